"""Files over the channel: the supervisor's side of put and get (the channel transport).

Without a shared filesystem, contexts, histories and ``upload``/``download`` travel
as frames: a put is a run of ``fput`` frames with the same id (chunks of text, or of
base64 for bytes; the last one has ``"last": true``), answered once; a get is one
``fget`` frame, answered with ``fdata`` chunks and then a reply. The paths are checked
on the host (``dockerrepl._files.split_remote``); here every component is opened
without following a link, a file is written to a fresh temp name and renamed over its
name, and only a regular file is read, with the same rules as the host's copy_in,
copy_out and write_new on a mount.
"""

from __future__ import annotations

import base64
import errno
import os
import secrets
import stat

from . import paths
from .files import PathRefused, entry_mode, kind, open_dir_chain, remove_tree

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

#: Raw bytes per ``fdata`` chunk of a get (base64 on the wire).
CHUNK = 1 << 20
_DIR_IN_THE_WAY = (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)


class _Put:
    __slots__ = ("cap", "dfd", "fd", "mode", "name", "replace_any", "tmp", "written")

    def __init__(self, dfd: int, tmp: str, name: str, fd: int, cap: int, mode: int) -> None:
        self.dfd, self.tmp, self.name, self.fd = dfd, tmp, name, fd
        self.written, self.cap, self.mode = 0, cap, mode
        self.replace_any = False


class _Refused(Exception):
    def __init__(self, exception: str, message: str) -> None:
        Exception.__init__(self, message)
        self.exception = exception


class Transfers:
    """The puts in progress, by request id."""

    def __init__(self, root: str = "") -> None:
        self.root = root or paths.WORKSPACE
        self.puts: dict[int, _Put] = {}
        self.failed: set[int] = set()  # answered already: their later chunks are dropped

    def put(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """One ``fput`` chunk; returns the reply (after the last chunk, or at the first
        error), else None."""
        rid = msg.get("id")
        if not isinstance(rid, int):
            return None
        if rid in self.failed:
            if msg.get("last"):
                self.failed.discard(rid)
            return None
        try:
            job = self.puts.get(rid)
            if job is None:
                job = self.puts[rid] = self._open(msg)
            data = msg.get("data", "")
            if not isinstance(data, str):
                raise _Refused("ValueError", "a chunk must be a string")
            raw = (
                base64.b64decode(data)
                if msg.get("enc") == "b64"
                else data.encode("utf-8", "surrogatepass")
            )
            job.written += len(raw)
            if job.written > job.cap:
                raise _Refused("ValueError", "the file is over the %d-byte cap" % job.cap)
            view = memoryview(raw)
            while view:
                view = view[os.write(job.fd, view) :]
            if not msg.get("last"):
                return None
            self._commit(job)
            del self.puts[rid]
            return {"type": "reply", "id": rid, "ok": True, "value": {"bytes": job.written}}
        except (_Refused, PathRefused, OSError, ValueError) as exc:
            job = self.puts.pop(rid, None)
            if job is not None:
                self._discard(job)
            if not msg.get("last"):
                self.failed.add(rid)
            name = exc.exception if isinstance(exc, _Refused) else "WorkspacePathError"
            if isinstance(exc, ValueError) and not isinstance(exc, _Refused):
                name = "ValueError"
            return {"type": "reply", "id": rid, "ok": False, "error": str(exc), "exception": name}

    def _open(self, msg: dict[str, Any]) -> _Put:
        parts = msg.get("path")
        if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
            raise _Refused("ValueError", "a path must be a list of names")
        where = "/".join(parts)
        dfd = open_dir_chain(self.root, parts[:-1], create=True)
        try:
            name = parts[-1]
            old = entry_mode(name, dfd)
            replace_any = msg.get("replace") == "any"
            if old is not None and not stat.S_ISREG(old) and not replace_any:
                raise _Refused(
                    "WorkspacePathError", "cannot write %r: it is %s" % (where, kind(old))
                )
            mode = stat.S_IMODE(old) & 0o777 if old is not None and stat.S_ISREG(old) else 0o644
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            for _ in range(8):  # O_EXCL: never a name something else planted
                tmp = ".%s.%s.put" % (name[:200], secrets.token_hex(8))
                try:
                    fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
                    break
                except FileExistsError:
                    continue
            else:
                raise _Refused("WorkspacePathError", "cannot write %r: no free temp name" % where)
            cap = msg.get("max")
            cap = cap if isinstance(cap, int) and cap >= 0 else 1 << 62
            job = _Put(dfd, tmp, name, fd, cap, mode)
            job.replace_any = replace_any
            return job
        except BaseException:
            os.close(dfd)
            raise

    def _commit(self, job: _Put) -> None:
        try:
            os.fchmod(job.fd, job.mode)
            os.close(job.fd)
            job.fd = -1
            for _ in range(8):
                try:
                    os.replace(job.tmp, job.name, src_dir_fd=job.dfd, dst_dir_fd=job.dfd)
                    job.tmp = ""  # renamed: nothing to remove
                    return
                except OSError as exc:
                    if not job.replace_any or exc.errno not in _DIR_IN_THE_WAY:
                        raise _Refused(
                            "WorkspacePathError", "cannot write %r: %s" % (job.name, exc)
                        ) from None
                # a payload replaces whatever is at its name (as write_new on a mount)
                aside = ".%s.%s.old" % (job.name[:200], secrets.token_hex(8))
                try:
                    os.rename(job.name, aside, src_dir_fd=job.dfd, dst_dir_fd=job.dfd)
                except FileNotFoundError:
                    continue
                remove_tree("/proc/self/fd/%d/%s" % (job.dfd, aside), ignore_errors=True)
            raise _Refused("WorkspacePathError", "cannot write %r: it keeps coming back" % job.name)
        finally:
            self._discard(job)

    def _discard(self, job: _Put) -> None:
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1
        if job.dfd >= 0:
            if job.tmp:
                try:
                    os.unlink(job.tmp, dir_fd=job.dfd)
                except OSError:
                    pass
            os.close(job.dfd)
            job.dfd = -1

    def get(self, msg: dict[str, Any], send: Callable[[Any], None]) -> dict[str, Any]:
        """Stream a file to the host in ``fdata`` chunks; returns the final reply."""
        rid = msg.get("id")
        parts = msg.get("path")
        cap = msg.get("max")
        cap = cap if isinstance(cap, int) and cap >= 0 else 1 << 62
        try:
            if (
                not isinstance(parts, list)
                or not parts
                or not all(isinstance(p, str) for p in parts)
            ):
                raise _Refused("ValueError", "a path must be a list of names")
            where = "/".join(parts)
            try:
                dfd = open_dir_chain(self.root, parts[:-1], create=False)
            except FileNotFoundError:
                raise _Refused("FileNotFoundError", "no such file in the workspace: %r" % where)
            try:
                mode = entry_mode(parts[-1], dfd)
                if mode is None:
                    raise _Refused("FileNotFoundError", "no such file in the workspace: %r" % where)
                if not stat.S_ISREG(mode):  # not even opened: a device's open can act
                    raise _Refused(
                        "WorkspacePathError", "cannot read %r: it is %s" % (where, kind(mode))
                    )
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                try:
                    fd = os.open(parts[-1], flags, dir_fd=dfd)
                except OSError as exc:
                    raise _Refused(
                        "WorkspacePathError", "cannot read %r (symlink?): %s" % (where, exc)
                    )
            finally:
                os.close(dfd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise _Refused("WorkspacePathError", "%r is not a regular file" % where)
                if st.st_size > cap:
                    raise _Refused(
                        "ValueError",
                        "%r is %d bytes, over the %d-byte cap" % (where, st.st_size, cap),
                    )
                sent = 0
                while True:
                    chunk = os.read(fd, CHUNK)
                    if not chunk:
                        break
                    sent += len(chunk)
                    if sent > cap:  # it grew while it was read
                        raise _Refused("ValueError", "%r grew past the %d-byte cap" % (where, cap))
                    send(
                        {
                            "type": "fdata",
                            "id": rid,
                            "data": base64.b64encode(chunk).decode("ascii"),
                        }
                    )
            finally:
                os.close(fd)
            return {"type": "reply", "id": rid, "ok": True, "value": {"bytes": sent}}
        except (_Refused, PathRefused, OSError) as exc:
            name = exc.exception if isinstance(exc, _Refused) else "WorkspacePathError"
            return {"type": "reply", "id": rid, "ok": False, "error": str(exc), "exception": name}
