"""Sessions as values, the container's side: the workspace as one tar (save, fork) and
back (resume, a forked child).

``export`` writes the namespace now (a synchronous checkpoint: ``state.dill`` and its
metadata) and packs ``/workspace`` (contexts, histories, uploaded files, the
checkpoint) into ``EXPORT_NAME``, which the host copies out as opaque bytes: the host
never unpickles anything, only a container does. ``import_`` unpacks such a tar into
a fresh worker's workspace and restores the checkpoint in it, as a restart would.
Only regular files and directories are packed and unpacked; links, devices and FIFOs
are skipped, and no member may leave the workspace.
"""

from __future__ import annotations

import os
import stat
import tarfile

from . import paths, protocol
from .checkpoint import CHECKPOINTER
from .namespace import REPL
from .scaffold import install_scaffold
from .store import read_meta, restore_checkpoint

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Where ``export`` leaves its tar, and where the host puts one for ``import_``
#: (top-level names: the host's file transfer keeps out of ``.dockerrepl``).
EXPORT_NAME = protocol.EXPORT_NAME
IMPORT_NAME = protocol.IMPORT_NAME
#: The bootstrap's own files that travel: the checkpoint's metadata (which values are
#: file-backed, which were skipped). Locks, the epoch and the scaffold stay behind.
_STATE_KEPT = ("state.meta.json",)
_STATE_DIRNAME = os.path.basename(paths.STATE_DIR)


def _members(root: str) -> list[tuple[str, str]]:
    """(path, name in the tar) of every regular file under ``root`` that travels."""
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != _STATE_DIRNAME]
            skip = {EXPORT_NAME, IMPORT_NAME}
            for name in _STATE_KEPT:
                full = os.path.join(paths.STATE_DIR, name)
                if _is_regular(full):
                    out.append((full, _STATE_DIRNAME + "/" + name))
        else:
            skip = set()
        for name in sorted(filenames):
            if name in skip or name.startswith(os.path.basename(paths.STATE_FILE) + ".tmp."):
                continue
            full = os.path.join(dirpath, name)
            if _is_regular(full):
                arc = name if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/" + name
                out.append((full, arc))
    return out


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def op_export(args: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint now and pack the workspace into EXPORT_NAME; at most ``max_bytes``."""
    cap = int(args.get("max_bytes") or (1 << 62))
    skipped = CHECKPOINTER.sync(args.get("cell", REPL.cell_id))
    out = os.path.join(paths.WORKSPACE, EXPORT_NAME)
    try:
        os.unlink(out)  # whatever a cell left at this name (a link) is not followed
    except FileNotFoundError:
        pass
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    total = files = 0
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(
            fileobj=f, mode="w", format=tarfile.PAX_FORMAT
        ) as tar:
            for full, arc in _members(paths.WORKSPACE):
                src = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
                with os.fdopen(src, "rb") as fh:
                    st = os.fstat(fh.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    total += st.st_size
                    if total > cap:
                        raise ValueError(
                            "the workspace is over the %d-byte cap of a saved session" % cap
                        )
                    info = tarfile.TarInfo(arc)
                    info.size = st.st_size
                    info.mode = 0o644
                    info.mtime = int(st.st_mtime)
                    tar.addfile(info, fh)
                    files += 1
        size = os.path.getsize(out)
    except BaseException:
        try:
            os.unlink(out)
        except OSError:
            pass
        raise
    return {"path": EXPORT_NAME, "bytes": size, "files": files, "skipped": skipped}


def op_drop_export(args: dict[str, Any]) -> dict[str, Any]:
    for name in (EXPORT_NAME, IMPORT_NAME):
        try:
            os.unlink(os.path.join(paths.WORKSPACE, name))
        except OSError:
            pass
    return {}


def _safe_parts(name: str) -> list[str] | None:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or name.startswith("/") or any(p == ".." for p in parts):
        return None
    if parts[0] == _STATE_DIRNAME and (len(parts) != 2 or parts[1] not in _STATE_KEPT):
        return None
    if len(parts) == 1 and parts[0] in (EXPORT_NAME, IMPORT_NAME):
        return None
    return parts


def _extract(tar_path: str, cap: int) -> int:
    """Unpack regular files of ``tar_path`` into the workspace; returns how many."""
    n = total = 0
    with tarfile.open(tar_path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = _safe_parts(member.name)
            if parts is None:
                continue
            total += member.size
            if total > cap:
                raise ValueError("the saved workspace is over the %d-byte cap" % cap)
            dest_dir = os.path.join(paths.WORKSPACE, *parts[:-1])
            os.makedirs(dest_dir, exist_ok=True)
            if os.path.realpath(dest_dir) != os.path.join(
                os.path.realpath(paths.WORKSPACE), *parts[:-1]
            ).rstrip("/"):
                continue  # a link on the way: never written through
            dest = os.path.join(dest_dir, parts[-1])
            try:
                if not _is_regular(dest):
                    os.unlink(dest)
            except OSError:
                pass
            src = tar.extractfile(member)
            if src is None:
                continue
            tmp = dest + ".import-tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
            os.replace(tmp, dest)
            n += 1
    return n


def op_import(args: dict[str, Any]) -> dict[str, Any]:
    """Unpack IMPORT_NAME into the workspace and make its checkpoint the namespace."""
    cap = int(args.get("max_bytes") or (1 << 62))
    src = os.path.join(paths.WORKSPACE, IMPORT_NAME)
    CHECKPOINTER.reap(block=True)  # this worker's own snapshots land first, not after
    try:
        files = _extract(src, cap)
    finally:
        try:
            os.unlink(src)
        except OSError:
            pass
    for k in REPL.user_names():
        del REPL.ns[k]
    REPL.file_backed.clear()
    cell, note = restore_checkpoint()
    install_scaffold()
    CHECKPOINTER.last_fp = None
    skipped = read_meta().get("skipped") or []
    return {"cell": cell, "note": note, "files": files, "skipped": skipped}
