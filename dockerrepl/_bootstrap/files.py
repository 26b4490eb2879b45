"""Removing what a cell left in the workspace, whatever it did to it.

The host's ``dockerrepl._files.remove_tree`` is the same walk (the bootstrap may
import nothing of the host's); tests/unit/test_files.py runs both.
"""

from __future__ import annotations

import os

from . import paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def purge_workspace() -> None:
    """Empty the workspace (the host asked: it may not delete what root made here)."""
    try:
        names = os.listdir(paths.WORKSPACE)
    except OSError:
        return
    for name in names:
        remove_tree(os.path.join(paths.WORKSPACE, name))


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _gone(op: Callable[..., None], name: str, dfd: int, chmod: bool) -> bool:
    """op(name, dir_fd=dfd) (os.unlink or os.rmdir); on EACCES/EPERM make dfd writable
    (a cell may have set 0500; with --cap-drop ALL even root needs that), try again."""
    for attempt in (0, 1):
        try:
            op(name, dir_fd=dfd)
            return True
        except FileNotFoundError:
            return True
        except PermissionError:
            if attempt or not chmod:
                return False
            try:
                os.fchmod(dfd, 0o700)
            except OSError:
                return False
        except OSError:
            return False
    return False


def _open_child(dfd: int, name: str) -> int | None:
    """The directory name in dfd, opened without following a link (a mode 000 the
    cell set is undone through an O_PATH descriptor); None if it cannot be."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except PermissionError:
        pass
    except OSError:
        return None
    try:
        pfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            os.chmod("/proc/self/fd/%d" % pfd, 0o700)
        finally:
            os.close(pfd)
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except (OSError, AttributeError):
        return None


def remove_tree(path: str) -> None:
    """rm -rf path, best effort: no recursion (a cell nests directories thousands
    deep; shutil.rmtree dies of RecursionError there), no symlink followed, two
    descriptors at most (down by name with O_NOFOLLOW, up through '..' checked
    against the inode it came down from). The host's dockerrepl._files.remove_tree
    is the same walk."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    fd = -1
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except OSError:
            return
        if not _is_dir_mode(st.st_mode):
            _gone(os.unlink, name, pfd, False)
            return
        top = _open_child(pfd, name)
        if top is None:
            return
        fd = top
        stack = [(name, _ident(fd))]
        skip: list[set[str]] = [set()]
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
                        if not _gone(os.unlink, entry.name, fd, True):
                            skip[-1].add(entry.name)
            except OSError:
                pass
            if child is not None:
                cfd = _open_child(fd, child)
                if cfd is None:
                    skip[-1].add(child)
                    continue
                os.close(fd)
                fd = cfd
                stack.append((child, _ident(fd)))
                skip.append(set())
                continue
            done = stack.pop()[0]
            skip.pop()
            if not stack:
                os.close(fd)
                fd = -1
                _gone(os.rmdir, done, pfd, False)
                return
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            if _ident(fd) != stack[-1][1]:
                return  # moved while it was removed: stop rather than follow it
            if not _gone(os.rmdir, done, fd, True):
                skip[-1].add(done)
    except OSError:
        pass
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(pfd)


def _is_dir_mode(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000
