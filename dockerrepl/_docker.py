"""The one place that runs the ``docker`` CLI.

Two entry points, both with argv lists (never a shell):

* :func:`run` for short commands: a mandatory keyword-only ``timeout``,
  stdout/stderr captured as bytes and decoded once with ``errors="replace"``,
  a non-zero exit mapped to a typed :class:`~dockerrepl.errors.DockerError`
  with a hint;
* :func:`spawn` for the long-lived ``docker run -i`` process that carries the
  framed channel to the container.

No other module imports :mod:`subprocess`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Optional, Union

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

__all__ = ["DockerResult", "classify_error", "redact", "resolve_docker", "run", "spawn"]

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


@dataclass(frozen=True)
class DockerResult:
    """What a finished docker command returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run(
    args: Sequence[str],
    *,
    timeout: float,
    docker: str = "docker",
    input: Optional[bytes] = None,
    check: bool = True,
    env: Optional[dict[str, str]] = None,
) -> DockerResult:
    """Run ``docker <args>`` and wait for it, at most ``timeout`` seconds.

    Raises :class:`DockerTimeout` when the command overruns (the process is
    killed), :class:`DockerNotFound` when there is no CLI, and, when ``check``
    is true, the mapped :class:`DockerError` subclass on a non-zero exit.
    """
    if timeout is None or timeout <= 0:
        raise ValueError("every docker command needs a positive timeout")
    argv = [resolve_docker(docker), *args]
    log.debug("docker: %s", redact(argv))
    try:
        proc = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise DockerTimeout(
            f"`docker {' '.join(args[:2])}` did not finish within {timeout:g}s",
            "the daemon may be hung or overloaded; check `docker info`",
        ) from None
    except FileNotFoundError:
        raise DockerNotFound(
            f"docker executable {argv[0]!r} vanished", "reinstall Docker"
        ) from None
    except PermissionError as exc:
        raise DockerNotFound(
            f"cannot execute {argv[0]!r}: {exc}", "check the file's permissions"
        ) from None
    result = DockerResult(
        tuple(argv),
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )
    if check and proc.returncode != 0:
        raise classify_error(result.stderr, proc.returncode, argv)
    return result


def spawn(
    args: Sequence[str],
    *,
    docker: str = "docker",
    stderr: Union[int, IO[bytes], None] = None,
    env: Optional[dict[str, str]] = None,
) -> subprocess.Popen[bytes]:
    """Start ``docker <args>`` with stdin/stdout as binary pipes (for ``docker run -i``).

    The caller owns the process: it must close stdin (the container's dead-man
    switch) and wait for it with a timeout.
    """
    argv = [resolve_docker(docker), *args]
    log.debug("docker (spawn): %s", redact(argv))
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr if stderr is not None else subprocess.DEVNULL,
            bufsize=0,
            close_fds=True,
            env=env,
        )
    except FileNotFoundError:
        raise DockerNotFound(
            f"docker executable {argv[0]!r} vanished", "reinstall Docker"
        ) from None


def is_timeout(exc: BaseException) -> bool:
    """True for the subprocess timeout exception (so callers need not import subprocess)."""
    return isinstance(exc, subprocess.TimeoutExpired)


TimeoutExpired = subprocess.TimeoutExpired
