"""Length-prefixed JSON frames: a 4-byte big-endian length, then UTF-8 JSON.

The same framing carries the LM Handler protocol (over TCP sockets, rlm's wire
format) and the host <-> container channel (over the ``docker run -i`` pipes).
Frames are bounded before anything is allocated; a clean EOF on a frame
boundary is not an error, an EOF in the middle of a frame is.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Optional

from ._bootstrap import protocol
from .errors import FrameTooLarge, ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "MAX_JSON_UNITS",
    "FrameBuffer",
    "TooManyValues",
    "decode_body",
    "encode_frame",
    "frame_length",
    "json_units",
    "parse_json",
    "recv_body",
    "recv_exact",
    "recv_frame",
    "send_frame",
]

HEADER = protocol.HEADER
#: Default bound on one frame's body. An LM request carrying a large prompt is
#: the biggest legitimate frame; 256 MiB leaves room while refusing a 4 GB prefix.
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
# bodies up to this size are allocated at once; larger ones grow as bytes arrive
_EAGER = 1 << 20
#: Most JSON "units" (``,`` ``:`` ``[`` ``{`` outside strings, see :func:`json_units`)
#: one frame or request body may hold. ``json.loads`` builds an object of 30-90 bytes
#: per unit, so a body of tiny values (``[],[],...``) costs about 24 times its size:
#: 1.5 GB for 64 MiB. An honest message holds far fewer: a batch of 10,000 prompts of
#: 10 chat messages each is about 510,000. At this bound, parsing costs at most about
#: 90 MB besides the text itself.
MAX_JSON_UNITS = 1_000_000
_STRING_SCANNER = json.JSONDecoder()


class TooManyValues(ValueError):
    """JSON text with more than :data:`MAX_JSON_UNITS` units: refused before parsing."""


def encode_frame(obj: Any) -> bytes:
    """Serialise ``obj`` as one frame (header and body in one ``bytes``, for one ``sendall``)."""
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )
    if len(body) > 0xFFFFFFFF:
        raise FrameTooLarge(f"frame body of {len(body)} bytes does not fit a 4-byte length")
    return HEADER.pack(len(body)) + body


def json_units(text: str, limit: int = MAX_JSON_UNITS) -> int:
    """How many ``,`` ``:`` ``[`` and ``{`` JSON ``text`` holds, as far as ``limit`` matters.

    Every value ``json.loads`` builds, past the first, follows one of them, so the
    count bounds the objects a parse allocates, before anything is allocated. A
    result of at most ``limit`` may include characters inside strings (an upper
    bound is enough there); past it, only those outside strings count, and the
    count stops once it is over ``limit``. Raises ``ValueError`` for a malformed
    string met on the way (the text is not JSON).
    """
    n = text.count(",") + text.count(":") + text.count("[") + text.count("{")
    if n <= limit:
        return n
    # The quick count includes commas and brackets inside strings: a prompt quoting
    # CSV, code or JSON. Count again outside strings only, skipping each string with
    # the C scanner. No more than `limit` strings are walked (under a second): text
    # with more strings than that holds too many values anyway.
    n = strings = pos = 0
    find, count, scan = text.find, text.count, _STRING_SCANNER.raw_decode
    while True:
        quote = find('"', pos)
        end = len(text) if quote < 0 else quote
        n += count(",", pos, end) + count(":", pos, end) + count("[", pos, end)
        n += count("{", pos, end)
        if quote < 0 or n > limit:
            return n
        strings += 1
        if strings > limit:
            return limit + 1
        pos = scan(text, quote)[1]


def parse_json(text: str, max_units: int = MAX_JSON_UNITS) -> Any:
    """``json.loads`` for untrusted text: ``ValueError`` for anything refused.

    Beyond bad JSON that means text with more than ``max_units`` units (it would
    cost the host far more memory than its size), nesting too deep for the parser
    (``json.loads`` raises ``RecursionError``, which callers expecting ``ValueError``
    let escape: a frame of 100,000 ``[`` broke the host's container channel that way),
    and a parse that ran out of memory.
    """
    try:
        if json_units(text, max_units) <= max_units:
            return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except MemoryError:
        # what the failed parse allocated is freed as the exception unwinds
        raise ValueError(f"out of memory parsing {len(text)} characters of JSON") from None
    raise TooManyValues(f"more than {max_units} JSON values (commas, colons, brackets)")


def decode_body(body: bytes) -> Any:
    """Decode a frame body: bad UTF-8, bad JSON or JSON refused by :func:`parse_json`
    (too many values, too deeply nested) raise :class:`ProtocolError`."""
    try:
        return parse_json(body.decode("utf-8", "surrogatepass"))
    except TooManyValues as exc:
        raise ProtocolError(f"frame refused: it holds {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not valid UTF-8 JSON: {exc}") from None
    except MemoryError:
        # decoding the text failed; whatever it allocated is freed by now
        raise ProtocolError(f"out of memory decoding a frame of {len(body)} bytes") from None


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


def frame_length(header: bytes | bytearray, max_size: int) -> int:
    """The body length a frame header announces; :class:`FrameTooLarge` over ``max_size``
    (checked here, before anything is allocated for the body)."""
    (length,) = HEADER.unpack(header)
    if length > max_size:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {max_size}")
    return int(length)


def recv_body(sock: socket.socket, max_size: int = DEFAULT_MAX_FRAME) -> Optional[bytes]:
    """Receive one frame's body (not decoded); ``None`` on a clean EOF between frames.

    An EOF inside a frame raises :class:`ProtocolError`; an oversized prefix raises
    :class:`FrameTooLarge` before the body is read, and the caller should close.
    """
    header = recv_exact(sock, HEADER.size)
    if header is None:
        return None
    length = frame_length(header, max_size)
    body = recv_exact(sock, length)
    if body is None:
        raise ProtocolError(f"connection closed before a {length}-byte frame body")
    return body


def recv_frame(sock: socket.socket, max_size: int = DEFAULT_MAX_FRAME) -> Optional[Any]:
    """Receive one frame and return the decoded JSON value; ``None`` on a clean EOF
    (see :func:`recv_body`)."""
    body = recv_body(sock, max_size)
    return None if body is None else decode_body(body)


class FrameBuffer:
    """The same frames, from a stream read in pieces (the container's stdout pipe).

    Bytes are fed as they arrive; :meth:`take` returns a frame's body once it is
    whole. The bound is checked on the header, before the body is waited for.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take(self) -> Optional[bytes]:
        """The next whole frame's body; ``None`` until one is complete."""
        buf = self._buf
        if len(buf) < HEADER.size:
            return None
        length = frame_length(buf[: HEADER.size], self.max_size)
        if len(buf) < HEADER.size + length:
            return None
        body = bytes(buf[HEADER.size : HEADER.size + length])
        del buf[: HEADER.size + length]
        return body

    def mid_frame(self) -> bool:
        """Whether part of a frame is waiting: an EOF now would cut it."""
        return bool(self._buf)

    def clear(self) -> None:
        self._buf.clear()


def send_frame(sock: socket.socket, obj: Any) -> None:
    """Send ``obj`` as one frame with a single ``sendall``."""
    sock.sendall(encode_frame(obj))
