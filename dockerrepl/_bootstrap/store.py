"""The checkpoint on disk: written atomically and only forwards, restored under a lock.

Every checkpoint carries an order key ``[epoch, seq]`` (see ``paths.EPOCH_FILE``);
a write that would not move the state on disk forward writes nothing.

``state.dill`` is a stream of dill pickles written by one pickler (so they share its
memo: two names bound to one object are one object again after a restore):
:data:`STREAM_HEADER`, then one ``(name, value)`` per variable. A writer killed part
way (out of memory) leaves whole records before the one it was writing, so its
parent can keep them as a partial checkpoint that names what it lacks
(:func:`salvage_partial`). A file that holds a single dict is an older bootstrap's.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from . import paths
from .files import open_regular, read_regular
from .hardening import WritingConditions
from .namespace import REPL

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import IO, Any


class Store:
    """This worker's place in the order of checkpoints (one instance, :data:`STORE`)."""

    def __init__(self) -> None:
        #: the worker's epoch (0 until it claimed one)
        self.epoch = 0
        #: its last snapshot's seq (never reset within a worker, also when a restore
        #: gives it a new epoch)
        self.seq = 0
        #: name -> id(value) of values dill could not pickle
        self.known_bad: dict[str, int] = {}

    def next_order(self) -> list[int]:
        self.seq += 1
        return [self.epoch, self.seq]


STORE = Store()


def dill() -> ModuleType:
    import dill

    mod: ModuleType = dill
    return mod


#: The first pickle of a streamed ``state.dill``.
STREAM_HEADER = ("dockerrepl-state", 2)


class _Counter:
    def write(self, b: bytes) -> int:
        return len(b)


def open_lock(path: str) -> int:
    """A lock file's descriptor; one it creates is made 0666 whatever the cell's umask
    (created 000, nobody could open it again: --cap-drop ALL leaves no DAC override)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:
        # a cell removed the state directory: made again (else this open failed in the
        # snapshot path, the worker died and the namespace was lost)
        os.makedirs(os.path.dirname(path), 0o777, exist_ok=True)
        fd = os.open(path, flags, 0o666)
    try:
        os.fchmod(fd, 0o666)
    except OSError:
        pass  # not ours (another uid made it): it was made right then
    return fd


def _open_for_write(path: str, binary: bool) -> IO[Any]:
    """A new file, mode 0644 whatever the umask (fchmod is not subject to it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        return os.fdopen(fd, "wb" if binary else "w")
    except BaseException:
        os.close(fd)
        raise


def _read_int(path: str) -> int:
    try:
        return int((read_regular(path, 64) or b"").strip() or 0)
    except ValueError:
        return 0


def read_meta() -> dict[str, Any]:
    # the cell's workspace: never a FIFO's blocking open, never through a link
    try:
        meta = json.loads(read_regular(paths.META_FILE, 1 << 20) or b"null")
    except Exception:
        return {}
    return meta if isinstance(meta, dict) else {}


def _order_of(meta: dict[str, Any]) -> list[int]:
    """The order key [epoch, seq] of a checkpoint's metadata; [-1, -1] (older than any)
    when it has none (an older bootstrap wrote it, or it is unreadable)."""
    order = meta.get("order")
    if (
        isinstance(order, list)
        and len(order) == 2
        and all(type(i) is int for i in order)  # not isinstance: True is no key
    ):
        return order
    return [-1, -1]


def _claim_epoch() -> None:
    """Take an epoch above every one on disk (the caller holds LOCK_FILE exclusively,
    or gave up waiting for it). Snapshots of earlier workers, still on their way, then
    drop themselves, and this worker's snapshots replace whatever the disk holds: a
    worker that restored the checkpoint of cell K writes cell K+1 over a "newer"
    file an earlier worker's late snapshot may have left."""
    epoch = max(_read_int(paths.EPOCH_FILE), _order_of(read_meta())[0], STORE.epoch) + 1
    # seq goes on counting: the snapshot children compare seqs alone (Wanted)
    STORE.epoch = epoch
    tmp = "%s.tmp.%d" % (paths.EPOCH_FILE, os.getpid())
    try:
        with WritingConditions(), _open_for_write(tmp, False) as f:
            f.write("%d\n" % epoch)
        os.replace(tmp, paths.EPOCH_FILE)
    except OSError:
        # not written: this worker's snapshots still win on disk (their epoch is the
        # highest); only an earlier worker's late snapshot is no longer stopped
        try:
            os.unlink(tmp)
        except OSError:
            pass


def start_epoch(wait: float = 10.0) -> None:
    """``_claim_epoch`` under the lock, for a worker that restores nothing (the first
    one, or one whose restore failed): its first snapshot must replace whatever an
    earlier session left in a reused workspace."""
    try:
        lock: int | None = open_lock(paths.LOCK_FILE)
    except OSError:
        lock = None  # the epoch is still taken, in memory: this worker's writes win
    try:
        if lock is not None:
            _lock_exclusive(lock, deadline=time.time() + wait)
        _claim_epoch()
    finally:
        if lock is not None:
            os.close(lock)


def _superseded(order: list[int]) -> bool:
    """Whether a write with ``order`` would go backwards: a newer worker has taken an
    epoch, or the checkpoint on disk is as new or newer. Asked under LOCK_FILE."""
    if _read_int(paths.EPOCH_FILE) > order[0]:
        return True
    return _order_of(read_meta()) >= order


def _lock_exclusive(
    fd: int, deadline: float | None = None, give_up: Callable[[], bool] | None = None
) -> bool:
    """flock(LOCK_EX) on ``fd``: True once held; False at ``deadline`` or as soon as
    ``give_up()`` says so (asked between tries, every 2 ms)."""
    if deadline is None and give_up is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        if give_up is not None and give_up():
            return False
        if deadline is not None and time.time() > deadline:
            return False
        time.sleep(0.002)


def _remove_dead_writers_files() -> None:
    """Temporary state files exist only while their writer holds LOCK_FILE: one seen
    under the lock is a killed writer's (out of memory, a kill of its pid)."""
    prefix = os.path.basename(paths.STATE_FILE) + ".tmp."
    try:
        names = os.listdir(paths.WORKSPACE)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(paths.WORKSPACE, name))
            except OSError:
                pass


def write_checkpoint(
    state: dict[str, Any],
    file_backed: dict[str, list[str]],
    cell_id: int,
    order: list[int],
    give_up: Callable[[], bool] | None = None,
    progress: Callable[[int, int, list[str]], None] | None = None,
) -> list[str] | None:
    """Dump ``state`` to STATE_FILE atomically unless a newer checkpoint is on disk.

    Returns the names that were skipped, or None when nothing was written: the
    disk already holds a newer checkpoint, a newer worker has started, or
    ``give_up()`` said, while this waited for the lock, that a newer snapshot is
    on its way. ``progress(n, offset, bad)`` is called after each record is in
    the temporary file: the first ``n`` names of ``state`` (but for ``bad``, which
    dill cannot pickle) end at byte ``offset``.
    """
    with WritingConditions():
        return _write_checkpoint(state, file_backed, cell_id, order, give_up, progress)


def _dump_stream(
    dill_: ModuleType,
    state: dict[str, Any],
    path: str,
    bad: list[str],
    progress: Callable[[int, int, list[str]], None] | None,
) -> None:
    """Write ``state`` as the stream of records (module docstring) to ``path``."""
    if progress is not None:
        progress(0, 0, bad)  # a retry rewrites the file: nothing of it is whole yet
    with _open_for_write(path, True) as f:
        pickler = dill_.Pickler(f, dill_.settings["protocol"], recurse=True)
        pickler.dump(STREAM_HEADER)
        for n, (k, v) in enumerate(state.items(), 1):
            if k in bad:
                continue
            pickler.dump((k, v))
            if progress is not None:
                f.flush()  # in the file (the page cache) before it is said to be
                progress(n, f.tell(), bad)


def _write_checkpoint(
    state: dict[str, Any],
    file_backed: dict[str, list[str]],
    cell_id: int,
    order: list[int],
    give_up: Callable[[], bool] | None,
    progress: Callable[[int, int, list[str]], None] | None,
) -> list[str] | None:
    dill_ = dill()
    ns = REPL.ns
    skipped = [k for k, i in STORE.known_bad.items() if k in ns and id(ns[k]) == i]
    lock = open_lock(paths.LOCK_FILE)
    try:
        if not _lock_exclusive(lock, give_up=give_up):
            return None
        if give_up is not None and give_up():
            return None  # the newer snapshot will write; this one's dump would be wasted
        # Writers take the lock in no particular order (the first snapshot child of
        # a worker imports dill itself and comes late): the order key, checked
        # under the lock, is what keeps an older state from replacing a newer one.
        if _superseded(order):
            return None
        _remove_dead_writers_files()
        tmp = "%s.tmp.%d" % (paths.STATE_FILE, os.getpid())
        meta_tmp = paths.META_FILE + ".tmp"
        try:
            try:
                _dump_stream(dill_, state, tmp, [], progress)
            except Exception:
                bad = []
                for k, v in list(state.items()):
                    try:
                        dill_.dump(v, _Counter(), recurse=True)
                    except Exception:
                        bad.append(k)
                if not bad:
                    raise  # not a value dill cannot pickle: the write itself failed
                skipped.extend(bad)
                _dump_stream(dill_, state, tmp, bad, progress)
            meta = {
                "cell": cell_id,
                "order": order,
                "skipped": sorted(set(skipped)),
                "file_backed": file_backed,
                "time": time.time(),
                "bad_ids": {k: id(ns[k]) for k in skipped if k in ns},
            }
            if not _commit(tmp, meta_tmp, meta, order):
                return None
        finally:
            _unlink_left(tmp, meta_tmp)
    finally:
        os.close(lock)
    return sorted(set(skipped))


def _unlink_left(*paths_left: str) -> None:
    """Remove the temporary files a write left (none after a commit)."""
    for path in paths_left:
        if os.path.exists(path):
            os.unlink(path)


def _commit(tmp: str, meta_tmp: str, meta: dict[str, Any], order: list[int]) -> bool:
    """Write ``meta`` and put the state file ``tmp`` and it in place (under the lock)."""
    with _open_for_write(meta_tmp, False) as f:
        json.dump(meta, f)
    # asked again right before the replace: a restore that gave up waiting
    # for the lock may have taken a new epoch during the dump
    if _superseded(order):
        return False
    os.replace(tmp, paths.STATE_FILE)
    os.replace(meta_tmp, paths.META_FILE)
    return True


def salvage_partial(pid: int, offset: int, meta: dict[str, Any]) -> bool:
    """In the worker, after its snapshot writer ``pid`` died part way: keep the
    records it finished (the first ``offset`` bytes of its temporary file) as the
    checkpoint ``meta`` describes (its ``partial`` names what is not in it).

    Only if the lock is free now (a writer that holds it has a newer state, and the
    worker must not wait) and this still moves the disk forward. True when kept.
    """
    tmp = "%s.tmp.%d" % (paths.STATE_FILE, pid)
    meta_tmp = paths.META_FILE + ".tmp"
    lock = open_lock(paths.LOCK_FILE)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        with WritingConditions():
            try:
                if _superseded(meta["order"]):
                    return False
                fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    if os.fstat(fd).st_size < offset:
                        return False  # not the file it reported on
                    os.ftruncate(fd, offset)
                finally:
                    os.close(fd)
                return _commit(tmp, meta_tmp, meta, meta["order"])
            except OSError:
                return False
            finally:
                _unlink_left(tmp, meta_tmp)
    finally:
        os.close(lock)


# (limit file, stat file, the stat line of anonymous memory): cgroup v2, then v1
_CGROUP_MEMORY = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.stat", "anon"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.stat", "rss"),
)


def _anon_and_limit() -> tuple[str, str, int] | None:
    for limit_path, stat_path, key in _CGROUP_MEMORY:
        try:
            with open(limit_path) as f:
                limit = int(f.read().strip())  # "max" (no limit): ValueError
        except (OSError, ValueError):
            continue
        if limit < 1 << 50:  # v1 says "no limit" with a huge number
            return stat_path, key, limit
    return None


def _read_stat(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def guard_memory(stop: Callable[[str], None]) -> None:
    """In a snapshot child: stop before the container's anonymous memory reaches its
    limit. The pages a writer touches are copied (refcounts), up to the size of the
    namespace; near the limit the kernel then reclaims page cache for minutes
    (measured: a writer stuck at the limit for 80 s, neither killed nor writing)
    before it kills anything. A writer that stops says why (``stop``) and exits;
    the worker keeps the variables it finished (``salvage_partial``)."""
    found = _anon_and_limit()
    if found is None:
        return
    stat_path, key, limit = found
    margin = max(32 << 20, limit // 16)  # what the worker's cells still need

    def watch() -> None:
        while True:
            anon = _read_stat(stat_path, key)
            if anon is None:
                return
            if anon > limit - margin:
                stop(
                    "the writer stopped at %d MB of the container's %d MB memory limit"
                    % (anon >> 20, limit >> 20)
                )
                os._exit(1)
            time.sleep(0.02)

    import threading

    threading.Thread(target=watch, daemon=True).start()


def _load_state(f: IO[bytes]) -> dict[str, Any]:
    """The namespace in a ``state.dill``: a stream of records, or an older one's dict."""
    unpickler = dill().Unpickler(f)
    first = unpickler.load()
    if isinstance(first, dict):
        return first
    if first != STREAM_HEADER:
        raise ValueError("not a dockerrepl checkpoint (it starts with %.80r)" % (first,))
    state: dict[str, Any] = {}
    while True:
        try:
            name, value = unpickler.load()
        except EOFError:
            return state  # the end of the last whole record (the file is cut only there)
        state[name] = value


def restore_checkpoint(expect_cell: int = 0, wait: float = 60.0) -> tuple[Any, str]:
    """Load the last checkpoint into the namespace; returns (cell_id or None, note).

    Snapshots of later cells may still be on their way in the old worker's
    children: wait (bounded) until none is pending. Then, under the lock, this
    worker takes a new epoch (see EPOCH_FILE): what it writes from now on
    replaces what it restored, and a snapshot of an earlier worker that is
    still late after the wait writes nothing.
    """
    deadline = time.time() + wait
    late = False
    pending = open_lock(paths.PENDING_FILE)
    try:
        while True:
            try:
                fcntl.flock(pending, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.time() > deadline:
                    late = True
                    break
                time.sleep(0.01)
    finally:
        os.close(pending)
    lock = open_lock(paths.LOCK_FILE)
    try:
        _lock_exclusive(lock, deadline=deadline)
        _claim_epoch()
        if not os.path.exists(paths.STATE_FILE):
            return None, "no checkpoint existed; the namespace starts empty"
        meta = read_meta()
        for name, (path, kind) in (meta.get("file_backed") or {}).items():
            try:
                REPL.load_file_var(name, path, kind)
            except Exception:
                pass
        fd = open_regular(paths.STATE_FILE)
        if fd is None:
            return None, "the checkpoint is not a regular file; the namespace starts empty"
        with os.fdopen(fd, "rb") as f:
            state = _load_state(f)
        REPL.ns.update(state)
    finally:
        os.close(lock)
    skipped = meta.get("skipped") or []
    note = "state restored from the checkpoint taken after cell %s" % meta.get("cell", "?")
    have = meta.get("cell")
    if isinstance(have, int) and isinstance(expect_cell, int) and have < expect_cell and not late:
        note += "; changes made by cells %d-%d, if any, are not in it" % (have + 1, expect_cell)
    if late:
        note += " (a later snapshot was still being written after %ds;" % wait
        note += " changes up to cell %s may be lost)" % expect_cell
    partial = meta.get("partial")
    if isinstance(partial, dict):
        note += "; it was written in part (%s), without: %s" % (
            partial.get("why", "?"),
            ", ".join(str(k) for k in partial.get("lacks") or ()) or "?",
        )
    if skipped:
        note += "; not restorable (dill cannot pickle them): %s" % ", ".join(skipped)
    return meta.get("cell"), note
