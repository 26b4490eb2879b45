"""The docker CLI choke point, against a fake `docker` executable (no engine needed)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from dockerrepl import _docker
from dockerrepl._labels import owner_label, process_start_time
from dockerrepl._runspec import ContainerConfig
from dockerrepl.errors import (
    DockerCommandError,
    DockerDaemonError,
    DockerError,
    DockerNotFound,
    DockerPermissionError,
    DockerTimeout,
    NoSuchContainer,
    NoSuchImage,
)

pytestmark = pytest.mark.timeout(30)


def fake_docker(tmp_path, stderr: str = "", rc: int = 0, stdout: str = "", sleep: float = 0) -> str:
    path = tmp_path / "docker"
    path.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, time
        time.sleep({sleep})
        sys.stdout.write({stdout!r})
        sys.stderr.write({stderr!r})
        sys.exit({rc})
    """)
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize(
    ("stderr", "cls"),
    [
        (
            "Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
            " Is the docker daemon running?",
            DockerDaemonError,
        ),
        (
            "permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock",
            DockerPermissionError,
        ),
        (
            "Unable to find image 'nope:1' locally\n"
            "docker: Error response from daemon: pull access denied for nope",
            NoSuchImage,
        ),
        ("Error response from daemon: No such container: abc", NoSuchContainer),
        ("something else broke", DockerCommandError),
    ],
)
def test_stderr_maps_to_typed_errors(tmp_path, stderr, cls):
    docker = fake_docker(tmp_path, stderr=stderr, rc=1)
    with pytest.raises(cls) as info:
        _docker.run(["ps"], timeout=10, docker=docker)
    err = info.value
    assert isinstance(err, DockerError)
    assert err.returncode == 1
    if cls is not DockerCommandError and cls is not NoSuchContainer:
        assert err.hint  # every environment failure says what to do


def test_no_such_image_hint_points_to_offline_build(tmp_path):
    docker = fake_docker(
        tmp_path, stderr="Unable to find image 'x' locally\nmanifest unknown", rc=125
    )
    with pytest.raises(NoSuchImage) as info:
        _docker.run(["run", "x"], timeout=10, docker=docker)
    assert "scripts/build-image.sh" in info.value.hint


def test_timeout_is_mandatory_and_enforced(tmp_path):
    docker = fake_docker(tmp_path, sleep=5)
    with pytest.raises(DockerTimeout) as info:
        _docker.run(["ps"], timeout=0.5, docker=docker)
    assert isinstance(info.value, TimeoutError)
    with pytest.raises(ValueError):
        _docker.run(["ps"], timeout=0, docker=docker)


def test_missing_docker(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DockerNotFound) as info:
        _docker.run(["ps"], timeout=5)
    assert "install" in info.value.hint.lower()


def test_success_decodes_once_with_replacement(tmp_path):
    docker = fake_docker(tmp_path, stdout="ok \udcff")  # lone surrogate -> written as ? by the fake
    res = _docker.run(["ps"], timeout=10, docker=docker)
    assert res.returncode == 0
    assert res.stdout.startswith("ok ")


def test_redact_hides_env_values():
    shown = _docker.redact(["docker", "run", "-e", "OPENAI_API_KEY=sk-secret", "--env=A=b", "img"])
    assert "sk-secret" not in shown and "=b" not in shown
    assert "OPENAI_API_KEY=***" in shown


def test_run_argv_hardened_defaults(tmp_path):
    cfg = ContainerConfig(image="img", workspace=str(tmp_path), labels={"dockerrepl.version": "1"})
    argv = cfg.run_argv("name", "python3", "L")
    joined = " ".join(argv)
    for part in (
        "--cap-drop ALL",
        "--security-opt no-new-privileges",
        "--pids-limit",
        "--memory 2g",
        "--memory-swap 2g",
        "--cpus 1",
        "--rm",
        "-i",
        "--sig-proxy=false",
        "host.docker.internal:host-gateway",
    ):
        assert part in joined
    # the supervisor is pid 1: an init process would hold the host channel where cell
    # code can open it (/proc/1/fd/1)
    assert "--init" not in argv
    assert argv[-4:-1] == ["img", "-B", "-c"]
    assert argv[-1] == "L"  # the launcher (the loader's text; the code follows on stdin)
    assert "-e" not in argv and "--env" not in argv  # no host environment, ever
    none = ContainerConfig(
        image="img", workspace=str(tmp_path), network="none", user="65534:65534", read_only=True
    ).run_argv("n", "python", "L")
    assert "--network" in none and none[none.index("--network") + 1] == "none"
    assert "host.docker.internal:host-gateway" not in none
    assert "--read-only" in none and "65534:65534" in none
    with pytest.raises(ValueError):
        ContainerConfig(image="i", workspace="/w", network="host").run_argv("n", "python3", "L")


def test_owner_label_uses_proc_start_time():
    host, pid, start = owner_label().split(":")
    assert int(pid) == os.getpid()
    assert start == process_start_time(os.getpid()) != "0"


# --------------------------------------------------------------------------- every mapped error
@pytest.mark.parametrize(
    "stderr",
    [
        "Unable to find image 'x:1' locally\nError response from daemon: manifest unknown",
        "Error response from daemon: pull access denied for x, repository does not exist",
        'Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: '
        "lookup registry-1.docker.io on 10.0.0.1:53: no such host",
        'Error response from daemon: failed to resolve reference "docker.io/library/x:1"',
        "Error: No such image: x:1",
    ],
)
def test_image_not_found_and_not_pullable_variants(tmp_path, stderr):
    docker = fake_docker(tmp_path, stderr=stderr, rc=125)
    with pytest.raises(NoSuchImage) as info:
        _docker.run(["run", "x:1"], timeout=10, docker=docker)
    assert "scripts/build-image.sh" in info.value.hint
    assert info.value.returncode == 125
    assert info.value.stderr == stderr.strip()  # the CLI's own words kept for the user


def test_hints_say_what_to_do(tmp_path):
    cases = {
        DockerDaemonError: "Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
        " Is the docker daemon running?",
        DockerPermissionError: "Got permission denied while trying to connect to the Docker daemon"
        " socket at unix:///var/run/docker.sock: dial unix /var/run/docker.sock: connect:"
        " permission denied",
    }
    hints = {}
    for i, (cls, stderr) in enumerate(cases.items()):
        d = tmp_path / str(i)
        d.mkdir()
        with pytest.raises(cls) as info:
            _docker.run(["info"], timeout=10, docker=fake_docker(d, stderr=stderr, rc=1))
        hints[cls] = info.value.hint
        assert info.value.hint in str(info.value)
    assert "docker" in hints[DockerPermissionError] and "group" in hints[DockerPermissionError]
    assert "dockerd" in hints[DockerDaemonError] or "start" in hints[DockerDaemonError]


def test_docker_path_not_executable(tmp_path):
    path = tmp_path / "docker"
    path.write_text("#!/bin/sh\nexit 0\n")  # no x bit
    with pytest.raises(DockerNotFound):
        _docker.run(["ps"], timeout=5, docker=str(path))
    with pytest.raises(DockerNotFound):
        _docker.run(["ps"], timeout=5, docker=str(tmp_path / "absent" / "docker"))
    with pytest.raises(DockerNotFound):
        _docker.spawn(["run", "-i", "x"], docker=str(tmp_path / "absent" / "docker"))


def hanging_docker(tmp_path) -> tuple[str, Path]:
    """A fake docker that says "started", then hangs; and the file that gets its pid."""
    pidfile = tmp_path / "pid"
    path = tmp_path / "docker"
    path.write_text(
        f"#!{sys.executable}\nimport os, time\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "print('started', flush=True)\ntime.sleep(60)\n"
    )
    path.chmod(0o755)
    return str(path), pidfile


def test_timeout_kills_the_process(tmp_path):
    docker, pidfile = hanging_docker(tmp_path)
    with pytest.raises(DockerTimeout) as info:
        _docker.run(["pull", "x"], timeout=1, docker=docker)
    assert info.value.hint
    pid = int(pidfile.read_text())
    # subprocess.run killed and reaped it: the pid is no longer ours
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_check_false_returns_the_failure(tmp_path):
    docker = fake_docker(tmp_path, stderr="Error: No such container: c1", rc=1, stdout="partial")
    res = _docker.run(["rm", "-f", "c1"], timeout=10, docker=docker, check=False)
    assert res.returncode == 1
    assert res.stdout == "partial"
    assert "No such container" in res.stderr
    assert res.argv[1:] == ("rm", "-f", "c1")


def test_run_passes_input_and_argv_without_a_shell(tmp_path):
    path = tmp_path / "docker"
    path.write_text(
        f"#!{sys.executable}\nimport sys, json\n"
        "print(json.dumps({'argv': sys.argv[1:], 'stdin': sys.stdin.read()}))\n"
    )
    path.chmod(0o755)
    tricky = ["run", "--name", "a b; rm -rf /", "$(echo no)"]
    res = _docker.run(tricky, timeout=10, docker=str(path), input=b"fed in")
    assert json.loads(res.stdout) == {"argv": tricky, "stdin": "fed in"}


def test_spawn_gives_binary_pipes(tmp_path):
    path = tmp_path / "docker"
    path.write_text(
        f"#!{sys.executable}\nimport sys\n"
        "data = sys.stdin.buffer.read()\nsys.stdout.buffer.write(data[::-1])\n"
    )
    path.chmod(0o755)
    proc = _docker.spawn(["run", "-i", "img"], docker=str(path))
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"\x00\x01frame\xff")
        proc.close_stdin()
        out = proc.stdout.read()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.close()
    assert out == b"\xff" + b"emarf" + b"\x01\x00"
    assert proc.stdin is None and proc.stdout is None


def test_the_spawned_process_handle_waits_with_a_timeout_and_kills(tmp_path):
    path = tmp_path / "docker"
    path.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    path.chmod(0o755)
    proc = _docker.spawn(["run", "-i", "img"], docker=str(path))
    try:
        assert proc.poll() is None
        assert proc.wait(0.2) is None  # still running: None, not an exception
        proc.kill()
        assert proc.wait(10) == -9
        proc.kill()  # already gone: nothing happens
    finally:
        proc.close()
        proc.close()  # idempotent


def test_stream_hands_over_each_line_as_it_comes(tmp_path):
    path = tmp_path / "docker"
    path.write_text(
        f"#!{sys.executable}\nimport sys, time\n"
        "print('layer 1: pulling', flush=True)\n"
        "time.sleep(0.2)\n"
        "sys.stdout.buffer.write(b'layer 2: done\\nno newline \\xff')\n"
        "sys.stderr.write('warning: slow')\n"
        "sys.exit(3)\n"
    )
    path.chmod(0o755)
    lines: list[str] = []
    res = _docker.stream(
        ["pull", "img"], timeout=10, on_line=lines.append, docker=str(path), check=False
    )
    assert lines == ["layer 1: pulling", "layer 2: done", "no newline \ufffd"]
    assert res.returncode == 3
    assert res.stderr == "warning: slow"
    assert res.stdout.startswith("layer 1: pulling\n")
    with pytest.raises(DockerCommandError):
        _docker.stream(["pull", "img"], timeout=10, on_line=lines.append, docker=str(path))


def test_stream_timeout_kills_the_process(tmp_path):
    docker, pidfile = hanging_docker(tmp_path)
    lines: list[str] = []
    with pytest.raises(DockerTimeout):
        _docker.stream(["pull", "x"], timeout=1, on_line=lines.append, docker=docker)
    assert lines == ["started"]
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)  # killed and reaped
    with pytest.raises(ValueError):
        _docker.stream(["pull", "x"], timeout=0, on_line=lines.append, docker=docker)


# --------------------------------------------------------------------------- through the public API
@pytest.fixture
def short_ws():
    """A workspace parent with a short path: with network="none" the proxy's unix
    socket lives inside it, and AF_UNIX paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="drw-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def script_docker(tmp_path, run_stderr: str, other_stderr: str = "", other_rc: int = 0) -> str:
    """A fake docker whose `run` fails like the engine does; other commands as given."""
    path = tmp_path / "docker"
    path.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        if sys.argv[1] == "run":
            sys.stderr.write({run_stderr!r})
            sys.exit(125)
        sys.stderr.write({other_stderr!r})
        print("[]")
        sys.exit({other_rc})
    """)
    )
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("run_stderr", "cls"),
    [
        (
            "Unable to find image 'nope:1' locally\ndocker: Error response from daemon: pull"
            " access denied for nope, repository does not exist or may require 'docker login'.\n",
            NoSuchImage,
        ),
        (
            "docker: Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
            " Is the docker daemon running?\n",
            DockerDaemonError,
        ),
        (
            "docker: permission denied while trying to connect to the Docker daemon socket at"
            " unix:///var/run/docker.sock\n",
            DockerPermissionError,
        ),
    ],
)
def test_repl_start_failures_are_typed_and_leave_nothing(tmp_path, short_ws, run_stderr, cls):
    from dockerrepl import DockerREPL

    ws = short_ws
    docker = script_docker(tmp_path, run_stderr)
    with pytest.raises(cls) as info:
        DockerREPL(image="nope:1", docker=docker, network="none", workspace_dir=str(ws))
    assert info.value.hint
    if cls is NoSuchImage:
        assert "scripts/build-image.sh" in info.value.hint
        assert "nope:1" in str(info.value)
    assert list(ws.iterdir()) == []  # the half-started REPL removed its temp dir


def test_repl_daemon_down_on_the_bridge_network(tmp_path):
    from dockerrepl import DockerREPL

    ws = tmp_path / "ws"
    ws.mkdir()
    down = "Cannot connect to the Docker daemon at unix:///x.sock. Is the docker daemon running?"
    docker = script_docker(tmp_path, down, other_stderr=down, other_rc=1)
    with pytest.raises(DockerDaemonError):
        DockerREPL(image="img", docker=docker, workspace_dir=str(ws))
    assert list(ws.iterdir()) == []


def test_repl_without_docker(tmp_path, short_ws):
    from dockerrepl import DockerREPL

    ws = short_ws
    with pytest.raises(DockerNotFound) as info:
        DockerREPL(
            image="img", docker=str(tmp_path / "no-docker"), network="none", workspace_dir=str(ws)
        )
    assert "install" in info.value.hint.lower()
    assert list(ws.iterdir()) == []


def test_classify_error_names_the_cause_not_the_cli_footer():
    # `docker run` ends its stderr with a help footer; the message must carry the cause
    stderr = (
        "docker: Cannot connect to the Docker daemon at unix:///tmp/x.sock."
        " Is the docker daemon running?.\n"
        "See 'docker run --help'.\n"
    )
    err = _docker.classify_error(stderr, 125, ["docker", "run", "-i"])
    assert isinstance(err, DockerDaemonError)
    assert "Cannot connect to the Docker daemon" in str(err)
    assert "--help" not in err.message


@pytest.mark.parametrize("user_value", [None, "3"])
def test_the_relay_cli_runs_with_one_go_thread_unless_the_user_set_one(
    tmp_path, short_ws, monkeypatch, user_value
):
    """The long-lived `docker run -i` gets GOMAXPROCS=1 (its Go threads spun for work
    after every frame: docs/benchmarks.md); a GOMAXPROCS the user set is kept, and
    this process's environment is not changed."""
    from dockerrepl import DockerREPL

    if user_value is None:
        monkeypatch.delenv("GOMAXPROCS", raising=False)
    else:
        monkeypatch.setenv("GOMAXPROCS", user_value)
    monkeypatch.setenv("DOCKERREPL_TEST_MARK", "kept")
    seen = tmp_path / "seen.json"
    path = tmp_path / "docker"
    path.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        if sys.argv[1] == "run":
            keys = ("GOMAXPROCS", "DOCKERREPL_TEST_MARK")
            with open({str(seen)!r}, "w") as f:
                json.dump({{k: os.environ.get(k) for k in keys}}, f)
            sys.stderr.write("docker: Error response from daemon: no.\\n")
            sys.exit(125)
        print("[]")
    """)
    )
    path.chmod(0o755)
    with pytest.raises(DockerError):
        DockerREPL(image="img", docker=str(path), network="none", workspace_dir=str(short_ws))
    got = json.loads(seen.read_text())
    assert got == {"GOMAXPROCS": user_value or "1", "DOCKERREPL_TEST_MARK": "kept"}
    assert os.environ.get("GOMAXPROCS") == user_value
