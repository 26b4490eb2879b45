"""The channel transport's host side: the same routes, reached through frames.

With the channel transport the container's requests arrive as ``rpc`` frames on
its stdout (see ``dockerrepl._bootstrap.relay``), read by whichever thread is
reading the container. :meth:`ChannelEndpoint.dispatch` hands each to a small pool
of threads (a cell's calls never wait behind one another, nor behind the thread
that reads), which checks it as the HTTP server checks a request (the token, the
body cap, the bytes in flight), serves it with :class:`Routes` and writes the
``rpc_reply`` frame back. The ledger, budgets, attribution to cells and error
strings are the proxy's own: one implementation, two ways in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .http import DEFAULT_MAX_BODY, KEEP_IDLE, MAX_CONNECTIONS, MAX_INFLIGHT_BODY, token_ok
from .ledger import ProxyState
from .routes import Routes

__all__ = ["ChannelEndpoint"]

log = logging.getLogger(__name__)

#: Sends one frame to the container (under the session's send lock).
Send = Callable[[dict[str, Any]], None]


class ChannelEndpoint:
    """One REPL's routes behind its stdio channel (``ProxyServer``'s counterpart)."""

    #: no port: the channel needs none (``DockerREPL.proxy_port`` says 0)
    port = 0
    host = ""

    def __init__(self, state: ProxyState, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.state = state
        self.routes = Routes(state)
        self.max_body = max_body
        self._lock = threading.Lock()
        self._inflight = 0
        self._closed = False
        # as many requests at once as the proxy serves connections
        self._pool = ThreadPoolExecutor(MAX_CONNECTIONS, thread_name_prefix="dockerrepl-rpc")
        state.on_cell_end = self._cell_ended

    @property
    def server(self) -> ChannelEndpoint:
        """What ``DockerREPL.proxy_server`` shows (it has ``lm_handler_address``, as in rlm)."""
        return self

    @property
    def lm_handler_address(self) -> Any:
        return self.state.lm_handler_address

    @lm_handler_address.setter
    def lm_handler_address(self, value: Any) -> None:
        self.state.lm_handler_address = value

    def dispatch(self, frame: dict[str, Any], send: Send) -> None:
        """Take an ``rpc`` frame from the container (in the reading thread: never blocks);
        the answer goes out through ``send``, bound to the container that asked (a
        replacement's relay numbers its requests afresh)."""
        if self._closed:
            return
        body = frame.get("body")
        size = len(body) if isinstance(body, str) else 0
        with self._lock:
            if self._inflight + size > MAX_INFLIGHT_BODY:
                reserved = -1
            else:
                self._inflight += size
                reserved = size
        if reserved < 0:
            # answered from the pool too: the reading thread may hold the send lock (it
            # reads while it writes a large frame), and the body is not kept meanwhile
            busy = {"error": "too many request bodies in flight; try again"}
            try:
                self._pool.submit(self._answer, send, {"id": frame.get("id")}, 503, busy)
            except RuntimeError:
                pass
            return
        try:
            self._pool.submit(self._serve, send, frame, reserved)
        except RuntimeError:  # closed meanwhile
            self._release(reserved)

    def _serve(self, send: Send, frame: dict[str, Any], reserved: int) -> None:
        try:
            status, reply = self._route(frame)
        except Exception as exc:  # never leave the container without an answer
            log.debug("channel request failed", exc_info=True)
            status, reply = 200, {"error": f"proxy error: {type(exc).__name__}: {exc}"}
        finally:
            self._release(reserved)
        self._answer(send, frame, status, reply)

    def _route(self, frame: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        token, path, body = frame.get("token"), frame.get("path"), frame.get("body")
        if not isinstance(token, str) or not token_ok(self.state, token):
            return 401, {"error": "missing or wrong token"}
        if not isinstance(path, str) or not isinstance(body, str):
            return 400, {"error": "malformed request"}
        if len(body) > self.max_body or (
            4 * len(body) > self.max_body
            and len(body.encode("utf-8", "surrogatepass")) > self.max_body
        ):
            return 413, {"error": f"body over {self.max_body} bytes"}
        cell = frame.get("cell")
        claimed = cell if isinstance(cell, int) and not isinstance(cell, bool) else 0
        return self.routes.serve_json(path, body, claimed)

    def _answer(self, send: Send, frame: dict[str, Any], status: int, reply: Any) -> None:
        try:
            send({"type": "rpc_reply", "id": frame.get("id"), "status": status, "body": reply})
        except Exception as exc:  # the container died or was replaced: nobody is waiting
            log.debug("channel reply not sent: %s", exc)

    def _release(self, n: int) -> None:
        with self._lock:
            self._inflight -= n

    def _cell_ended(self) -> None:
        # as the proxy does when a cell's result is taken: a few pooled LM connections stay
        self.routes.reap_idle(KEEP_IDLE)

    def close(self) -> None:
        """Stop serving (idempotent): requests still running end without a reply."""
        if self._closed:
            return
        self._closed = True
        self.routes.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.routes.close()
