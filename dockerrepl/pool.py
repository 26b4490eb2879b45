"""A warm pool of pre-started REPLs.

Starting a container costs ~0.3 s; :meth:`DockerREPLPool.acquire` hands out
one that is already running (well under a millisecond) and starts its
replacement in the background. A REPL is handed out once and never returned
to the pool (no state can leak from one user to the next); members that were
never handed out die with the pool: on :meth:`~DockerREPLPool.close`, when the
pool is garbage-collected, and, like every DockerREPL, when the process exits
(their stdin closes and ``--rm`` removes them).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Optional

from . import _exit
from ._options import ReplOptions
from .errors import DockerReplError, ReplClosed
from .repl import DockerREPL

__all__ = ["DockerREPLPool"]

log = logging.getLogger(__name__)


class DockerREPLPool:
    """Keep ``size`` ready :class:`DockerREPL` instances built with ``repl_kwargs``.

    ``acquire()`` returns a ready REPL (the caller owns it and must
    ``cleanup()`` it); ``close()`` removes every REPL not yet handed out.
    Per-user data (``context_payload``, ``setup_code``) can be given as pool
    kwargs if all users share it, or loaded after ``acquire()``.

    Arguments that no member could start with (an unknown keyword, a bad
    ``network`` or ``timeout``, a ``size`` that is not a positive int) raise
    ``TypeError``/``ValueError`` here, before any container starts. Failures
    that only starting a container reveals (no such image, no engine) are
    raised by :meth:`acquire` as :class:`~dockerrepl.errors.DockerReplError`
    with the cause chained.
    """

    def __init__(self, size: int = 2, **repl_kwargs: Any) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, not {size!r}")
        # every member would fail on these: fail now, in the caller's thread. Unlike
        # DockerREPL (rlm passes some), an unknown name is refused: a pool has no such
        # caller, so it is a typo that would otherwise be silently dropped
        ReplOptions.build(**repl_kwargs)
        self.size = size
        self.repl_kwargs = repl_kwargs
        self._ready: queue.Queue[DockerREPL] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._starting = 0
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        _exit.track(self, 0)  # at exit: closed, before its members are
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._starting += 1
            t = threading.Thread(target=self._start_one, name="dockerrepl-pool", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _start_one(self) -> None:
        repl: Optional[DockerREPL] = None
        try:
            repl = DockerREPL(**self.repl_kwargs)
        except BaseException as exc:
            log.warning("pool: starting a REPL failed: %s", exc)
            with self._lock:
                self._errors.append(exc)
        finally:
            with self._lock:
                self._starting -= 1
                closed = self._closed
        if repl is None:
            return
        if closed:
            repl.cleanup()
        else:
            self._ready.put(repl)

    def acquire(self, timeout: Optional[float] = 120.0) -> DockerREPL:
        """A ready REPL, yours alone; a replacement starts in the background.

        Raises :class:`~dockerrepl.errors.ReplClosed` after :meth:`close`,
        :class:`DockerReplError` when members cannot be started (the cause is
        chained) and ``TimeoutError`` when none is ready in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise ReplClosed("the pool is closed")
            try:
                repl = self._ready.get(timeout=0.05)
            except queue.Empty:
                with self._lock:
                    err = self._errors[-1] if self._errors and self._starting == 0 else None
                    if err is not None:
                        self._errors.clear()
                if err is not None:
                    self._spawn()  # keep trying for later callers
                    raise DockerReplError(f"the pool could not start a REPL: {err}") from err
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError("no REPL became ready in time") from None
                continue
            self._spawn()
            if not _alive(repl):
                # it died while it waited (killed from outside, engine restart): a
                # fresh one is better than a restart on the caller's first cell
                log.warning("pool: a ready REPL had died; it is replaced")
                repl.cleanup()
                continue
            return repl

    @property
    def ready_count(self) -> int:
        """How many REPLs are ready right now."""
        return self._ready.qsize()

    def close(self) -> None:
        """Remove every REPL not handed out (idempotent). Handed-out REPLs stay their owners'."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for t in threads:  # members still starting clean themselves up when they finish
            t.join(timeout=180)
        while True:
            try:
                self._ready.get_nowait().cleanup()
            except queue.Empty:
                break

    def __enter__(self) -> DockerREPLPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_at_exit(self, deadline: float) -> None:
        """From the atexit hook: no new members; the ready ones are closed.

        Members still starting are REPLs the hook closes next (it stops their
        containers and waits for them); no thread is joined or started here.
        """
        with self._lock:
            self._closed = True
        while True:
            try:
                self._ready.get_nowait()._close_at_exit(deadline)
            except queue.Empty:
                break

    def __del__(self) -> None:
        # Members die with the pool. No joining here: a member still starting
        # holds a reference to the pool, so by now none is. During the
        # interpreter's teardown a member is closed without a thread or a wait.
        try:
            self._closed = True
            while True:
                self._ready.get_nowait()._discard()
        except queue.Empty:
            pass
        except Exception:
            pass


def _alive(repl: DockerREPL) -> bool:
    container = repl._session.container
    return container is not None and container.alive()
