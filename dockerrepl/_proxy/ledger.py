"""The LM-call ledger of one REPL: budgets, reservations, attribution, abandonment.

Every LM call a cell makes (through any transport) is reserved here before it is
dispatched (:meth:`ProxyState.acquire_calls`), settled after
(:meth:`ProxyState.release_calls`), and its completion recorded for the cell
that made it (:meth:`ProxyState.record`), within bounds, until the host takes
the cell's result (:meth:`ProxyState.take`). A cell that timed out or crashed is
abandoned: its calls get no new LM work and nothing is kept for it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "ABANDONED",
    "MAX_LM_INFLIGHT",
    "MAX_RECORDED",
    "MAX_RECORDED_BYTES",
    "Address",
    "ProxyState",
    "call_tokens",
]

log = logging.getLogger(__name__)

#: LM calls (prompts) a proxy has at the LM Handler at once. It bounds the pooled
#: connections to the handler (and an in-process handler's threads), and how far a
#: token budget can be overshot: no call is dispatched once the budget is reached, so
#: at most MAX_LM_INFLIGHT - 1 calls beyond the one that reached it are made.
MAX_LM_INFLIGHT = 16
#: Completions held for the cell that has not been taken yet: past either bound they
#: are counted (ProxyState.unrecorded) and not kept. rlm_calls of an honest cell stay
#: far below them; a cell looping on a fast LM cannot grow the host without end.
MAX_RECORDED = 50_000
MAX_RECORDED_BYTES = 256 * 1024 * 1024
ABANDONED = "the cell that asked was abandoned (it timed out or crashed)"

Address = tuple[str, int]


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


def call_tokens(c: dict[str, Any]) -> int:
    """The tokens (input and output) one completion used, from its usage summary."""
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
    # the latest cell a request (an LM call, a host tool) was attributed to: a cell
    # that asked the host for anything ran, and is never sent again (Session.run_cell)
    asked: int = 0
    completions: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # each completion's place in its cell's rlm_calls: (batch, index) for a batch's,
    # (arrival, 0) otherwise, so a batch lists its prompts' answers in prompt order
    # whatever order they finished in (rlm's contract)
    _keys: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    _seq: int = 0
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
            self.asked = max(self.asked, current)
            return current

    def order(self) -> int:
        """A number that places one batch's completions among the cell's others."""
        with self.lock:
            self._seq += 1
            return self._seq

    def record(
        self, cell: int, completion: dict[str, Any], key: Optional[tuple[int, int]] = None
    ) -> None:
        """Count a completion's tokens and keep it for :meth:`take`, within bounds.

        ``key`` is its place in the cell's ``rlm_calls``: ``(order(), index)`` for the
        index-th prompt of a batch; by default, after everything recorded so far.
        """
        size = _approx_size(completion)  # outside the lock: it may walk a message list
        with self.lock:
            if key is None:
                self._seq += 1
                key = (self._seq, 0)
            self.tokens += call_tokens(completion)
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
            self._keys.setdefault(cell, []).append(key)
            self._sizes[cell] = self._sizes.get(cell, 0) + size
            self._kept += 1
            self._kept_bytes += size

    def _drop(self, cell: int) -> list[dict[str, Any]]:
        out = self.completions.pop(cell, [])
        keys = self._keys.pop(cell, [])
        self._kept -= len(out)
        self._kept_bytes -= self._sizes.pop(cell, 0)
        order = sorted(range(len(out)), key=keys.__getitem__)  # stable: ties keep arrival
        return [out[i] for i in order]

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
