"""The supervisor's one worker process: forked with its pipes, killed, reaped."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import time
import traceback

from . import protocol
from .hardening import close_fds_except, set_dumpable
from .parking import Parked
from .procs import SnapshotWriters
from .snapshots import recv_with_fds
from .worker import worker_main

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class WorkerSlot:
    """Where the worker runs; the base of the Supervisor, which decides when."""

    def __init__(self, nondumpable: bool) -> None:
        #: the supervisor made itself non-dumpable (main): the worker is made dumpable again
        self.nondumpable = nondumpable
        #: the host's configuration (the hello's), handed to every worker
        self.config: dict[str, Any] = {}
        #: the last cell that ended with the worker alive (a respawn restores up to it)
        self.last_good_cell = 0
        self.writers = SnapshotWriters()  # the snapshot writers the worker reported
        self.parked = Parked()  # the in-memory snapshots (parked forks of a worker)
        self.writers.also_keep = self.parked.keep  # a sweep spares them too
        self.worker_pid: int | None = None
        #: the worker's wait status, when reap_orphans collected it
        self.worker_status: int | None = None
        self.worker_started = False
        self.ctrl: socket.socket | None = None
        self.ctrl_reader = protocol.FrameReader()
        # the read ends of the worker's stdout and stderr (made at the first spawn)
        self.out_r = self.err_r = -1
        self._pipe_w: tuple[int, int] = (-1, -1)

    def spawn_worker(self, restore: bool) -> None:
        if self.out_r < 0:
            self.out_r, out_w = os.pipe()
            self.err_r, err_w = os.pipe()
            self._pipe_w = (out_w, err_w)
            for fd in (self.out_r, self.err_r):
                fl = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        out_w, err_w = self._pipe_w
        parent, child = socket.socketpair()
        try:
            pid = os.fork()
        except OSError:
            # the pids limit is full of what earlier cells left behind: clear it and
            # try once more (if that fails too, this process exits, the container
            # with it, and the host starts a fresh one)
            self.writers.sweep()
            time.sleep(0.1)
            self.reap_orphans()  # as pid 1, the killed orphans' pids are ours to free
            pid = os.fork()
        if pid == 0:
            try:
                parent.close()
                os.setpgid(0, 0)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                # Nothing of the supervisor's may stay open in the worker (the host
                # channel was fds 0/1 until the dup2s above), and only then can the
                # worker be dumpable again: a non-dumpable worker's /proc/self files
                # belong to root, so as a non-root user it could not name its snapshot
                # children (/proc/self/comm), read /proc/self/environ, or let its own
                # children read its /proc entries. The supervisor stays non-dumpable.
                close_fds_except({0, 1, 2, child.fileno()})
                # when the container runs out of memory, the kernel's OOM killer takes
                # the worker or what it started, never the supervisor first: a cell
                # cannot end the container (or its channel) by starving pid 1
                try:
                    with open("/proc/self/oom_score_adj", "w") as f:
                        f.write("500")
                except OSError:
                    pass
                if self.nondumpable:
                    set_dumpable(True)
                child.set_inheritable(False)
                worker_main(child, self.config, restore, self.last_good_cell)
            except BaseException:
                try:
                    traceback.print_exc()
                except BaseException:
                    pass
            os._exit(70)
        child.close()
        self.adopt_worker(pid, parent)
        try:
            # the child does this too; doing it here as well closes the race in which
            # a kill (stdin closed right after start) comes before the child's setpgid:
            # killpg then found no group and the supervisor waited for ever
            os.setpgid(pid, pid)
        except OSError:
            pass

    def adopt_worker(self, pid: int, ctrl: socket.socket) -> None:
        """Make ``pid`` (a child of this process) the worker, on ``ctrl``."""
        self.worker_pid = pid
        self.worker_status = None
        self.ctrl = ctrl
        self.ctrl.setblocking(False)
        self.ctrl_reader = protocol.FrameReader()
        self.worker_started = False

    def recv_ctrl(self) -> bytes | None:
        """What the worker sent (``b""`` at EOF, ``None`` if nothing yet); descriptors
        that came with it wait for their ``parked`` frame."""
        if self.ctrl is None:
            return b""
        try:
            data, fds = recv_with_fds(self.ctrl)
        except BlockingIOError:
            return None
        except OSError:
            return b""
        if fds:
            self.parked.take_fds(fds)
        return data

    # -- the sweep --
    def kill_worker(self) -> int | None:
        if self.worker_pid is None:
            return None
        self.sigkill_worker()
        status = self.reap_worker(block=True)
        return status

    def sigkill_worker(self) -> None:
        """SIGKILL the worker's process group and the worker itself.

        Both: cell code can move the worker out of its group (``setpgid``) while a
        child stays in it; killing only the group then succeeded without reaching
        the worker, and the blocking wait for it never returned (the container
        outlived its host, and timeouts waited for the host's margin).
        """
        pid = self.worker_pid
        if pid is None:
            return
        for kill, target in ((os.killpg, pid), (os.kill, pid)):
            try:
                kill(target, signal.SIGKILL)
            except OSError:
                pass  # no such group (or worker) any more

    def reap_worker(self, block: bool) -> int | None:
        if self.worker_pid is None:
            return None
        status, self.worker_status = self.worker_status, None
        if status is None:
            try:
                pid, status = os.waitpid(self.worker_pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                pid, status = self.worker_pid, 0
            if not pid:
                return None
        self.worker_pid = None
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        return status

    def reap_orphans(self) -> None:
        """As pid 1 (``docker run`` without ``--init``), collect every exited child.

        Processes the worker leaves behind (``setsid`` forks, snapshot writers of a
        killed worker) are re-parented to pid 1; until it waits for them they stay
        zombies and hold pids under the pids limit. The worker's own status is kept
        for :meth:`reap_worker`.
        """
        if os.getpid() != 1:
            return
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            if pid == self.worker_pid and self.worker_status is None:
                self.worker_status = status
