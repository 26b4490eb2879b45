"""Snapshots of the namespace after the cells that change it, in the background.

Each completed cell forks a copy-on-write child that writes the namespace at that
cell boundary (``store.write_checkpoint``), so the cell never waits for a write;
``sync`` writes in the worker itself (``checkpoint()``, ``auto_checkpoint="sync"``).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import sys
import types

from . import paths, protocol
from .hardening import set_comm
from .namespace import REPL, flush_std
from .scaffold import SCAFFOLD
from .store import STORE, dill, open_lock, read_meta, write_checkpoint

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
    return state, file_backed


class Wanted:
    """The seq of the worker's newest snapshot, in memory its snapshot children share
    (an anonymous shared mapping made before the first fork).

    A snapshot child waiting for the lock behind another writer gives up as soon as
    a newer one is on its way: it would only write a state the newer one replaces.
    """

    def __init__(self) -> None:
        self.map: mmap.mmap | None = None

    def set(self, seq: int) -> None:
        if self.map is None:
            try:
                import mmap

                self.map = mmap.mmap(-1, 8)
            except (ImportError, OSError, ValueError):
                return  # then no child gives up: each writes in turn, in order
        self.map[0:8] = struct.pack("=q", seq)

    def newer_than(self, seq: int) -> bool:
        """For a child: whether a newer snapshot than ``seq`` is on its way. Read until
        two reads agree (the worker may be writing the value right now)."""
        if self.map is None:
            return False
        last = None
        while True:
            value: int = struct.unpack("=q", self.map[0:8])[0]
            if value == last:
                return value > seq
            last = value


class Checkpointer:
    """Background snapshots, in order, converging on the last completed cell.

    Each completed cell forks a copy-on-write snapshot of the namespace at that
    cell boundary; the cell itself never waits for a write. Children write one
    at a time (LOCK_FILE); one that waits for its turn and sees a newer snapshot
    on its way exits (coalescing), and one whose state is older than the file on
    disk writes nothing (see ``write_checkpoint``). The file on disk converges on
    the last completed cell even while the worker is busy with the next one.
    """

    def __init__(self) -> None:
        self.last_fp: tuple[Any, ...] | None = None
        # snapshot child pid -> (the cell it snapshots, its seq, its error pipe)
        self.cells: dict[int, tuple[int, int, int]] = {}
        # the newest snapshot that ended, as (seq, cell, None) or (seq, cell, why it failed)
        self.outcome: tuple[int, int, str | None] | None = None
        self.told = False  # a failure was reported since the last good snapshot
        self.wanted = Wanted()
        #: the worker's end of its control socket (the snapshot child closes its copy)
        self.ctrl: socket.socket | None = None

    def reap(self, block: bool = False) -> None:
        for pid in list(self.cells):
            try:
                done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                done, status = pid, None
            if done:
                self._learn_bad()
                self._record(pid, status)

    def _record(self, pid: int, status: int | None) -> None:
        cell, seq, fd = self.cells.pop(pid)
        why = _child_error(fd)
        if status is not None and os.WIFEXITED(status):
            if os.WEXITSTATUS(status) == SNAPSHOT_DROPPED:
                return  # a newer snapshot is on disk or on its way: not an outcome
            if os.WEXITSTATUS(status) == 0:
                why = None
        if status is not None and status != 0:
            why = why or _describe_status(status)
        newest = self.outcome[0] if self.outcome else -1
        if seq >= newest:
            self.outcome = (seq, cell, why)
            if why is None:
                self.told = False
        if why is not None:
            self.last_fp = None  # try again after the next cell, changed or not

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
        self.reap()
        fp = _fingerprint()
        if fp is not None and fp == self.last_fp:
            return  # nothing can have changed since the last snapshot: skip the fork
        self.last_fp = fp
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
            code = 1
            os.close(err_r)
            try:
                if self.ctrl is not None:
                    self.ctrl.close()  # so the supervisor sees EOF if the worker dies
                # its own process group: killing a runaway worker must not kill the snapshot
                os.setpgid(0, 0)
                set_comm(SNAPSHOT_COMM)  # a name for `docker top`; it grants nothing
                try:
                    os.nice(10)  # cells come first; the snapshot uses what is left
                except Exception:
                    pass
                wanted = self.wanted
                done = write_checkpoint(
                    state, fb, cell_id, order, give_up=lambda: wanted.newer_than(order[1])
                )
                code = SNAPSHOT_DROPPED if done is None else 0
            except BaseException as e:
                code = 1
                _note_child_error(err_w, e)
            finally:
                os._exit(code)
        os.close(pending)  # the child's copy of the descriptor keeps the lock
        os.close(err_w)
        os.set_inheritable(err_r, False)
        self.cells[pid] = (cell_id, order[1], err_r)
        self._report_snapshot(pid)
        # only now that the child exists: an older child that gives up for it must
        # be sure a newer snapshot is really on its way
        self.wanted.set(order[1])

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


def _note_child_error(fd: int, exc: BaseException) -> None:
    """In a snapshot child that failed: the reason, through a pipe to the worker (a
    pipe, not a file: the file size limit that failed the snapshot applies to files)."""
    try:
        text = ("%s: %s" % (type(exc).__name__, exc))[:500]
        os.write(fd, text.encode("utf-8", "replace"))
    except BaseException:
        pass


def _child_error(fd: int) -> str | None:
    """What the snapshot child wrote to its pipe (it has exited: no wait)."""
    try:
        return os.read(fd, 2000).decode("utf-8", "replace") or None
    except OSError:
        return None
    finally:
        os.close(fd)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return "its writer was killed by signal %d%s" % (
            sig,
            ", out of memory?" if sig == signal.SIGKILL else "",
        )
    return "its writer exited with status %d" % os.WEXITSTATUS(status)


CHECKPOINTER = Checkpointer()
