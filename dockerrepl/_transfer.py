"""Files over the container's stdio (the channel transport): the session's side.

A :class:`~dockerrepl._workspace.VolumeWorkspace` has no host directory to write
into: contexts, histories and ``upload``/``download`` go to the supervisor as
frames (``fput`` chunks, ``fget`` answered by ``fdata`` chunks; see
``_bootstrap/transfer.py``), under the session's lock like any other request.
Every chunk has its own deadline, so a large file takes as long as it needs and a
container that stops taking (or sending) chunks is given up on, not waited for.
The supervisor's refusals come back as the errors the mounted workspace raises.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from .errors import ContainerDied, DockerReplError, ProtocolError, WorkspacePathError

if TYPE_CHECKING:
    from ._container import Container

__all__ = ["CHUNK_WAIT", "SessionFiles"]

log = logging.getLogger(__name__.rpartition(".")[0] + ".repl")

#: The longest the container may take to accept or send one chunk.
CHUNK_WAIT = 60.0

_ERRORS: dict[str, type[Exception]] = {
    "WorkspacePathError": WorkspacePathError,
    "FileNotFoundError": FileNotFoundError,
    "ValueError": ValueError,
}


class SessionFiles:
    """The FileChannel of a :class:`~dockerrepl._session.Session` (a mixin: it uses the
    session's lock, request ids, container and re-sync)."""

    if TYPE_CHECKING:
        import contextlib
        import threading

        lock: threading.RLock
        container: Optional[Container]
        in_flight: Optional[tuple[str, int]]

        def held(self) -> contextlib.AbstractContextManager[None]: ...
        def begin_request(self) -> tuple[int, Container]: ...
        def send(self, obj: dict[str, Any], deadline: Optional[float] = None) -> None: ...
        def abandon(self) -> None: ...

    def put_file(
        self, parts: list[str], chunks: Iterator[tuple[str, str]], replace_any: bool, max_bytes: int
    ) -> int:
        """Write ``parts`` in the workspace from ``(data, "text" | "b64")`` chunks."""
        start = time.perf_counter()
        with self.held():
            rid, container = self.begin_request()
            try:
                frame: Optional[dict[str, Any]] = None
                for data, enc in chunks:
                    if frame is not None:
                        self.send(frame, time.monotonic() + CHUNK_WAIT)
                    frame = {
                        "type": "fput",
                        "id": rid,
                        "path": parts,
                        "data": data,
                        "enc": enc,
                        "replace": "any" if replace_any else "file",
                        "max": max_bytes,
                    }
                if frame is None:
                    frame = {"type": "fput", "id": rid, "path": parts, "data": "", "enc": "text"}
                self.send({**frame, "last": True}, time.monotonic() + CHUNK_WAIT)
                value = self._reply(container, rid, None)
            except BaseException:
                if self.in_flight is not None:
                    self.abandon()
                raise
        n = _bytes(value)
        log.debug(
            "dockerrepl: put %s (%d bytes) in %.3fs",
            "/".join(parts),
            n,
            time.perf_counter() - start,
        )
        return n

    def get_file(self, parts: list[str], sink: Any, max_bytes: int) -> int:
        """Stream ``parts`` from the workspace into ``sink.write``."""
        received = [0]

        def chunk(msg: dict[str, Any]) -> None:
            try:
                raw = base64.b64decode(str(msg.get("data", "")), validate=True)
            except (binascii.Error, ValueError):
                raise ProtocolError("a file chunk from the container is not base64") from None
            received[0] += len(raw)
            if received[0] > max_bytes:  # the container's word is not the cap
                raise ValueError(f"{'/'.join(parts)!r} is over the {max_bytes}-byte cap")
            sink.write(raw)

        with self.held():
            rid, container = self.begin_request()
            try:
                request = {"type": "fget", "id": rid, "path": parts, "max": max_bytes}
                self.send(request, time.monotonic() + CHUNK_WAIT)
                value = self._reply(container, rid, chunk)
            except BaseException:
                if self.in_flight is not None:
                    self.abandon()
                raise
        n = _bytes(value)
        if n != received[0]:
            raise ProtocolError(f"the container said {n} bytes and sent {received[0]}")
        return n

    def _reply(self, container: Container, rid: int, on_chunk: Any) -> Any:
        """The reply to request ``rid`` (``fdata`` chunks go to ``on_chunk`` meanwhile)."""
        while True:
            try:
                msg = container.recv(time.monotonic() + CHUNK_WAIT)
            except TimeoutError:
                raise ContainerDied(
                    f"the container sent nothing for {CHUNK_WAIT:g}s during a file transfer"
                ) from None
            kind = msg.get("type")
            if msg.get("id") != rid:
                if kind == "error":
                    raise ProtocolError(str(msg.get("error")))
                continue
            if kind == "fdata" and on_chunk is not None:
                on_chunk(msg)
                continue
            if kind == "error":
                self.in_flight = None
                raise ProtocolError(str(msg.get("error")))
            if kind != "reply":
                continue
            self.in_flight = None
            if msg.get("ok"):
                return msg.get("value")
            err = str(msg.get("error"))[:2000]
            raise _ERRORS.get(str(msg.get("exception")), DockerReplError)(err)


def _bytes(value: Any) -> int:
    n = value.get("bytes") if isinstance(value, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ProtocolError(f"a file transfer's reply carries no byte count: {value!r}"[:300])
    return n
