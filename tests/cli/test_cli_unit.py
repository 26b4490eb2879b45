"""The CLI's pure parts, without an engine: input completeness, display, exit codes, gc rules."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bootstrap_process import load_package

from dockerrepl import REPLResult
from dockerrepl._labels import owner_label, pid_namespace
from dockerrepl.cli.gc import looks_like_workspace, owner_status, stale_workspaces
from dockerrepl.cli.repl import is_complete
from dockerrepl.cli.run import exit_status
from dockerrepl.cli.sandbox import Output, _remainder, read_context

pytestmark = pytest.mark.timeout(30)
HOST = socket.gethostname()


@pytest.mark.parametrize(
    ("source", "complete"),
    [
        ("x = 1", True),
        ("if x:", False),
        ("if x:\n    pass", False),  # a block ends with an empty line
        ("if x:\n    pass\n", True),
        ("a = (1,", False),
        ("'''doc", False),
        ("@decorator", False),
        ("def f():\n    return 1\nprint(f())", True),  # a pasted block runs as a module
        ("1 +", True),  # a syntax error: the container reports it
        ("print(1) )", True),
    ],
)
def test_is_complete(source: str, complete: bool) -> None:
    assert is_complete(source) is complete


_NS = load_package("bootstrap_for_display").namespace


def _displayed(source: str) -> str:
    """What the bootstrap prints for a cell run with ``display=True``."""
    out = io.StringIO()
    old_out, old_hook = sys.stdout, sys.displayhook
    sys.stdout = out
    sys.displayhook = sys.__displayhook__
    ns: dict[str, object] = {}
    try:
        for part in _NS._compile(source, "<stdin>", True):
            exec(part, ns)
    finally:
        sys.stdout, sys.displayhook = old_out, old_hook
    return out.getvalue()


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("1 + 1", "2\n"),
        ("x = 5\nx", "5\n"),
        ("a = 1; a  # comment", "1\n"),
        ("1, 2", "(1, 2)\n"),
        ("*[1], 2", "(1, 2)\n"),
        ("(1,\n 2)", "(1, 2)\n"),
        ("'é' * 2", "'éé'\n"),
        ("x = 3", ""),
        ("print('p')", "p\n"),  # None is not shown
        ("def f():\n    return 7\n\nf()", "7\n"),
        ("for i in range(2):\n    i\n", ""),  # only a trailing top-level expression
    ],
)
def test_display_shows_a_trailing_expression(source: str, shown: str) -> None:
    assert _displayed(source) == shown


def test_display_keeps_every_line_number() -> None:
    """A one-line expression's error is on line 1 of <stdin>, as at Python's prompt
    (the old source rewrite put it on line 2)."""
    parts = _NS._compile("x = 1\n1/x\n1/0", "<stdin>", True)
    ns: dict[str, object] = {}
    exec(parts[0], ns)
    with pytest.raises(ZeroDivisionError) as info:
        exec(parts[1], ns)
    assert info.traceback[-1].lineno + 1 == 3  # pytest counts from 0
    assert info.traceback[-1].frame.code.raw.co_filename == "<stdin>"
    with pytest.raises(SyntaxError):
        _NS._compile("def f(:", "<stdin>", True)  # reported as typed


@pytest.mark.parametrize(
    ("status", "exception", "stderr", "code"),
    [
        ("ok", None, "", 0),
        ("error", "ZeroDivisionError", "Traceback...", 1),
        ("error", "SystemExit", "SystemExit: 3\n", 3),
        ("error", "SystemExit", "SystemExit: \n", 0),
        ("error", "SystemExit", "SystemExit: bye\n", 1),
        ("timeout", "KeyboardInterrupt", "", 124),
        ("interrupted", "KeyboardInterrupt", "", 130),
        ("oom", None, "", 137),
        ("crashed", None, "", 1),
    ],
)
def test_exit_status(status: str, exception: str | None, stderr: str, code: int) -> None:
    res = REPLResult("", stderr, {}, status=status, exception=exception)
    assert exit_status(res) == code


def test_output_prints_only_what_was_not_streamed() -> None:
    out, err = io.StringIO(), io.StringIO()
    o = Output(out, err)
    o("stdout", "a\n")
    o("stderr", "boom\n")
    o.finish(REPLResult("a\n", "note from the host\nboom\n", {}))
    assert out.getvalue() == "a\n"
    assert err.getvalue() == "boom\nnote from the host\n"
    assert _remainder("xyz", "") == "xyz"
    assert _remainder("head...tail", "something else") == ""  # capped: all was shown live


def test_read_context(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"k": [1]}')
    (tmp_path / "n.json").write_text("3")
    (tmp_path / "t.txt").write_text('{"k": 1}')
    assert read_context(str(tmp_path / "a.json")) == {"k": [1]}
    assert read_context(str(tmp_path / "n.json")) == "3"  # not a dict/list/str: the text
    assert read_context(str(tmp_path / "t.txt")) == '{"k": 1}'


def test_owner_status() -> None:
    assert owner_status(owner_label(), HOST)[0] == "live"
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert owner_status(f"{HOST}:{p.pid}:1", HOST)[0] == "dead"
    assert owner_status(f"{HOST}:{os.getpid()}:1", HOST)[0] == "dead"  # pid reused
    assert owner_status(f"{HOST}:{os.getpid()}:0", HOST)[0] == "live"  # start unknown: keep
    assert owner_status("elsewhere:1:1", HOST)[0] == "foreign"
    assert owner_status("", HOST)[0] == "unknown"
    assert owner_status("garbage", HOST)[0] == "unknown"
    assert owner_status(f"{HOST}:0:1", HOST)[0] == "dead"  # pid 0 is never an owner
    # the owner's PID namespace: another one's pids cannot be judged here
    dead = f"{HOST}:{p.pid}:1"
    assert owner_status(dead, HOST, pidns="1", my_pidns="2") == (
        "foreign",
        "owned by a process in another PID namespace (pid:[1])",
    )
    assert owner_status(dead, HOST, pidns="2", my_pidns="2")[0] == "dead"
    assert owner_status(dead, HOST, pidns="", my_pidns="2")[0] == "dead"  # an older container
    assert pid_namespace().isdigit()
    assert pid_namespace(os.getpid()) == pid_namespace()


def _ws(parent: Path, name: str, age: float = 3600) -> Path:
    root = parent / f"dockerrepl-{name}"
    (root / "workspace" / ".dockerrepl").mkdir(parents=True)
    t = time.time() - age
    for p in (root / "workspace" / ".dockerrepl", root / "workspace", root):
        os.utime(p, (t, t))
    return root


def test_looks_like_workspace(tmp_path: Path) -> None:
    good = _ws(tmp_path, "good")
    assert looks_like_workspace(str(good))
    bare = tmp_path / "dockerrepl-bare"
    bare.mkdir()
    assert not looks_like_workspace(str(bare))
    other = tmp_path / "other"
    (other / "workspace" / ".dockerrepl").mkdir(parents=True)
    assert not looks_like_workspace(str(other))  # not named dockerrepl-*
    link = tmp_path / "dockerrepl-link"
    link.symlink_to(good)
    assert not looks_like_workspace(str(link))
    assert not looks_like_workspace("dockerrepl-relative")
    # the host dir of a channel transport's volume workspace: the CLI's log only
    channel = tmp_path / "dockerrepl-channel"
    channel.mkdir()
    (channel / "docker-run.log").write_text("")
    assert looks_like_workspace(str(channel))
    (channel / "other").write_text("")
    assert not looks_like_workspace(str(channel))  # something else is in it: not ours


def test_stale_workspaces_rules(tmp_path: Path) -> None:
    stale = _ws(tmp_path, "stale")
    young = _ws(tmp_path, "young", age=0)
    claimed = _ws(tmp_path, "claimed")
    busy = _ws(tmp_path, "busy")
    released = _ws(tmp_path, "released", age=0)
    elsewhere = _ws(tmp_path / "elsewhere", "orphan", age=0)  # not in a scanned dir
    with open(busy / "workspace" / "open.txt", "w"):
        gone, kept = stale_workspaces(
            [str(tmp_path)], {str(claimed)}, 300, released=[str(released), str(elsewhere)]
        )
    assert sorted(p for p, _ in gone) == sorted(str(p) for p in (stale, released, elsewhere))
    assert sorted(p for p, _ in kept) == sorted(str(p) for p in (young, claimed, busy))


# --------------------------------------------------------------------------- gc loads little
_GC_MODULES = """
import json, sys
from dockerrepl.cli import main
rc = main(["gc", "--dry-run", "--docker", sys.argv[1], "--workspace-dir", sys.argv[2]])
print(json.dumps({"rc": rc, "modules": sorted(m for m in sys.modules if "dockerrepl" in m)}))
"""


def test_gc_does_not_load_the_repl_the_proxy_or_the_lm_handler(tmp_path: Path) -> None:
    # gc reads labels and removes what dead owners left: it needs neither the REPL nor
    # the proxy nor the LM Handler (nor their threads, sockets and dill)
    fake = tmp_path / "docker"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(0)\n")  # `docker ps`: nothing
    fake.chmod(0o755)
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", _GC_MODULES, str(fake), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": root, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["rc"] == 0
    loaded = set(report["modules"])
    assert "dockerrepl.cli.gc" in loaded  # the command ran
    for heavy in ("dockerrepl.repl", "dockerrepl._proxy", "dockerrepl.lm_handler", "dill"):
        assert not any(m == heavy or m.startswith(heavy + ".") for m in loaded), heavy
    assert not any(m.startswith("dockerrepl._session") for m in loaded)


# --------------------------------------------------------------------------- doctor's suggestions
_FAKE_IMAGES = """#!{python}
import json, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[0] == "images":
    print("\\n".join({names!r}))
    sys.exit(0)
image = args[args.index("--entrypoint") + 2]
answer = {answers!r}.get(image)
if answer is None:
    sys.stderr.write("exec: executable file not found in $PATH")
    sys.exit(127)
print(answer)
"""


def test_doctor_suggests_only_local_images_that_run_python_3_8(tmp_path: Path) -> None:
    from dockerrepl.cli import doctor

    names = [
        "old/python:2.7",  # Python too old
        "none/python-less:1",  # no interpreter at all
        "good/python:3.11",
        "later/python:3.12",  # would work, but past the probe bound
        "other/ubuntu:22.04",  # not a candidate
        "dangling/python:<none>",
    ]
    answers = {
        "old/python:2.7": "2.7.18",
        "good/python:3.11": "3.11.9",
        "later/python:3.12": "3.12.1",
    }
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "docker"
    fake.write_text(
        _FAKE_IMAGES.format(python=sys.executable, log=str(log), names=names, answers=answers)
    )
    fake.chmod(0o755)
    assert doctor._local_python_images(str(fake)) == ["good/python:3.11"]
    runs = [json.loads(line) for line in log.read_text().splitlines() if '"run"' in line]
    probed = {a[a.index("--entrypoint") + 2] for a in runs}
    assert probed == {"old/python:2.7", "none/python-less:1", "good/python:3.11"}
    assert len(probed) <= doctor.MAX_PROBED
    assert all("--pull" in a and a[a.index("--pull") + 1] == "never" for a in runs)


# --------------------------------------------------------------------------- engine options
def _fake_docker(tmp_path: Path) -> Path:
    """A docker that logs its argv and lists no containers."""
    fake = tmp_path / "docker"
    fake.write_text(
        f'#!/bin/sh\nprintf "%s " "$@" >> {tmp_path / "argv"}\necho >> {tmp_path / "argv"}\n'
    )
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        (["--docker-host", "tcp://10.1.2.3:2375"], "--host tcp://10.1.2.3:2375 ps -a"),
        (["--context", "other"], "--context other ps -a"),
        (["--docker-context", "other"], "--context other ps -a"),
    ],
)
def test_gc_sweeps_the_engine_it_is_pointed_at(tmp_path: Path, flags: list[str], want: str) -> None:
    from dockerrepl.cli import main

    fake = _fake_docker(tmp_path)
    rc = main(["gc", "--dry-run", "--docker", str(fake), *flags])
    assert rc == 0
    calls = (tmp_path / "argv").read_text().splitlines()
    assert calls and all(c.startswith(want.rsplit(" ps", 1)[0] + " ") for c in calls)
    assert calls[0].startswith(want)


@pytest.mark.parametrize(
    "flags",
    [
        ["--docker-host", "/var/run/docker.sock"],
        ["--context=-x"],
        ["--docker-host", "tcp://h:1", "--context", "c"],
    ],
)
def test_bad_engine_options_are_usage_errors(
    tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from dockerrepl.cli import main

    assert main(["gc", "--dry-run", "--docker", str(_fake_docker(tmp_path)), *flags]) == 2
    assert "dockerrepl: error:" in capsys.readouterr().err
    assert not (tmp_path / "argv").exists()  # no docker command ran


def test_run_and_repl_take_the_engine_options() -> None:
    from dockerrepl.cli import build_parser
    from dockerrepl.cli.options import engine_from

    for cmd in ("run", "repl", "doctor"):
        extra = ["-c", "1"] if cmd == "run" else []
        args = build_parser().parse_args(
            [cmd, "--docker", "podman", "--docker-host", "unix:///x", *extra]
        )
        args.docker_context = getattr(args, "docker_context", None)
        engine = engine_from(args)
        assert (engine.binary, engine.host, engine.context) == ("podman", "unix:///x", None)
    # run's --context is still the context FILE; the engine's is --docker-context
    args = build_parser().parse_args(
        ["run", "--context", "f.json", "--docker-context", "c1", "-c", "1"]
    )
    assert (args.context, args.docker_context) == ("f.json", "c1")
