"""The workspace: where ``/workspace`` lives, and how files reach it.

Two ways, one :class:`Workspace` interface (the session asks it for what it needs):

* :class:`MountedWorkspace` (the proxy transport): a host temp dir bind-mounted at
  ``/workspace`` (contexts, histories, uploads, checkpoints); the host reads and
  writes the files itself. With ``network="none"`` a second host dir, mounted
  read-only, holds the proxy's unix socket.
* :class:`VolumeWorkspace` (the channel transport): a named volume of the engine's,
  labelled like the container, that outlives each container (a killed one restores
  from the checkpoint in it) and is removed by ``remove()`` (or ``dockerrepl gc``);
  files cross the container's stdio in chunks (see ``_bootstrap/transfer.py``).

Layout on the host (the root is 0700, made by ``tempfile.mkdtemp``)::

    dockerrepl-XXXX/               root: removed by remove()
        workspace/                 /workspace when mounted: the container writes here
            .dockerrepl/           state.meta.json beside state.dill; probe.nonce
        code/                      /opt/dockerrepl, read-only: proxy.sock (network="none")
        docker-run.log             the docker CLI's stderr (both kinds)
"""

from __future__ import annotations

import base64
import io
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Optional, Protocol

from . import _docker
from ._files import (
    DEFAULT_MAX_FILE,
    check_local_file,
    copy_in,
    copy_out,
    remove_tree,
    split_remote,
    write_local,
    write_new,
)
from ._labels import LABEL_WORKSPACE
from ._runspec import CODE_MOUNT, PROXY_SOCKET
from .errors import DockerError, DockerReplError

__all__ = ["FileChannel", "MountedWorkspace", "VolumeWorkspace", "Workspace"]

log = logging.getLogger(__name__)

#: Characters of text (or raw bytes, sent as base64) per ``fput`` frame.
PUT_CHUNK = 4 << 20


class Workspace(Protocol):
    """What a session needs from the place its files live (see the module docstring)."""

    #: the host directory the container sees as ``/workspace`` ("" before create(),
    #: and always "" for a volume)
    temp_dir: str
    #: the directory that holds it all, labelled on the container for ``gc`` ("" before)
    root: str
    #: True: ``/workspace`` is a volume of the engine's (``mounts()`` names it)
    volume: bool

    def create(self, labels: dict[str, str]) -> None:
        """Make the host directory and, for a volume, the volume (with ``labels``)."""

    def mounts(self) -> tuple[str, str]:
        """(what is mounted at ``/workspace``, host dir for the read-only code mount or "")."""

    def proxy_socket(self) -> tuple[str, str]:
        """(host path, container path) of the proxy's unix socket (``network="none"``)."""

    def probe_nonce(self) -> str:
        """A nonce written where the container must find it if the engine sees our files."""

    def log_path(self) -> str:
        """Where the docker CLI's stderr goes."""

    def write_payload(self, stem: str, encoded: tuple[str, str]) -> str:
        """Write an ``encode_payload`` result; returns its path in the workspace."""

    def upload(self, local_path: str, remote_path: str, max_bytes: int = DEFAULT_MAX_FILE) -> int:
        """Copy a host file in; returns bytes."""

    def download(self, remote_path: str, local_path: str, max_bytes: int = DEFAULT_MAX_FILE) -> int:
        """Copy a file out; returns bytes."""

    def purge_on_close(self) -> bool:
        """True when the container must delete what it wrote before it exits."""

    def remove(self, start_processes: bool = True) -> None:
        """Remove everything it made (idempotent; never raises); ``start_processes=False``
        in the interpreter's teardown (what needs a process is left for ``gc``)."""


class FileChannel(Protocol):
    """How a :class:`VolumeWorkspace` moves files: the session's frames to the supervisor."""

    def put_file(
        self, parts: list[str], chunks: Iterator[tuple[str, str]], replace_any: bool, max_bytes: int
    ) -> int:
        """Send ``(data, "text" | "b64")`` chunks as the file ``parts``; returns bytes written."""

    def get_file(self, parts: list[str], sink: Any, max_bytes: int) -> int:
        """Stream the file ``parts`` into ``sink.write``; returns bytes read."""


class MountedWorkspace:
    """A host temp dir, bind-mounted: the container and the host share the files."""

    volume = False

    def __init__(self, parent: Optional[str], *, shared: bool) -> None:
        """``parent``: where the temp dir is made (None: the system's); ``shared``: the
        container runs as another user, who must be able to write the workspace."""
        self._parent = parent
        self._shared = shared
        self.root = ""
        self.temp_dir = ""
        self._code_dir = ""
        self._serves_socket = False
        self._nonce = ""

    def create(self, labels: dict[str, str]) -> None:
        self.root = tempfile.mkdtemp(prefix="dockerrepl-", dir=self._parent)
        self.temp_dir = os.path.join(self.root, "workspace")
        boot_dir = os.path.join(self.temp_dir, ".dockerrepl")  # state, writable inside
        os.makedirs(boot_dir)
        # a non-root container user must be able to write state and checkpoints;
        # the 0700 parent keeps other host users out
        os.chmod(self.temp_dir, 0o777 if self._shared else 0o755)
        os.chmod(boot_dir, 0o777 if self._shared else 0o755)
        # the proxy socket's directory, outside the workspace and mounted read-only
        self._code_dir = os.path.join(self.root, "code")
        os.makedirs(self._code_dir)
        os.chmod(self._code_dir, 0o755)
        # transport="auto" asks the container for this: an engine elsewhere (remote, a
        # VM, the other side of a socket-mounted container) does not see these files
        self._nonce = secrets.token_hex(16)
        with open(os.path.join(boot_dir, "probe.nonce"), "w") as f:
            f.write(self._nonce)

    @property
    def code_dir(self) -> str:
        return self._code_dir

    def mounts(self) -> tuple[str, str]:
        return self.temp_dir, self._code_dir if self._serves_socket else ""

    def proxy_socket(self) -> tuple[str, str]:
        # beside the workspace, mounted read-only, not in it: a cell that swapped
        # /workspace/.dockerrepl for a symlink made the host bind, chmod and (at
        # cleanup) unlink proxy.sock in a host directory of its choosing
        self._serves_socket = True
        return os.path.join(self._code_dir, PROXY_SOCKET), f"{CODE_MOUNT}/{PROXY_SOCKET}"

    def probe_nonce(self) -> str:
        return self._nonce

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

    def purge_on_close(self) -> bool:
        # a non-root host user cannot delete files the container's root made
        return os.geteuid() != 0

    def remove(self, start_processes: bool = True) -> None:
        if self.root:
            remove_tree(self.root, ignore_errors=True)


class VolumeWorkspace:
    """A named volume of the engine's at ``/workspace``; files cross the channel.

    The volume carries the container's labels (``gc`` judges it by its owner), is
    made before the first container and removed by :meth:`remove` once the last one
    is gone. A container killed under a cell leaves it behind for the next one, which
    restores the checkpoint in it, as with a mount.
    """

    volume = True
    temp_dir = ""

    def __init__(self, parent: Optional[str], engine: _docker.Engine, *, shared: bool) -> None:
        """``parent``: where the host dir for the CLI's log is made; ``engine``: whose volume;
        ``shared``: the container runs as another user, who must be able to write it."""
        self._parent = parent
        self._engine = engine
        self._shared = shared
        self.root = ""
        self.name = ""
        self.files: Optional[FileChannel] = None  # set by the session before first use

    def create(self, labels: dict[str, str]) -> None:
        self.root = tempfile.mkdtemp(prefix="dockerrepl-", dir=self._parent)
        name = "dockerrepl-" + secrets.token_hex(8)
        argv = ["volume", "create"]
        # the host dir too: gc removes it with a dead owner's volume
        for k, v in sorted({**labels, LABEL_WORKSPACE: self.root}.items()):
            argv += ["--label", f"{k}={v}"]
        _docker.run([*argv, name], timeout=60, docker=self._engine)
        self.name = name

    def prepare(self, image: str) -> None:
        """Make the volume writable for a non-root container user (``user=``).

        A new volume's root belongs to root, mode 0755, and a container without
        capabilities cannot change that as another user: one short container as root
        (no capabilities, no network) opens it up, once per REPL.
        """
        if not self._shared:
            return
        argv = ["run", "--rm", "--network", "none", "--cap-drop", "ALL", "--user", "0:0"]
        argv += ["--security-opt", "no-new-privileges", "--label", "dockerrepl.helper=1"]
        argv += ["--mount", f"type=volume,src={self.name},dst=/w", "--entrypoint"]
        # .dockerrepl made here too: a volume left empty gets the mode of the container's
        # mount point (0755, root) copied onto it at the REPL container's first mount
        code = (
            "import os; os.chmod('/w', 0o1777); os.mkdir('/w/.dockerrepl');"
            " os.chmod('/w/.dockerrepl', 0o777)"
        )
        for python in ("python3", "python"):
            try:
                _docker.run([*argv, python, image, "-c", code], timeout=120, docker=self._engine)
                return
            except DockerError as exc:
                if python == "python" or "executable file not found" not in str(exc):
                    raise

    def mounts(self) -> tuple[str, str]:
        return self.name, ""

    def proxy_socket(self) -> tuple[str, str]:
        raise DockerReplError("a volume workspace has no proxy socket (the channel needs none)")

    def probe_nonce(self) -> str:
        return ""

    def log_path(self) -> str:
        return os.path.join(self.root, "docker-run.log")

    def _channel(self) -> FileChannel:
        if self.files is None:
            raise DockerReplError("the workspace is not connected to a container yet")
        return self.files

    def write_payload(self, stem: str, encoded: tuple[str, str]) -> str:
        data, kind = encoded
        rel = f"{stem}.txt" if kind == "text" else f"{stem}.json"
        chunks = ((data[i : i + PUT_CHUNK], "text") for i in range(0, max(len(data), 1), PUT_CHUNK))
        self._channel().put_file([rel], chunks, True, 1 << 62)
        return rel

    def upload(self, local_path: str, remote_path: str, max_bytes: int = DEFAULT_MAX_FILE) -> int:
        parts = split_remote(remote_path)
        check_local_file(local_path, max_bytes)
        with open(local_path, "rb") as src:

            def chunks() -> Iterator[tuple[str, str]]:
                read = 0
                while True:
                    raw = src.read(PUT_CHUNK // 4 * 3)  # base64: 4 characters per 3 bytes
                    read += len(raw)
                    if read > max_bytes:  # the local file grew while we read it
                        raise ValueError(f"{local_path!r} grew past the {max_bytes}-byte cap")
                    yield base64.b64encode(raw).decode("ascii"), "b64"
                    if len(raw) < PUT_CHUNK // 4 * 3:
                        return

            return self._channel().put_file(parts, chunks(), False, max_bytes)

    def download(self, remote_path: str, local_path: str, max_bytes: int = DEFAULT_MAX_FILE) -> int:
        parts = split_remote(remote_path)
        return write_local(local_path, lambda dst: self._channel().get_file(parts, dst, max_bytes))

    def purge_on_close(self) -> bool:
        return False  # the volume goes whole

    def remove(self, start_processes: bool = True) -> None:
        """Remove the host dir and the volume (idempotent; never raises).

        ``start_processes=False`` (the interpreter's teardown, where no process may be
        started): the volume stays for ``dockerrepl gc``.
        """
        if self.root:
            remove_tree(self.root, ignore_errors=True)
        name, self.name = self.name, ""
        if not name:
            return
        if not start_processes:
            log.warning("dockerrepl: volume %s is left for `dockerrepl gc` (at exit)", name)
            return
        for attempt in range(5):
            try:
                _docker.run(["volume", "rm", "-f", name], timeout=60, docker=self._engine)
                return
            except DockerError as exc:
                # the engine removes a --rm container a moment after its CLI exits
                if "in use" not in str(exc) or attempt == 4:
                    log.warning("dockerrepl: could not remove volume %s: %s", name, exc)
                    return
                time.sleep(0.2 * (attempt + 1))
            except DockerReplError as exc:
                log.warning("dockerrepl: could not remove volume %s: %s", name, exc)
                return
