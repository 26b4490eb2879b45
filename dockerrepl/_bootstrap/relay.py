"""The channel transport's endpoint in the container: LM calls and host tools as frames.

With the channel transport the container has no route to the host: the supervisor
listens on an abstract unix socket (no file: nothing a cell can unlink or replace,
and private to the container's network namespace), the cell's client
(:mod:`.client`) sends each request there as one frame ``{"path", "body", "cell",
"token"}``, and the supervisor passes it to the host as ``{"type": "rpc", "id", ...}``
on stdout, interleaved with the cell's own frames. The host answers with
``{"type": "rpc_reply", "id", "status", "body"}``, which goes back to the connection
that asked. The host serves both transports with the same routes, ledger and checks.

Everything here runs inside the supervisor's select loop and never blocks it: sockets
are non-blocking, replies wait in a per-connection buffer until the socket takes them,
and a connection has at most one request with the host at a time (the next is not
read until the answer is written), so what the relay holds is bounded by its
connections.
"""

from __future__ import annotations

import os
import socket
import time

from . import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

#: Connections the relay holds at once; past it the oldest idle one is closed for a
#: new one (the client sends its request again on a fresh connection), or, with none
#: idle, new ones wait in the listen backlog.
MAX_CONNECTIONS = 2 * protocol.PROXY_CONNECTIONS
#: The proxy's body cap (``dockerrepl._proxy.http.DEFAULT_MAX_BODY``): a request frame
#: may hold that much JSON text, escaped once more inside the frame (up to twice as long
#: for an honest body), plus the envelope. The host checks the body itself.
MAX_BODY = 64 << 20
MAX_REQUEST = MAX_BODY + (1 << 20)
#: Bytes of unfinished requests the relay holds across its connections. Past it, only
#: the connection furthest along (it can always finish: one request is at most
#: MAX_REQUEST) and connections holding less than SMALL (a new request: llm_query's are
#: small) are read, SMALL at a time. So the relay holds at most about BUDGET +
#: MAX_REQUEST + MAX_CONNECTIONS * 2 * SMALL: eight partial 120 MiB frames used to take
#: pid 1's memory until the OOM killer ended the container.
BUDGET = 32 << 20
SMALL = 256 << 10
#: A connection whose unfinished request has not grown for this long is closed: what it
#: holds counts against BUDGET, and an honest client sends its request at once.
STALL = 30.0


class _Conn:
    __slots__ = ("doomed", "grew", "out", "reader", "sock", "used", "waiting")

    def __init__(self, sock: socket.socket, order: int) -> None:
        self.sock = sock
        self.reader = protocol.FrameReader(MAX_REQUEST)
        self.out = bytearray()
        self.waiting: int | None = None  # the id of its request with the host
        self.used = order  # when it last asked: the oldest idle one goes first
        self.doomed = False  # closed once its last reply is written (it broke framing)
        self.grew = time.monotonic()  # when its unfinished request last grew


class Relay:
    """The abstract-socket endpoint; ``send_host`` writes a frame to the host."""

    def __init__(self, send_host: Callable[[Any], None]) -> None:
        self.send_host = send_host
        self.name = "\0dockerrepl-relay-%d-%s" % (os.getpid(), os.urandom(8).hex())
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.name)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.conns: dict[int, _Conn] = {}  # by fd
        self.pending: dict[int, _Conn] = {}  # request id -> the connection that asked
        self.next_id = 0
        self.ticks = 0
        self.tight = False  # over BUDGET at the last look

    # -- select ---------------------------------------------------------------
    def read_fds(self) -> list[int]:
        now = time.monotonic()
        for c in [c for c in self.conns.values() if c.reader.buf and now - c.grew > STALL]:
            self._close(c)  # a request that stopped coming: what it holds is freed
        ready = [(fd, c) for fd, c in self.conns.items() if c.waiting is None and not c.out]
        self.tight = sum(len(c.reader.buf) for c in self.conns.values()) > BUDGET
        if self.tight and ready:
            # the one furthest along finishes and frees what it holds; new, small
            # requests still get through
            furthest = max(ready, key=lambda fc: len(fc[1].reader.buf))
            ready = [fc for fc in ready if fc is furthest or len(fc[1].reader.buf) < SMALL]
        fds = [fd for fd, _ in ready]
        if len(self.conns) < MAX_CONNECTIONS or self._idle() is not None:
            fds.append(self.listener.fileno())
        return fds

    def write_fds(self) -> list[int]:
        return [fd for fd, c in self.conns.items() if c.out]

    def owns(self, fd: int) -> bool:
        return fd == self.listener.fileno() or fd in self.conns

    def on_readable(self, fd: int) -> None:
        if fd == self.listener.fileno():
            self._accept()
            return
        conn = self.conns.get(fd)
        if conn is None:
            return
        try:
            data = conn.sock.recv(SMALL if self.tight else 1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.reader.feed(data)
        conn.grew = time.monotonic()
        self._take_request(conn)

    def on_writable(self, fd: int) -> None:
        conn = self.conns.get(fd)
        if conn is None or not conn.out:
            return
        try:
            n = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        del conn.out[:n]
        if not conn.out:
            if conn.doomed:
                self._close(conn)
                return
            self._take_request(conn)  # a request it sent behind the last one

    # -- the host's answers ------------------------------------------------------
    def on_reply(self, msg: dict[str, Any]) -> None:
        """An ``rpc_reply`` from the host: queued for the connection that asked."""
        rid = msg.get("id")
        conn = self.pending.pop(rid, None) if isinstance(rid, int) else None
        if conn is None or conn.waiting != rid:
            return  # the connection closed meanwhile
        conn.waiting = None
        reply = {"status": msg.get("status", 502), "body": msg.get("body")}
        self._queue(conn, reply)

    # -- internals ---------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            if len(self.conns) >= MAX_CONNECTIONS:
                idle = self._idle()
                if idle is None:
                    return
                self._close(idle)
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. out of descriptors: the client's connect times out
            sock.setblocking(False)
            self.ticks += 1
            self.conns[sock.fileno()] = _Conn(sock, self.ticks)

    def _idle(self) -> _Conn | None:
        idle = [c for c in self.conns.values() if c.waiting is None and not c.out]
        return min(idle, key=lambda c: c.used) if idle else None

    def _take_request(self, conn: _Conn) -> None:
        if conn.waiting is not None or conn.out:
            return
        try:
            whole, req = conn.reader.take()
        except (ValueError, RecursionError) as exc:
            # over the bound, or not JSON: answered as the proxy answers such bodies,
            # then closed (what follows on it cannot be framed any more)
            conn.doomed = True
            if "over the limit" in str(exc):
                reply = {"status": 413, "body": {"error": "body over %d bytes" % MAX_BODY}}
                conn.reader.buf = bytearray()  # nothing more of it is kept
            else:
                reply = {"status": 400, "body": {"error": "bad JSON: %s" % str(exc)[:200]}}
            self._queue(conn, reply)
            return
        if not whole:
            return
        if not (
            isinstance(req, dict)
            and isinstance(req.get("path"), str)
            and isinstance(req.get("body"), str)
        ):
            self._queue(conn, {"status": 400, "body": {"error": "bad request frame"}})
            return
        self.next_id += 1
        rid = self.next_id
        conn.waiting = rid
        self.ticks += 1
        conn.used = self.ticks
        self.pending[rid] = conn
        cell = req.get("cell")
        self.send_host(
            {
                "type": "rpc",
                "id": rid,
                "path": req["path"][:1000],
                "body": req["body"],
                "cell": cell if isinstance(cell, int) and not isinstance(cell, bool) else 0,
                "token": str(req.get("token", ""))[:1000],
            }
        )

    def _queue(self, conn: _Conn, reply: dict[str, Any]) -> None:
        conn.out += protocol.encode(reply)
        self.on_writable(conn.sock.fileno())

    def _close(self, conn: _Conn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        if conn.waiting is not None:
            self.pending.pop(conn.waiting, None)
        try:
            conn.sock.close()
        except OSError:
            pass

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        try:
            self.listener.close()
        except OSError:
            pass
