"""Snapshots of the namespace after the cells that change it, in the background.

A completed cell that may have changed the namespace owes a snapshot: a
copy-on-write child that writes the namespace at a cell boundary
(``store.write_checkpoint``), so the cell never waits for a write. One writer runs
at a time, spaced by what the last one cost (cells back to back: at most ~10% of a
core), and the newest owed snapshot is forked when the worker goes idle; a writer
killed part way leaves the variables it finished (``store.salvage_partial``).
``sync`` writes in the worker itself (``checkpoint()``, ``auto_checkpoint="sync"``).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import struct
import sys
import time
import types

from . import paths, protocol
from .hardening import set_comm
from .namespace import REPL, flush_std
from .scaffold import SCAFFOLD
from .store import (
    STORE,
    dill,
    guard_memory,
    open_lock,
    read_meta,
    salvage_partial,
    write_checkpoint,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap
    import socket
    from typing import Any

# the name snapshot writers give themselves (for `docker top`; any process can take
# it, so the sweep goes by what the supervisor was told at fork, not by this name)
SNAPSHOT_COMM = "drepl-snapshot"
# the exit status of a snapshot child that wrote nothing because a newer snapshot
# is on disk or on its way (not a failure)
SNAPSHOT_DROPPED = 3

_SCALARS = (str, bytes, int, float, complex, bool, type(None))


def _fingerprint() -> tuple[Any, ...] | None:
    """Identity and content digest of a namespace made only of values that cannot
    change in place; ``None`` when any value is mutable (then every cell is
    snapshotted). str and bytes cache their hash, so a 100 MB string costs its
    hash once, not every cell.
    """
    fp: list[tuple[Any, ...]] = []
    for k in REPL.user_names():
        v = REPL.ns[k]
        t = type(v)
        try:
            if t in _SCALARS or (
                t in (tuple, frozenset) and len(v) <= 64 and all(type(e) in _SCALARS for e in v)
            ):
                fp.append((k, t, id(v), hash(v)))
            elif t is types.ModuleType:
                fp.append((k, t, id(v)))
            elif t is types.FunctionType:
                fp.append((k, t, id(v), hash(v.__code__), id(v.__defaults__), id(v.__closure__)))
            elif (
                k == "answer"
                and t is dict
                and len(v) <= 8
                and all(type(e) in _SCALARS for e in v.values())
            ):
                fp.append((k, t, tuple(sorted((str(a), b) for a, b in v.items()))))
            else:
                return None
        except Exception:
            return None
    return tuple(fp)


def _checkpoint_state() -> tuple[dict[str, Any], dict[str, list[str]]]:
    ns = REPL.ns
    state: dict[str, Any] = {}
    file_backed: dict[str, list[str]] = {}
    for k in REPL.user_names():
        v = ns[k]
        fb = REPL.file_backed.get(k)
        if fb is not None and fb[0] == id(v):
            file_backed[k] = [fb[1], fb[2]]
            continue
        if STORE.known_bad.get(k) == id(v):
            continue
        if SCAFFOLD.tools.get(k) is v:
            continue  # reinstalled from scaffold.json on restore (host-tool stubs do not pickle)
        if k == "history" and REPL.config.get("compaction"):
            continue
        if k == "context" and "context_0" in ns and ns["context_0"] is v:
            continue
        if k == "history" and "history_0" in ns and ns["history_0"] is v:
            continue
        state[k] = v
    # smallest first: a writer killed part way (out of memory) has written the most
    # variables it could (the size is shallow, and asked only of C-level __sizeof__)
    return dict(sorted(state.items(), key=_size)), file_backed


def _size(item: tuple[str, Any]) -> int:
    try:
        if isinstance(getattr(type(item[1]), "__sizeof__", None), types.FunctionType):
            return 0  # a Python __sizeof__ is cell code: not run in the worker's snapshot
        return sys.getsizeof(item[1])
    except Exception:
        return 0


class Wanted:
    """Memory the worker's snapshot children share with it (an anonymous shared
    mapping made before the first fork): the seq of the newest snapshot, and the
    progress of the one writing.

    A snapshot child waiting for the lock behind another writer gives up as soon as
    a newer one is on its way: it would only write a state the newer one replaces.
    A writer says after each variable how far its file is whole, so that if it is
    killed part way (out of memory) the worker can keep that much.
    """

    def __init__(self) -> None:
        self.map: mmap.mmap | None = None

    def set(self, seq: int) -> None:
        if self.map is None:
            try:
                import mmap

                self.map = mmap.mmap(-1, 32)
            except (ImportError, OSError, ValueError):
                return  # then no child gives up: each writes in turn, in order
        self.map[0:8] = struct.pack("=q", seq)

    def newer_than(self, seq: int) -> bool:
        """For a child: whether a newer snapshot than ``seq`` is on its way."""
        return self._read(0) > seq

    def _read(self, at: int) -> int:
        """Read until two reads agree (the other side may be writing it right now)."""
        if self.map is None:
            return -1
        last = None
        while True:
            value: int = struct.unpack("=q", self.map[at : at + 8])[0]
            if value == last:
                return value
            last = value

    def progress(self, seq: int, n: int, offset: int) -> None:
        """For the writer of ``seq``: its first ``n`` variables end at ``offset``."""
        if self.map is not None:
            self.map[8:16] = struct.pack("=q", -1)  # torn while the rest changes
            self.map[16:32] = struct.pack("=qq", n, offset)
            self.map[8:16] = struct.pack("=q", seq)

    def progress_of(self, seq: int) -> tuple[int, int] | None:
        """For the worker, once the writer of ``seq`` is dead: ``(n, offset)``."""
        if self.map is None or self._read(8) != seq:
            return None
        n, offset = struct.unpack("=qq", self.map[16:32])
        return (n, offset) if self._read(8) == seq else None


#: Seconds without a message after which the worker counts as idle: the host's gap
#: between back-to-back cells is ~1 ms, a model's turn between cells is seconds.
IDLE_S = 0.01
#: While cells come back to back, a new writer waits this many times the CPU time
#: the last one took (from its end): writers use at most ~1/(1+BUSY_SPACING) of a
#: core. An idle worker waits IDLE_SPACING times it (so at most about half a core).
BUSY_SPACING = 9.0
IDLE_SPACING = 1.0


class _Writer:
    """What the worker keeps about one snapshot child."""

    __slots__ = ("cell", "err", "file_backed", "fork_s", "names", "order", "skipped")

    def __init__(
        self, cell: int, order: list[int], err: int, names: list[str],
        file_backed: dict[str, list[str]], skipped: list[str], fork_s: float,
    ) -> None:  # fmt: skip
        self.cell, self.order, self.err, self.names = cell, order, err, names
        self.file_backed, self.skipped, self.fork_s = file_backed, skipped, fork_s


class Checkpointer:
    """Background snapshots, in order, converging on the last completed cell.

    A completed cell that may have changed the namespace owes a snapshot: a
    copy-on-write child that writes the namespace at a cell boundary, so the cell
    never waits for the write. It is forked at once unless a writer is still
    running or the last one ended too recently for its cost (``BUSY_SPACING``);
    then the worker takes it when it goes idle (``idle``), of the newest state.
    Children write one at a time (LOCK_FILE); one that waits for its turn and
    sees a newer snapshot on its way exits (coalescing), and one whose state is
    older than the file on disk writes nothing (see ``write_checkpoint``).
    """

    def __init__(self) -> None:
        self.last_fp: tuple[Any, ...] | None = None
        #: snapshot child pid -> what it writes
        self.cells: dict[int, _Writer] = {}
        # the newest snapshot that ended, as (seq, cell, None) or (seq, cell, why it failed)
        self.outcome: tuple[int, int, str | None] | None = None
        self.told = False  # a failure was reported since the last good snapshot
        self.wanted = Wanted()
        #: the worker's end of its control socket (the snapshot child closes its copy)
        self.ctrl: socket.socket | None = None
        #: the newest cell whose snapshot is owed (not forked yet), or None
        self.owed: int | None = None
        #: when the last writer ended (monotonic) and the CPU seconds it cost
        self.last_end = 0.0
        self.last_cost = 0.0

    def reap(self, block: bool = False) -> None:
        for pid in list(self.cells):
            rusage = None
            try:
                done, status, rusage = os.wait4(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                done, status = pid, None
            if done:
                w = self.cells[pid]
                self.last_end = time.monotonic()
                self.last_cost = w.fork_s
                if rusage is not None:
                    self.last_cost += rusage.ru_utime + rusage.ru_stime
                self._learn_bad()
                self._record(pid, status)

    def _record(self, pid: int, status: int | None) -> None:
        w = self.cells.pop(pid)
        cell, seq = w.cell, w.order[1]
        bad, why = _child_error(w.err)
        if status is not None and os.WIFEXITED(status):
            if os.WEXITSTATUS(status) == SNAPSHOT_DROPPED:
                return  # a newer snapshot is on disk or on its way: not an outcome
            if os.WEXITSTATUS(status) == 0:
                why = None
        if status is not None and status != 0:
            why = why or _describe_status(status)
        if why is not None:
            why = self._salvage(pid, w, bad, why)
        newest = self.outcome[0] if self.outcome else -1
        if seq >= newest:
            self.outcome = (seq, cell, why)
            if why is None:
                self.told = False
        if why is not None:
            self.last_fp = None  # try again after the next cell, changed or not

    def _salvage(self, pid: int, w: _Writer, bad: list[str], why: str) -> str:
        """A writer that failed part way: keep the variables it wrote, if any."""
        got = self.wanted.progress_of(w.order[1])
        if got is None or got[0] <= 0:
            return why
        n, offset = got
        lacks = [k for k in w.names[n:] if k not in bad]
        skipped = sorted(set(w.skipped) | set(bad))
        meta = {
            "cell": w.cell,
            "order": w.order,
            "skipped": skipped,
            "file_backed": w.file_backed,
            "time": time.time(),
            "bad_ids": {k: id(REPL.ns[k]) for k in skipped if k in REPL.ns},
            "partial": {"why": why, "lacks": lacks},
        }
        try:
            kept = salvage_partial(pid, offset, meta)
        except Exception:
            kept = False
        if kept and lacks:
            return "%s; it was kept without %s" % (why, ", ".join(lacks))
        return why if not kept else "%s; it was kept whole" % why

    def report(self) -> None:
        """Say in the cell's stderr that the newest snapshot failed: once per run of
        failures (a limit the cell set fails every snapshot after it)."""
        self.reap()
        if not self.outcome or self.outcome[2] is None or self.told:
            return
        self.told = True
        _, cell, why = self.outcome
        good = read_meta().get("cell")
        sys.stderr.write(
            "dockerrepl: the checkpoint after cell %s failed (%s); a crash now would restore"
            " %s\n" % (cell, why, "the one after cell %s" % good if good is not None else "nothing")
        )

    def _learn_bad(self) -> None:
        try:
            with open(paths.META_FILE) as f:
                meta = json.load(f)
            for k, i in (meta.get("bad_ids") or {}).items():
                STORE.known_bad[k] = i
        except Exception:
            pass

    def request(self, cell_id: int) -> None:
        """After a completed cell: a snapshot is owed unless nothing can have changed
        since the last one; forked now if the spacing allows it, else when idle."""
        self.reap()
        fp = _fingerprint()
        if fp is not None and fp == self.last_fp:
            return  # nothing can have changed since the last snapshot: skip the fork
        self.owed = cell_id
        if not self.cells and time.monotonic() >= self.last_end + BUSY_SPACING * self.last_cost:
            self._fork(cell_id)

    def idle(self, sock: socket.socket) -> None:
        """Before the worker blocks for its next message: while a snapshot is owed,
        wait for the message no longer than until the snapshot may be forked (the
        worker idle for IDLE_S, no writer running, IDLE_SPACING since the last), and
        fork it then. Returns when a message is there, or nothing is owed and no
        writer runs."""
        start = time.monotonic()
        # a running writer is waited for too: reaped as it ends, one killed part way
        # is salvaged while it is still the newest (not at the next cell)
        while self.owed is not None or self.cells:
            self.reap()
            now = time.monotonic()
            if not self.cells:
                if self.owed is None:
                    return
                at = max(start + IDLE_S, self.last_end + IDLE_SPACING * self.last_cost)
                if now >= at:
                    self._fork(self.owed)
                    continue
                fds, wait = [sock.fileno()], at - now
            else:  # a writer's pipe is readable (EOF) once it exits
                fds, wait = [sock.fileno()] + [w.err for w in self.cells.values()], 1.0
            try:
                ready = select.select(fds, [], [], wait)[0]
            except (OSError, ValueError):
                return
            if sock.fileno() in ready:
                return
            if ready:
                time.sleep(0.001)  # closed its pipe, about to be a zombie

    def _fork(self, cell_id: int) -> None:
        self.owed = None
        self.last_fp = _fingerprint()
        if "dill" not in sys.modules:
            # once per worker, here (the cell's result is already sent) and not in
            # the snapshot child: a child inherits dill and lands in ~5 ms, where one
            # importing it at nice 10 on a busy host took up to ~0.9 s, the window
            # in which a killed container loses the worker's first completed cell
            try:
                dill()
            except Exception:
                pass
        order = STORE.next_order()
        state, fb = _checkpoint_state()
        flush_std()
        pending = open_lock(paths.PENDING_FILE)
        err_r = err_w = None
        t0 = time.monotonic()
        try:
            if self.wanted.map is None:
                self.wanted.set(0)  # mapped before the fork, so the child shares it
            err_r, err_w = os.pipe()
            fcntl.flock(pending, fcntl.LOCK_SH)
            pid = os.fork()
        except OSError:
            # no process left under the pids limit (a flood the cell left behind), or
            # no memory: skip this snapshot, the next completed cell tries again. The
            # worker must not die for it: its namespace is newer than any checkpoint.
            for fd in (pending, err_r, err_w):
                if fd is not None:
                    os.close(fd)
            self.last_fp = None
            return
        except BaseException:
            for fd in (pending, err_r, err_w):
                if fd is not None:
                    os.close(fd)
            raise
        if pid == 0:  # the child: a copy-on-write snapshot of the namespace
            os.close(err_r)
            self._child(state, fb, cell_id, order, err_w)
        os.close(pending)  # the child's copy of the descriptor keeps the lock
        os.close(err_w)
        os.set_inheritable(err_r, False)
        skipped = [k for k, i in STORE.known_bad.items() if k in REPL.ns and id(REPL.ns[k]) == i]
        self.cells[pid] = _Writer(
            cell_id, order, err_r, list(state), fb, skipped, time.monotonic() - t0
        )
        self._report_snapshot(pid)
        # only now that the child exists: an older child that gives up for it must
        # be sure a newer snapshot is really on its way
        self.wanted.set(order[1])

    def _child(
        self, state: dict[str, Any], fb: dict[str, list[str]], cell_id: int,
        order: list[int], err_w: int,
    ) -> None:  # fmt: skip
        code = 1
        try:
            if self.ctrl is not None:
                self.ctrl.close()  # so the supervisor sees EOF if the worker dies
            # its own process group: killing a runaway worker must not kill the snapshot
            os.setpgid(0, 0)
            set_comm(SNAPSHOT_COMM)  # a name for `docker top`; it grants nothing
            _lower_priority()
            guard_memory(lambda text: _note_child_error(err_w, MemoryError(text)))
            wanted = self.wanted
            noted: list[bool] = []

            def progress(n: int, offset: int, bad: list[str]) -> None:
                if bad and not noted:
                    noted.append(True)
                    _note_bad(err_w, bad)  # once: the retry without them has begun
                wanted.progress(order[1], n, offset)

            done = write_checkpoint(
                state, fb, cell_id, order,
                give_up=lambda: wanted.newer_than(order[1]), progress=progress,
            )  # fmt: skip
            code = SNAPSHOT_DROPPED if done is None else 0
        except BaseException as e:
            code = 1
            _note_child_error(err_w, e)
        finally:
            os._exit(code)

    def sync_changed(self, cell_id: int) -> None:
        """``sync`` unless nothing can have changed; a failure is reported in stderr."""
        fp = _fingerprint()
        if fp is not None and fp == self.last_fp:
            return
        try:
            self.sync(cell_id)
        except Exception as e:
            self.last_fp = None
            sys.stderr.write("dockerrepl: the checkpoint failed: %s: %s\n" % (type(e).__name__, e))
            flush_std()

    def sync(self, cell_id: int) -> list[str]:
        """Write the namespace now, in this process. Snapshot children still waiting
        give up (this one is newer); one that is writing is waited for (the lock)."""
        self.reap()
        order = STORE.next_order()
        self.wanted.set(order[1])
        self.owed = None  # this write has the newest state
        self.last_fp = _fingerprint()
        state, fb = _checkpoint_state()
        skipped = write_checkpoint(state, fb, cell_id, order)
        self.reap()
        if skipped is None:
            self.last_fp = None
            raise RuntimeError(
                "not written: a newer checkpoint is on disk (another worker wrote to %s)"
                % paths.STATE_FILE
            )
        for k in skipped:
            if k in REPL.ns:
                STORE.known_bad[k] = id(REPL.ns[k])
        return skipped

    def _report_snapshot(self, pid: int) -> None:
        """Tell the supervisor a snapshot writer was forked, so its sweep spares it."""
        try:
            if self.ctrl is not None:
                protocol.send_frame(self.ctrl, {"type": "snapshot", "pid": pid})
        except OSError:
            pass


def _lower_priority() -> None:
    """In a snapshot child: the cells come first, and if the container runs out of
    memory the kernel kills the writer, not the worker (whose namespace is newer
    than any checkpoint): an OOM score adjustment may always be raised."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    try:
        # SCHED_IDLE: runs on what its own container's worker leaves idle (a cgroup
        # competes with other containers as a whole), where nice 10 still took ~10%
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(10)
        except OSError:
            pass


def _note_bad(fd: int, bad: list[str]) -> None:
    """In a snapshot child: the names dill cannot pickle, ahead of any error text."""
    try:
        os.write(fd, ("bad %s\n" % json.dumps(bad))[:60000].encode("utf-8", "replace"))
    except OSError:
        pass


def _note_child_error(fd: int, exc: BaseException) -> None:
    """In a snapshot child that failed: the reason, through a pipe to the worker (a
    pipe, not a file: the file size limit that failed the snapshot applies to files)."""
    try:
        text = ("%s: %s" % (type(exc).__name__, exc))[:500]
        os.write(fd, text.encode("utf-8", "replace"))
    except BaseException:
        pass


def _child_error(fd: int) -> tuple[list[str], str | None]:
    """What the snapshot child wrote to its pipe (it has exited: no wait): the names
    dill could not pickle (``_note_bad``), and why it failed."""
    try:
        text = os.read(fd, 65536).decode("utf-8", "replace")
    except OSError:
        return [], None
    finally:
        os.close(fd)
    bad: list[str] = []
    if text.startswith("bad "):
        line, _, text = text.partition("\n")
        try:
            bad = [str(k) for k in json.loads(line[4:])]
        except ValueError:
            pass
    return bad, text[:2000] or None


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return "its writer was killed by signal %d%s" % (
            sig,
            ", out of memory?" if sig == signal.SIGKILL else "",
        )
    return "its writer exited with status %d" % os.WEXITSTATUS(status)


CHECKPOINTER = Checkpointer()
