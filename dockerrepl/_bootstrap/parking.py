"""In-memory snapshots, the supervisor's side: the parked processes and rollback.

The worker forks a parked copy of itself for each ``snapshot`` (``snapshots.py``) and
hands the supervisor one end of a socketpair to it. A rollback asks the parked
process for a new worker made from its state, and only once that worker exists
kills the current one: a rollback that fails leaves the session as it was.

The supervisor trusts none of it more than the worker's other frames: a parked
process counts only if it is this process's child (detached by a live worker), at most
``max_snapshots`` are kept (the oldest is dropped), and a spawned worker counts only
if it is the supervisor's child.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from . import protocol
from .procs import proc_stat
from .snapshots import recv_with_fds

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .supervisor import Supervisor

#: how many snapshots a session keeps when the host does not say (each holds the
#: pages the worker changed since it was taken: at most one more copy of the heap),
#: and the most it may ask for
DEFAULT_KEEP = 8
MAX_KEEP = protocol.MAX_SNAPSHOTS
#: how long a parked process may take to fork a worker
SPAWN_TIMEOUT = 10.0
# descriptors passed without their frame are closed past this many
_MAX_LOOSE_FDS = 4


class Parked:
    """The parked snapshots: snap id -> (pid, start time, the socket to it)."""

    def __init__(self) -> None:
        self.snaps: dict[int, tuple[int, int, socket.socket]] = {}
        #: descriptors that came on the control socket, waiting for their frame
        self.fds: list[int] = []

    def take_fds(self, fds: list[int]) -> None:
        self.fds.extend(fds)
        while len(self.fds) > _MAX_LOOSE_FDS:
            _close(self.fds.pop(0))

    def add(self, msg: dict[str, Any], worker_pid: int | None) -> None:
        """The worker reported a parked process (with its socket among ``fds``); the
        oldest beyond the ``keep`` it asks for are dropped."""
        keep = msg.get("keep")
        limit = min(keep, MAX_KEEP) if type(keep) is int and keep > 0 else DEFAULT_KEEP
        fd = self.fds.pop(0) if self.fds else None
        snap, pid = msg.get("snap"), msg.get("pid")
        if fd is None:
            return
        if type(pid) is not int or type(snap) is not int or pid <= 1:
            _close(fd)
            return
        st = proc_stat(pid)
        if st is None or worker_pid is None or st[0] != os.getpid():
            _close(fd)  # not a process the worker detached: nothing to keep
            return
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            _close(fd)
            return
        if snap in self.snaps:
            self.drop(snap)
        self.snaps[snap] = (pid, st[1], sock)
        while len(self.snaps) > limit:
            self.drop(next(iter(self.snaps)))

    def alive(self, snap: Any) -> bool:
        entry = self.snaps.get(snap) if type(snap) is int else None
        if entry is None:
            return False
        st = proc_stat(entry[0])
        if st is None or st[1] != entry[1]:
            self.drop(snap)
            return False
        return True

    def drop(self, snap: int) -> None:
        entry = self.snaps.pop(snap, None)
        if entry is None:
            return
        pid, start, sock = entry
        sock.close()  # its EOF is enough; the kill is for one that does not listen
        st = proc_stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def keep(self) -> list[tuple[int, int]]:
        """(pid, start time) of every parked process, for the sweep to spare."""
        return [(pid, start) for pid, start, _ in self.snaps.values()]

    def spawn(self, snap: int, cell: Any) -> tuple[int, socket.socket]:
        """A new worker from snapshot ``snap``: (its pid, its control socket)."""
        _, _, sock = self.snaps[snap]
        end = time.monotonic() + SPAWN_TIMEOUT
        reader = protocol.FrameReader(1 << 16)
        got: list[int] = []
        try:
            sock.settimeout(SPAWN_TIMEOUT)
            protocol.send_frame(sock, {"type": "spawn", "cell": cell})
            while True:
                whole, msg = reader.take()
                if whole:
                    break
                sock.settimeout(max(0.01, end - time.monotonic()))
                data, fds = recv_with_fds(sock)
                got.extend(fds)
                if not data:
                    raise RuntimeError("the snapshot's process is gone")
                reader.feed(data)
        except (OSError, ValueError) as e:
            for fd in got:
                _close(fd)
            self.drop(snap)
            raise RuntimeError("the snapshot did not answer (%s)" % e) from None
        except BaseException:
            for fd in got:
                _close(fd)
            raise
        pid = msg.get("pid") if isinstance(msg, dict) else None
        st = proc_stat(pid) if type(pid) is int and pid > 1 else None
        if type(pid) is not int or st is None or st[0] != os.getpid() or len(got) != 1:
            for fd in got:
                _close(fd)
            why = msg.get("error") if isinstance(msg, dict) else None
            raise RuntimeError(str(why or "the snapshot's process sent no worker"))
        ctrl = socket.socket(fileno=got[0])
        return pid, ctrl


def handle(sup: Supervisor, msg: dict[str, Any]) -> None:
    """A ``call`` the supervisor answers itself: ``rollback`` and ``drop_snapshot``."""
    rid = msg.get("id")
    raw = msg.get("args")
    args: dict[str, Any] = raw if isinstance(raw, dict) else {}
    snap = args.get("snap")

    def reply(value: Any = None, error: str | None = None, exc: str = "RuntimeError") -> None:
        if error is None:
            sup.send_host({"type": "reply", "id": rid, "ok": True, "value": value})
        else:
            sup.send_host(
                {"type": "reply", "id": rid, "ok": False, "error": error, "exception": exc}
            )

    if sup.current is not None:
        sup.send_host({"type": "error", "id": rid, "error": "busy: a request is already running"})
        return
    if msg.get("op") == "drop_snapshot":
        if type(snap) is int:
            sup.parked.drop(snap)
        reply({})
        return
    if type(snap) is not int or not sup.parked.alive(snap):
        reply(error="the snapshot's process is gone", exc="SnapshotLost")
        return
    t0 = time.monotonic()
    # the current worker's snapshot writers would only write a state the rollback
    # replaces, and hold the lock the new worker takes its epoch under (first the
    # frames that name them: the host's request can come before they are read)
    if sup.ctrl is not None:
        sup.pump_ctrl()
    sup.writers.kill_all()
    try:
        pid, ctrl = sup.parked.spawn(snap, args.get("cell"))
    except RuntimeError as e:
        reply(error=str(e), exc="SnapshotLost")
        return
    t1 = time.monotonic()
    # only now that the new worker exists does the current one go
    sup.kill_worker()
    sup.drain_output()
    sup.out.reset()
    sup.err.reset()
    sup.adopt_worker(pid, ctrl)
    t2 = time.monotonic()
    sup.wait_started()
    if not sup.worker_started:
        sup.kill_worker()  # the next request starts one that restores the checkpoint
        reply(error="the worker made from the snapshot did not start", exc="SnapshotLost")
        return
    cell = args.get("cell")
    if type(cell) is int:
        sup.last_good_cell = cell
    sup.restart_note = None
    ms = [round((b - a) * 1000, 2) for a, b in ((t0, t1), (t1, t2), (t2, time.monotonic()))]
    reply({"pid": pid, "ms": dict(zip(("spawn", "kill", "start"), ms))})


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
