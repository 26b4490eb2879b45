"""Length-prefixed JSON frames: a 4-byte big-endian length, then UTF-8 JSON.

The same framing carries the LM Handler protocol (over TCP sockets, rlm's wire
format) and the host <-> container channel (over the ``docker run -i`` pipes).
Frames are bounded before anything is allocated; a clean EOF on a frame
boundary is not an error, an EOF in the middle of a frame is.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Optional

from .errors import FrameTooLarge, ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "decode_body",
    "encode_frame",
    "recv_exact",
    "recv_frame",
    "send_frame",
]

HEADER = struct.Struct(">I")
#: Default bound on one frame's body. An LM request carrying a large prompt is
#: the biggest legitimate frame; 256 MiB leaves room while refusing a 4 GB prefix.
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
# bodies up to this size are allocated at once; larger ones grow as bytes arrive
_EAGER = 1 << 20


def encode_frame(obj: Any) -> bytes:
    """Serialise ``obj`` as one frame (header and body in one ``bytes``, for one ``sendall``)."""
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )
    if len(body) > 0xFFFFFFFF:
        raise FrameTooLarge(f"frame body of {len(body)} bytes does not fit a 4-byte length")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Any:
    """Decode a frame body, mapping bad UTF-8 / JSON to :class:`ProtocolError`."""
    try:
        return json.loads(body.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not valid UTF-8 JSON: {exc}") from None


def recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    """Read exactly ``n`` bytes; ``None`` if the peer closed before the first byte.

    Raises :class:`ProtocolError` if the peer closed part-way through.
    """
    if n == 0:
        return b""
    if n > _EAGER:
        # memory follows the bytes that actually arrive: a peer announcing a large
        # frame and sending nothing costs nothing
        chunks = bytearray()
        while len(chunks) < n:
            data = sock.recv(min(n - len(chunks), _EAGER))
            if not data:
                if not chunks:
                    return None
                raise ProtocolError(f"connection closed after {len(chunks)} of {n} bytes")
            chunks += data
        return bytes(chunks)
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0:
                return None
            raise ProtocolError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, max_size: int = DEFAULT_MAX_FRAME) -> Optional[Any]:
    """Receive one frame and return the decoded JSON value; ``None`` on a clean EOF.

    The size bound is checked before the body is allocated: an oversized prefix
    raises :class:`FrameTooLarge` and the caller should close the connection.
    """
    header = recv_exact(sock, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > max_size:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {max_size}")
    body = recv_exact(sock, length)
    if body is None:
        raise ProtocolError(f"connection closed before a {length}-byte frame body")
    return decode_body(body)


def send_frame(sock: socket.socket, obj: Any) -> None:
    """Send ``obj`` as one frame with a single ``sendall``."""
    sock.sendall(encode_frame(obj))
