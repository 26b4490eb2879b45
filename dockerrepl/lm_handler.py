"""The LM Handler: a socket server that answers LM requests, wire-compatible with rlm's.

Protocol (rlm's): 4-byte big-endian length + UTF-8 JSON. A request carries
``prompt`` (single) or ``prompts`` (batched), optional ``model`` and ``depth``.
Every response has all three keys ``chat_completion``, ``chat_completions`` and
``error``. Unlike rlm's server, ours keeps serving further frames on the same
connection until the client closes it (our proxy keeps one connection open);
rlm's one-request-per-connection clients work unchanged. ``stop()`` closes
those kept-alive connections too: after it, no request reaches a client.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from . import _exit
from ._serve import start_serving, stop_serving
from ._wire import DEFAULT_MAX_FRAME, decode_body, encode_frame, recv_body, recv_frame, send_frame
from .errors import FrameTooLarge, LMHandlerError, ProtocolError
from .types import ModelUsageSummary, RLMChatCompletion, UsageSummary

__all__ = ["LMConnection", "LMHandler", "send_lm_request", "send_lm_request_batched"]

log = logging.getLogger(__name__)

Address = tuple[str, int]

#: How long stop() waits, in all, for connection threads inside a client call.
STOP_TIMEOUT = 5.0


def _error(msg: str) -> dict[str, Any]:
    return {"error": msg, "chat_completion": None, "chat_completions": None}


class _Server(socketserver.ThreadingTCPServer):
    """One run of an LMHandler (start to stop): its socket, connections and batch pool.

    ``daemon_threads`` means socketserver keeps no list of connection threads, so
    the server keeps its own: ``stop()`` must reach kept-alive connections too.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    owner: LMHandler

    def init_run(self, owner: LMHandler) -> None:
        self.owner = owner
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(
            owner.batch_max_concurrent, thread_name_prefix="dockerrepl-lm"
        )
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}

    def track(self, sock: socket.socket) -> bool:
        """Register a connection and its thread; False once stop() has begun."""
        with self._conn_lock:
            if self.stopping.is_set():
                return False
            self._conns[sock] = threading.current_thread()
            return True

    def untrack(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._conns.pop(sock, None)

    def close_connections(self, timeout: float) -> None:
        """Shut every open connection, join its thread (bounded), close it."""
        with self._conn_lock:
            self.stopping.set()
            conns = dict(self._conns)
        for sock in conns:
            try:
                # wakes a thread blocked in recv (it reads EOF); a thread inside a
                # client call finds its socket shut when it tries to answer
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in conns.values():
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        for sock in conns:
            try:
                sock.close()  # a Python socket object closes once; later uses raise OSError
            except OSError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("LM handler: error serving %r", client_address, exc_info=True)


class _ConnHandler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        server = self.server
        sock: socket.socket = self.request
        if not server.track(sock):
            return  # accepted while stop() ran: socketserver closes it
        try:
            self._serve(server, sock)
        finally:
            server.untrack(sock)

    def _serve(self, server: _Server, sock: socket.socket) -> None:
        owner = server.owner
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        while True:
            # the body is decoded in _answer_frame, not by recv_frame: a body of JSON
            # `null` must be answered (not taken for EOF), and a bad body must be
            # answered too (the stream is still aligned) rather than end the connection
            try:
                body = recv_body(sock, owner.max_frame)
            except FrameTooLarge as exc:
                log.warning("LM handler: %s; closing", exc)
                return
            except (ProtocolError, OSError):
                return  # EOF mid-frame, reset or timeout
            if body is None:
                return  # clean EOF between frames
            if server.stopping.is_set():
                return  # read while stop() ran: close without calling a client
            # the request and its answer live in _answer_frame only: a kept-alive
            # connection may sit idle for long, and must not hold a big prompt meanwhile
            frame = self._answer_frame(owner, server, body)
            del body
            try:
                sock.sendall(frame)
            except OSError:
                return
            del frame

    @staticmethod
    def _answer_frame(owner: LMHandler, server: _Server, body: bytes) -> bytes:
        """The frame answering one request body; an error frame for anything refused."""
        try:
            req = decode_body(body)
        except ProtocolError as exc:
            # the length was valid, so the stream is still aligned: answer and go on
            resp = _error(f"Bad request: {exc}")
        else:
            resp = owner._answer(req, server)
        try:
            return encode_frame(resp)
        except (TypeError, ValueError, RecursionError) as exc:
            # an answer json cannot write (a client's odd value, or a prompt echoed back
            # nested deeper than json.dumps goes here): say so, and keep the stream
            return encode_frame(_error(f"the answer could not be encoded: {exc}"))


class LMHandler:
    """Serve LM requests from environments (ours or rlm's) over TCP.

    Args:
        client: the default client (anything with rlm's BaseLM shape:
            ``model_name``, ``completion(prompt) -> str``, ``get_last_usage()``).
        host, port: where to listen (default 127.0.0.1 and a free port).
        other_backend_client: used for ``depth == 1`` requests, as in rlm.
        batch_max_concurrent: how many prompts of one batch run at once.
        max_frame: the largest request accepted; larger prefixes close the connection.
        clients: extra clients by model name (``model`` in a request picks one).
    """

    def __init__(
        self,
        client: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        other_backend_client: Any = None,
        batch_max_concurrent: int = 16,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        clients: Optional[dict[str, Any]] = None,
    ) -> None:
        if batch_max_concurrent < 1:
            raise ValueError("batch_max_concurrent must be >= 1")
        self.client = client
        self.default_client = client
        self.other_backend_client = other_backend_client
        self.host = host
        self.port = port
        self.batch_max_concurrent = batch_max_concurrent
        self.max_frame = max_frame
        self.clients: dict[str, Any] = {}
        name = getattr(client, "model_name", None)
        if isinstance(name, str):
            self.clients[name] = client
        if other_backend_client is not None and isinstance(
            getattr(other_backend_client, "model_name", None), str
        ):
            self.clients[other_backend_client.model_name] = other_backend_client
        self.clients.update(clients or {})
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # serialises start() and stop()

    def register_client(self, name: str, client: Any) -> None:
        """Route requests whose ``model`` is ``name`` to ``client``."""
        self.clients[name] = client

    # -- lifecycle -------------------------------------------------------
    def start(self) -> Address:
        """Start serving (idempotent); returns ``(host, port)``.

        A stopped handler can be started again: it listens anew on the same
        host and port (the port it got the first time, when ``port`` was 0).
        """
        with self._lock:
            if self._server is None:
                _exit.track(self, 2)  # stopped at exit if the caller never stops it
                try:
                    server = _Server((self.host, self.port), _ConnHandler)
                except OSError as exc:
                    raise LMHandlerError(
                        f"cannot listen on {self.host}:{self.port}: {exc}"
                    ) from None
                server.init_run(self)
                self._server = server
                self.port = int(server.server_address[1])
                self._thread = start_serving(server, "dockerrepl-lm-handler")
            return self.address

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop serving: close the listening socket and every open connection.

        Idempotent and thread-safe. Once it has begun, no request reaching the
        handler calls a client: a request read after that point, and every
        prompt of a batch not yet handed to a client, gets a closed connection or
        an error instead. Calls already inside a client are waited for up to
        ``timeout`` seconds in all; one still running then finishes in its thread
        and its answer is dropped (its connection is closed).
        """
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
            if server is None or thread is None:
                return
            server.stopping.set()  # before the loop stops: nothing accepted now is served
            stop_serving(server, thread)
            server.close_connections(timeout)

    def _close_at_exit(self, deadline: float) -> None:
        """From the atexit hook: stop, bounded (no thread is started; see ``_serve``)."""
        self.stop(timeout=max(0.1, min(STOP_TIMEOUT, deadline - time.monotonic())))

    @property
    def address(self) -> Address:
        """``(host, port)``; raises :class:`LMHandlerError` before :meth:`start`."""
        if self._server is None:
            raise LMHandlerError("the LM handler is not started")
        return (self.host, self.port)

    def __enter__(self) -> LMHandler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- dispatch --------------------------------------------------------
    def get_client(self, model: Optional[str] = None, depth: int = -1) -> Any:
        """rlm's routing: a registered model name wins; depth 1 goes to the other backend."""
        if model and model in self.clients:
            return self.clients[model]
        if depth == 1 and self.other_backend_client is not None:
            return self.other_backend_client
        return self.default_client

    def dispatch(self, req: Any) -> dict[str, Any]:
        """Answer one decoded request in this thread (never raises)."""
        return self._answer(req, None)

    def _answer(self, req: Any, server: Optional[_Server]) -> dict[str, Any]:
        # server: the run the request came through; once it is stopping, no client is called
        if not isinstance(req, dict):
            return _error("Request must be a JSON object")
        model = req.get("model") if isinstance(req.get("model"), str) else None
        depth = req.get("depth", -1)
        depth = depth if isinstance(depth, int) else -1
        prompts = req.get("prompts")
        try:
            if isinstance(prompts, list) and prompts:
                comps = self._batched(prompts, model, depth, server)
                return {
                    "chat_completions": [c.to_dict() for c in comps],
                    "chat_completion": None,
                    "error": None,
                }
            if req.get("prompt"):
                comp = self._single(req["prompt"], model, depth, server)
                return {"chat_completion": comp.to_dict(), "chat_completions": None, "error": None}
        except Exception as exc:
            return _error(str(exc) or type(exc).__name__)
        return _error("Missing 'prompt' or 'prompts' in request.")

    def _single(
        self, prompt: Any, model: Optional[str], depth: int, server: Optional[_Server]
    ) -> RLMChatCompletion:
        if server is not None and server.stopping.is_set():
            raise LMHandlerError("the LM handler is stopping")
        client = self.get_client(model, depth)
        t0 = time.perf_counter()
        text = client.completion(prompt)
        elapsed = time.perf_counter() - t0
        root = model or getattr(client, "model_name", "unknown")
        usage = ModelUsageSummary.coerce(_last_usage(client))
        return RLMChatCompletion(
            root_model=str(root),
            prompt=prompt,
            response="" if text is None else str(text),
            usage_summary=UsageSummary({str(root): usage}),
            execution_time=elapsed,
        )

    def _batched(
        self, prompts: list[Any], model: Optional[str], depth: int, server: Optional[_Server]
    ) -> list[RLMChatCompletion]:
        root = str(model or getattr(self.get_client(model, depth), "model_name", "unknown"))

        def one(p: Any) -> RLMChatCompletion:
            try:
                return self._single(p, model, depth, server)
            except Exception as exc:
                return RLMChatCompletion(
                    root_model=root,
                    prompt=p,
                    response="",
                    usage_summary=UsageSummary({}),
                    execution_time=0.0,
                    error=f"llm() call failed - {exc}",
                )

        if server is None or len(prompts) == 1:
            return [one(p) for p in prompts]
        # after stop() the pool refuses new work (RuntimeError: an error frame) and
        # cancels what has not started; prompts that start check stopping in _single
        return list(server.pool.map(one, prompts))


def _last_usage(client: Any) -> Any:
    fn = getattr(client, "get_last_usage", None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:
        return None


class LMConnection:
    """A reusable client connection to an LM Handler (ours or rlm's).

    rlm's server closes the connection after each reply: before reusing the
    socket we peek for that EOF, and a request that fails on a reused socket
    before any reply byte is retried once on a fresh one (never after a reply
    byte: the handler had the request, and the LM call would be made twice).
    """

    def __init__(
        self, address: Address, timeout: float = 300.0, max_frame: int = DEFAULT_MAX_FRAME
    ) -> None:
        self.address = (str(address[0]), int(address[1]))
        self.timeout = timeout
        self.max_frame = max_frame
        self._sock: Optional[socket.socket] = None

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as exc:
            raise LMHandlerError(
                f"cannot reach the LM handler at {self.address[0]}:{self.address[1]}: {exc}"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _usable(self, sock: socket.socket) -> bool:
        try:
            sock.setblocking(False)
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            finally:
                sock.setblocking(True)
                sock.settimeout(self.timeout)
        except BlockingIOError:
            return True  # nothing to read: still open
        except OSError:
            return False
        return bool(data)  # b"" = the server closed it

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the decoded response."""
        for attempt in (0, 1):
            sock = self._sock
            reused = sock is not None
            if sock is None or not self._usable(sock):
                if sock is not None:
                    sock.close()
                sock = self._connect()
                reused = False
            self._sock = sock
            try:
                send_frame(sock, obj)
                resp = recv_frame(sock, self.max_frame)
            except (OSError, ProtocolError) as exc:
                self.close()
                # a ProtocolError means reply bytes came: the handler took the request,
                # and sending it again would make (and bill) the LM call twice
                if reused and attempt == 0 and not isinstance(exc, (socket.timeout, ProtocolError)):
                    continue
                raise LMHandlerError(
                    f"LM handler at {self.address[0]}:{self.address[1]} failed: {exc}"
                ) from None
            if resp is None:
                self.close()
                if reused and attempt == 0:
                    continue
                raise LMHandlerError("the LM handler closed the connection without answering")
            if not isinstance(resp, dict):
                raise LMHandlerError("the LM handler answered with a non-object")
            return resp
        raise LMHandlerError("unreachable")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> LMConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_lm_request(
    address: Address,
    prompt: Any,
    model: Optional[str] = None,
    depth: int = 0,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """One request on a fresh connection (works with rlm's server); returns the raw response."""
    req: dict[str, Any] = {"prompt": prompt, "depth": depth}
    if model is not None:
        req["model"] = model
    with LMConnection(address, timeout) as conn:
        return conn.request(req)


def send_lm_request_batched(
    address: Address,
    prompts: list[Any],
    model: Optional[str] = None,
    depth: int = 0,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """One batched request on a fresh connection; returns the raw response dict."""
    req: dict[str, Any] = {"prompts": list(prompts), "depth": depth}
    if model is not None:
        req["model"] = model
    with LMConnection(address, timeout) as conn:
        return conn.request(req)
