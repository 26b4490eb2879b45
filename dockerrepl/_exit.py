"""What runs when the interpreter exits: one ``atexit`` hook, registered on the first start.

Nothing here runs at import (the design card: no atexit, no threads at import).
The first REPL, pool or LM Handler that starts registers one hook; the hook
closes every one still alive, pools first, with bounded waits.

Why a hook and not only ``__del__``: ``atexit`` callbacks run before the
interpreter's teardown, while the docker CLI can still be run and waited for.
``__del__`` may run during teardown (``sys.is_finalizing()``), where
``Thread.start()`` waits for ever on 3.9-3.11 and raises on 3.12+; there it
must only close descriptors and remove files (see ``DockerREPL._close_now``).
On 3.12 no thread can be started in an ``atexit`` callback either, so the
closers the hook calls start none (``_serve.stop_serving`` knows both cases).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import Any, Optional, Protocol

from .errors import ReplClosed

__all__ = ["EXIT_TIMEOUT", "exiting", "track"]

log = logging.getLogger(__name__)

#: The longest the hook spends in all (each object gets what is left, or less).
EXIT_TIMEOUT = 20.0


class _Closable(Protocol):
    def _close_at_exit(self, deadline: float) -> None: ...


# object -> (order: pools 0, REPLs 1, LM Handlers 2; the pid that started it).
# Weak: being tracked keeps nothing alive. A forked child inherits the entries
# and the hook, but closes only what it started itself.
_live: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
# the process that registered the hook, and the one it last ran in
_state: dict[str, Optional[int]] = {"pid": None, "ran": None}
_exiting = threading.Event()


def exiting() -> bool:
    """True once the hook has begun: nothing may start a container any more."""
    return _exiting.is_set()


def track(obj: _Closable, order: int) -> None:
    """Close ``obj`` (``obj._close_at_exit(deadline)``) at exit unless it is gone by then.

    Registers the hook the first time (per process). Raises
    :class:`~dockerrepl.errors.ReplClosed` once the interpreter is exiting:
    what started now could not be cleaned up.
    """
    with _lock:
        if _exiting.is_set():
            raise ReplClosed("the interpreter is exiting: nothing new is started")
        if _state["pid"] != os.getpid():
            _state["pid"] = os.getpid()
            atexit.register(_at_exit)
        _live[obj] = (order, os.getpid())


def _at_exit() -> None:
    pid = os.getpid()
    with _lock:
        if _state["pid"] != pid or _state["ran"] == pid:
            return  # the parent's hook, inherited by a forked child; or run already
        _state["ran"] = pid
        _exiting.set()
        mine = [(order, obj) for obj, (order, owner) in _live.items() if owner == pid]
    deadline = time.monotonic() + EXIT_TIMEOUT
    for _, obj in sorted(mine, key=lambda item: item[0]):  # stable: start order within one
        try:
            obj._close_at_exit(deadline)
        except Exception:
            log.debug("dockerrepl: closing %r at exit failed", obj, exc_info=True)
