"""The workspace: how files reach the container, and where they live on the host.

Today one way: :class:`MountedWorkspace`, a host temp dir bind-mounted at
``/workspace`` (contexts, histories, uploads, checkpoints) and a code dir
mounted read-only (the bootstrap, dill, the proxy's unix socket). This module is
the only one that knows that; the session asks :class:`Workspace` for what it
needs, so a second way in (the stdio channel and a named volume, next) is a
second class with the same methods.

Layout on the host (the root is 0700, made by ``tempfile.mkdtemp``)::

    dockerrepl-XXXX/               root: removed by remove()
        workspace/                 /workspace: the container writes here
            .dockerrepl/           state.meta.json beside state.dill
        code/                      /opt/dockerrepl, read-only (see _staging.py)
        docker-run.log             the docker CLI's stderr
"""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
from typing import Any, Optional, Protocol

from ._files import DEFAULT_MAX_FILE, copy_in, copy_out, open_dir, remove_tree, write_new
from ._runspec import CODE_MOUNT, PROXY_SOCKET
from ._staging import stage_code

__all__ = ["MountedWorkspace", "Workspace"]


class Workspace(Protocol):
    """What a session needs from the place its files live (see the module docstring)."""

    #: the host directory the container sees as ``/workspace`` ("" before create())
    temp_dir: str
    #: the directory that holds it all, labelled on the container for ``gc`` ("" before)
    root: str

    def create(self, *, copy_dill: bool) -> None:
        """Make the directories and stage the bootstrap (and dill when ``copy_dill``)."""

    def mounts(self) -> tuple[str, str]:
        """(host dir for ``/workspace``, host dir for the read-only code mount)."""

    def proxy_socket(self) -> tuple[str, str]:
        """(host path, container path) of the proxy's unix socket (``network="none"``)."""

    def log_path(self) -> str:
        """Where the docker CLI's stderr goes."""

    def write_payload(self, stem: str, encoded: tuple[str, str]) -> str:
        """Write an ``encode_payload`` result; returns its path in the workspace."""

    def upload(self, local_path: str, remote_path: str, max_bytes: int = DEFAULT_MAX_FILE) -> int:
        """Copy a host file in; returns bytes."""

    def download(self, remote_path: str, local_path: str, max_bytes: int = DEFAULT_MAX_FILE) -> int:
        """Copy a file out; returns bytes."""

    def checkpoint_cell(self) -> Optional[int]:
        """The cell the checkpoint was taken after (None: no checkpoint)."""

    def purge_on_close(self) -> bool:
        """True when the container must delete what it wrote before it exits."""

    def remove(self) -> None:
        """Remove everything on the host (idempotent; never raises)."""


class MountedWorkspace:
    """A host temp dir, bind-mounted: the container and the host share the files."""

    def __init__(self, parent: Optional[str], *, shared: bool) -> None:
        """``parent``: where the temp dir is made (None: the system's); ``shared``: the
        container runs as another user, who must be able to write the workspace."""
        self._parent = parent
        self._shared = shared
        self.root = ""
        self.temp_dir = ""
        self._code_dir = ""

    def create(self, *, copy_dill: bool) -> None:
        self.root = tempfile.mkdtemp(prefix="dockerrepl-", dir=self._parent)
        self.temp_dir = os.path.join(self.root, "workspace")
        boot_dir = os.path.join(self.temp_dir, ".dockerrepl")  # state, writable inside
        os.makedirs(boot_dir)
        # a non-root container user must be able to write state and checkpoints;
        # the 0700 parent keeps other host users out
        os.chmod(self.temp_dir, 0o777 if self._shared else 0o755)
        os.chmod(boot_dir, 0o777 if self._shared else 0o755)
        # the code, outside the workspace and mounted read-only: nothing a cell does
        # can change what the next container runs as its supervisor
        self._code_dir = os.path.join(self.root, "code")
        os.makedirs(self._code_dir)
        os.chmod(self._code_dir, 0o755)
        stage_code(self._code_dir, copy_dill=copy_dill)

    @property
    def code_dir(self) -> str:
        return self._code_dir

    def mounts(self) -> tuple[str, str]:
        return self.temp_dir, self._code_dir

    def proxy_socket(self) -> tuple[str, str]:
        # beside the code, mounted read-only, not in the workspace: a cell that
        # swapped /workspace/.dockerrepl for a symlink made the host bind, chmod
        # and (at cleanup) unlink proxy.sock in a host directory of its choosing
        return os.path.join(self._code_dir, PROXY_SOCKET), f"{CODE_MOUNT}/{PROXY_SOCKET}"

    def log_path(self) -> str:
        return os.path.join(self.root, "docker-run.log")

    def write_payload(self, stem: str, encoded: tuple[str, str]) -> str:
        data, kind = encoded
        rel = f"{stem}.txt" if kind == "text" else f"{stem}.json"
        self._write_new(rel, data)
        return rel

    def _write_new(self, rel: str, text: str) -> None:
        """Write ``rel`` in the mount as a new file.

        The container can write the mount: whatever it left at that name (a
        symlink to a host file, a FIFO, a deep directory tree) is replaced, never
        followed or opened; a directory is moved out of the mount and removed.
        """

        def write(f: Any) -> None:
            out = io.TextIOWrapper(f, encoding="utf-8", errors="surrogatepass")
            out.write(text)
            out.flush()
            out.detach()

        write_new(self.temp_dir, rel, write, self.root)

    def upload(self, local_path: str, remote_path: str, max_bytes: int = DEFAULT_MAX_FILE) -> int:
        return copy_in(self.temp_dir, local_path, remote_path, max_bytes)

    def download(self, remote_path: str, local_path: str, max_bytes: int = DEFAULT_MAX_FILE) -> int:
        return copy_out(self.temp_dir, remote_path, local_path, max_bytes)

    def checkpoint_cell(self) -> Optional[int]:
        """The cell the checkpoint in the mount was taken after (None: no checkpoint).

        The file is the container's: opened without following links, never a
        FIFO, read bounded, and only one integer is taken from it.
        """
        # every component opened without following a link: a cell can replace
        # .dockerrepl (or the files) with a symlink to anywhere on the host
        try:
            wfd = open_dir(self.temp_dir)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.stat("state.dill", dir_fd=wfd, follow_symlinks=False).st_mode):
                return None
            dfd = os.open(".dockerrepl", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=wfd)
            try:
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open("state.meta.json", flags, dir_fd=dfd)
            finally:
                os.close(dfd)
        except OSError:
            return None
        finally:
            os.close(wfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            meta = json.loads(os.read(fd, 1 << 16))
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        cell = meta.get("cell") if isinstance(meta, dict) else None
        return cell if isinstance(cell, int) and not isinstance(cell, bool) else None

    def purge_on_close(self) -> bool:
        # a non-root host user cannot delete files the container's root made
        return os.geteuid() != 0

    def remove(self) -> None:
        if self.root:
            remove_tree(self.root, ignore_errors=True)
