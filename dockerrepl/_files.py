"""Moving files in and out of the workspace mount without following symlinks.

The container can create symlinks in ``/workspace`` that point anywhere on
the *host* (``/workspace/x -> /etc/shadow``). Every path is therefore walked
one component at a time with ``O_NOFOLLOW`` relative to the previous
directory's file descriptor (``dir_fd``), so neither a symlink nor a race
with the container can lead the host outside the workspace.
"""

from __future__ import annotations

import os
import shutil
import stat

from .errors import WorkspacePathError

__all__ = ["DEFAULT_MAX_FILE", "copy_in", "copy_out", "split_remote"]

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
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        for name in parts:
            try:
                nfd = os.open(name, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o777, dir_fd=fd)
                nfd = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                raise WorkspacePathError(
                    f"{name!r} is not a plain directory (symlink?): {exc}"
                ) from None
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def copy_in(root: str, local_path: str, remote_path: str, max_bytes: int = DEFAULT_MAX_FILE) -> int:
    """Copy a host file into the workspace; returns the bytes written."""
    parts = split_remote(remote_path)
    st = os.stat(local_path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{local_path!r} is not a regular file")
    if st.st_size > max_bytes:
        raise ValueError(f"{local_path!r} is {st.st_size} bytes, over the {max_bytes}-byte cap")
    dfd = _open_dir_chain(root, parts[:-1], create=True)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(parts[-1], flags, 0o666, dir_fd=dfd)
        except OSError as exc:
            raise WorkspacePathError(f"cannot write {remote_path!r} (symlink?): {exc}") from None
    finally:
        os.close(dfd)
    with open(local_path, "rb") as src, os.fdopen(fd, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        return dst.tell()


def copy_out(
    root: str, remote_path: str, local_path: str, max_bytes: int = DEFAULT_MAX_FILE
) -> int:
    """Copy a workspace file to the host; returns the bytes read."""
    parts = split_remote(remote_path)
    dfd = _open_dir_chain(root, parts[:-1], create=False)
    try:
        try:
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
        tmp = local_path + ".part"
        copied = 0
        with open(tmp, "wb") as dst:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                copied += len(chunk)
                if copied > max_bytes:  # the file grew while we read it
                    dst.close()
                    os.unlink(tmp)
                    raise ValueError(f"{remote_path!r} grew past the {max_bytes}-byte cap")
                dst.write(chunk)
        os.replace(tmp, local_path)
        return copied
