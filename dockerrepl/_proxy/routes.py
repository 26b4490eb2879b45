"""What the container may ask the host for: the routes, whatever the transport.

A route takes a parsed request (the path, the body as a dict, the cell the
request is attributed to) and returns a reply dict; :meth:`Routes.serve` adds
the path lookup and the cell's attribution and returns ``(status, reply)``. No
route sees an HTTP object: the proxy's HTTP server is one way in, and frames
over the container's stdio can be another.

Routes (POST, JSON): ``/llm_query``, ``/llm_query_batched``, ``/rlm_query``,
``/rlm_query_batched`` as in rlm, and ``/host_tool`` for
:func:`dockerrepl.host_tool` functions. LM calls are forwarded to the LM Handler
over a small pool of raw sockets (rlm's framing) with the environment's depth,
never the body's; each is reserved in the ledger before it is dispatched.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

from .._wire import TooManyValues, parse_json
from ..errors import DockerReplError
from ..lm_handler import LMConnection
from .ledger import ABANDONED, MAX_LM_INFLIGHT, ProxyState, call_tokens

__all__ = [
    "BATCH_CHUNK",
    "BATCH_WINDOW",
    "LM_IDLE_TIMEOUT",
    "MAX_BATCH_PROMPTS",
    "Refused",
    "Routes",
]

log = logging.getLogger(__name__)

#: Idle pooled connections to the LM Handler are closed after this long.
LM_IDLE_TIMEOUT = 30.0
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


class Refused(Exception):
    """A request refused with an HTTP status (e.g. 413: too many prompts), by a route
    or by the server side before it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


class Routes:
    """The routes of one REPL's proxy, with the LM Handler connection pool and the
    executor that batched and sub-calls run on."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._idle_lm: list[tuple[LMConnection, float]] = []
        self._stopping = False
        self._executor: Optional[ThreadPoolExecutor] = None
        self._table: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
            "/llm_query": self._llm_single,
            "/llm_query_batched": self._llm_batched,
            "/rlm_query": self._rlm_single,
            "/rlm_query_batched": self._rlm_batched,
            "/host_tool": self._host_tool,
        }

    def serve_json(self, path: str, text: str, claimed: int) -> tuple[int, dict[str, Any]]:
        """Answer one request whose body is JSON text (both transports' way in)."""
        try:
            # bounded: too deep a nesting is a 400 like bad JSON, too many values a 413
            body = parse_json(text)
        except TooManyValues as exc:
            return 413, {
                "error": f"the request holds {exc}; a batched call takes at most "
                f"{MAX_BATCH_PROMPTS} prompts"
            }
        except ValueError as exc:
            return 400, {"error": f"bad JSON: {exc}"}
        except MemoryError:
            return 400, {"error": f"bad JSON: out of memory decoding {len(text)} characters"}
        if not isinstance(body, dict):
            return 400, {"error": "body must be a JSON object"}
        return self.serve(path, body, claimed)

    def serve(self, path: str, body: dict[str, Any], claimed: int) -> tuple[int, dict[str, Any]]:
        """Answer one request: ``(status, reply)``. ``claimed`` is the cell the
        container says made it; the ledger decides which cell it counts for."""
        if path == "/ping":
            # transport="auto" asks whether the container reaches this proxy at all
            return 200, {"pong": True}
        route = self._table.get(path)
        if route is None:
            return 404, {"error": f"no such endpoint {path[:200]!r}"}
        # the claim is the container's word: checked against the cell the host runs
        cell = self.state.attribute(claimed)
        if cell is None:
            return 403, {
                "error": f"X-DockerREPL-Cell names cell {claimed}, which the host has not "
                f"started (it is running cell {self.state.current_cell})"
            }
        try:
            return 200, route(body, cell)
        except Refused as exc:
            return exc.status, {"error": str(exc)}
        except Exception as exc:  # never leave the container without an answer
            log.debug("proxy handler failed", exc_info=True)
            return 200, {"error": f"proxy error: {type(exc).__name__}: {exc}"}

    def _prompt_fields(self, body: dict[str, Any]) -> tuple[Any, Optional[str]]:
        model = body.get("model")
        return body.get("prompt"), (model if isinstance(model, str) else None)

    def _llm_single(self, body: dict[str, Any], cell: int) -> dict[str, Any]:
        state = self.state
        prompt, model = self._prompt_fields(body)
        got = state.acquire_calls(1, cell)  # reserved before dispatch: see acquire_calls
        if got < 0:
            return {"error": ABANDONED}
        if got == 0:
            return {"error": state.budget_message()}
        used: list[int] = []
        try:
            resp = self._ask_lm({"prompt": prompt}, model)
            comp = resp.get("chat_completion")
            if resp.get("error") or not isinstance(comp, dict):
                return {"error": str(resp.get("error") or "LM handler sent no completion")}
            state.record(cell, comp)
            used.append(call_tokens(comp))
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
            raise Refused(
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
        state = self.state
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
        batch = state.order()  # rlm_calls lists the answers in prompt order
        starts = range(0, len(prompts), BATCH_CHUNK)
        chunks = [(prompts[i : i + BATCH_CHUNK], (batch, i)) for i in starts]
        if len(chunks) == 1:
            return {"responses": self._batch_chunk(chunks[0][0], model, cell, chunks[0][1])}
        results = self.run_windowed(chunks, lambda ch: self._batch_chunk(ch[0], model, cell, ch[1]))
        return {"responses": [r for chunk in results for r in chunk]}

    def _batch_chunk(
        self, prompts: list[Any], model: Optional[str], cell: int, key: tuple[int, int]
    ) -> list[str]:
        """One chunk's answers. Its prompts go as the ledger lets them (all at once
        when there is room, else in smaller requests as room comes back); once the
        budget is spent, or the cell abandoned, the rest are answered at once."""
        state = self.state
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
                out += self._send_batch(part, model, cell, used, (key[0], key[1] + len(out)))
            finally:
                state.release_calls(got, used)
        return out

    def _send_batch(
        self,
        prompts: list[Any],
        model: Optional[str],
        cell: int,
        used: list[int],
        key: tuple[int, int],
    ) -> list[str]:
        state = self.state
        resp = self._ask_lm({"prompts": prompts}, model)
        comps = resp.get("chat_completions")
        if resp.get("error") or not isinstance(comps, list):
            return [f"Error: {resp.get('error') or 'LM handler sent no completions'}"] * len(
                prompts
            )
        out: list[str] = []
        for i, c in enumerate(comps[: len(prompts)]):
            if not isinstance(c, dict):
                out.append("Error: malformed completion")
            elif c.get("error"):
                out.append(f"Error: {c['error']}")
            else:
                state.record(cell, c, (key[0], key[1] + i))
                used.append(call_tokens(c))
                out.append(str(c.get("response") or ""))
        out += ["Error: LM handler sent too few completions"] * (len(prompts) - len(out))
        return out

    def _ask_lm(self, what: dict[str, Any], model: Optional[str]) -> dict[str, Any]:
        """One request to the LM Handler, at the environment's depth (never the body's)."""
        req = {**what, "depth": self.state.depth}
        if model is not None:
            req["model"] = model
        return self.pooled_lm_request(req)

    def _subcall(
        self,
        prompt: Any,
        model: Optional[str],
        cell: int,
        key: Optional[tuple[int, int]] = None,
    ) -> tuple[str, Optional[str]]:
        """One rlm_query: (response, error). Bounded by max_concurrent_subcalls per REPL."""
        state = self.state
        fn = state.subcall_fn
        assert fn is not None
        with state.subcall_semaphore():
            try:
                comp = _completion_dict(fn(prompt, model))
            except Exception as exc:
                return "", f"RLM query failed - {exc}"
        state.record(cell, comp, key)
        return str(comp.get("response") or ""), None

    def _rlm_single(self, body: dict[str, Any], cell: int) -> dict[str, Any]:
        if self.state.subcall_fn is None:
            return self._llm_single(body, cell)
        prompt, model = self._prompt_fields(body)
        resp, err = self._subcall(prompt, model, cell)
        return {"error": err} if err else {"response": resp}

    def _rlm_batched(self, body: dict[str, Any], cell: int) -> dict[str, Any]:
        state = self.state
        if state.subcall_fn is None:
            return self._llm_batched(body, cell)
        prompts = self._batch_prompts(body)
        if isinstance(prompts, dict):
            return prompts
        _, model = self._prompt_fields(body)
        batch = state.order()  # rlm_calls lists the answers in prompt order

        def one(item: tuple[int, Any]) -> str:
            if state.is_abandoned(cell):
                return f"Error: {ABANDONED}"
            resp, err = self._subcall(item[1], model, cell, (batch, item[0]))
            return f"Error: {err}" if err else resp

        return {"responses": list(self.executor().map(one, enumerate(prompts)))}

    def _host_tool(self, body: dict[str, Any], cell: int) -> dict[str, Any]:
        if self.state.is_abandoned(cell):
            return {"error": ABANDONED, "exception": "RuntimeError"}
        name = body.get("tool")
        fn = self.state.host_tools.get(name) if isinstance(name, str) else None
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

    # -- the LM Handler pool, the executor --------------------------------------
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
        with self._lock:
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
        with self._lock:
            if len(self._idle_lm) < max(1, self.state.max_lm_inflight) and not self._stopping:
                self._idle_lm.append((conn, time.monotonic()))
                conn = None
        if conn is not None:
            conn.close()
        return resp

    def close_pooled(self, older_than: Optional[float] = None) -> None:
        """Close the idle pooled LM connections (those idle for ``older_than`` s)."""
        now = time.monotonic()
        with self._lock:
            idle = self._idle_lm
            if older_than is None:
                drop, self._idle_lm = [c for c, _ in idle], []
            else:
                drop = [c for c, t in idle if now - t >= older_than]
                self._idle_lm = [(c, t) for c, t in idle if now - t < older_than]
        for c in drop:
            c.close()

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                # batch chunks hold LM slots (MAX_LM_INFLIGHT); sub-calls are bounded by
                # the state's semaphore: the pool needs room for both, and no more
                subcalls = max(1, int(self.state.max_concurrent_subcalls))
                self._executor = ThreadPoolExecutor(
                    max_workers=min(64, MAX_LM_INFLIGHT + subcalls),
                    thread_name_prefix="dockerrepl-subcall",
                )
            return self._executor

    def reap_idle(self, keep: int) -> None:
        """Close the idle pooled LM connections but the ``keep`` most recently used."""
        with self._lock:
            self._idle_lm.sort(key=lambda ct: ct[1], reverse=True)
            drop = [c for c, _ in self._idle_lm[keep:]]
            del self._idle_lm[keep:]
        for c in drop:
            c.close()

    def stop(self) -> None:
        """The proxy is stopping: connections in use are closed, not pooled, when done."""
        with self._lock:
            self._stopping = True

    def close(self) -> None:
        """Stop the executor (without waiting for its calls) and close the idle pool."""
        self.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self.close_pooled()
