"""Removing what a cell left in the workspace, whatever it did to it.

The host removes trees a cell built too (cleanup, gc, a planted context file): it
imports :func:`remove_tree` from here (imports flow host -> bootstrap, never back),
so there is one walk. Stdlib only, Python 3.8+.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Optional


def purge_workspace() -> None:
    """Empty the workspace (the host asked: it may not delete what root made here)."""
    # imported here: paths reads the container's environment, and the host imports
    # this module for remove_tree (nothing may happen at the host's import time)
    from . import paths

    try:
        names = os.listdir(paths.WORKSPACE)
    except OSError:
        return
    for name in names:
        remove_tree(os.path.join(paths.WORKSPACE, name), ignore_errors=True)


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _retry_writable(
    op: Callable[..., None], name: str, dfd: int, chmod: bool, errors: list[OSError]
) -> bool:
    """``op(name, dir_fd=dfd)`` (``os.unlink`` or ``os.rmdir``); on EACCES/EPERM make
    ``dfd`` writable (a cell may have set its mode to 0500; ``chmod``: it is not the
    caller's) and try once more. True: the entry is gone."""
    for attempt in (0, 1):
        try:
            op(name, dir_fd=dfd)
            return True
        except FileNotFoundError:
            return True
        except PermissionError as exc:
            if attempt or not chmod:
                errors.append(exc)
                return False
            try:
                os.fchmod(dfd, 0o700)
            except OSError:
                errors.append(exc)
                return False
        except OSError as exc:
            errors.append(exc)
            return False
    return False


def _open_child(dfd: int, name: str, errors: list[OSError]) -> Optional[int]:
    """Open the directory ``name`` in ``dfd`` (never a symlink); None if it cannot be."""
    try:
        return os.open(name, _DIR, dir_fd=dfd)
    except PermissionError:
        pass  # a mode the cell set (000): undone below
    except OSError as exc:
        # ELOOP, ENOTDIR: swapped for a symlink or a file since it was listed; the
        # next listing sees what it is now
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            errors.append(exc)
        return None
    # chmod it through an O_PATH descriptor, which names that very directory
    # (O_NOFOLLOW: never a link's target), then open it again
    o_path = getattr(os, "O_PATH", 0)
    try:
        if not o_path:
            raise PermissionError(errno.EACCES, "cannot open a directory", name)
        pfd = os.open(name, o_path | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            os.chmod(f"/proc/self/fd/{pfd}", 0o700)
        finally:
            os.close(pfd)
        return os.open(name, _DIR, dir_fd=dfd)
    except OSError as exc:
        errors.append(exc)
        return None


def _remove_in(pfd: int, name: str, errors: list[OSError]) -> None:
    """Remove ``name`` in the (trusted) directory ``pfd``, whatever is under it.

    Depth first without recursion, holding two descriptors at most: it goes down by
    opening a child (``O_NOFOLLOW``) and back up through ``..``, checked against the
    device and inode it came down from, so a directory moved meanwhile stops the
    walk instead of leading it elsewhere. Entries are removed with ``unlinkat`` /
    ``rmdir`` relative to their directory: a symlink is removed, never followed.
    An entry that cannot be removed is skipped (and its error kept), never retried.
    """
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        errors.append(exc)
        return
    if not stat.S_ISDIR(st.st_mode):
        _retry_writable(os.unlink, name, pfd, False, errors)
        return
    fd = _open_child(pfd, name, errors)
    if fd is None:
        return
    path = [(name, _ident(fd))]  # the directories from the top down to fd
    skip: list[set[str]] = [set()]  # per level: names that could not be removed
    try:
        while True:
            child = None
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        if entry.name in skip[-1]:
                            continue
                        try:
                            is_dir = entry.is_dir(follow_symlinks=False)
                        except OSError:
                            is_dir = False
                        if is_dir:
                            child = entry.name
                            break
                        if not _retry_writable(os.unlink, entry.name, fd, True, errors):
                            skip[-1].add(entry.name)
            except OSError as exc:
                errors.append(exc)  # cannot be listed: what is left in it stays
            if child is not None:
                cfd = _open_child(fd, child, errors)
                if cfd is None:
                    skip[-1].add(child)
                    continue
                os.close(fd)
                fd = cfd
                path.append((child, _ident(fd)))
                skip.append(set())
                continue
            done, _ = path.pop()
            skip.pop()
            if not path:
                os.close(fd)
                fd = -1
                _retry_writable(os.rmdir, done, pfd, False, errors)
                return
            up = os.open("..", _DIR, dir_fd=fd)
            os.close(fd)
            fd = up
            if _ident(fd) != path[-1][1]:
                errors.append(OSError(errno.ESTALE, "a directory was moved while it was removed"))
                return
            if not _retry_writable(os.rmdir, done, fd, True, errors):
                skip[-1].add(done)
    except OSError as exc:
        errors.append(exc)
    finally:
        if fd >= 0:
            os.close(fd)


def remove_tree(path: str, *, ignore_errors: bool = False) -> None:
    """Remove ``path`` (a directory tree, a file or a symlink) like ``rm -rf``.

    Iterative, so depth is no limit; never follows a symlink, at the top or below;
    undoes the permission bits a cell set on its directories. The parent of
    ``path`` is the caller's and is trusted (it is never chmod'ed). Everything that
    can be removed is; then the first error is raised unless ``ignore_errors``.
    """
    errors: list[OSError] = []
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:
        if ignore_errors:
            return
        raise
    try:
        _remove_in(pfd, name, errors)
    finally:
        os.close(pfd)
    if errors and not ignore_errors:
        raise errors[0]


# ---------------------------------------------------------------- reading state files
def open_regular(path: str) -> Optional[int]:
    """A read-only descriptor of ``path`` if it is a regular file, else None.

    The workspace is the cell's: what it left at a state file's name may be a FIFO
    (a plain open() blocks for ever: pid 1 reading it before its ready frame wedged
    every later start) or a link (to /proc/1/fd/0: the supervisor read its own stdin).
    So no link is followed, the open never blocks, and only a regular file is kept.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | _CLOEXEC)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def read_regular(path: str, limit: int) -> Optional[bytes]:
    """At most ``limit`` bytes of ``path`` if it is a regular file (see open_regular)."""
    fd = open_regular(path)
    if fd is None:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------- walking paths
class PathRefused(Exception):
    """A workspace path leads through something other than a plain directory, or names
    something other than what the operation allows (the host raises it as
    ``WorkspacePathError``)."""


def open_dir_chain(root: str, parts: list[str], create: bool) -> int:
    """A descriptor of ``root/parts...``, every component opened without following a
    link (``create``: missing directories are made). The caller closes it."""
    fd = os.open(root, _DIR)
    try:
        for name in parts:
            try:
                nfd = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o777, dir_fd=fd)
                nfd = os.open(name, _DIR, dir_fd=fd)
            except OSError as exc:
                raise PathRefused("%r is not a plain directory (symlink?): %s" % (name, exc))
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def entry_mode(name: str, dfd: int) -> Optional[int]:
    """``st_mode`` of ``name`` in ``dfd`` without following a symlink; None if absent."""
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def kind(mode: int) -> str:
    """What a non-regular entry is, for an error message."""
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"
