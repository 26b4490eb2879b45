"""The HTTP proxy the container's ``llm_query()`` talks to.

A ``socketserver`` HTTP/1.1 server (keep-alive: a handler thread per open
connection, no per-request thread churn) served on TCP at the docker bridge
gateway address, or on a unix socket inside the workspace mount for
``network="none"``. Every request must carry the per-container token. Requests
are forwarded to the LM Handler over a small pool of raw sockets (rlm's
framing) with the environment's depth, never the body's.

What one proxy (one session) can hold on the host is bounded by constants:
MAX_CONNECTIONS connections (a thread and an fd each; past it, new ones wait
unaccepted while the oldest idle kept-alive one is closed), MAX_LM_INFLIGHT
prompts at the LM Handler at once (one pooled connection per request), and the
executor's threads. Idle connections are closed when a cell's result is taken.

Endpoints (POST, JSON): ``/llm_query``, ``/llm_query_batched``, ``/rlm_query``,
``/rlm_query_batched`` as in rlm, and ``/host_tool`` for
:func:`dockerrepl.host_tool` functions.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ._serve import start_serving, stop_serving
from ._wire import TooManyValues, parse_json
from .errors import DockerReplError, ProxyError
from .lm_handler import LMConnection

__all__ = ["ProxyServer", "ProxyState"]

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
#: The container's client keeps at most this many (bootstrap PROXY_POOL).
MAX_CONNECTIONS = 32
#: LM calls (prompts) a proxy has at the LM Handler at once. It bounds the pooled
#: connections to the handler (and an in-process handler's threads), and how far a
#: token budget can be overshot: no call is dispatched once the budget is reached, so
#: at most MAX_LM_INFLIGHT - 1 calls beyond the one that reached it are made.
MAX_LM_INFLIGHT = 16
#: Idle pooled connections to the LM Handler are closed after this long.
LM_IDLE_TIMEOUT = 30.0
#: When a cell's result is taken, idle kept-alive connections (and idle pooled LM
#: connections) past this many are closed, the oldest first: a cell that ran many
#: threads leaves a few behind, and a single-threaded one keeps its connection.
KEEP_IDLE = 4
#: Request-body bytes held in memory at once, per proxy; past it: 503.
MAX_INFLIGHT_BODY = 256 * 1024 * 1024
#: Prompts per request to the LM Handler; a larger batch goes in chunks, BATCH_WINDOW
#: at a time, each checked against abandonment and the budget when dispatched (and
#: each holding LM slots, so MAX_LM_INFLIGHT bounds the prompts actually in flight).
BATCH_CHUNK = 16
BATCH_WINDOW = 4
#: Prompts in one llm_query_batched / rlm_query_batched request; more get 413. rlm's
#: batches are tens to thousands of prompts. The bound keeps the host's per-prompt
#: work (chunks, futures, answers) small: 8,000,000 one-byte prompts took the host's
#: peak RSS to 1.9 GB and 21 s of CPU, even with the call budget already spent.
MAX_BATCH_PROMPTS = 10_000
#: Completions held for the cell that has not been taken yet: past either bound they
#: are counted (ProxyState.unrecorded) and not kept. rlm_calls of an honest cell stay
#: far below them; a cell looping on a fast LM cannot grow the host without end.
MAX_RECORDED = 50_000
MAX_RECORDED_BYTES = 256 * 1024 * 1024
ABANDONED = "the cell that asked was abandoned (it timed out or crashed)"

Address = tuple[str, int]


def _completion_dict(obj: Any) -> dict[str, Any]:
    """A completion (ours, rlm's or a dict) as the wire's ``C`` dict."""
    if isinstance(obj, dict):
        return obj
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        d = to_dict()
        if isinstance(d, dict):
            return d
    raise TypeError(f"subcall_fn returned {type(obj).__name__}, not a completion")


def _approx_size(c: dict[str, Any]) -> int:
    """About how many bytes a completion holds: its prompt and response, plus the rest."""
    n = 512  # model name, usage, timing: small and bounded
    for key in ("prompt", "response"):
        v = c.get(key)
        if isinstance(v, str):
            n += len(v)
        elif v is not None:  # a message list
            try:
                n += len(json.dumps(v, ensure_ascii=False))
            except (TypeError, ValueError, RecursionError):
                n += MAX_RECORDED_BYTES  # cannot tell: do not keep it
    return n


def _tokens(c: dict[str, Any]) -> int:
    total = 0
    usage = (c.get("usage_summary") or {}).get("model_usage_summaries") or {}
    for u in usage.values():
        if isinstance(u, dict):
            total += int(u.get("total_input_tokens") or 0) + int(u.get("total_output_tokens") or 0)
    return total


@dataclass
class ProxyState:
    """What one REPL's proxy needs; mutable where rlm mutates it (handler address).

    ``current_cell`` is the cell the host is running (set before the cell is sent).
    The container names its cell in a header; with ``current_cell`` set, that claim
    is checked against it (see :meth:`attribute`). ``None`` means the owner does not
    number cells, and the header is taken as it is (tests; DockerREPL sets it before
    its first cell, and no cell code runs before that).
    """

    token: str
    depth: int = 1
    lm_handler_address: Optional[Address] = None
    subcall_fn: Optional[Callable[[Any, Optional[str]], Any]] = None
    max_concurrent_subcalls: int = 4
    max_llm_calls: Optional[int] = None
    max_llm_tokens: Optional[int] = None
    host_tools: dict[str, Callable[..., Any]] = field(default_factory=dict)
    lm_timeout: float = 600.0
    max_lm_inflight: int = MAX_LM_INFLIGHT
    # runtime
    calls: int = 0
    tokens: int = 0
    inflight: int = 0  # LM calls (prompts) dispatched and not yet settled
    current_cell: Optional[int] = None
    abandoned_below: int = 0
    taken_through: Optional[int] = None  # the latest cell whose completions were taken
    completions: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    unrecorded: int = 0  # completions not kept: past MAX_RECORDED or MAX_RECORDED_BYTES
    lock: threading.Lock = field(default_factory=threading.Lock)
    _subcall_sem: Optional[threading.BoundedSemaphore] = None
    _sizes: dict[int, int] = field(default_factory=dict)  # approximate bytes kept, per cell
    _kept: int = 0
    _kept_bytes: int = 0
    _warned_cell: Optional[int] = None
    _call_tokens_max: Optional[int] = None  # the most tokens one answered call used
    on_cell_end: Optional[Callable[[], None]] = None  # the proxy's idle-connection reaper

    def __post_init__(self) -> None:
        # dispatchers wait on it for room (in-flight slots, budget); settling wakes them
        self._room = threading.Condition(self.lock)

    def subcall_semaphore(self) -> threading.BoundedSemaphore:
        with self.lock:
            if self._subcall_sem is None:
                self._subcall_sem = threading.BoundedSemaphore(
                    max(1, int(self.max_concurrent_subcalls))
                )
            return self._subcall_sem

    def attribute(self, claimed: int) -> Optional[int]:
        """The cell a request whose header names cell ``claimed`` is attributed to.

        ``None`` (refuse it) when ``claimed`` is after the current cell: the host
        sets the current cell before it sends the cell, and the worker sends the
        id of the cell it is running, so an honest header is never ahead of it.
        An abandoned cell keeps its id, so that its calls are refused. Any other
        older cell means the cell running now (its thread made the call; or the
        worker has not started the new cell yet, and a thread that outlived its
        cell makes a call in that moment): its calls count for the running cell.
        """
        with self.lock:
            current = self.current_cell
            if current is None or claimed < self.abandoned_below:
                return claimed
            if claimed > current:
                return None
            return current

    def record(self, cell: int, completion: dict[str, Any]) -> None:
        """Count a completion's tokens and keep it for :meth:`take`, within bounds."""
        size = _approx_size(completion)  # outside the lock: it may walk a message list
        with self.lock:
            self.tokens += _tokens(completion)
            if cell < self.abandoned_below:
                return  # never attributed: its cell timed out or crashed
            if self.taken_through is not None and cell <= self.taken_through:
                return  # its cell's result is gone; nothing will ever take it
            if self._kept >= MAX_RECORDED or self._kept_bytes + size > MAX_RECORDED_BYTES:
                self.unrecorded += 1
                if self._warned_cell != cell:
                    self._warned_cell = cell
                    log.warning(
                        "proxy: cell %d made more LM calls than are kept (%d or %d MiB); "
                        "later ones are not in its rlm_calls",
                        cell,
                        MAX_RECORDED,
                        MAX_RECORDED_BYTES >> 20,
                    )
                return
            self.completions.setdefault(cell, []).append(completion)
            self._sizes[cell] = self._sizes.get(cell, 0) + size
            self._kept += 1
            self._kept_bytes += size

    def _drop(self, cell: int) -> list[dict[str, Any]]:
        out = self.completions.pop(cell, [])
        self._kept -= len(out)
        self._kept_bytes -= self._sizes.pop(cell, 0)
        return out

    def take(self, cell: int) -> list[dict[str, Any]]:
        """The completions a cell made; older cells' leftovers are dropped. Later
        completions for this cell or an older one are not kept: nothing takes them."""
        with self.lock:
            out = self._drop(cell)
            for k in [k for k in self.completions if k <= cell]:
                self._drop(k)
            if self.taken_through is None or cell > self.taken_through:
                self.taken_through = cell
        reap = self.on_cell_end
        if reap is not None:
            reap()  # the cell is over: close what its threads left idle
        return out

    def is_abandoned(self, cell: int) -> bool:
        """True for a cell that timed out (or crashed): its calls get no new LM work."""
        return cell < self.abandoned_below

    def abandon_through(self, cell: int) -> None:
        """Calls made by cells <= ``cell`` will never be attributed (their cell timed out)."""
        with self.lock:
            self.abandoned_below = max(self.abandoned_below, cell + 1)
            for k in [k for k in self.completions if k <= cell]:
                self._drop(k)
            self._room.notify_all()  # its calls waiting for room give up

    def budget_spent(self) -> bool:
        """True when no LM call is left in the budget (calls or tokens)."""
        with self.lock:
            return self._tokens_spent() or (
                self.max_llm_calls is not None and self.calls >= self.max_llm_calls
            )

    def acquire_calls(self, n: int, cell: int) -> int:
        """Reserve up to ``n`` LM calls (prompts) before they are dispatched.

        Returns how many may go now (>= 1, counted against ``max_llm_calls`` and held
        in flight until :meth:`release_calls`), 0 when the budget is spent (answer
        :meth:`budget_message`), or -1 when ``cell`` was abandoned. Waits while there
        is no room: at most ``max_lm_inflight`` calls are in flight, and with
        ``max_llm_tokens`` the calls in flight are each reserved the most tokens one
        answered call has used (one call at a time until an answer shows the cost).
        A call is dispatched only while the tokens used plus those reserved are
        under the budget, so concurrent calls cannot all pass the check at once.
        """
        with self._room:
            while True:
                if cell < self.abandoned_below:
                    return -1
                if self._tokens_spent():
                    return 0
                k = min(n, max(0, self.max_lm_inflight - self.inflight))
                if self.max_llm_calls is not None:
                    left = self.max_llm_calls - self.calls
                    if left <= 0:
                        return 0
                    k = min(k, left)
                if self.max_llm_tokens is not None:
                    est = self._call_tokens_max
                    if est is None:  # no answer yet: nothing tells what a call costs
                        k = min(k, 1 if self.inflight == 0 else 0)
                    else:
                        room = self.max_llm_tokens - self.tokens - self.inflight * max(1, est)
                        k = min(k, max(0, -(-room // max(1, est))))
                if k > 0:
                    self.calls += k
                    self.inflight += k
                    return k
                # room comes back when a call settles (or the cell is abandoned); with
                # nothing in flight there is always room for one call until the budget
                # is spent, so this wait ends
                self._room.wait()

    def release_calls(self, n: int, call_tokens: list[int]) -> None:
        """Settle ``n`` calls from :meth:`acquire_calls`; ``call_tokens`` are the
        tokens of those answered (already counted by :meth:`record`)."""
        with self._room:
            self.inflight -= n
            if call_tokens:
                top = max(call_tokens)
                if self._call_tokens_max is None or top > self._call_tokens_max:
                    self._call_tokens_max = top
            self._room.notify_all()

    def _tokens_spent(self) -> bool:
        return self.max_llm_tokens is not None and self.tokens >= self.max_llm_tokens

    def budget_message(self) -> str:
        if self.max_llm_tokens is not None and self.tokens >= self.max_llm_tokens:
            return (
                f"budget exceeded: max_llm_tokens={self.max_llm_tokens} used ({self.tokens} tokens)"
            )
        return f"budget exceeded: max_llm_calls={self.max_llm_calls} used"


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


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(socketserver.StreamRequestHandler):
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
            except _BadRequest as exc:
                self._reply(exc.status, {"error": str(exc)}, close=True)
                return
            except (OSError, ValueError):
                return  # timeout, reset, or a closed file: drop the connection
            if not keep:
                return

    def _read_line(self) -> bytes:
        line = self.rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise _BadRequest(431, "request line or header too long")
        return line

    def _handle_one(self) -> bool:
        line = self._read_line()
        if not line:
            return False  # clean EOF between requests
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "malformed request line")
        method, self.path, version = parts
        headers: dict[str, str] = {}
        while True:
            h = self._read_line()
            if h in (b"\r\n", b"\n"):
                break
            if not h:
                return False
            if len(headers) >= _MAX_HEADERS:
                raise _BadRequest(431, "too many headers")
            name, sep, value = h.decode("latin-1").partition(":")
            if not sep or not name.strip():
                raise _BadRequest(400, "malformed header")
            headers[name.strip().lower()] = value.strip()
        self.headers = headers
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method != "POST":
            self._reply(405, {"error": "use POST"}, close=not keep)
            return keep
        if "transfer-encoding" in headers:
            raise _BadRequest(411, "chunked bodies are not accepted; send Content-Length")
        try:
            length = int(headers["content-length"])
        except (KeyError, ValueError):
            raise _BadRequest(411, "a valid Content-Length is required") from None
        if length < 0:
            raise _BadRequest(400, "negative Content-Length")
        state = self.server.state
        token = headers.get("authorization", "")
        if not hmac.compare_digest(
            token.encode("utf-8", "replace"), f"Bearer {state.token}".encode()
        ):
            self._reply(401, {"error": "missing or wrong token"}, close=True)
            return False
        if not self.server.claim(self.request):
            return False  # closed as idle while this request came: never served
        if not self._authed:
            self._authed = True
            self.connection.settimeout(IDLE_TIMEOUT)
        if length > self.server.max_body:
            raise _BadRequest(413, f"body over {self.server.max_body} bytes")
        if not self.server.reserve_body(length):
            raise _BadRequest(503, "too many request bodies in flight; try again")
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
            # bounded: too deep a nesting is a 400 like bad JSON, too many values a 413
            body = parse_json(raw.decode("utf-8"))
        except TooManyValues as exc:
            return 413, {
                "error": f"the request holds {exc}; a batched call takes at most "
                f"{MAX_BATCH_PROMPTS} prompts"
            }
        except (UnicodeDecodeError, ValueError) as exc:
            return 400, {"error": f"bad JSON: {exc}"}
        except MemoryError:
            return 400, {"error": f"bad JSON: out of memory decoding {len(raw)} bytes"}
        if not isinstance(body, dict):
            return 400, {"error": "body must be a JSON object"}
        try:
            claimed = int(self.headers.get("x-dockerrepl-cell", "0"))
        except ValueError:
            claimed = 0
        route = {
            "/llm_query": self._llm_single,
            "/llm_query_batched": self._llm_batched,
            "/rlm_query": self._rlm_single,
            "/rlm_query_batched": self._rlm_batched,
            "/host_tool": self._host_tool,
        }.get(self.path)
        if route is None:
            return 404, {"error": f"no such endpoint {self.path[:200]!r}"}
        # the header is the container's word: checked against the cell the host runs
        cell = self.server.state.attribute(claimed)
        if cell is None:
            return 403, {
                "error": f"X-DockerREPL-Cell names cell {claimed}, which the host has not "
                f"started (it is running cell {self.server.state.current_cell})"
            }
        try:
            return 200, route(body, cell)
        except _BadRequest as exc:
            return exc.status, {"error": str(exc)}
        except Exception as exc:  # never leave the container without an answer
            log.debug("proxy handler failed", exc_info=True)
            return 200, {"error": f"proxy error: {type(exc).__name__}: {exc}"}

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

    def _prompt_fields(self, body: dict[str, Any]) -> tuple[Any, Optional[str]]:
        model = body.get("model")
        return body.get("prompt"), (model if isinstance(model, str) else None)

    def _llm_single(self, body: dict[str, Any], cell: int) -> dict[str, Any]:
        state = self.server.state
        prompt, model = self._prompt_fields(body)
        got = state.acquire_calls(1, cell)  # reserved before dispatch: see acquire_calls
        if got < 0:
            return {"error": ABANDONED}
        if got == 0:
            return {"error": state.budget_message()}
        used: list[int] = []
        try:
            req: dict[str, Any] = {"prompt": prompt, "depth": state.depth}
            if model is not None:
                req["model"] = model
            resp = self.server.pooled_lm_request(req)
            comp = resp.get("chat_completion")
            if resp.get("error") or not isinstance(comp, dict):
                return {"error": str(resp.get("error") or "LM handler sent no completion")}
            state.record(cell, comp)
            used.append(_tokens(comp))
            return {"response": str(comp.get("response") or "")}
        finally:
            state.release_calls(1, used)

    @staticmethod
    def _batch_prompts(body: dict[str, Any]) -> Union[list[Any], dict[str, Any]]:
        """The body's prompt list, or the answer refusing it (413 past MAX_BATCH_PROMPTS)."""
        prompts = body.get("prompts")
        if not isinstance(prompts, list):
            return {"error": "'prompts' must be a list"}
        if len(prompts) > MAX_BATCH_PROMPTS:
            raise _BadRequest(
                413,
                f"{len(prompts)} prompts in one batched call; at most {MAX_BATCH_PROMPTS} "
                "are accepted (split the list)",
            )
        return prompts

    def _llm_batched(self, body: dict[str, Any], cell: int) -> dict[str, Any]:
        prompts = self._batch_prompts(body)
        if isinstance(prompts, dict):
            return prompts
        if not prompts:
            return {"responses": []}
        state = self.server.state
        # nothing to dispatch: one answer, no chunks or futures (each chunk would
        # find the same and answer the same)
        if state.is_abandoned(cell):
            return {"responses": [f"Error: {ABANDONED}"] * len(prompts)}
        if state.budget_spent():
            return {"responses": [f"Error: {state.budget_message()}"] * len(prompts)}
        _, model = self._prompt_fields(body)
        # Bounded chunks, each checked against abandonment (its cell timed out) and
        # the budget when it is dispatched: a batch whose cell is gone stops costing.
        # Each chunk is an ordinary batched request, so rlm's handler serves it too.
        chunks = [prompts[i : i + BATCH_CHUNK] for i in range(0, len(prompts), BATCH_CHUNK)]
        if len(chunks) == 1:
            return {"responses": self._batch_chunk(chunks[0], model, cell)}
        results = self.server.run_windowed(chunks, lambda ch: self._batch_chunk(ch, model, cell))
        return {"responses": [r for chunk in results for r in chunk]}

    def _batch_chunk(self, prompts: list[Any], model: Optional[str], cell: int) -> list[str]:
        """One chunk's answers. Its prompts go as the ledger lets them (all at once
        when there is room, else in smaller requests as room comes back); once the
        budget is spent, or the cell abandoned, the rest are answered at once."""
        state = self.server.state
        out: list[str] = []
        while len(out) < len(prompts):
            rest = len(prompts) - len(out)
            got = state.acquire_calls(rest, cell)
            if got < 0:
                out += [f"Error: {ABANDONED}"] * rest
                break
            if got == 0:
                out += [f"Error: {state.budget_message()}"] * rest
                break
            part = prompts[len(out) : len(out) + got]
            used: list[int] = []
            try:
                out += self._send_batch(part, model, cell, used)
            finally:
                state.release_calls(got, used)
        return out

    def _send_batch(
        self, prompts: list[Any], model: Optional[str], cell: int, used: list[int]
    ) -> list[str]:
        state = self.server.state
        req: dict[str, Any] = {"prompts": prompts, "depth": state.depth}
        if model is not None:
            req["model"] = model
        resp = self.server.pooled_lm_request(req)
        comps = resp.get("chat_completions")
        if resp.get("error") or not isinstance(comps, list):
            return [f"Error: {resp.get('error') or 'LM handler sent no completions'}"] * len(
                prompts
            )
        out: list[str] = []
        for c in comps[: len(prompts)]:
            if not isinstance(c, dict):
                out.append("Error: malformed completion")
            elif c.get("error"):
                out.append(f"Error: {c['error']}")
            else:
                state.record(cell, c)
                used.append(_tokens(c))
                out.append(str(c.get("response") or ""))
        out += ["Error: LM handler sent too few completions"] * (len(prompts) - len(out))
        return out

    def _subcall(self, prompt: Any, model: Optional[str], cell: int) -> tuple[str, Optional[str]]:
        """One rlm_query: (response, error). Bounded by max_concurrent_subcalls per REPL."""
        state = self.server.state
        fn = state.subcall_fn
        assert fn is not None
        with state.subcall_semaphore():
            try:
                comp = _completion_dict(fn(prompt, model))
            except Exception as exc:
                return "", f"RLM query failed - {exc}"
        state.record(cell, comp)
        return str(comp.get("response") or ""), None

    def _rlm_single(self, body: dict[str, Any], cell: int) -> dict[str, Any]:
        if self.server.state.subcall_fn is None:
            return self._llm_single(body, cell)
        prompt, model = self._prompt_fields(body)
        resp, err = self._subcall(prompt, model, cell)
        return {"error": err} if err else {"response": resp}

    def _rlm_batched(self, body: dict[str, Any], cell: int) -> dict[str, Any]:
        state = self.server.state
        if state.subcall_fn is None:
            return self._llm_batched(body, cell)
        prompts = self._batch_prompts(body)
        if isinstance(prompts, dict):
            return prompts
        _, model = self._prompt_fields(body)

        def one(p: Any) -> str:
            if state.is_abandoned(cell):
                return f"Error: {ABANDONED}"
            resp, err = self._subcall(p, model, cell)
            return f"Error: {err}" if err else resp

        return {"responses": list(self.server.executor().map(one, prompts))}

    def _host_tool(self, body: dict[str, Any], cell: int) -> dict[str, Any]:
        if self.server.state.is_abandoned(cell):
            return {"error": ABANDONED, "exception": "RuntimeError"}
        name = body.get("tool")
        fn = self.server.state.host_tools.get(name) if isinstance(name, str) else None
        if fn is None:
            return {"error": f"no host tool named {name!r}", "exception": "NameError"}
        args = body.get("args") or []
        kwargs = body.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return {"error": "args must be a list and kwargs an object", "exception": "TypeError"}
        try:
            result = fn(*args, **kwargs)
            json.dumps(result)
        except Exception as exc:
            out: dict[str, Any] = {"error": str(exc), "exception": type(exc).__name__}
            try:
                json.dumps(list(exc.args))
                out["args"] = list(exc.args)  # so the REPL raises e.g. KeyError('k'), not "'k'"
            except (TypeError, ValueError):
                pass
            return out
        return {"result": result}


@dataclass
class _Conn:
    """What the proxy knows of one open connection (its thread runs the handler)."""

    since: float  # accepted, or last answered: the oldest idle one is closed first
    authed: bool = False
    busy: bool = True  # between a request's token check and its answer (never closed)
    closed: bool = False  # shut by the proxy: a request read after it is not served


class _ServerMixin:
    state: ProxyState
    max_body: int
    _executor: Optional[ThreadPoolExecutor] = None
    _exec_lock = threading.Lock()

    def init_limits(self) -> None:
        self._conn_lock = threading.Lock()
        # notified when a connection closes or turns idle: an accept may be waiting
        self._conn_change = threading.Condition(self._conn_lock)
        self._conns: dict[socket.socket, _Conn] = {}  # every connection with a thread
        self._stopping = False
        self._inflight = 0
        self._idle_lm: list[tuple[LMConnection, float]] = []

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
            self._idle_lm.sort(key=lambda ct: ct[1], reverse=True)
            drop = [c for c, _ in self._idle_lm[keep:]]
            del self._idle_lm[keep:]
        for c in drop:
            c.close()

    def service_actions(self) -> None:
        """Called by serve_forever's loop (at least every poll interval)."""
        self.close_pooled(older_than=LM_IDLE_TIMEOUT)

    def reserve_body(self, n: int) -> bool:
        with self._conn_lock:
            if self._inflight + n > MAX_INFLIGHT_BODY:
                return False
            self._inflight += n
            return True

    def release_body(self, n: int) -> None:
        with self._conn_lock:
            self._inflight -= n

    # -- batched LM requests ---------------------------------------------------
    def run_windowed(self, items: list[Any], fn: Callable[[Any], Any]) -> list[Any]:
        """``[fn(x) for x in items]``, at most BATCH_WINDOW at once; each starts only
        when a slot frees, so ``fn`` sees the state (abandoned, budget) of that moment."""
        slots = threading.Semaphore(BATCH_WINDOW)
        futures = []
        pool = self.executor()
        for item in items:
            slots.acquire()
            fut = pool.submit(fn, item)
            fut.add_done_callback(lambda _f: slots.release())
            futures.append(fut)
        return [f.result() for f in futures]

    def pooled_lm_request(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request on a pooled connection to the LM Handler.

        Every caller holds LM slots (ProxyState.acquire_calls), so at most
        ``max_lm_inflight`` connections are in use, and as many kept idle.
        """
        addr = self.state.lm_handler_address
        if not addr:
            return {"error": "No LM handler configured"}
        addr = (str(addr[0]), int(addr[1]))
        conn: Optional[LMConnection] = None
        with self._conn_lock:
            for i, (c, _) in enumerate(self._idle_lm):
                if c.address == addr:
                    conn = c
                    del self._idle_lm[i]
                    break
        if conn is None:
            conn = LMConnection(addr, timeout=self.state.lm_timeout)
        try:
            resp = conn.request(req)
        except (DockerReplError, OSError, ValueError) as exc:
            conn.close()
            return {"error": f"LM handler at {addr[0]}:{addr[1]} failed: {exc}"}
        with self._conn_lock:
            if len(self._idle_lm) < max(1, self.state.max_lm_inflight) and not self._stopping:
                self._idle_lm.append((conn, time.monotonic()))
                conn = None
        if conn is not None:
            conn.close()
        return resp

    def close_pooled(self, older_than: Optional[float] = None) -> None:
        """Close the idle pooled LM connections (those idle for ``older_than`` s)."""
        now = time.monotonic()
        with self._conn_lock:
            idle = self._idle_lm
            if older_than is None:
                drop, self._idle_lm = [c for c, _ in idle], []
            else:
                drop = [c for c, t in idle if now - t >= older_than]
                self._idle_lm = [(c, t) for c, t in idle if now - t < older_than]
        for c in drop:
            c.close()

    def executor(self) -> ThreadPoolExecutor:
        with self._exec_lock:
            if self._executor is None:
                # batch chunks hold LM slots (MAX_LM_INFLIGHT); sub-calls are bounded by
                # the state's semaphore: the pool needs room for both, and no more
                subcalls = max(1, int(self.state.max_concurrent_subcalls))
                self._executor = ThreadPoolExecutor(
                    max_workers=min(64, MAX_LM_INFLIGHT + subcalls),
                    thread_name_prefix="dockerrepl-subcall",
                )
            return self._executor

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("proxy: error while serving %r", client_address, exc_info=True)

    @property
    def lm_handler_address(self) -> Optional[Address]:
        """rlm's attribute: where requests are forwarded (updated by update_handler_address)."""
        return self.state.lm_handler_address

    @lm_handler_address.setter
    def lm_handler_address(self, value: Optional[Address]) -> None:
        self.state.lm_handler_address = value


class _TCPServer(_ServerMixin, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class _UnixServer(_ServerMixin, socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 64

    def get_request(self) -> Any:
        sock, _ = super().get_request()
        return sock, ("unix", 0)  # BaseHTTPRequestHandler expects an (address, port) pair


class ProxyServer:
    """One REPL's proxy: TCP on ``(host, 0)`` or a unix socket path."""

    def __init__(
        self,
        state: ProxyState,
        *,
        host: Optional[str] = None,
        unix_path: Optional[str] = None,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        if (host is None) == (unix_path is None):
            raise ValueError("give exactly one of host= or unix_path=")
        self.state = state
        self.unix_path = unix_path
        self._dir_fd: Optional[int] = None
        self._server: Union[_TCPServer, _UnixServer]
        try:
            if unix_path is not None:
                if os.path.exists(unix_path):
                    os.unlink(unix_path)
                self._server = _UnixServer(self._bindable(unix_path), _Handler)
                # the container user may be anyone: the token is the access control
                os.chmod(unix_path, 0o666)
            else:
                assert host is not None
                self._server = _TCPServer((host, 0), _Handler)
        except OSError as exc:
            if self._dir_fd is not None:
                os.close(self._dir_fd)
            where = unix_path or f"{host}:0"
            raise ProxyError(
                f"cannot bind the LM proxy to {where}: {exc}"
                + ("" if unix_path else " (is this the docker bridge gateway of a local engine?)")
            ) from None
        self._server.state = state
        self._server.max_body = max_body
        self._server.init_limits()
        state.on_cell_end = self._server.reap_idle
        self._thread = start_serving(self._server, "dockerrepl-proxy")

    def _bindable(self, path: str) -> str:
        """A path ``bind()`` accepts for ``path``.

        sun_path holds ~107 bytes, and a deep ``workspace_dir`` passes that. Then bind
        through ``/proc/self/fd/<fd of the directory>/name``: short whatever the depth, and
        it names the same directory (the fd stays open while the server lives, because
        stopping the server connects to that address to wake its loop).
        """
        if len(os.fsencode(path)) < 100:
            return path
        self._dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._dir_fd}/{os.path.basename(path)}"

    @property
    def server(self) -> Union[_TCPServer, _UnixServer]:
        return self._server

    @property
    def port(self) -> int:
        if self.unix_path is not None:
            return 0
        addr: Any = self._server.server_address
        return int(addr[1])

    @property
    def host(self) -> str:
        addr: Any = self._server.server_address
        return "" if self.unix_path is not None else str(addr[0])

    def close(self) -> None:
        """Stop serving (idempotent)."""
        srv = self._server
        if getattr(srv, "_closed", False):
            return
        srv._closed = True  # type: ignore[union-attr]
        stop_serving(srv, self._thread)
        if srv._executor is not None:
            srv._executor.shutdown(wait=False)
        srv.reap_idle(keep=0)  # idle kept-alive connections and pooled LM connections
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def wait_port_closed(host: str, port: int, timeout: float = 2.0) -> bool:
    """Test helper: True once nothing accepts on host:port."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                pass
        except OSError:
            return True
        time.sleep(0.05)
    return False
