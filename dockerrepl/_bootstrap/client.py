"""The container's client for the host's routes: pooled, kept-alive connections.

Two transports, one interface (``request(path, body, headers, timeout) -> (status,
value)``): HTTP to the host proxy (TCP through ``host.docker.internal``, or a unix
socket with ``network="none"``), or frames to the supervisor's relay (the channel
transport, see :mod:`.relay`). Cell code calls ``llm_query`` the same way over both.
"""

from __future__ import annotations

import json
import os
import socket
import time

from . import protocol
from .namespace import REPL

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any


class _ProxyConnection:
    """A minimal kept-alive HTTP/1.1 client for the host proxy (pooled: _ProxyPool).

    http.client parses every response's headers with the email package; the
    proxy's answers are tiny and regular, so this reads status, Content-Length
    and the body, and sends each request in a single write.
    """

    def __init__(self, target: dict[str, Any]) -> None:
        self.target = target
        self.sock: socket.socket | None = None
        self.rfile: IO[bytes] | None = None

    def connect(self, timeout: float) -> tuple[socket.socket, IO[bytes]]:
        if self.target.get("unix"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.target["unix"])
        else:
            s = socket.create_connection(
                (self.target.get("host", "host.docker.internal"), int(self.target.get("port", 0))),
                timeout,
            )
            # without this, Nagle + delayed ACK add ~40 ms to every llm_query
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.rfile = rfile = s.makefile("rb")
        return s, rfile

    def close(self) -> None:
        for f in (self.rfile, self.sock):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self.sock = self.rfile = None

    def request(
        self, path: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> tuple[int, Any]:
        if self.sock is None or self.rfile is None:
            sock, rfile = self.connect(timeout)
        else:
            sock, rfile = self.sock, self.rfile
        sock.settimeout(timeout)
        head = (
            "POST %s HTTP/1.1\r\nHost: dockerrepl\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n" % (path, len(body))
        )
        head += "".join("%s: %s\r\n" % kv for kv in headers.items()) + "\r\n"
        sock.sendall(head.encode("latin-1") + body)
        status_line = rfile.readline(8193)
        if not status_line:
            raise ConnectionResetError("the proxy closed the connection")
        parts = status_line.split(None, 2)
        status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
        length, close = 0, False
        while True:
            line = rfile.readline(8193)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        data = rfile.read(length) if length else b""
        if len(data) != length:
            raise ConnectionResetError("the proxy closed the connection mid-answer")
        if close:
            self.close()
        try:
            return status, json.loads(data.decode("utf-8", "replace"))
        except ValueError:
            return status, {"error": "proxy answered HTTP %d with a non-JSON body" % status}


class _RelayConnection:
    """A kept-alive connection to the supervisor's relay (the channel transport)."""

    def __init__(self, target: dict[str, Any]) -> None:
        self.target = target
        self.sock: socket.socket | None = None
        self.reader = protocol.FrameReader()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def request(
        self, path: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> tuple[int, Any]:
        if self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.target["unix"])
            self.sock, self.reader = s, protocol.FrameReader()
        sock = self.sock
        sock.settimeout(timeout)
        try:
            cell = int(headers.get("X-DockerREPL-Cell", "0"))
        except ValueError:
            cell = 0
        token = headers.get("Authorization", "")
        frame = {
            "path": path,
            "body": body.decode("utf-8", "surrogatepass"),
            "cell": cell,
            "token": token[7:] if token.startswith("Bearer ") else token,
        }
        sock.sendall(protocol.encode(frame))
        reply = protocol.recv_frame(sock, self.reader)
        if not isinstance(reply, dict):
            raise ConnectionResetError("the relay closed the connection")
        status = reply.get("status")
        return (status if isinstance(status, int) else 0), reply.get("body")


def _connection(target: dict[str, Any]) -> _ProxyConnection | _RelayConnection:
    return _RelayConnection(target) if target.get("relay") else _ProxyConnection(target)


class _ProxyPool:
    """At most PROXY_CONNECTIONS connections to the proxy, lent to one thread at a time.

    The host holds a thread and a descriptor for each open connection, so a cell's
    threads share a few instead of keeping one each. Idle ones are reused most
    recent first; the host may close idle ones (after a cell, or to make room), and
    a request that finds its connection closed is sent once more on a new one.
    """

    def __init__(self, target: dict[str, Any], size: int) -> None:
        import threading

        self.target = target
        self.pid = os.getpid()
        self.slots = threading.BoundedSemaphore(size)
        self.lock = threading.Lock()
        self.idle: list[_ProxyConnection | _RelayConnection] = []

    def get(self, timeout: float) -> _ProxyConnection | _RelayConnection:
        if not self.slots.acquire(timeout=timeout):
            raise TimeoutError("no connection to the host proxy came free in %ss" % (timeout,))
        with self.lock:
            if self.idle:
                return self.idle.pop()
        return _connection(self.target)

    def put(self, conn: _ProxyConnection | _RelayConnection) -> None:
        if conn.sock is not None:
            with self.lock:
                self.idle.append(conn)
        self.slots.release()


_POOL: list[_ProxyPool] = []  # this process's pool, made on first use


def _proxy_pool() -> _ProxyPool:
    # a forked child must not share its parent's connections (or its lock states)
    if not _POOL or _POOL[0].pid != os.getpid():
        _POOL[:] = [_ProxyPool(REPL.config.get("proxy") or {}, protocol.PROXY_CONNECTIONS)]
    return _POOL[0]


def post(path: str, payload: Any, timeout: float) -> Any:
    """POST JSON to the proxy; returns the decoded answer. Raises on transport errors."""
    body = json.dumps(payload).encode("utf-8", "surrogatepass")
    headers = {
        "Authorization": "Bearer " + REPL.config.get("token", ""),
        "X-DockerREPL-Cell": str(REPL.cell_id),
    }
    pool = _proxy_pool()
    start = time.monotonic()
    conn = pool.get(timeout)
    try:
        timeout = max(0.001, timeout - (time.monotonic() - start))
        for attempt in (0, 1):
            reused = conn.sock is not None
            try:
                status, value = conn.request(path, body, headers, timeout)
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle kept-alive connection: retry once
                raise
            except BaseException:
                conn.close()  # a half-read answer would poison the next request
                raise
            if not isinstance(value, dict):
                return {"error": "proxy answered HTTP %d with a non-object body" % status}
            return value
        return {"error": "unreachable"}
    finally:
        pool.put(conn)
