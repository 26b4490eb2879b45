"""The host <-> bootstrap contract, and the bootstrap's one frame reader.

Both sides import this module: the host as ``dockerrepl._bootstrap.protocol``, the
container as ``dockerrepl_bootstrap.protocol``. So it imports only the standard
library and runs on Python 3.8. Imports flow host -> bootstrap, never back.

A frame is a 4-byte big-endian length, then that many bytes of UTF-8 JSON. The host
reads frames with ``dockerrepl._wire``; the bootstrap (which may import nothing of
the host's) with :class:`FrameReader` below.
"""

from __future__ import annotations

import json
import os
import select
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any

__all__ = [
    "FINAL_ANSWER_CAP",
    "HEADER",
    "MAX_FRAME",
    "MAX_LOCALS",
    "MAX_NAME",
    "MAX_NOTES",
    "MAX_REPLY",
    "PROXY_CONNECTIONS",
    "REPR_SLACK",
    "RESERVED_NAMES",
    "RESULT_STATUSES",
    "SCAFFOLD_FUNCS",
    "TEXT_SLACK",
    "VALUE_KINDS",
    "VERSION",
    "WORKER_STATUSES",
    "FrameReader",
    "cut",
    "encode",
    "recv_frame",
    "send_frame",
    "write_all",
]

#: The protocol version: the hello frame carries the host's, the ready frame the bootstrap's.
VERSION = 1
#: The frame header: the body's length, 4 bytes big-endian.
HEADER = struct.Struct(">I")
#: The largest frame the bootstrap reads (from the host, and between its processes).
MAX_FRAME = 1 << 30

#: The REPL helpers the bootstrap defines, hidden from ``locals``.
SCAFFOLD_FUNCS = ("llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched", "SHOW_VARS")
#: Names the REPL owns: restored after every cell and refused as custom-tool names.
RESERVED_NAMES = frozenset(SCAFFOLD_FUNCS + ("answer", "context", "history"))
#: The statuses a worker reports for a cell it ran.
WORKER_STATUSES = frozenset({"ok", "error"})
#: Every ``REPLResult.status``; the others are the supervisor's (and the host's).
RESULT_STATUSES = WORKER_STATUSES | {"timeout", "interrupted", "crashed", "oom"}

# Bounds on what a cell's result may carry: names listed in locals, the length of one
# name, the characters of final_answer, and of the supervisor's own notes. The
# bootstrap keeps to them; the host refuses more (plus the slacks below).
MAX_LOCALS = 10000
MAX_NAME = 1000
FINAL_ANSWER_CAP = 16 << 20
MAX_NOTES = 16 << 10
#: A repr longer than its cap by more than this was not cut by the bootstrap.
REPR_SLACK = 64
#: What a bounded text may exceed its cap by: cut markers and the supervisor's notes.
TEXT_SLACK = 64 << 10
#: Kept-alive connections the container's client holds to the proxy, shared by its
#: threads; the proxy serves as many per session (a cell's 256 threads wait in the
#: container for one, not in the host's backlog).
PROXY_CONNECTIONS = 32
#: A result's trailing-expression value (asked for with the exec frame's ``"value": true``)
#: is ``{"kind": "json", "data": v}`` for JSON of at most max_output characters, else
#: ``{"kind": "repr", "data": text, "dropped": n}`` (the repr, cut to max_output).
VALUE_KINDS = ("json", "repr")
#: The largest reply to a host "call" (the worker's own are a few hundred bytes; cell
#: code can replace the worker's operations, so a larger one is refused).
MAX_REPLY = 1 << 20
# Sessions as values (save, resume, fork): the top-level workspace files the
# "export" call leaves for the host to copy out, and the one the host copies in for
# "import" (opaque tar bytes to the host; only a container unpickles what is in them)
#: the most in-memory snapshots (parked forks of the worker) a session keeps
MAX_SNAPSHOTS = 64
EXPORT_NAME = "_dockerrepl_export.tar"
IMPORT_NAME = "_dockerrepl_import.tar"


def cut(text: str, cap: int, what: str) -> str:
    """``text`` with at most ``cap`` characters: head and tail kept, the middle said."""
    if len(text) <= cap:
        return text
    half = cap // 2
    return "%s\n... [dockerrepl: %d characters of %s dropped] ...\n%s" % (
        text[:half],
        len(text) - cap,
        what,
        text[len(text) - (cap - half) :],
    )


# --------------------------------------------------------------------------- framing
def encode(obj: Any) -> bytes:
    """``obj`` as one frame (header and body in one ``bytes``)."""
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )
    return HEADER.pack(len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, blocking or not."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def send_frame(sock: socket.socket, obj: Any) -> None:
    """Send ``obj`` as one frame on ``sock``, blocking or not."""
    view = memoryview(encode(obj))
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            select.select([], [sock], [])
            continue
        except InterruptedError:
            continue
        view = view[n:]


class FrameReader:
    """The bootstrap's frame parser: bytes are fed as they come, frames taken out whole.

    The bound is checked on the header, before the body is waited for (or kept).
    """

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self.buf = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> None:
        self.buf += data

    def take(self) -> tuple[bool, Any]:
        """``(True, value)`` of the next whole frame, ``(False, None)`` until one is
        complete; ``ValueError`` for a frame over the bound or not UTF-8 JSON."""
        buf = self.buf
        if len(buf) < HEADER.size:
            return False, None
        (n,) = HEADER.unpack_from(buf)
        if n > self.limit:
            raise ValueError("frame of %d bytes over the limit" % n)
        if len(buf) < HEADER.size + n:
            return False, None
        body = bytes(buf[HEADER.size : HEADER.size + n])
        del buf[: HEADER.size + n]
        return True, json.loads(body.decode("utf-8", "surrogatepass"))

    def frames(self) -> list[Any]:
        """Every whole frame fed so far."""
        out: list[Any] = []
        while True:
            whole, value = self.take()
            if not whole:
                return out
            out.append(value)


def recv_frame(sock: socket.socket, reader: FrameReader) -> Any:
    """Blocking: the next frame's value from ``sock`` (read through ``reader``, which
    keeps what came after it); ``None`` at EOF, wherever it falls (the peer is gone:
    nothing is left to answer)."""
    while True:
        whole, value = reader.take()
        if whole:
            return value
        try:
            data = sock.recv(1 << 16)
        except InterruptedError:
            continue
        if not data:
            return None
        reader.feed(data)


def positive(value: Any) -> float | None:
    """A timeout from the host: a finite number > 0, else None (no limit)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if 0 < value < float("inf") else None
