"""The proxy's minimal HTTP/1.1 server side: requests in, JSON replies out.

A ``socketserver`` server (keep-alive: a handler thread per open connection, no
per-request thread churn) on TCP or on a unix socket. It parses exactly what the
container's client sends (and what curl or requests send), checks the
per-container token and the body caps, and hands the parsed request to
:class:`~dockerrepl._proxy.routes.Routes`.

What one proxy can hold on the host is bounded: MAX_CONNECTIONS connections (a
thread and an fd each; past it, new ones wait unaccepted while the oldest idle
kept-alive one is closed) and MAX_INFLIGHT_BODY request-body bytes. Idle
connections are closed when a cell's result is taken (:meth:`reap_idle`).
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from .._bootstrap import protocol
from .ledger import Address, ProxyState
from .routes import LM_IDLE_TIMEOUT, Refused, Routes

__all__ = [
    "DEFAULT_MAX_BODY",
    "IDLE_TIMEOUT",
    "KEEP_IDLE",
    "MAX_CONNECTIONS",
    "MAX_INFLIGHT_BODY",
    "PREAUTH_GRACE",
    "PREAUTH_TIMEOUT",
    "Handler",
    "TCPServer",
    "UnixServer",
]

log = logging.getLogger(__name__)

#: Largest request body accepted (a batched prompt list is the biggest honest body).
DEFAULT_MAX_BODY = 64 * 1024 * 1024
#: How long a kept-alive connection may sit idle or a client may dawdle mid-request.
#: Idle ones are also closed when a cell's result is taken, and the oldest idle one
#: when a new connection finds the proxy full; the container's client retries a
#: request once when its kept-alive connection turns out closed.
IDLE_TIMEOUT = 60.0
#: How long a connection may take to send its first authenticated request.
PREAUTH_TIMEOUT = 10.0
#: When the proxy is full, a connection that has not authenticated for this long may be
#: dropped for a new one, so slow or silent clients (anyone on the bridge can connect)
#: cannot starve the container. An honest client sends its request at once, and one
#: whose request is still on its way must not lose it.
PREAUTH_GRACE = 1.0
#: Connections per proxy (a host thread and fd each). Past it a new connection is not
#: served until one closes: the oldest idle kept-alive one is closed to make room, and
#: if every one is busy the new one waits (the kernel's listen backlog holds the rest).
#: The container's client keeps at most this many: one number in the wire contract.
MAX_CONNECTIONS = protocol.PROXY_CONNECTIONS
#: When a cell's result is taken, idle kept-alive connections (and idle pooled LM
#: connections) past this many are closed, the oldest first: a cell that ran many
#: threads leaves a few behind, and a single-threaded one keeps its connection.
KEEP_IDLE = 4
#: Request-body bytes held in memory at once, per proxy; past it: 503.
MAX_INFLIGHT_BODY = 256 * 1024 * 1024


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_MAX_LINE = 8192
_MAX_HEADERS = 100


def token_ok(state: ProxyState, token: str) -> bool:
    """Whether ``token`` is this REPL's (compared in constant time); both transports ask."""
    return hmac.compare_digest(token.encode("utf-8", "replace"), state.token.encode())


class Handler(socketserver.StreamRequestHandler):
    """A lean HTTP/1.1 server side: keep-alive, Content-Length bodies, JSON in and out.

    ``http.server``'s handler parses headers with the email package, which
    costs more than the whole LM round trip; this one reads exactly what the
    container's client sends (and what curl or requests send), and nothing else.
    """

    timeout = PREAUTH_TIMEOUT  # until the first authenticated request; then IDLE_TIMEOUT
    # TCP_NODELAY is set in setup(), for TCP only: the class-level switch would
    # also try it on the unix socket (network="none"), where it fails
    disable_nagle_algorithm = False
    server: _ServerMixin  # type: ignore[assignment]

    def setup(self) -> None:
        if self.request.family != socket.AF_UNIX:
            # the container waits for each answer: Nagle would hold the tail of it back
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
        self.path = ""
        self.headers: dict[str, str] = {}
        self._authed = False
        self.server.preauth_add(self.request)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass

    def handle(self) -> None:
        while True:
            if self._authed:
                # between requests: the proxy may close it for a connection that waits
                self.server.mark_idle(self.request)
            try:
                keep = self._handle_one()
            except Refused as exc:
                self._reply(exc.status, {"error": str(exc)}, close=True)
                return
            except (OSError, ValueError):
                return  # timeout, reset, or a closed file: drop the connection
            if not keep:
                return

    def _read_line(self) -> bytes:
        line = self.rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise Refused(431, "request line or header too long")
        return line

    def _handle_one(self) -> bool:
        line = self._read_line()
        if not line:
            return False  # clean EOF between requests
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise Refused(400, "malformed request line")
        method, self.path, version = parts
        headers: dict[str, str] = {}
        while True:
            h = self._read_line()
            if h in (b"\r\n", b"\n"):
                break
            if not h:
                return False
            if len(headers) >= _MAX_HEADERS:
                raise Refused(431, "too many headers")
            name, sep, value = h.decode("latin-1").partition(":")
            if not sep or not name.strip():
                raise Refused(400, "malformed header")
            headers[name.strip().lower()] = value.strip()
        self.headers = headers
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method != "POST":
            self._reply(405, {"error": "use POST"}, close=not keep)
            return keep
        if "transfer-encoding" in headers:
            raise Refused(411, "chunked bodies are not accepted; send Content-Length")
        try:
            length = int(headers["content-length"])
        except (KeyError, ValueError):
            raise Refused(411, "a valid Content-Length is required") from None
        if length < 0:
            raise Refused(400, "negative Content-Length")
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not token_ok(self.server.state, token):
            self._reply(401, {"error": "missing or wrong token"}, close=True)
            return False
        if not self.server.claim(self.request):
            return False  # closed as idle while this request came: never served
        if not self._authed:
            self._authed = True
            self.connection.settimeout(IDLE_TIMEOUT)
        if length > self.server.max_body:
            raise Refused(413, f"body over {self.server.max_body} bytes")
        if not self.server.reserve_body(length):
            raise Refused(503, "too many request bodies in flight; try again")
        try:
            if headers.get("expect", "").lower() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            raw = self.rfile.read(length)
            if len(raw) != length:
                return False
            self._reply(*self._route(raw), close=not keep)
        finally:
            self.server.release_body(length)
        return keep

    def _route(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return 400, {"error": f"bad JSON: {exc}"}
        try:
            claimed = int(self.headers.get("x-dockerrepl-cell", "0"))
        except ValueError:
            claimed = 0
        return self.server.routes.serve_json(self.path, text, claimed)

    def _reply(self, status: int, data: dict[str, Any], close: bool = False) -> None:
        payload = json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass")
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        try:
            self.wfile.write(head.encode("latin-1") + payload)  # one write: one segment
        except OSError:
            pass


@dataclass
class _Conn:
    """What the proxy knows of one open connection (its thread runs the handler)."""

    since: float  # accepted, or last answered: the oldest idle one is closed first
    authed: bool = False
    busy: bool = True  # between a request's token check and its answer (never closed)
    closed: bool = False  # shut by the proxy: a request read after it is not served


class _ServerMixin:
    state: ProxyState
    routes: Routes
    max_body: int

    def init_limits(self) -> None:
        self._conn_lock = threading.Lock()
        # notified when a connection closes or turns idle: an accept may be waiting
        self._conn_change = threading.Condition(self._conn_lock)
        self._conns: dict[socket.socket, _Conn] = {}  # every connection with a thread
        self._stopping = False
        self._inflight = 0

    # -- connection limits -----------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._admit(request):
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self.connection_done(request)
            raise

    def _admit(self, sock: socket.socket) -> bool:
        """Wait for a connection slot (False when the server stops meanwhile).

        At MAX_CONNECTIONS, the oldest idle kept-alive connection is closed to make
        room (its client sends its next request on a new one), else the oldest one
        that has not authenticated within PREAUTH_GRACE; when every one is busy, this
        waits. Accepting stops meanwhile, and the kernel's backlog holds the rest.
        """
        waited = False
        with self._conn_lock:
            while len(self._conns) >= MAX_CONNECTIONS:
                if self._stopping:
                    return False
                if not any(c.closed for c in self._conns.values()):
                    victim = self._idle_locked(authed=True) or self._idle_locked(authed=False)
                    if victim is not None:
                        self._close_locked(victim)
                if not waited:
                    waited = True
                    log.debug("proxy: %d connections open; a new one waits", MAX_CONNECTIONS)
                self._conn_change.wait(1.0)
            self._conns[sock] = _Conn(since=time.monotonic())
            return True

    def _idle_locked(self, authed: bool) -> Optional[socket.socket]:
        """The oldest connection that may be closed: idle after an answer (``authed``),
        or not authenticated for PREAUTH_GRACE (called with _conn_lock)."""
        limit = time.monotonic() - (0.0 if authed else PREAUTH_GRACE)
        old = [
            (c.since, id(k), k)
            for k, c in self._conns.items()
            if c.authed == authed and not c.busy and not c.closed and c.since <= limit
        ]
        return min(old)[2] if old else None

    def _close_locked(self, sock: socket.socket) -> None:
        """Shut a connection that is not serving a request (called with _conn_lock)."""
        conn = self._conns.get(sock)
        if conn is None or conn.closed or conn.busy:
            return
        conn.closed = True
        try:
            sock.shutdown(socket.SHUT_RDWR)  # its handler reads EOF and ends
        except OSError:
            pass

    def shutdown(self) -> None:
        with self._conn_lock:
            self._stopping = True  # an accept waiting for a slot gives up
            self._conn_change.notify_all()
        super().shutdown()  # type: ignore[misc]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.connection_done(request)

    def connection_done(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._conns.pop(sock, None)
            self._conn_change.notify_all()

    def preauth_add(self, sock: socket.socket) -> None:
        """A new connection's handler runs: until it authenticates, it may be closed."""
        with self._conn_lock:
            conn = self._conns.get(sock)
            if conn is not None:
                conn.busy = False

    def claim(self, sock: socket.socket) -> bool:
        """An authenticated request is about to be served: it is busy now, and the
        proxy will not close it. False if the proxy closed it first (not served: the
        client sees its connection closed without an answer and sends it again)."""
        with self._conn_lock:
            conn = self._conns.get(sock)
            if conn is None or conn.closed:
                return False
            conn.busy = conn.authed = True
            return True

    def mark_idle(self, sock: socket.socket) -> None:
        """An answered connection waits for its next request: it may be closed."""
        with self._conn_lock:
            conn = self._conns.get(sock)
            if conn is not None:
                conn.busy = False
                conn.since = time.monotonic()
                self._conn_change.notify_all()

    def reap_idle(self, keep: int = KEEP_IDLE) -> None:
        """Close idle kept-alive connections and idle pooled LM connections but the
        ``keep`` most recently used of each (called when a cell's result is taken)."""
        with self._conn_lock:
            idle = sorted(
                ((c.since, id(k), k) for k, c in self._conns.items() if c.authed and not c.busy),
                reverse=True,
            )
            for _, _, sock in idle[keep:]:
                self._close_locked(sock)
        self.routes.reap_idle(keep)

    def service_actions(self) -> None:
        """Called by serve_forever's loop (at least every poll interval)."""
        self.routes.close_pooled(older_than=LM_IDLE_TIMEOUT)

    def reserve_body(self, n: int) -> bool:
        with self._conn_lock:
            if self._inflight + n > MAX_INFLIGHT_BODY:
                return False
            self._inflight += n
            return True

    def release_body(self, n: int) -> None:
        with self._conn_lock:
            self._inflight -= n

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("proxy: error while serving %r", client_address, exc_info=True)

    @property
    def lm_handler_address(self) -> Optional[Address]:
        """rlm's attribute: where requests are forwarded (updated by update_handler_address)."""
        return self.state.lm_handler_address

    @lm_handler_address.setter
    def lm_handler_address(self, value: Optional[Address]) -> None:
        self.state.lm_handler_address = value


class TCPServer(_ServerMixin, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class UnixServer(_ServerMixin, socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 64

    def get_request(self) -> Any:
        sock, _ = super().get_request()
        return sock, ("unix", 0)  # BaseHTTPRequestHandler expects an (address, port) pair
