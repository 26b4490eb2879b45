"""Starting containers when many start at once: a process-wide bound, and retries.

Every container start in the process (a :class:`~dockerrepl.DockerREPL`, a pool
member, a restart after a crash) goes through :func:`start_container`:

* at most :func:`start_limit` starts run at once (``$DOCKERREPL_MAX_STARTS``, or
  :func:`set_start_limit`; default :data:`DEFAULT_START_LIMIT`). The daemon
  serialises much of ``docker run`` anyway; thirty-two at once on a small
  machine made every one of them slow (and some time out) instead of a few fast.
  Waiting for a slot is first come, first served and is not charged to
  ``start_timeout``: each start ahead holds its slot at most its own
  ``start_timeout``, so the wait is bounded too;
* a start that fails for a reason that passes (the daemon busy or restarting, a
  connection reset, a name conflict of our own random name, a network endpoint
  the daemon could not set up in a rush) is tried again with jittered
  exponential backoff, under a fresh name, until ``start_timeout`` (counted from
  the first try) runs out; one that will not pass (no such image, a bad option,
  permission denied on the socket, no docker CLI) is raised at once;
* whatever is raised keeps its type (:mod:`dockerrepl.errors`) and its message
  names the engine, and after retries how many tries over how long.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from . import _docker
from .errors import (
    BootstrapError,
    ContainerDied,
    DockerDaemonError,
    DockerError,
    DockerNotFound,
    DockerPermissionError,
    DockerReplError,
    DockerTimeout,
    NoSuchImage,
    ProxyError,
)

if TYPE_CHECKING:
    from ._container import Container

__all__ = [
    "DEFAULT_START_LIMIT",
    "START_LIMIT_ENV",
    "describe_engine",
    "is_transient",
    "naming",
    "set_start_limit",
    "start_container",
    "start_limit",
]

log = logging.getLogger(__name__.rpartition(".")[0] + ".repl")

#: Container starts that may run at once in one process, unless configured.
DEFAULT_START_LIMIT = 8
#: The environment variable that sets the limit (read at the first start).
START_LIMIT_ENV = "DOCKERREPL_MAX_STARTS"
#: Backoff before the 2nd, 3rd, ... try: BASE * 2**n, at most CAP, times a jitter in [0.5, 1].
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0
#: A retry is not begun with less than this left of start_timeout (it could not finish).
MIN_TRY = 0.5

# What the engine says when a start failed for a reason that passes. Matched against
# the error's message and the CLI's stderr; only errors of no permanent class get here.
_TRANSIENT = re.compile(
    r"connection reset|connection refused|unexpected eof|daemon: eof\b|"
    r"context deadline exceeded|tls handshake timeout|i/o timeout|client\.timeout|"
    r"awaiting headers|resource temporarily unavailable|device or resource busy|"
    r"server is busy|too many requests|service unavailable|bad gateway|"
    r"is already in use by container|conflict\. the container name|"
    r"removal of container .* is already in progress|failed to create endpoint|"
    r"failed to set up container networking|"
    r"daemon is (?:shutting down|restarting)",
    re.I,
)
# Never retried: the same start fails the same way (each has a hint saying what to do).
_PERMANENT: tuple[type[BaseException], ...] = (
    NoSuchImage,
    DockerPermissionError,
    DockerNotFound,
    ProxyError,  # TransportUnavailable included: the transport choice handles it
    ContainerDied,  # aborted: the REPL was closed while it started
)

_cond = threading.Condition()
_limit: Optional[int] = None  # read from the environment at the first start
_active = 0
_waiting: deque[object] = deque()
# engines (their cache keys) that answered a start in this process: one of them that
# now refuses connections is restarting; one that never answered is not running
_answered: set[tuple[str, ...]] = set()


def _limit_from_env() -> int:
    raw = os.environ.get(START_LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_START_LIMIT
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"${START_LIMIT_ENV} must be a positive int, not {raw!r}")
    return value


def start_limit() -> int:
    """How many container starts may run at once in this process."""
    global _limit
    with _cond:
        if _limit is None:
            _limit = _limit_from_env()
        return _limit


def set_start_limit(limit: Optional[int]) -> int:
    """Set how many container starts may run at once in this process; returns the old limit.

    ``None`` goes back to ``$DOCKERREPL_MAX_STARTS`` (or the default, 8). Starts
    already running keep their slots; waiting ones are admitted under the new limit.
    """
    global _limit
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
        raise TypeError(f"limit must be a positive int or None, not {type(limit).__name__}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive int or None, not {limit!r}")
    old = start_limit()
    new = _limit_from_env() if limit is None else limit
    with _cond:
        _limit = new
        _cond.notify_all()
    return old


def describe_engine(docker: Any) -> str:
    """The engine a start went to, as a user would name it."""
    engine = _docker.as_engine(docker)
    if engine.host is not None:
        return f"engine {engine.host} ({engine.binary} --host)"
    if engine.context is not None:
        return f"engine of context {engine.context!r} ({engine.binary} --context)"
    env = [f"{k}={os.environ[k]}" for k in ("DOCKER_HOST", "DOCKER_CONTEXT") if os.environ.get(k)]
    return f"{engine.binary}'s default engine" + (f" ({', '.join(env)})" if env else "")


def is_transient(exc: BaseException, engine: Any = "docker") -> bool:
    """Whether a failed start may succeed if tried again (see the module's docstring)."""
    if not isinstance(exc, DockerReplError) or isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, DockerDaemonError):
        # unreachable: an engine that answered before is restarting (worth the wait);
        # one that never did is not running, and the user should hear it at once
        if _docker.as_engine(engine).cache_key() in _answered:
            return True
        return bool(_TRANSIENT.search(f"{exc} {exc.stderr}")) and "refused" not in str(exc)
    if isinstance(exc, DockerTimeout):
        return True
    stderr = exc.stderr if isinstance(exc, DockerError) else ""
    if isinstance(exc, (DockerError, BootstrapError)):
        return bool(_TRANSIENT.search(f"{exc}\n{stderr}"))
    return False


class _Slot:
    """One of the process's start slots, taken in arrival order."""

    def __init__(self, container: Container) -> None:
        self.container = container

    def __enter__(self) -> _Slot:
        global _active
        limit = start_limit()
        ticket = object()
        with _cond:
            _waiting.append(ticket)
            try:
                while not (_waiting[0] is ticket and _active < (_limit or limit)):
                    if self.container.aborted:
                        raise ContainerDied("the REPL was closed while its start waited its turn")
                    # woken by every release; the timeout only re-checks `aborted`
                    _cond.wait(0.25)
            finally:
                _waiting.remove(ticket)
                _cond.notify_all()  # the next in line may fit too
            _active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        with _cond:
            _active -= 1
            _cond.notify_all()


def _backoff(attempt: int) -> float:
    return min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _renamed(exc: DockerReplError, message: str) -> DockerReplError:
    """``exc`` again, of its own class, with ``message``; ``exc`` itself if that cannot be."""
    try:
        if isinstance(exc, DockerError):
            return type(exc)(message, exc.hint, exc.stderr, exc.returncode)
        if type(exc).__init__ is BaseException.__init__ or len(exc.args) <= 1:
            return type(exc)(message)
    except Exception:
        pass
    return exc


def _named(exc: DockerReplError, engine: Any, tries: int, began: float) -> DockerReplError:
    where = describe_engine(engine)
    text = exc.message if isinstance(exc, DockerError) else str(exc)
    if tries > 1:
        suffix = f" [{where}; {tries} tries over {time.monotonic() - began:.1f}s]"
    else:
        suffix = f" [{where}]"
    return _renamed(exc, text + suffix)


@contextlib.contextmanager
def naming(engine: Any) -> Iterator[None]:
    """A :class:`DockerError` raised inside (the workspace volume, the bridge lookup,
    any docker command of a REPL's start) names ``engine``, as a container start's does."""
    try:
        yield
    except DockerError as exc:
        where = describe_engine(engine)
        named = exc if where in exc.message else _renamed(exc, f"{exc.message} [{where}]")
        if named is exc:
            raise
        raise named from exc


def _forget_try(container: Container, left: float) -> None:
    """Undo a failed try: its CLI process, and the container the engine may have
    created under that name before the failure; the next try gets a new name."""
    old = container.name
    container.kill(timeout=max(1.0, min(10.0, left)))
    try:
        _docker.run(
            ["rm", "-f", old],
            timeout=max(1.0, min(10.0, left)),
            docker=container.config.docker,
            check=False,
        )
    except DockerError:
        pass  # the engine is away: it made no container then either
    container.name = "dockerrepl-" + secrets.token_hex(6)


def start_container(container: Container, hello: dict[str, Any]) -> dict[str, Any]:
    """``container.start(hello)`` within the process's start limit, retrying what passes.

    The total time is the container's ``start_timeout`` from the first try (the wait
    for a slot is not counted). Returns the bootstrap's ready frame; raises the
    typed error of the last try, its message naming the engine.
    """
    config = container.config
    engine = config.docker
    with _Slot(container):
        began = time.monotonic()
        deadline = began + config.start_timeout
        tries = 0
        while True:
            tries += 1
            try:
                ready = container.start(hello)
            except DockerReplError as exc:
                delay = _backoff(tries)
                left = deadline - time.monotonic()
                if container.aborted or not is_transient(exc, engine) or left < delay + MIN_TRY:
                    named = _named(exc, engine, tries, began)
                    if named is exc:
                        raise
                    raise named from exc
                log.info(
                    "dockerrepl: starting a container on %s failed (%s); try %d in %.2fs",
                    describe_engine(engine),
                    exc,
                    tries + 1,
                    delay,
                )
                _forget_try(container, left)
                end = time.monotonic() + delay
                while time.monotonic() < end:
                    if container.aborted:
                        raise _named(exc, engine, tries, began) from exc
                    time.sleep(min(0.05, max(0.0, end - time.monotonic())))
                # the next try gets what is left of the total, not a fresh start_timeout
                config.start_timeout = max(MIN_TRY, deadline - time.monotonic())
                continue
            with _cond:
                _answered.add(_docker.as_engine(engine).cache_key())
            return ready
