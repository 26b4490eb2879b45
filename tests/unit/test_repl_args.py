"""DockerREPL's arguments are checked before anything starts (no engine needed).

The docker given is a fake that records every call and fails: an argument that
slipped through would reach it (and fail with DockerCommandError instead of the
typed error asserted here). For every bad argument the fake must not have been
called at all, and the workspace directory stays empty.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

from dockerrepl import AsyncDockerREPL, DockerREPL, DockerREPLPool
from dockerrepl.repl import MAX_TIMEOUT

pytestmark = pytest.mark.timeout(30)


def recording_docker(tmp_path: Path) -> tuple[str, Path]:
    """A fake `docker` that appends its argv (one line per call) to a log and exits 1."""
    log = tmp_path / "docker-calls.log"
    path = tmp_path / "docker"
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:]) + '\\n')\n"
        "sys.stderr.write('fake docker: nothing runs here\\n')\n"
        "sys.exit(1)\n"
    )
    path.chmod(0o755)
    return str(path), log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


class _Unserialisable:
    pass


_circular: list[object] = []
_circular.append(_circular)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"timeout": True}, TypeError),
        ({"timeout": False}, TypeError),
        ({"timeout": "5"}, TypeError),
        ({"timeout": math.nan}, ValueError),
        ({"timeout": 0}, ValueError),
        ({"timeout": -1.0}, ValueError),
        ({"timeout": -math.inf}, ValueError),
        ({"timeout": MAX_TIMEOUT * 10}, ValueError),
        ({"pids_limit": 0}, ValueError),
        ({"pids_limit": -1}, ValueError),
        ({"pids_limit": True}, TypeError),
        ({"pids_limit": 1.5}, TypeError),
        ({"cpus": 0}, ValueError),
        ({"cpus": 0.001}, ValueError),  # docker's range starts at 0.01
        ({"cpus": -1}, ValueError),
        ({"cpus": math.inf}, ValueError),
        ({"cpus": math.nan}, ValueError),
        ({"cpus": "1"}, TypeError),
        ({"cpus": True}, TypeError),
        ({"memory": "lots"}, ValueError),  # issue #10: it surfaced docker's usage text
        ({"memory": ""}, ValueError),
        ({"memory": "1e3g"}, ValueError),
        ({"memory": "-1g"}, ValueError),
        ({"memory": "0"}, ValueError),
        ({"memory": "2 gigs"}, ValueError),
        ({"memory": "5m"}, ValueError),  # below docker's 6 MB minimum
        ({"memory": 1.5}, TypeError),
        ({"memory": True}, TypeError),
        ({"memory": ["2g"]}, TypeError),
        ({"user": ""}, ValueError),
        ({"user": "a b"}, ValueError),
        ({"user": "1:2:3"}, ValueError),
        ({"user": "-1"}, ValueError),
        ({"user": 3.5}, TypeError),
        ({"network": "host"}, ValueError),
        ({"network": None}, TypeError),
        ({"read_only": "no"}, TypeError),  # truthy: it would have made / read-only
        ({"verify_security": "no"}, TypeError),
        ({"verify_security": None}, TypeError),
        ({"runtime": ""}, ValueError),
        ({"runtime": "run sc"}, ValueError),
        ({"runtime": 5}, TypeError),
        ({"docker": ""}, ValueError),
        ({"docker": 5}, TypeError),
        ({"workspace_dir": 5}, TypeError),
        ({"workspace_dir": b"/tmp"}, TypeError),
        ({"context_payload": {1, 2}}, TypeError),  # issue #10: raised after a start
        ({"context_payload": {"a": _Unserialisable()}}, TypeError),
        ({"context_payload": [{"k": b"bytes"}]}, TypeError),
        ({"context_payload": _circular}, TypeError),
        ({"context_payload": 5}, TypeError),
        ({"setup_code": 42}, TypeError),
        ({"setup_code": b"import os"}, TypeError),
        ({"max_llm_calls": -1}, ValueError),
        ({"max_llm_calls": "5"}, TypeError),
        ({"max_llm_tokens": 1.5}, TypeError),
        ({"auto_checkpoint": 1}, ValueError),
        ({"auto_checkpoint": "SYNC"}, ValueError),
        ({"auto_checkpoint": None}, ValueError),
        ({"persistent": "yes"}, TypeError),
        ({"compaction": None}, TypeError),
        ({"depth": -1}, ValueError),
        ({"depth": "1"}, TypeError),
        ({"max_concurrent_subcalls": 0}, ValueError),
        ({"subcall_fn": "f"}, TypeError),
        ({"custom_tools": [("a", 1)]}, TypeError),
        ({"custom_tools": {"not an identifier": 1}}, ValueError),
        ({"custom_sub_tools": "x"}, TypeError),
        ({"image": "Python:3.11"}, ValueError),  # docker: repository name must be lowercase
        ({"image": "python:3.11 slim"}, ValueError),
        ({"image": "python@sha256:zz"}, ValueError),
        ({"image": "python:"}, ValueError),
        ({"image": 3}, TypeError),
        ({"image": b"python:3.11"}, TypeError),
        ({"image": "--privileged"}, ValueError),
        ({"max_output_bytes": 0}, ValueError),
        ({"max_output_bytes": -5}, ValueError),
        ({"repr_cap": 0}, ValueError),
        ({"grace": -0.1}, ValueError),
        ({"grace": math.nan}, ValueError),
        ({"start_timeout": 0}, ValueError),
        ({"start_timeout": -1}, ValueError),
        ({"start_timeout": math.inf}, ValueError),
        ({"start_timeout": None}, ValueError),
        ({"lm_handler_address": ("x",)}, ValueError),
        ({"lm_handler_address": "127.0.0.1:80"}, TypeError),
        ({"lm_handler_address": ("127.0.0.1", "80")}, TypeError),
        ({"lm_handler_address": ("127.0.0.1", 0)}, ValueError),
        ({"lm_handler_address": ("127.0.0.1", 70000)}, ValueError),
        ({"lm_handler_address": (None, 80)}, TypeError),
        ({"extra_args": "--hostname x"}, TypeError),  # a str, not a list of them
        ({"extra_args": ["--hostname", 5]}, TypeError),
        ({"extra_args": None}, TypeError),
        ({"extra_args": ["-t"]}, ValueError),  # a tty corrupts the framed channel
        ({"extra_args": ["-it"]}, ValueError),
        ({"extra_args": ["--init"]}, ValueError),
        ({"extra_args": ["--detach"]}, ValueError),
        ({"extra_args": ["--entrypoint=sh"]}, ValueError),
        ({"extra_args": ["-e", "OPENAI_API_KEY"]}, ValueError),  # the host's value
        ({"extra_args": ["--env=A=b"]}, ValueError),
        ({"extra_args": ["--env-file", "/etc/environment"]}, ValueError),
        ({"extra_args": ["--memory", "8g"]}, ValueError),  # memory= is the way
        ({"extra_args": ["--network=host"]}, ValueError),
        ({"extra_args": ["-u", "0"]}, ValueError),
        ({"extra_args": ["--privileged"]}, ValueError),
        ({"extra_args": ["--cap-add", "SYS_PTRACE"]}, ValueError),
        ({"extra_args": ["--security-opt=seccomp=unconfined"]}, ValueError),
        ({"extra_args": ["--pid=host"]}, ValueError),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, kwargs, exc):
    docker, log = recording_docker(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    args = {"image": "img", "docker": docker, "workspace_dir": str(ws)}
    with pytest.raises(exc) as info:
        DockerREPL(**{**args, **kwargs})
    assert calls(log) == [], "a docker command ran before the argument was refused"
    assert list(ws.iterdir()) == []
    (name,) = kwargs  # the message names the option ("custom tool 'x'" for custom_tools)
    assert name in str(info.value) or name.replace("_", " ").rstrip("s") in str(info.value)
    with pytest.raises(exc):
        DockerREPLPool(size=1, **{**args, **kwargs})
    assert calls(log) == [], "a docker command ran before the pool refused the argument"
    assert list(ws.iterdir()) == []
    with pytest.raises(exc) as async_info:  # the same error, from the same check
        AsyncDockerREPL(**{**args, **kwargs})
    assert str(async_info.value) == str(info.value)
    assert calls(log) == [], "a docker command ran before AsyncDockerREPL refused the argument"
    assert list(ws.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "argv"),
    [
        ({}, ["--cpus", "1", "--memory", "2g"]),  # the defaults
        ({"cpus": 0.5, "memory": "512MiB"}, ["--cpus", "0.5", "--memory", "512MiB"]),
        ({"cpus": 0.1 + 0.2}, ["--cpus", "0.3"]),  # not 0.30000000000000004 (too precise)
        ({"cpus": None, "memory": None}, []),
        ({"user": 65534}, ["--user", "65534"]),
        ({"memory": 1 << 30}, ["--memory", "1073741824"]),
        ({"memory": " 1g "}, ["--memory", "1g"]),
    ],
)
def test_good_arguments_reach_docker_run(tmp_path, kwargs, argv):
    """The positive control: the same fake is called once the arguments are good."""
    from dockerrepl.errors import DockerReplError

    docker, log = recording_docker(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(DockerReplError):
        DockerREPL(image="img", docker=docker, network="none", workspace_dir=str(ws), **kwargs)
    runs = [c.split() for c in calls(log) if c.startswith("run ")]
    assert runs, calls(log)
    run = runs[0]
    for flag, value in zip(argv[::2], argv[1::2]):
        assert run[run.index(flag) + 1] == value
    if kwargs.get("cpus", 1) is None:
        assert "--cpus" not in run and "--memory" not in run
    assert list(ws.iterdir()) == []


def test_a_missing_workspace_dir_is_named(tmp_path):
    missing = tmp_path / "not-there"
    with pytest.raises(FileNotFoundError) as info:
        DockerREPL(image="img", docker=str(tmp_path / "no-docker"), workspace_dir=str(missing))
    assert "workspace_dir" in str(info.value)
    afile = tmp_path / "a-file"
    afile.write_text("")
    with pytest.raises(FileNotFoundError):
        DockerREPL(image="img", docker=str(tmp_path / "no-docker"), workspace_dir=str(afile))


@pytest.mark.parametrize("value", ["-v/:/host", "Not An Image"])
def test_image_from_the_environment_is_checked_too(tmp_path, monkeypatch, value):
    docker, log = recording_docker(tmp_path)
    monkeypatch.setenv("DOCKERREPL_IMAGE", value)
    with pytest.raises(ValueError, match="DOCKERREPL_IMAGE"):
        DockerREPL(docker=docker, workspace_dir=str(tmp_path))
    assert calls(log) == []


@pytest.mark.parametrize(
    "image",
    [
        "python:3.11-slim",
        "dockerrepl/python:3.11-bookworm",
        "localhost:5000/team/py:latest",
        "registry.example.com/a/b_c/d--e:v1.2_3",
        "python@sha256:" + "a" * 64,
        "python:3.11@sha256:" + "0" * 64,
        "sha256:" + "f" * 64,
        "f1177216ad8b",
    ],
)
def test_image_references_docker_accepts_pass(image):
    from dockerrepl._options import check_image

    assert check_image("image", image) == image


def test_a_workspace_dir_that_cannot_be_written_is_named(tmp_path):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="workspace_dir"):
            DockerREPL(image="img", docker=str(tmp_path / "no-docker"), workspace_dir=str(ro))
        return
    # root may write anywhere: check as another user (a forked child), in a directory
    # that user may enter
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="ro-workspace-")
    try:
        os.chmod(base, 0o755)
        ro = os.path.join(base, "ro")
        os.mkdir(ro, 0o500)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            said = b"no error"
            try:
                os.setgid(65534)
                os.setuid(65534)
                DockerREPL(image="img", docker="/nonexistent/docker", workspace_dir=ro)
            except PermissionError as e:
                said = f"PermissionError {e}".encode()
            except BaseException as e:
                said = f"{type(e).__name__} {e}".encode()
            os.write(w, said)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            said = f.read().decode()
        os.waitpid(pid, 0)
        assert said.startswith("PermissionError") and "workspace_dir" in said, said
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": None},
        {"timeout": math.inf},
        {"timeout": 5},
        {"pids_limit": None},
        {"max_output_bytes": 1e6},
        {"grace": 0},
        # rlm's environment contract, and arguments it passes that we do not know
        {"persistent": True, "depth": 2, "max_concurrent_subcalls": 8, "compaction": False},
        {"some_future_rlm_option": object()},
        {"extra_args": ["--hostname", "sandbox", "--label=team=a", "--device", "/dev/fuse"]},
        {"extra_args": ("--storage-opt", "size=2g")},
        # widening options are the caller's to take on, with the inspect check off
        {"extra_args": ["--cap-add", "SYS_PTRACE"], "verify_security": False},
    ],
)
def test_good_arguments_get_as_far_as_the_start(tmp_path, kwargs):
    from dockerrepl.errors import DockerNotFound

    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(DockerNotFound):
        DockerREPL(
            image="img",
            docker=str(tmp_path / "no-docker"),
            network="none",
            workspace_dir=str(ws),
            **kwargs,
        )
    assert list(ws.iterdir()) == []


def test_unknown_arguments_are_ignored_with_a_warning(tmp_path, caplog):
    """rlm's contract says accept and ignore; a misspelt option is named, not silent."""
    from dockerrepl.errors import DockerNotFound

    with pytest.raises(DockerNotFound):
        DockerREPL(image="img", docker=str(tmp_path / "no-docker"), memroy="1g")
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage() for r in warned] == [
        "DockerREPL ignores unknown arguments: memroy (did you mean 'memory'?)"
    ]


@pytest.mark.parametrize(
    ("names", "said"),
    [
        (["memroy"], "memroy (did you mean 'memory'?)"),
        (["time_out", "zzz"], "time_out (did you mean 'timeout'?), zzz"),
        (["some_future_rlm_option"], "some_future_rlm_option"),
        (["cpu", "read_onyl"], "cpu (did you mean 'cpus'?), read_onyl (did you mean 'read_only'?)"),
    ],
)
def test_an_unknown_argument_is_named_with_the_option_it_resembles(names, said):
    from dockerrepl._options import unknown_arguments

    assert unknown_arguments(names) == said


def test_a_misspelt_pool_argument_is_refused_with_a_suggestion():
    with pytest.raises(TypeError, match=r"memroy \(did you mean 'memory'\?\)"):
        DockerREPLPool(size=1, image="img", memroy="1g")


def test_the_options_object_has_every_default_of_the_signature():
    """One list of arguments: DockerREPL's signature, the options' DEFAULTS and the object."""
    import dataclasses
    import inspect

    from dockerrepl._options import DEFAULTS, ReplOptions

    params = {
        name: p.default
        for name, p in inspect.signature(DockerREPL.__init__).parameters.items()
        if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    assert params == dict(DEFAULTS)
    fields = {f.name for f in dataclasses.fields(ReplOptions)}
    # kept encoded; the engine's context (the argument) is docker_context in the object
    renamed = {"context_payload": "context", "context": "docker_context"}
    assert fields - {renamed.get(n, n) for n in params} == {"tools"}
    assert {renamed.get(n, n) for n in params} - fields == set()


def test_the_options_object_is_frozen_and_filled_in(monkeypatch):
    import dataclasses

    from dockerrepl._options import DEFAULT_CELL_TIMEOUT, DEFAULT_IMAGE, ReplOptions

    monkeypatch.delenv("DOCKERREPL_IMAGE", raising=False)
    opts = ReplOptions.build(memory=" 1g ", max_output_bytes=1e6, extra_args=["--hostname", "h"])
    assert opts.image == DEFAULT_IMAGE
    assert opts.timeout == DEFAULT_CELL_TIMEOUT
    assert opts.memory == "1g"
    assert opts.max_output_bytes == 1_000_000 and type(opts.max_output_bytes) is int
    assert opts.extra_args == ("--hostname", "h")
    assert opts.custom_sub_tools == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.memory = "2g"  # type: ignore[misc]
    assert ReplOptions.build(timeout=math.inf).timeout is None
    with pytest.raises(TypeError, match=r"junk, memroy \(did you mean 'memory'\?\)"):
        ReplOptions.build(memroy=2, junk=1)
