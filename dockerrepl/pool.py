"""A warm pool of pre-started REPLs, on one engine or spread over several.

Starting a container costs ~0.3 s; :meth:`DockerREPLPool.acquire` hands out
one that is already running (well under a millisecond) and starts its
replacement in the background. A REPL is handed out once and never returned
to the pool (no state can leak from one user to the next); members that were
never handed out die with the pool: on :meth:`~DockerREPLPool.close`, when the
pool is garbage-collected, and, like every DockerREPL, when the process exits
(their stdin closes and ``--rm`` removes them).

Members are started by at most ``max_starting`` threads of the pool (they exit
when the pool is full), within the process-wide start limit of
:mod:`dockerrepl._starts`. With ``engines=``, each new member goes to the engine
with the fewest of the pool's REPLs (ready, starting and handed out and still
open); an engine whose starts fail is left alone for a while (1 s, doubling up
to 30 s) while the others serve.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from . import _exit
from ._options import ReplOptions
from ._starts import describe_engine, set_start_limit, start_limit
from .errors import DockerReplError, ReplClosed
from .repl import DockerREPL

__all__ = ["DockerREPLPool", "set_start_limit"]

log = logging.getLogger(__name__)

#: How long an engine whose start failed is left alone: BASE * 2**(failures-1), at most CAP.
ENGINE_BACKOFF_BASE = 1.0
ENGINE_BACKOFF_CAP = 30.0


class _Engine:
    """One engine of a pool: the options its members start with, and how it fares."""

    def __init__(self, kwargs: dict[str, Any], options: ReplOptions) -> None:
        self.kwargs = kwargs
        self.label = describe_engine(options.engine)
        self.starting = 0
        self.ready = 0
        self.handed: weakref.WeakSet[DockerREPL] = weakref.WeakSet()
        self.failures = 0  # consecutive
        self.retry_at = 0.0
        self.last_error: Optional[BaseException] = None

    def load(self) -> int:
        handed = sum(1 for r in list(self.handed) if not r._session.closed)
        return self.starting + self.ready + handed

    def stats(self) -> dict[str, Any]:
        return {
            "engine": self.label,
            "ready": self.ready,
            "starting": self.starting,
            "handed_out": sum(1 for r in list(self.handed) if not r._session.closed),
            "failures": self.failures,
            "last_error": None if self.last_error is None else str(self.last_error),
        }


class DockerREPLPool:
    """Keep ``size`` ready :class:`DockerREPL` instances built with ``repl_kwargs``.

    ``acquire()`` returns a ready REPL (the caller owns it and must
    ``cleanup()`` it); ``close()`` removes every REPL not yet handed out.
    Per-user data (``context_payload``, ``setup_code``) can be given as pool
    kwargs if all users share it, or loaded after ``acquire()``.

    ``engines``: a list of dicts of options that pick an engine (``docker``,
    ``docker_host``, ``context``; any other DockerREPL option an engine needs,
    e.g. ``transport="channel"``), each laid over ``repl_kwargs``. Each new member
    goes to the engine with the fewest of this pool's REPLs (ready, starting,
    handed out and not yet cleaned up); one whose starts fail is backed off while
    the others serve. Default: one engine, the one ``repl_kwargs`` name.

    ``max_starting``: how many members this pool starts at once (default: ``size``,
    at most the process-wide start limit, :func:`set_start_limit`).
    ``repl_class``: the :class:`DockerREPL` subclass members are built with.

    Arguments that no member could start with (an unknown keyword, a bad
    ``network`` or ``timeout``, a ``size`` that is not a positive int, an
    ``engines`` entry that is not a dict of options) raise ``TypeError``/
    ``ValueError`` here, before any container starts. Failures that only
    starting a container reveals (no such image, no engine) are raised by
    :meth:`acquire` as :class:`~dockerrepl.errors.DockerReplError` with the
    cause chained, once every engine has failed and none is still starting.
    """

    def __init__(
        self,
        size: int = 2,
        *,
        engines: Optional[Sequence[Mapping[str, Any]]] = None,
        max_starting: Optional[int] = None,
        repl_class: type[DockerREPL] = DockerREPL,
        **repl_kwargs: Any,
    ) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, not {size!r}")
        if max_starting is not None and (
            not isinstance(max_starting, int) or isinstance(max_starting, bool) or max_starting < 1
        ):
            raise ValueError(f"max_starting must be a positive int or None, not {max_starting!r}")
        if not (isinstance(repl_class, type) and issubclass(repl_class, DockerREPL)):
            raise TypeError(f"repl_class must be a DockerREPL subclass, not {repl_class!r}")
        if engines is None:
            engines = [{}]
        if isinstance(engines, (str, bytes, Mapping)) or not isinstance(engines, Sequence):
            raise TypeError("engines must be a list of dicts of options, e.g. [{'context': 'x'}]")
        if not engines:
            raise ValueError("engines must name at least one engine")
        self._engines: list[_Engine] = []
        for entry in engines:
            if not isinstance(entry, Mapping):
                raise TypeError(f"each engines entry must be a dict of options, not {entry!r}")
            kwargs = {**repl_kwargs, **entry}
            # every member would fail on these: fail now, in the caller's thread. Unlike
            # DockerREPL (rlm passes some), an unknown name is refused: a pool has no such
            # caller, so it is a typo that would otherwise be silently dropped
            self._engines.append(_Engine(kwargs, ReplOptions.build(**kwargs)))
        self.size = size
        self.repl_kwargs = repl_kwargs
        self.repl_class = repl_class
        self.max_starting = max_starting or min(size, start_limit())
        self._ready: deque[tuple[DockerREPL, _Engine]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._starting = 0
        self._workers: list[threading.Thread] = []
        self._working = 0  # workers that have not decided to exit
        self._unreported: list[tuple[_Engine, BaseException]] = []
        _exit.track(self, 0)  # at exit: closed, before its members are
        self._fill()

    # ---------------------------------------------------------------- starting
    def _fill(self) -> None:
        """Start workers (at most ``max_starting``) while members are missing."""
        with self._cond:
            if self._closed:
                return
            missing = self.size - len(self._ready) - self._starting
            new = max(0, min(missing, self.max_starting) - self._working)
            threads = [
                threading.Thread(target=self._work, name="dockerrepl-pool", daemon=True)
                for _ in range(new)
            ]
            self._working += new
            self._workers = [t for t in self._workers if t.is_alive()] + threads
        for t in threads:
            t.start()

    def _pick(self, now: float) -> Optional[_Engine]:
        """The least-loaded engine not backed off (the first of equals), or None."""
        usable = [e for e in self._engines if e.retry_at <= now]
        return min(usable, key=lambda e: e.load()) if usable else None

    def _work(self) -> None:
        """One starter: starts members, one at a time, until the pool is full or closed."""
        while True:
            with self._cond:
                if self._closed or len(self._ready) + self._starting >= self.size:
                    self._working -= 1  # counted here, under the lock: _fill sees it at once
                    return
                now = time.monotonic()
                engine = self._pick(now)
                if engine is None:
                    # every engine is backed off: wait for the first to be due (or close)
                    due = min(e.retry_at for e in self._engines)
                    self._cond.wait(max(0.01, due - now))
                    continue
                engine.starting += 1
                self._starting += 1
            try:
                self._start_on(engine)
            except BaseException:
                with self._cond:
                    self._working -= 1
                raise

    def _start_on(self, engine: _Engine) -> None:
        repl: Optional[DockerREPL] = None
        try:
            repl = self.repl_class(**engine.kwargs)
            if repl._options.auto_checkpoint:
                # the worker's first snapshot loads dill and forks for the first time
                # (~50-170 ms here): taken now, it is not the first user cell's wait
                repl.checkpoint()
        except BaseException as exc:
            if repl is not None:
                repl.cleanup()
                repl = None
            log.warning("pool: starting a REPL on %s failed: %s", engine.label, exc)
            failed: Optional[BaseException] = exc
        else:
            failed = None
        with self._cond:
            engine.starting -= 1
            self._starting -= 1
            if failed is not None:
                engine.failures += 1
                engine.last_error = failed
                delay = ENGINE_BACKOFF_BASE * 2.0 ** (engine.failures - 1)
                engine.retry_at = time.monotonic() + min(ENGINE_BACKOFF_CAP, delay)
                self._unreported.append((engine, failed))
            elif repl is not None and not self._closed:
                engine.failures = 0
                engine.retry_at = 0.0
                engine.ready += 1
                self._ready.append((repl, engine))
                repl = None
            self._cond.notify_all()
        if repl is not None:  # the pool was closed while it started
            repl.cleanup()

    # ---------------------------------------------------------------- handing out
    def acquire(self, timeout: Optional[float] = 120.0) -> DockerREPL:
        """A ready REPL, yours alone; a replacement starts in the background.

        Raises :class:`~dockerrepl.errors.ReplClosed` after :meth:`close`,
        :class:`DockerReplError` when no engine can start members (the last cause
        chained, every engine's named) and ``TimeoutError`` when none is ready in time.
        """
        return self._acquire(timeout, refill=True)

    def _acquire(self, timeout: Optional[float], refill: bool) -> DockerREPL:
        """:meth:`acquire`; with ``refill=False`` the replacement waits for the caller's
        :meth:`_fill` (use_dockerrepl's pool sets the REPL up first: a ``docker run``
        starting meanwhile would take the CPU that setup needs on a small machine)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            err: Optional[DockerReplError] = None
            with self._cond:
                while True:
                    if self._closed:
                        raise ReplClosed("the pool is closed")
                    if self._ready:
                        repl, engine = self._ready.popleft()
                        engine.ready -= 1
                        engine.handed.add(repl)
                        break
                    err = self._failed_everywhere()
                    if err is not None:
                        break
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError("no REPL became ready in time") from None
                    self._cond.wait(0.5 if left is None else min(left, 0.5))
            if refill or err is not None:
                self._fill()
            if err is not None:
                raise err
            if not _alive(repl):
                # it died while it waited (killed from outside, engine restart): a
                # fresh one is better than a restart on the caller's first cell
                log.warning("pool: a ready REPL had died; it is replaced")
                repl.cleanup()
                continue
            return repl

    def _failed_everywhere(self) -> Optional[DockerReplError]:
        """With the lock held: the error to raise when every engine's last start failed,
        none is starting, and that was not reported yet (it is now); else None."""
        if not self._unreported or self._starting or any(e.failures == 0 for e in self._engines):
            return None
        last = self._unreported[-1][1]
        self._unreported.clear()
        now = time.monotonic()
        for e in self._engines:  # the next acquire gets a fresh try, not a backoff
            e.retry_at = min(e.retry_at, now)
        causes = "; ".join(f"{e.label}: {e.last_error}" for e in self._engines)
        err = DockerReplError(f"the pool could not start a REPL: {causes}")
        err.__cause__ = last
        return err

    @property
    def ready_count(self) -> int:
        """How many REPLs are ready right now."""
        return len(self._ready)

    def stats(self) -> list[dict[str, Any]]:
        """Per engine: its name, REPLs ready, starting and handed out (still open),
        consecutive failed starts and the last error."""
        with self._cond:
            return [e.stats() for e in self._engines]

    # ---------------------------------------------------------------- closing
    def close(self) -> None:
        """Remove every REPL not handed out (idempotent). Handed-out REPLs stay their owners'."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            workers = list(self._workers)
        for t in workers:  # members still starting clean themselves up when they finish
            t.join(timeout=180)
        for repl in self._take_ready():
            repl.cleanup()

    def _take_ready(self) -> list[DockerREPL]:
        with self._cond:
            members = [r for r, _ in self._ready]
            self._ready.clear()
            for e in self._engines:
                e.ready = 0
        return members

    def __enter__(self) -> DockerREPLPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_at_exit(self, deadline: float) -> None:
        """From the atexit hook: no new members; the ready ones are closed.

        Members still starting are REPLs the hook closes next (it stops their
        containers and waits for them); no thread is joined or started here.
        """
        with self._cond:
            self._closed = True
        for repl in self._take_ready():
            repl._close_at_exit(deadline)

    def __del__(self) -> None:
        # Members die with the pool. No joining here: a member still starting
        # holds a reference to the pool, so by now none is. During the
        # interpreter's teardown a member is closed without a thread or a wait.
        try:
            self._closed = True
            while self._ready:
                self._ready.popleft()[0]._discard()
        except Exception:
            pass


def _alive(repl: DockerREPL) -> bool:
    container = repl._session.container
    return container is not None and container.alive()
