"""Moving files in and out of the workspace mount without following symlinks.

The container can create symlinks in ``/workspace`` that point anywhere on
the *host* (``/workspace/x -> /etc/shadow``). Every path is therefore walked
one component at a time with ``O_NOFOLLOW`` relative to the previous
directory's file descriptor (``dir_fd``), so neither a symlink nor a race
with the container can lead the host outside the workspace.

The host never opens for writing a name the container could have planted: an
upload goes to a fresh temp file beside it (``O_CREAT | O_EXCL | O_NOFOLLOW``)
that is renamed over the name. A FIFO planted there can therefore not block
the host, and a swap between a check and the write replaces only the swapped-in
entry. A download opens the file ``O_NONBLOCK`` and reads it only when
``fstat`` says it is a regular file.

Trees are removed by :func:`remove_tree`: iteratively (a cell makes 2,000 nested
directories in a second, and a recursive walk dies of ``RecursionError``), never
through a symlink, and with the permission bits a cell set (a directory of mode
000) undone on the way.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tempfile
from typing import BinaryIO, Callable, Optional

from ._bootstrap.files import PathRefused, entry_mode, open_dir_chain, remove_tree
from ._bootstrap.files import kind as _kind
from .errors import WorkspacePathError

__all__ = [
    "DEFAULT_MAX_FILE",
    "check_local_file",
    "copy_in",
    "copy_out",
    "open_dir",
    "remove_tree",
    "split_remote",
    "tree_size",
    "write_local",
    "write_new",
]

#: Largest file upload()/download() move unless told otherwise.
DEFAULT_MAX_FILE = 1 << 30
_MOUNT = "/workspace"


def split_remote(remote_path: str) -> list[str]:
    """Components of a workspace path; raises :class:`WorkspacePathError` if it escapes."""
    if not isinstance(remote_path, str) or not remote_path or "\x00" in remote_path:
        raise WorkspacePathError(f"invalid workspace path {remote_path!r}")
    path = remote_path
    if path.startswith("/"):
        if path != _MOUNT and not path.startswith(_MOUNT + "/"):
            raise WorkspacePathError(f"{remote_path!r} is outside /workspace")
        path = path[len(_MOUNT) :]
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise WorkspacePathError(f"{remote_path!r} contains '..'")
    if not parts:
        raise WorkspacePathError(f"{remote_path!r} names the workspace itself, not a file")
    if parts[0] == ".dockerrepl":
        raise WorkspacePathError("the .dockerrepl directory belongs to the bootstrap")
    return parts


def _open_dir_chain(root: str, parts: list[str], create: bool) -> int:
    try:
        return open_dir_chain(root, parts, create)
    except PathRefused as exc:
        raise WorkspacePathError(str(exc)) from None


def copy_in(root: str, local_path: str, remote_path: str, max_bytes: int = DEFAULT_MAX_FILE) -> int:
    """Copy a host file into the workspace; returns the bytes written.

    If ``remote_path`` exists it must be a regular file, which is replaced
    whole (atomically: a reader sees the old content or the new one); a
    symlink, directory, FIFO, socket or device there raises
    :class:`WorkspacePathError` and is left as it is. The file is written to
    a temp file in the same directory and renamed over the name, so the host
    never opens the entry found under that name. The new file gets the
    permission bits of the file it replaces (a new name: ``0o666`` less the
    umask); its owner is the host user.
    """
    parts = split_remote(remote_path)
    check_local_file(local_path, max_bytes)
    name = parts[-1]
    dfd = _open_dir_chain(root, parts[:-1], create=True)
    try:
        old = entry_mode(name, dfd)
        if old is not None and not stat.S_ISREG(old):
            raise WorkspacePathError(f"cannot write {remote_path!r}: it is {_kind(old)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(8):  # O_EXCL: a name the container planted is never reused
            tmp = f".{name[:200]}.{secrets.token_hex(8)}.upload"
            try:
                fd = os.open(tmp, flags, 0o666, dir_fd=dfd)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise WorkspacePathError(f"cannot write {remote_path!r}: {exc}") from None
        else:
            raise WorkspacePathError(f"cannot write {remote_path!r}: no free temp name")
        try:
            with open(local_path, "rb") as src, os.fdopen(fd, "wb") as dst:
                if old is not None:
                    os.fchmod(dst.fileno(), stat.S_IMODE(old) & 0o777)
                copied = 0
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    copied += len(chunk)
                    if copied > max_bytes:  # the local file grew while we read it
                        raise ValueError(f"{local_path!r} grew past the {max_bytes}-byte cap")
                    dst.write(chunk)
            try:
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError as exc:  # the name became a directory meanwhile, ...
                raise WorkspacePathError(f"cannot write {remote_path!r}: {exc}") from None
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        return copied
    finally:
        os.close(dfd)


def check_local_file(local_path: str, max_bytes: int) -> None:
    """What an upload of ``local_path`` needs: a regular file of at most ``max_bytes``."""
    st = os.stat(local_path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{local_path!r} is not a regular file")
    if st.st_size > max_bytes:
        raise ValueError(f"{local_path!r} is {st.st_size} bytes, over the {max_bytes}-byte cap")


def copy_out(
    root: str, remote_path: str, local_path: str, max_bytes: int = DEFAULT_MAX_FILE
) -> int:
    """Copy a workspace file to the host; returns the bytes read."""
    parts = split_remote(remote_path)
    dfd = _open_dir_chain(root, parts[:-1], create=False)
    try:
        mode = entry_mode(parts[-1], dfd)
        if mode is None:
            raise FileNotFoundError(f"no such file in the workspace: {remote_path!r}")
        if not stat.S_ISREG(mode):  # not even opened (a device's open can act)
            raise WorkspacePathError(f"cannot read {remote_path!r}: it is {_kind(mode)}")
        try:
            # O_NONBLOCK: a FIFO swapped in after the check opens at once, and the
            # fstat below refuses it before any read
            fd = os.open(
                parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd
            )
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file in the workspace: {remote_path!r}") from None
        except OSError as exc:
            raise WorkspacePathError(f"cannot read {remote_path!r} (symlink?): {exc}") from None
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise WorkspacePathError(f"{remote_path!r} is not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(
                f"{remote_path!r} is {st.st_size} bytes, over the {max_bytes}-byte cap"
            )

        def fill(dst: BinaryIO) -> int:
            copied = 0
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    return copied
                copied += len(chunk)
                if copied > max_bytes:  # the file grew while we read it
                    raise ValueError(f"{remote_path!r} grew past the {max_bytes}-byte cap")
                dst.write(chunk)

        return write_local(local_path, fill)


def write_local(local_path: str, fill: Callable[[BinaryIO], int]) -> int:
    """Write a host file whole or not at all: ``fill(f)`` writes a new temp file beside
    ``local_path`` (``.<name>.*.part``), which is renamed over ``local_path`` when it
    returns and removed if it raises; returns what ``fill`` returned."""
    directory, name = os.path.split(os.path.abspath(local_path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name[:100]}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as dst:
            n = fill(dst)
        os.replace(tmp, local_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return n


# --------------------------------------------------------------------------- trees
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(root: str, parts: Optional[list[str]] = None) -> int:
    """A descriptor of ``root``/``parts...``, no component a symlink (the caller closes it)."""
    return _open_dir_chain(root, list(parts or ()), create=False)


def tree_size(path: str) -> int:
    """Bytes in the regular files under ``path`` (lstat; no recursion, no links followed)."""
    total = 0
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        else:
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        pass
        except OSError:
            pass  # gone, unreadable, or a path too long to name: counted as far as it went
    return total


def write_new(root: str, name: str, write: Callable[[BinaryIO], None], aside_dir: str) -> None:
    """Write the file ``root/name`` afresh (a context or history file, ``run --stdin``)
    with ``write(f)``, ``f`` a binary file; mode 0644.

    The container may have planted anything at ``name``: a symlink to a host
    file, a FIFO, a directory tree of any depth. Nothing there is opened or
    followed: the text goes to a new file (``O_EXCL | O_NOFOLLOW``) that is renamed
    over the name. A directory at the name is first renamed out of the mount into
    ``aside_dir`` (host-only, on the same filesystem: the container can no longer
    reach it there) and removed.
    """
    rfd = open_dir(root)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        tmp = f".{name[:200]}.{secrets.token_hex(8)}.new"
        fd = os.open(tmp, flags, 0o644, dir_fd=rfd)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)  # whatever the umask: the container user reads it
                write(f)
            for _ in range(8):
                try:
                    os.replace(tmp, name, src_dir_fd=rfd, dst_dir_fd=rfd)
                    return
                except OSError as exc:
                    if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                        raise
                aside = os.path.join(aside_dir, f"removed-{secrets.token_hex(8)}")
                try:
                    os.rename(name, aside, src_dir_fd=rfd)
                except FileNotFoundError:
                    continue
                remove_tree(aside, ignore_errors=True)
            raise WorkspacePathError(f"cannot write {name!r}: a directory keeps coming back there")
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=rfd)
            except OSError:
                pass
            raise
    finally:
        os.close(rfd)
