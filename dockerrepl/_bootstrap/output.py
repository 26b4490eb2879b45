"""What the supervisor sends the host of a cell: its output (head and tail kept),
the worker's locals and replies, bounded by the contract's caps.
"""

from __future__ import annotations

import json

from . import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class OutputBuffer:
    """Keeps the head and tail of a stream up to ``cap`` bytes; counts the rest."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.reset()

    def reset(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        half = self.cap // 2
        room = half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.cap - half:
                cut = len(self.tail) - (self.cap - half)
                del self.tail[:cut]
                self.dropped += cut

    def text(self) -> str:
        if not self.dropped:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        return "%s\n... [dockerrepl: %d bytes of output dropped] ...\n%s" % (
            bytes(self.head).decode("utf-8", "replace"),
            self.dropped,
            bytes(self.tail).decode("utf-8", "replace"),
        )


def clean_locals(raw: Any, cap: int) -> dict[str, str]:
    """The worker's locals as they may go to the host: str to str, bounded."""
    out: dict[str, str] = {}
    if not isinstance(raw, dict):
        return out
    for k, v in raw.items():
        if len(out) >= protocol.MAX_LOCALS:
            break
        if isinstance(k, str) and isinstance(v, str) and len(k) <= protocol.MAX_NAME:
            out[k] = (
                v if len(v) <= cap + protocol.REPR_SLACK else v[:cap] + "... (%d chars)" % len(v)
            )
    return out


def clean_value(raw: Any, cap: int) -> dict[str, Any] | None:
    """A cell's value (see namespace.encode_value) as it may go to the host: its keys,
    a repr cut to ``cap`` characters; a "json" value of more than ``cap`` characters
    (the worker's bound) is replaced by a note."""
    if not isinstance(raw, dict) or raw.get("kind") not in protocol.VALUE_KINDS:
        return None
    data = raw.get("data")
    dropped = raw.get("dropped")
    dropped = dropped if type(dropped) is int and dropped >= 0 else 0
    if raw["kind"] == "repr":
        if not isinstance(data, str):
            return None
        if len(data) > cap + protocol.TEXT_SLACK:
            dropped += len(data) - cap
            data = protocol.cut(data, cap, "the value")
        return {"kind": "repr", "data": data, "dropped": dropped}
    if data is not None and not isinstance(data, (bool, int, float, str)):
        size = len(json.dumps(data, ensure_ascii=False))
        if size > cap + protocol.TEXT_SLACK:
            return {
                "kind": "repr",
                "data": "<a value of %d characters of JSON>" % size,
                "dropped": size,
            }
    elif isinstance(data, str) and len(data) > cap + protocol.TEXT_SLACK:
        return {
            "kind": "repr",
            "data": protocol.cut(repr(data), cap, "the value"),
            "dropped": len(data) - cap,
        }
    return {"kind": "json", "data": data}


def clean_reply(msg: dict[str, Any]) -> bytes:
    """A worker's reply to a host "call", encoded as it may go to the host: its keys,
    bounded (the frame is encoded once, here, to measure it)."""
    rid = msg.get("id")
    if msg.get("ok") is True:
        reply = {"type": "reply", "id": rid, "ok": True, "value": msg.get("value")}
    else:
        exc = msg.get("exception")
        reply = {
            "type": "reply",
            "id": rid,
            "ok": False,
            "error": protocol.cut(str(msg.get("error")), protocol.MAX_NOTES, "the error"),
            "exception": exc[:200] if isinstance(exc, str) else None,
        }
    frame = protocol.encode(reply)
    if len(frame) - protocol.HEADER.size <= protocol.MAX_REPLY:
        return frame
    return protocol.encode(
        {
            "type": "reply",
            "id": rid,
            "ok": False,
            "error": "the worker's reply was %d bytes, over the limit of %d (did cell code"
            " replace a dockerrepl operation?)"
            % (len(frame) - protocol.HEADER.size, protocol.MAX_REPLY),
            "exception": "RuntimeError",
        }
    )
