"""The one place that runs the ``docker`` CLI.

Three entry points, all with argv lists (never a shell):

* :func:`run` for short commands: a mandatory keyword-only ``timeout``,
  stdout/stderr captured as bytes and decoded once with ``errors="replace"``,
  a non-zero exit mapped to a typed :class:`~dockerrepl.errors.DockerError`
  with a hint;
* :func:`stream` for long commands whose progress is shown as it comes
  (``docker pull``, ``docker build``): the same, plus each stdout line handed
  to a callback while the command runs;
* :func:`spawn` for the long-lived ``docker run -i`` process that carries the
  framed channel to the container: a :class:`Process` handle.

No other module imports :mod:`subprocess`.

Which engine a command goes to is an :class:`Engine` (the CLI binary plus its
``--host`` / ``--context`` global flags), passed as ``docker=``; a plain string
is the binary with the CLI's own defaults. The process environment is never
changed: two REPLs in one process can use two engines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Optional, Union

from .errors import (
    DockerCommandError,
    DockerDaemonError,
    DockerError,
    DockerNotFound,
    DockerPermissionError,
    DockerTimeout,
    NoSuchContainer,
    NoSuchImage,
)

__all__ = [
    "PODMAN_BRIDGE",
    "DockerResult",
    "Engine",
    "Process",
    "as_engine",
    "classify_error",
    "is_podman",
    "redact",
    "resolve_docker",
    "run",
    "spawn",
    "stream",
]

log = logging.getLogger(__name__)

#: How much of a failing command's stderr an error keeps.
STDERR_KEEP = 4000

_BUILD_HINT = (
    "build one offline with scripts/build-image.sh (debootstrap + docker import), "
    "or `docker pull` it where a registry is reachable"
)

# Order matters: the first matching pattern decides the class.
_ERROR_TABLE: list[tuple[re.Pattern[str], type[DockerError], str]] = [
    (
        re.compile(
            r"permission denied.*docker(\.sock| daemon socket)|docker\.sock.*permission denied",
            re.I,
        ),
        DockerPermissionError,
        "add your user to the 'docker' group (then log in again) or run with sufficient rights",
    ),
    (
        re.compile(
            r"cannot connect to the docker daemon|is the docker daemon running|"
            r"error during connect|connection refused.*docker|docker daemon is not running",
            re.I,
        ),
        DockerDaemonError,
        "start the engine (e.g. `sudo systemctl start docker` or `dockerd &`)"
        " and check DOCKER_HOST",
    ),
    (
        re.compile(
            r"unable to find image|pull access denied|manifest unknown|repository does not exist|"
            r"no such image|not found: manifest|failed to resolve reference|"
            r"error response from daemon: .*(?:dial tcp|lookup .* on|i/o timeout|no such host)",
            re.I,
        ),
        NoSuchImage,
        _BUILD_HINT,
    ),
    (re.compile(r"no such container|is not running|no such object", re.I), NoSuchContainer, ""),
]


def redact(argv: Sequence[str]) -> str:
    """Render argv for logs, hiding values of env options (they may hold secrets)."""
    out: list[str] = []
    hide_next = False
    for a in argv:
        if hide_next:
            out.append(a.split("=", 1)[0] + "=***" if "=" in a else "***")
            hide_next = False
            continue
        if a in ("-e", "--env"):
            hide_next = True
        elif a.startswith("--env="):
            a = "--env=" + a[6:].split("=", 1)[0] + "=***"
        out.append(a)
    return " ".join(out)


def classify_error(stderr: str, returncode: int, argv: Sequence[str]) -> DockerError:
    """Map a failed docker command's stderr to the most specific error with a hint."""
    tail = stderr.strip()[-STDERR_KEEP:]
    cmd = " ".join(argv[1:3]) if len(argv) > 1 else "docker"
    for pattern, cls, hint in _ERROR_TABLE:
        if pattern.search(tail):
            # the line that matched names the cause; the CLI's last line is often only
            # "Run 'docker run --help' for more information"
            lines = [ln for ln in tail.splitlines() if pattern.search(ln)]
            first = lines[-1].strip() if lines else tail.splitlines()[-1]
            return cls(f"`docker {cmd}` failed: {first}", hint, tail, returncode)
    return DockerCommandError(
        f"`docker {cmd}` exited with {returncode}: {tail[-500:]}", "", tail, returncode
    )


def resolve_docker(docker: str = "docker") -> str:
    """Find the docker executable, or raise :class:`DockerNotFound` with a hint."""
    path = docker if os.sep in docker else shutil.which(docker)
    if not path or not os.access(path, os.X_OK):
        raise DockerNotFound(
            f"docker executable {docker!r} not found",
            "install Docker (Debian: `apt-get install docker.io`) or pass docker=/path/to/docker",
        )
    return path


#: Why Podman cannot have network="bridge" yet (TransportUnavailable's message).
PODMAN_BRIDGE = (
    "transport='proxy' with network='bridge' needs the docker bridge and"
    " host.docker.internal, which Podman does not give our LM proxy; use"
    " transport='channel' (or 'auto'), or network='none'"
)


def is_podman(binary: str) -> bool:
    """Whether ``binary`` names Podman's CLI (``podman``, ``/usr/bin/podman-remote``)."""
    return os.path.basename(binary).startswith("podman")


@dataclass(frozen=True)
class Engine:
    """Which engine docker commands go to: the CLI binary and its global flags.

    ``host`` (``unix://``, ``tcp://``, ``ssh://``, ``npipe://``) and ``context`` (a
    docker context's name) are mutually exclusive; with neither, the CLI picks as
    it always does (``$DOCKER_HOST``, ``$DOCKER_CONTEXT``, the current context).
    Podman's CLI spells them ``--url`` and ``--connection``. Hashable: caches
    keyed by engine keep one engine's answers apart from another's.
    """

    binary: str = "docker"
    host: Optional[str] = None
    context: Optional[str] = None

    def __post_init__(self) -> None:
        if self.host is not None and self.context is not None:
            raise ValueError("docker_host and context are mutually exclusive")

    @property
    def podman(self) -> bool:
        return is_podman(self.binary)

    def flags(self) -> list[str]:
        """The global flags that select this engine (they go before the command)."""
        if self.host is not None:
            return ["--url" if self.podman else "--host", self.host]
        if self.context is not None:
            return ["--connection" if self.podman else "--context", self.context]
        return []

    def cache_key(self) -> tuple[str, ...]:
        """What decides which engine answers: the flags, or (without them) the
        environment the CLI reads, as it is now (read, never changed)."""
        if self.host is not None or self.context is not None:
            return (self.binary, *self.flags())
        env = ("DOCKER_HOST", "DOCKER_CONTEXT", "CONTAINER_HOST", "CONTAINER_CONNECTION")
        return (self.binary, *(os.environ.get(k, "") for k in env))


def as_engine(docker: Union[str, Engine]) -> Engine:
    """``docker`` as an :class:`Engine` (a string is the binary, with no flags)."""
    return docker if isinstance(docker, Engine) else Engine(docker)


def _argv(docker: Union[str, Engine], args: Sequence[str]) -> list[str]:
    engine = as_engine(docker)
    return [resolve_docker(engine.binary), *engine.flags(), *args]


@dataclass(frozen=True)
class DockerResult:
    """What a finished docker command returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _check_timeout(timeout: float) -> None:
    if timeout is None or timeout <= 0:
        raise ValueError("every docker command needs a positive timeout")


def _timed_out(args: Sequence[str], timeout: float) -> DockerTimeout:
    return DockerTimeout(
        f"`docker {' '.join(args[:2])}` did not finish within {timeout:g}s",
        "the daemon may be hung or overloaded; check `docker info`",
    )


@contextlib.contextmanager
def _executing(argv: Sequence[str]) -> Iterator[None]:
    """Map a docker executable that cannot be run to :class:`DockerNotFound`."""
    try:
        yield
    except FileNotFoundError:
        raise DockerNotFound(
            f"docker executable {argv[0]!r} vanished", "reinstall Docker"
        ) from None
    except PermissionError as exc:
        raise DockerNotFound(
            f"cannot execute {argv[0]!r}: {exc}", "check the file's permissions"
        ) from None


def _popen(
    argv: list[str], stdin: int, stdout: int, stderr: Union[int, IO[bytes]], **kw: Any
) -> subprocess.Popen[bytes]:
    with _executing(argv):
        return subprocess.Popen(
            argv, stdin=stdin, stdout=stdout, stderr=stderr, close_fds=True, **kw
        )


def _result(
    argv: Sequence[str], args: Sequence[str], rc: int, out: bytes, err: bytes, check: bool
) -> DockerResult:
    result = DockerResult(
        tuple(argv), rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    )
    if check and rc != 0:
        # the error names the command (`docker run`), not the engine flags before it
        raise classify_error(result.stderr, rc, [argv[0], *args])
    return result


def run(
    args: Sequence[str],
    *,
    timeout: float,
    docker: Union[str, Engine] = "docker",
    input: Optional[bytes] = None,
    check: bool = True,
    env: Optional[dict[str, str]] = None,
) -> DockerResult:
    """Run ``docker <args>`` and wait for it, at most ``timeout`` seconds.

    Raises :class:`DockerTimeout` when the command overruns (the process is
    killed), :class:`DockerNotFound` when there is no CLI, and, when ``check``
    is true, the mapped :class:`DockerError` subclass on a non-zero exit.
    """
    _check_timeout(timeout)
    argv = _argv(docker, args)
    log.debug("docker: %s", redact(argv))
    try:
        with _executing(argv):
            proc = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                env=env,
            )
    except subprocess.TimeoutExpired:
        raise _timed_out(args, timeout) from None
    return _result(argv, args, proc.returncode, proc.stdout, proc.stderr, check)


def stream(
    args: Sequence[str],
    *,
    timeout: float,
    on_line: Callable[[str], None],
    docker: Union[str, Engine] = "docker",
    check: bool = True,
    env: Optional[dict[str, str]] = None,
) -> DockerResult:
    """Run ``docker <args>`` like :func:`run`, handing each stdout line to ``on_line``
    (decoded, without its newline) as it is printed: for pulls and builds.

    stdin is empty. On :class:`DockerTimeout` the process is killed and reaped.
    """
    _check_timeout(timeout)
    argv = _argv(docker, args)
    log.debug("docker (stream): %s", redact(argv))
    deadline = time.monotonic() + timeout
    proc = _popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    got = {out_fd: bytearray(), err_fd: bytearray()}
    line = b""
    try:
        open_fds = list(got)
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _timed_out(args, timeout)
            ready, _, _ = select.select(open_fds, [], [], min(left, 1.0))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.remove(fd)
                    continue
                got[fd] += chunk
                if fd == out_fd:
                    *lines, line = (line + chunk).split(b"\n")
                    for one in lines:
                        on_line(one.decode("utf-8", "replace"))
        if line:
            on_line(line.decode("utf-8", "replace"))
        try:
            rc = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise _timed_out(args, timeout) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    return _result(argv, args, rc, bytes(got[out_fd]), bytes(got[err_fd]), check)


class Process:
    """A spawned docker CLI process: its binary pipes, and poll/wait/kill/close.

    ``stdin`` and ``stdout`` are unbuffered binary pipes (``None`` once closed
    by :meth:`close`). :meth:`wait` takes a timeout and returns ``None`` when it
    passes, so callers need not know :mod:`subprocess`'s exceptions.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.stdin: Optional[IO[bytes]] = popen.stdin
        self.stdout: Optional[IO[bytes]] = popen.stdout

    @property
    def pid(self) -> int:
        return self._popen.pid

    def poll(self) -> Optional[int]:
        """The exit status, or ``None`` while it runs."""
        return self._popen.poll()

    def wait(self, timeout: float) -> Optional[int]:
        """The exit status, waiting at most ``timeout`` seconds; ``None`` if it still runs."""
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL it (nothing happens when it already exited)."""
        try:
            self._popen.kill()
        except OSError:
            pass

    def close_stdin(self) -> None:
        """Close stdin only: the container's dead-man switch (the supervisor sees EOF)."""
        if self.stdin is not None:
            try:
                self.stdin.close()
            except OSError:
                pass

    def close(self) -> None:
        """Close both pipes (the process itself is not waited for: see :meth:`wait`)."""
        for pipe in (self.stdin, self.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self.stdin = self.stdout = None


def spawn(
    args: Sequence[str],
    *,
    docker: Union[str, Engine] = "docker",
    stderr: Union[int, IO[bytes], None] = None,
    env: Optional[dict[str, str]] = None,
) -> Process:
    """Start ``docker <args>`` with stdin/stdout as binary pipes (for ``docker run -i``).

    The caller owns the process: it must close stdin (the container's dead-man
    switch) and wait for it with a timeout.
    """
    argv = _argv(docker, args)
    log.debug("docker (spawn): %s", redact(argv))
    return Process(
        _popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr if stderr is not None else subprocess.DEVNULL,
            bufsize=0,
            env=env,
        )
    )
