"""The container's processes, seen from the supervisor (pid 1): what a killed worker
left behind is swept, the snapshot writers it reported are spared for a while.
"""

from __future__ import annotations

import os
import signal
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

# The sweep spares at most this many snapshot writers (one writing, one waiting: all
# a worker ever has), the newest the worker reported, for at most SNAPSHOT_SPARE
# seconds (the restore's own wait for them); then they are killed.
MAX_SPARED = 2
SNAPSHOT_SPARE = 60.0


def in_container() -> bool:
    """True when this supervisor runs under the container's init (docker run --init).

    The sweep below kills every other process it can see: it must never run
    where the bootstrap was started by something else (tests on the host).
    """
    if os.getpid() == 1:
        return True
    if os.getppid() != 1:
        return False
    try:
        with open("/proc/1/cmdline", "rb") as f:
            init = f.read().split(b"\0", 1)[0]
    except OSError:
        return False
    return os.path.basename(init) in (b"docker-init", b"tini", b"tini-static", b"dumb-init")


def sweep_processes(
    spare: int | None = None, keep: Iterable[tuple[int, int]] = ()
) -> list[tuple[int, int]]:
    """Kill what a killed worker left behind: children that left its process group
    (``setsid``), fork floods that fill the pids limit. Spares init, the
    supervisor, ``spare`` and the ``keep`` list of ``(pid, start time)``: the
    snapshot writers the supervisor was told of (they finish the last completed
    cell's checkpoint, which the restore waits for). A process's name spares
    nothing: any process can call itself ``drepl-snapshot``. Returns
    ``[(pid, parent pid)]`` of the processes it killed (zombies included: they
    still hold a pid).
    """
    if not in_container():
        return []
    me, killed = os.getpid(), []
    keep = set(keep)
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit() or int(name) in (1, me, spare):
            continue
        pid = int(name)
        st = proc_stat(pid)
        if st is None or (pid, st[1]) in keep:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, st[0]))
        except OSError:
            pass
    return killed


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a process, from /proc; None if gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_start(pid: int) -> int | None:
    st = proc_stat(pid)
    return None if st is None else st[1]


#: the note a cell gets when it left the container without process slots
PIDS_NOTE = (
    "the container had run out of processes (pids limit); %d left-over processes were killed"
)


def pids_exhausted() -> bool:
    """True when the container's pids cgroup is (nearly) full (cgroup v1 or v2)."""
    for d in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        try:
            with open(d + "/pids.max") as f:
                limit = f.read().strip()
            with open(d + "/pids.current") as f:
                current = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if not limit.isdigit():
            return False
        return current >= int(limit) - 2
    return False


class SnapshotWriters:
    """The snapshot writers the worker reported: spared by a sweep, for a while."""

    def __init__(self) -> None:
        #: [(pid, start time)], newest last
        self.snapshots: list[tuple[int, int]] = []
        #: when the writers a sweep spared are killed
        self.spared_until: float | None = None
        #: more processes every sweep spares: the parked snapshots, ``[(pid, start time)]``
        self.also_keep: Callable[[], list[tuple[int, int]]] = list

    def note(self, pid: Any, worker_pid: int | None) -> None:
        """The worker forked a snapshot writer. Cell code can send this frame too,
        naming its own children: so only a child of the worker counts, only the
        newest MAX_SPARED are kept, and a sweep spares them for SNAPSHOT_SPARE s."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
            return
        st = proc_stat(pid)
        if st is None or worker_pid is None or st[0] != worker_pid:
            return
        self.snapshots = (self.snapshots + [(pid, st[1])])[-MAX_SPARED:]

    def sweep(self, spare: int | None = None) -> list[tuple[int, int]]:
        """sweep_processes, sparing the reported snapshot writers for a bounded time."""
        keep = [(pid, start) for pid, start in self.snapshots if proc_start(pid) == start]
        self.snapshots = keep
        killed = sweep_processes(spare=spare, keep=keep + self.also_keep())
        if keep and self.spared_until is None:
            self.spared_until = time.monotonic() + SNAPSHOT_SPARE
        return killed

    def kill_all(self) -> None:
        """Kill every reported snapshot writer now (matched by pid and start time): a
        rollback's (what they write is superseded, and the lock they hold would keep
        the new worker waiting), or the end of the time a sweep spared them."""
        for pid, start in self.snapshots:
            if proc_start(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.snapshots = []
        self.spared_until = None

    def kill_spared(self) -> None:
        """Kill the snapshot writers a sweep spared, if it spared any."""
        if self.spared_until is not None:
            self.kill_all()


class OomCounter:
    """The container's OOM-kill count, as last read."""

    def __init__(self) -> None:
        self.seen = 0

    def suspected(self) -> bool:
        """Best effort: did the kernel's OOM killer act in this container's cgroup
        since the last call?"""
        for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
            try:
                with open(path) as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == "oom_kill":
                    count = int(parts[1])
                    prev, self.seen = self.seen, count
                    return count > prev
        return False
