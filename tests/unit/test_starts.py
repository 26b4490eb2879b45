"""Bounded, retried container starts (dockerrepl._starts), against a fake `docker`.

The fake fails its first N `docker run`s with the stderr a test gives, then runs
the real bootstrap under the host's Python (as tests/bootstrap_process.py does), so
a start that succeeds is a real handshake. No engine is needed.
"""

from __future__ import annotations

import stat
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from bootstrap_process import hello

from dockerrepl import _starts
from dockerrepl._container import Container
from dockerrepl._docker import Engine
from dockerrepl._runspec import ContainerConfig
from dockerrepl.errors import (
    ContainerDied,
    DockerCommandError,
    DockerDaemonError,
    NoSuchImage,
)

pytestmark = pytest.mark.timeout(60)

CONFLICT = (
    'docker: Error response from daemon: Conflict. The container name "/dockerrepl-x" is'
    ' already in use by container "abc". You have to remove (or rename) that container.\n'
)
NO_DAEMON = (
    "docker: Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
    " Is the docker daemon running?\n"
)


def flaky_docker(tmp_path: Path, fails: int, stderr: str, rc: int = 125) -> Path:
    """A fake `docker`: its first ``fails`` runs print ``stderr`` and exit ``rc``; later
    ones exec the command after the image under this Python (the bootstrap). Each
    call's argv goes to ``calls.log``."""
    ws = tmp_path / "ws"
    (ws / ".dockerrepl").mkdir(parents=True, exist_ok=True)
    poison = tmp_path / "poison" / "dockerrepl"
    poison.mkdir(parents=True, exist_ok=True)
    (poison / "__init__.py").write_text("raise ImportError('no dockerrepl in the bootstrap')\n")
    path = tmp_path / "docker"
    path.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys
        d = {str(tmp_path)!r}
        with open(os.path.join(d, "calls.log"), "a") as f:
            f.write(" ".join(sys.argv[1:]) + "\\n")
        args = sys.argv[1:]
        while args[:1] in (["--host"], ["--context"]):
            args = args[2:]
        if args[:1] != ["run"]:
            sys.exit(0)
        count = os.path.join(d, "runs")
        n = int(open(count).read()) if os.path.exists(count) else 0
        open(count, "w").write(str(n + 1))
        if n < {fails}:
            sys.stderr.write({stderr!r})
            sys.exit({rc})
        i = args.index("--entrypoint")
        env = {{"PATH": os.environ.get("PATH", "/bin"), "LANG": "C.UTF-8",
               "DOCKERREPL_WORKSPACE": {str(ws)!r},
               "PYTHONPATH": {str(poison.parent)!r}}}
        os.execve(sys.executable, [sys.executable] + args[i + 3:], env)
        """)
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def runs(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [ln for ln in lines if ln.startswith("run ") or " run -i " in ln]


def names(tmp_path: Path) -> list[str]:
    return [ln.split("--name ", 1)[1].split()[0] for ln in runs(tmp_path)]


def container(tmp_path: Path, docker: object, start_timeout: float = 30.0) -> Container:
    cfg = ContainerConfig(
        image="img",
        workspace=str(tmp_path / "ws"),
        docker=docker,  # type: ignore[arg-type]
        network="none",
        start_timeout=start_timeout,
    )
    return Container(cfg, str(tmp_path / "log"), copy_dill=False)


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    monkeypatch.delenv(_starts.START_LIMIT_ENV, raising=False)
    monkeypatch.setattr(_starts, "_limit", None)
    monkeypatch.setattr(_starts, "_answered", set())
    monkeypatch.setattr(_starts, "BACKOFF_BASE", 0.02)


def test_a_start_that_fails_transiently_is_retried_under_a_new_name(tmp_path):
    docker = flaky_docker(tmp_path, fails=3, stderr=CONFLICT)
    c = container(tmp_path, str(docker))
    try:
        ready = _starts.start_container(c, hello())
        assert ready["type"] == "ready"
        assert len(runs(tmp_path)) == 4
        assert len(set(names(tmp_path))) == 4, "a retry reused the conflicting name"
        assert c.name == names(tmp_path)[-1]
        # each failed try's name was removed (the engine may have created it)
        log = (tmp_path / "calls.log").read_text()
        for old in names(tmp_path)[:-1]:
            assert f"rm -f {old}" in log
    finally:
        c.close()


@pytest.mark.parametrize(
    "stderr",
    [
        "docker: Error response from daemon: context deadline exceeded.\n",
        "docker: Error response from daemon: failed to create endpoint x on network bridge:"
        " failed to add the host pair interfaces: resource temporarily unavailable.\n",
        "error waiting for container: unexpected EOF\n",
    ],
)
def test_other_transient_engine_errors_are_retried(tmp_path, stderr):
    docker = flaky_docker(tmp_path, fails=2, stderr=stderr)
    c = container(tmp_path, str(docker))
    try:
        assert _starts.start_container(c, hello())["type"] == "ready"
        assert len(runs(tmp_path)) == 3
    finally:
        c.close()


def test_a_permanent_error_fails_at_once_naming_the_engine(tmp_path):
    stderr = (
        "Unable to find image 'img:latest' locally\n"
        "docker: Error response from daemon: pull access denied for img.\n"
    )
    docker = flaky_docker(tmp_path, fails=5, stderr=stderr)
    c = container(tmp_path, Engine(str(docker), host="tcp://10.9.8.7:2375"))
    with pytest.raises(NoSuchImage) as info:
        _starts.start_container(c, hello())
    assert len(runs(tmp_path)) == 1, "a permanent error was retried"
    assert "tcp://10.9.8.7:2375" in str(info.value)
    assert "img" in str(info.value)
    assert info.value.hint  # the hint (build the image) survives the renaming


def test_transient_errors_give_up_at_start_timeout(tmp_path):
    docker = flaky_docker(tmp_path, fails=10_000, stderr=CONFLICT)
    c = container(tmp_path, str(docker), start_timeout=2.0)
    began = time.monotonic()
    with pytest.raises(DockerCommandError) as info:
        _starts.start_container(c, hello())
    took = time.monotonic() - began
    assert took < 2.0 + 5.0  # the total deadline, not one per try
    tries = len(runs(tmp_path))
    assert tries >= 2
    assert f"{tries} tries" in str(info.value)
    assert "default engine" in str(info.value)
    assert "already in use" in str(info.value)  # the cause


def test_an_unreachable_engine_that_never_answered_fails_at_once(tmp_path):
    docker = flaky_docker(tmp_path, fails=1, stderr=NO_DAEMON)
    c = container(tmp_path, str(docker))
    with pytest.raises(DockerDaemonError):
        _starts.start_container(c, hello())
    assert len(runs(tmp_path)) == 1


def test_an_engine_that_answered_before_and_now_refuses_is_waited_for(tmp_path):
    """An engine restarting: it answered a start, then refuses connections for a while."""
    docker = flaky_docker(tmp_path, fails=0, stderr="")
    first = container(tmp_path, str(docker))
    _starts.start_container(first, hello())
    first.close()
    again = tmp_path / "again"
    again.mkdir()
    docker2 = flaky_docker(again, fails=2, stderr=NO_DAEMON)
    # the same engine (binary path aside, the cache key is what is compared)
    _starts._answered.add(Engine(str(docker2)).cache_key())
    c = container(again, str(docker2))
    try:
        assert _starts.start_container(c, hello())["type"] == "ready"
        assert len(runs(again)) == 3
    finally:
        c.close()


class _StubContainer:
    """What _starts needs of a Container, with a start that takes a while."""

    active = 0
    most = 0
    lock = threading.Lock()

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.config = ContainerConfig(
            image="img", workspace="/nowhere", start_timeout=start_timeout
        )
        self.aborted = False
        self.name = "dockerrepl-stub"

    def start(self, hello: dict) -> dict:
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.most = max(cls.most, cls.active)
        time.sleep(0.1)
        with cls.lock:
            cls.active -= 1
        return {"type": "ready"}


def test_concurrent_starts_are_bounded_by_the_limit():
    _starts.set_start_limit(3)
    stubs = [_StubContainer() for _ in range(24)]
    errors: list[BaseException] = []

    def go(stub):
        try:
            _starts.start_container(stub, {})  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(s,)) for s in stubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert _StubContainer.most == 3  # bounded, and not serialised either
    assert _starts._active == 0 and not _starts._waiting


def test_a_start_waiting_for_its_turn_stops_when_aborted():
    _starts.set_start_limit(1)
    holder = _StubContainer()
    holder.start = lambda hello: time.sleep(3) or {"type": "ready"}  # type: ignore[method-assign]
    t = threading.Thread(target=_starts.start_container, args=(holder, {}))
    t.start()
    time.sleep(0.2)
    waiter = _StubContainer()
    threading.Timer(0.3, lambda: setattr(waiter, "aborted", True)).start()
    began = time.monotonic()
    with pytest.raises(ContainerDied):
        _starts.start_container(waiter, {})  # type: ignore[arg-type]
    assert time.monotonic() - began < 2.5
    t.join(10)
    assert not _starts._waiting


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(_starts.START_LIMIT_ENV, "5")
    assert _starts.start_limit() == 5
    assert _starts.set_start_limit(2) == 5
    assert _starts.start_limit() == 2
    assert _starts.set_start_limit(None) == 2
    assert _starts.start_limit() == 5


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_a_bad_limit_in_the_environment_is_named(monkeypatch, value):
    monkeypatch.setenv(_starts.START_LIMIT_ENV, value)
    with pytest.raises(ValueError, match=_starts.START_LIMIT_ENV):
        _starts.start_limit()


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "4"])
def test_set_start_limit_refuses_bad_values(value):
    with pytest.raises((TypeError, ValueError)):
        _starts.set_start_limit(value)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (DockerCommandError("`docker run` exited with 125: unknown flag: --bogus"), False),
        (DockerCommandError("x", "", "docker: invalid reference format."), False),
        (DockerCommandError("x", "", "Error response from daemon: i/o timeout"), True),
        (NoSuchImage("`docker run` failed: pull access denied", "build it"), False),
        (DockerDaemonError("`docker run` failed: Cannot connect to the Docker daemon"), False),
        (ContainerDied("the container was aborted while it started"), False),
        (ValueError("not ours"), False),
    ],
)
def test_which_errors_are_transient(exc, transient):
    assert _starts.is_transient(exc, "docker") is transient


def test_a_docker_error_before_the_container_start_names_the_engine_too(tmp_path):
    """The channel transport's volume, made before any container: its failure names the
    engine as a container start's does (and keeps its class)."""
    from dockerrepl import DockerREPL

    docker = flaky_docker(tmp_path, fails=0, stderr="")
    script = docker.read_text().replace(
        'if args[:1] != ["run"]:\n    sys.exit(0)',
        'if args[:1] != ["run"]:\n'
        '    sys.stderr.write("Error response from daemon: no space left on device\\n")\n'
        "    sys.exit(1)",
    )
    assert script != docker.read_text()
    docker.write_text(script)
    with pytest.raises(DockerCommandError) as info:
        DockerREPL(
            image="img",
            docker=str(docker),
            docker_host="tcp://10.1.2.3:2375",
            transport="channel",
            workspace_dir=str(tmp_path),
        )
    assert "no space left" in str(info.value)
    assert str(info.value).count("tcp://10.1.2.3:2375") == 1
    assert runs(tmp_path) == []  # it failed before any container
