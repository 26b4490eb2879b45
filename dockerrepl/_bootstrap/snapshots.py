"""In-memory snapshots of the namespace, the worker's side: a parked fork.

``snapshot`` forks the worker. The child (the *parked* process) holds the namespace
as it was at that moment, copy-on-write, in its own process group, and waits on one
end of a socketpair whose other end goes to the supervisor with the reply
(``SCM_RIGHTS`` on the control socket). Nothing is pickled: taking a snapshot costs
the fork, and keeping one costs the pages the worker changes afterwards.

``spawn`` (the supervisor's rollback) makes a new worker out of the parked process,
which stays parked: a snapshot can be rolled back to again. The new worker's control
socket goes to the supervisor the same way. Both are forked through an intermediate
child (``fork_detached``), so that their parent is the supervisor (pid 1): it waits
for its workers and reaps dropped snapshots, whichever worker made them.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import sys

from . import protocol
from .checkpoint import CHECKPOINTER, Wanted
from .hardening import set_comm
from .namespace import REPL, flush_std

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: the name parked processes give themselves (``docker top``); it grants nothing
PARKED_COMM = "drepl-parked"
#: the worker's own process name, which a worker spawned from a parked process takes back
_COMM: list[str] = []
#: the most bytes of frames read along with passed descriptors at once
_RECV = 1 << 16


def send_with_fd(sock: socket.socket, obj: Any, fd: int) -> None:
    """Send ``obj`` as one frame on ``sock`` with the descriptor ``fd`` attached to its
    first byte (the rest, if the socket takes it in pieces, goes without)."""
    data = protocol.encode(obj)
    fds = array.array("i", [fd])
    sent = 0
    while sent == 0:
        try:
            sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except (BlockingIOError, InterruptedError):
            import select

            select.select([], [sock], [], 1.0)
    rest = memoryview(data)[sent:]
    while rest:
        try:
            rest = rest[sock.send(rest) :]
        except (BlockingIOError, InterruptedError):
            import select

            select.select([], [sock], [], 1.0)


def recv_with_fds(sock: socket.socket, size: int = _RECV) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: the bytes and the descriptors that came with them (closed on
    exec; the caller owns them). Raises what ``recv`` raises."""
    space = socket.CMSG_SPACE(16 * array.array("i").itemsize)
    data, ancdata, _, _ = sock.recvmsg(size, space)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - (len(payload) % got.itemsize)])
            fds.extend(got)
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
    return data, fds


def op_snapshot(args: dict[str, Any]) -> dict[str, Any]:
    """Fork a parked copy of this worker; its socket goes to the supervisor."""
    ctrl = CHECKPOINTER.ctrl
    if ctrl is None:
        raise RuntimeError("no control socket")
    snap = args.get("snap")
    if isinstance(snap, bool) or not isinstance(snap, int):
        raise ValueError("a snapshot needs an int id")
    flush_std()
    ours, theirs = socket.socketpair()

    def park() -> None:
        _COMM[:] = [_read_comm()]
        ours.close()
        ctrl.close()  # the worker's; its EOF is how the supervisor sees the worker die
        _park(theirs)

    try:
        pid = fork_detached(park)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    theirs.close()
    try:
        send_with_fd(
            ctrl,
            {"type": "parked", "snap": snap, "pid": pid, "keep": args.get("keep")},
            ours.fileno(),
        )
    finally:
        ours.close()
    return {"pid": pid, "cell": REPL.cell_id}


def _read_comm() -> str:
    try:
        with open("/proc/self/comm") as f:
            return f.read().strip() or "python3"
    except OSError:
        return "python3"


def _park(sock: socket.socket) -> None:
    """The parked process: wait for the supervisor's ``spawn``; exit at EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are for the worker
    set_comm(PARKED_COMM)
    try:
        # under memory pressure the kernel takes a snapshot before any worker (500)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    sock.setblocking(True)
    reader = protocol.FrameReader()
    while True:
        msg = protocol.recv_frame(sock, reader)
        if msg is None:
            return  # the supervisor dropped the snapshot (or is gone)
        if isinstance(msg, dict) and msg.get("type") == "spawn":
            _spawn(sock, msg)


def _spawn(sock: socket.socket, msg: dict[str, Any]) -> None:
    """Fork a new worker from this parked state (through an intermediate child, so the
    worker is re-parented to the supervisor); hand its socket to the supervisor."""
    ctrl, theirs = socket.socketpair()

    def work() -> None:
        theirs.close()
        sock.close()
        _become_worker(ctrl, msg)

    try:
        pid = fork_detached(work)
    except OSError as e:
        protocol.send_frame(sock, {"type": "spawned", "error": "fork failed: %s" % e})
        return
    finally:
        ctrl.close()
    try:
        send_with_fd(sock, {"type": "spawned", "pid": pid}, theirs.fileno())
    finally:
        theirs.close()


def fork_detached(child: Callable[[], None]) -> int:
    """Run ``child`` in a new process (its own process group) whose parent is pid 1,
    the supervisor, through an intermediate child: the supervisor waits for it (a
    worker), or reaps it when it is dropped (a parked snapshot). Returns its pid."""
    pid_r, pid_w = os.pipe()
    try:
        mid = os.fork()
    except BaseException:
        os.close(pid_r)
        os.close(pid_w)
        raise
    if mid == 0:
        try:
            os.close(pid_r)
            pid = os.fork()
            if pid == 0:
                os.close(pid_w)
                os.setpgid(0, 0)  # killing the worker's group must not kill it
                child()
                os._exit(0)
            os.write(pid_w, b"%d" % pid)
        finally:
            os._exit(0)
    os.close(pid_w)
    try:
        os.waitpid(mid, 0)  # gone: its child's parent is pid 1 now
        raw = os.read(pid_r, 32)
    finally:
        os.close(pid_r)
    if not raw:
        raise OSError("the detached child did not fork")
    return int(raw)


def _become_worker(ctrl: socket.socket, msg: dict[str, Any]) -> None:
    """In the new worker: this process's namespace is the snapshot's; serve the supervisor."""
    from . import store
    from .scaffold import install_scaffold
    from .worker import serve

    set_comm(_COMM[0] if _COMM else "python3")
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")
    except OSError:
        pass
    # the snapshot writers of the worker this was forked from are not this one's
    for writer in CHECKPOINTER.cells.values():
        try:
            os.close(writer.err)
        except OSError:
            pass
    CHECKPOINTER.cells.clear()
    CHECKPOINTER.owed = None  # serve() asks for this state's own snapshot
    CHECKPOINTER.outcome = None
    CHECKPOINTER.told = False
    CHECKPOINTER.last_fp = None
    CHECKPOINTER.wanted = Wanted()  # the old one is shared with those writers
    CHECKPOINTER.ctrl = ctrl
    # an epoch above every one on disk: this state's checkpoints win over the newer
    # state the killed worker (or its writers) may still be writing
    # (a writer the supervisor could not name yet may hold the lock for a while:
    # without it, the epoch is still above the one that writer's state carries,
    # which checks it again before it renames its file, and drops it)
    store.STORE.epoch = 0
    store.start_epoch(wait=0.0)
    cell = msg.get("cell")
    if isinstance(cell, int) and not isinstance(cell, bool):
        REPL.cell_id = cell
    install_scaffold()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    protocol.send_frame(ctrl, {"type": "started", "pid": os.getpid(), "note": None})
    sys.stdout.flush()
    serve(ctrl, REPL.config.get("auto_checkpoint", True), checkpoint_now=True)
