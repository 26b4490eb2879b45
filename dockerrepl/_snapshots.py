"""In-memory snapshots of a REPL (``snapshot``, ``rollback``), the host's side.

A snapshot is a parked fork of the container's worker (see ``_bootstrap/snapshots.py``
and ``_bootstrap/parking.py``): taking one costs a fork (no pickling), keeping one
costs the memory pages the worker changes afterwards, inside the container's memory
limit, and rolling back makes a new worker from it in a few milliseconds whatever the
namespace's size. What only the host knows (how many contexts and histories, the
compaction history) is kept beside it, in the :class:`Snapshot` value.

A snapshot lives in its container: a container that is replaced (killed, the engine
restarted) takes its snapshots with it, and :class:`~dockerrepl.errors.SnapshotLost`
says so. A worker that crashes or is killed for a timeout does not.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._bootstrap import protocol
from ._sessions import host_state
from .errors import DockerReplError, SnapshotLost

if TYPE_CHECKING:
    from .repl import DockerREPL

__all__ = ["Snapshot", "discard", "rollback", "take"]

log = logging.getLogger("dockerrepl")

# snapshot ids, unique in the process (a snapshot of one REPL is refused by another)
_IDS = itertools.count(1)
_IDS_LOCK = threading.Lock()
# taking, rolling back and dropping: the fork of a big heap is quick, but not free
_CALL_TIMEOUT = 60.0


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A point :meth:`DockerREPL.rollback` can return a REPL to.

    ``cell`` is the last completed cell when it was taken (the namespace as of then),
    ``created`` the ``time.time()`` it was taken at.
    """

    id: int
    cell: int
    created: float
    _owner: int = field(repr=False)
    _restarts: int = field(repr=False)
    _state: dict[str, Any] = field(repr=False)


def take(repl: DockerREPL, keep: int) -> Snapshot:
    """Snapshot ``repl``'s namespace as of its last completed cell; at most ``keep``
    are kept, the oldest dropped."""
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int, not {type(keep).__name__}")
    if not 1 <= keep <= protocol.MAX_SNAPSHOTS:
        raise ValueError(f"keep must be between 1 and {protocol.MAX_SNAPSHOTS}, not {keep}")
    session = repl._session
    with _IDS_LOCK:
        snap = next(_IDS)
    with session.held():
        session.call("snapshot", {"snap": snap, "keep": keep}, _CALL_TIMEOUT)
        # (the call may have replaced a dead container first: what is counted is after)
        return Snapshot(
            id=snap,
            cell=session.last_completed,
            created=time.time(),
            _owner=id(session),
            _restarts=session.restarts,
            _state=host_state(repl),
        )


def _check(repl: DockerREPL, snap: Any) -> None:
    if not isinstance(snap, Snapshot):
        raise TypeError(f"expected a Snapshot from snapshot(), not {type(snap).__name__}")
    if snap._owner != id(repl._session):
        raise ValueError(f"snapshot {snap.id} was taken of another REPL")


def rollback(repl: DockerREPL, snap: Snapshot) -> None:
    """Make ``repl``'s namespace the one ``snap`` holds (the snapshot stays usable)."""
    _check(repl, snap)
    session = repl._session
    with session.held():
        session.check_open()
        if session.restarts != snap._restarts:
            raise SnapshotLost(
                f"snapshot {snap.id} (after cell {snap.cell}) was lost with its container,"
                " which was replaced since"
            )
        try:
            value = session.call("rollback", {"snap": snap.id, "cell": session.last_completed})
        except SnapshotLost:
            raise
        except DockerReplError as exc:
            if session.restarts != snap._restarts:
                raise SnapshotLost(
                    f"snapshot {snap.id} (after cell {snap.cell}) was lost with its"
                    " container, which died"
                ) from exc
            raise
        log.debug("rollback to snapshot %s: %s", snap.id, value)
        state = snap._state
        repl._context_count = int(state.get("contexts") or 0)
        repl._history_count = int(state.get("histories") or 0)
        history = state.get("compaction_history")
        if repl.compaction and isinstance(history, list):
            session.compaction_history[:] = history
            session.call("compaction", {"history": session.compaction_history})
        specs = session.options.tools.specs
        if specs:
            # the tools stay as they are now (they are the host's configuration, not
            # the namespace's): the new worker had the snapshot's
            session.call("define_tools", {"tools": specs})


def discard(repl: DockerREPL, snap: Snapshot) -> None:
    """Free ``snap``'s memory in the container now (idempotent)."""
    _check(repl, snap)
    session = repl._session
    with session.held():
        if session.closed or session.restarts != snap._restarts:
            return  # gone with its container already
        session.call("drop_snapshot", {"snap": snap.id}, _CALL_TIMEOUT)
