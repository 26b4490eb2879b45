"""AsyncDockerREPL: DockerREPL for asyncio, for dozens of sessions on one event loop.

Each method awaits the same method of a wrapped :class:`~dockerrepl.DockerREPL`,
run in a thread of this module's own: one thread per operation in flight,
started for it and gone when it ends (not the loop's default executor, whose
few threads would serialise dozens of sessions). An idle session holds no
thread of this module, only what its DockerREPL holds (docs/async.md).

Calls on one AsyncDockerREPL are serialised by an :class:`asyncio.Lock` (in
the order they were made). When the task awaiting a call is cancelled, the
call is stopped where that is safe: a running cell is interrupted (its
namespace kept), a start removes its half-started container, and what a
``fork`` or ``resume`` makes after its caller left is removed; then the
``CancelledError`` goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, TypeVar, Union

from . import _options
from ._aiothreads import (
    CANCEL_MARGIN,
    CLOSE_WAIT,
    Tracked,
    on_loop,
    outcome,
    result,
    retrieve,
    spawn,
    stop_building,
    wait,
)
from ._files import DEFAULT_MAX_FILE
from ._options import DEFAULT_CELL_TIMEOUT, Address, ReplOptions, unknown_arguments
from ._session import INTERRUPT_WAIT
from ._sessions import MAX_SESSION_BYTES
from ._snapshots import Snapshot
from .errors import ReplClosed
from .repl import DockerREPL
from .types import REPLResult

__all__ = ["CANCEL_MARGIN", "AsyncDockerREPL"]

log = logging.getLogger(__name__.rpartition(".")[0] + ".repl")

T = TypeVar("T")
Payload = Union[str, dict[str, Any], list[Any]]


class AsyncDockerREPL:
    """A :class:`~dockerrepl.DockerREPL` for asyncio: ``await`` every call.

    The arguments are DockerREPL's (docs/usage.md), checked here: a wrong one raises
    the same ``TypeError`` / ``ValueError``, and nothing starts in the constructor
    (a ``context_payload`` dict or list is JSON-encoded here, on the loop: give a
    large one to :meth:`load_context` after start, which runs in a thread)::

        async with AsyncDockerREPL(image=..., lm_handler_address=addr) as repl:
            r = await repl.execute_code("x = 6 * 7")

        repl = await AsyncDockerREPL.open(image=...)   # or: start() / aclose()
        ...
        await repl.aclose()

    Calls on one object are serialised (an ``asyncio.Lock``), in the order made.
    Cancelling the task that awaits :meth:`execute_code` interrupts the cell
    (state kept; bounded by ``grace`` + :data:`CANCEL_MARGIN`) and re-raises;
    cancelling :meth:`start` removes the half-started container. Blocking work
    runs in threads of this module's own, one per call in flight; an idle
    session holds only its DockerREPL's. Unclosed sessions are closed at exit.
    """

    def __init__(
        self,
        image: Optional[str] = None,
        lm_handler_address: Optional[Address] = None,
        context_payload: Optional[Payload] = None,
        setup_code: Optional[str] = None,
        persistent: bool = False,
        depth: int = 1,
        subcall_fn: Optional[Callable[[Any, Optional[str]], Any]] = None,
        custom_tools: Optional[Mapping[str, Any]] = None,
        custom_sub_tools: Optional[Mapping[str, Any]] = None,
        compaction: bool = False,
        max_concurrent_subcalls: int = 4,
        *,
        timeout: Optional[float] = DEFAULT_CELL_TIMEOUT,
        memory: Optional[str] = _options.DEFAULT_MEMORY,
        cpus: Optional[float] = _options.DEFAULT_CPUS,
        pids_limit: Optional[int] = _options.DEFAULT_PIDS_LIMIT,
        network: str = "bridge",
        user: Optional[str] = None,
        read_only: bool = False,
        workspace_dir: Optional[str] = None,
        docker: str = "docker",
        docker_host: Optional[str] = None,
        context: Optional[str] = None,
        transport: str = "auto",
        runtime: Optional[str] = None,
        max_output_bytes: int = _options.DEFAULT_MAX_OUTPUT,
        repr_cap: int = _options.DEFAULT_REPR_CAP,
        max_llm_calls: Optional[int] = None,
        max_llm_tokens: Optional[int] = None,
        auto_checkpoint: Union[bool, str] = True,
        grace: float = _options.DEFAULT_GRACE,
        start_timeout: float = _options.DEFAULT_START_TIMEOUT,
        verify_security: bool = True,
        extra_args: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        # locals() here is exactly the named arguments (and self, and kwargs)
        named = {k: v for k, v in locals().items() if k not in ("self", "kwargs")}
        if kwargs:
            # DockerREPL's rule (rlm's contract): accepted, ignored, said aloud
            log.warning("AsyncDockerREPL ignores unknown arguments: %s", unknown_arguments(kwargs))
        # DockerREPL's checks, all of them (a dict or list context_payload is JSON-encoded
        # for it, here on the loop: load a large one with `await load_context()` instead)
        options = ReplOptions.build(**named)
        self._args = named
        self._setup(None, options.grace)

    def _setup(self, repl: Optional[DockerREPL], grace: float) -> None:
        self._repl = repl
        self._grace = grace
        self._closed = False
        self._lock: Optional[asyncio.Lock] = None  # made on the loop, at first use
        self._closing: Optional[asyncio.Future[None]] = None
        # calls that outlived their cancellation: the next call waits for them first
        self._pending: list[concurrent.futures.Future[Any]] = []
        self._threads: set[threading.Thread] = set()
        self._born: list[DockerREPL] = []  # the REPL a start() is building

    @classmethod
    def _wrap(cls, repl: DockerREPL) -> AsyncDockerREPL:
        """An open AsyncDockerREPL around a started DockerREPL (fork, resume)."""
        obj = cls.__new__(cls)
        obj._args = {}
        obj._setup(repl, repl._options.grace)
        return obj

    # ------------------------------------------------------------ lifecycle
    @classmethod
    async def open(cls, *args: Any, **kwargs: Any) -> AsyncDockerREPL:
        """``AsyncDockerREPL(*args, **kwargs)``, started: ``await repl.aclose()`` when done."""
        repl = cls(*args, **kwargs)
        await repl.start()
        return repl

    async def start(self) -> AsyncDockerREPL:
        """Start the container (and run ``setup_code``); returns ``self``. Idempotent.

        Cancelled, it removes the half-started container before ``CancelledError``
        goes on (bounded by :data:`CLOSE_WAIT`). Raises what DockerREPL's
        constructor raises.
        """
        async with self._guard():
            if self._closed:
                raise ReplClosed("this AsyncDockerREPL was closed")
            if self._repl is not None:
                return self
            args = dict(self._args)

            def build() -> DockerREPL:
                repl = Tracked(**args)
                _ = repl.container_id  # cached now, so the property never runs docker on the loop
                return repl

            born: list[DockerREPL] = []
            self._born = born
            cf = spawn(build, "start", self._threads, born)
            try:
                await result(cf)
            except asyncio.CancelledError:
                await stop_building(cf, born, self._threads)
                raise
            finally:
                self._born = []
            repl = cf.result()
            if self._closed:  # aclose() came while it started
                await self._offload(repl.cleanup, "cleanup")
                raise ReplClosed("this AsyncDockerREPL was closed while it started")
            self._repl = repl
            return self

    async def aclose(self) -> None:
        """Remove the container, the proxy and the workspace. Idempotent.

        Does not wait for a running call: its cell is stopped with the container
        and it raises :class:`~dockerrepl.errors.ReplClosed` (as later calls do).
        Returns once no thread of this session is left. Cancelled, the close
        still completes in its thread.
        """
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        # a start in flight is stopped too (its constructor then raises ReplClosed)
        targets = [r for r in (self._repl, *self._born) if getattr(r, "_session", None)]
        for r in targets:
            assert r is not None
            cf = spawn(r.cleanup, "cleanup", self._threads)
            await wait(cf, CLOSE_WAIT)
            error = outcome(cf)
            if error is not None:
                raise error
        # the calls it ended leave their threads now, and the channel's idle reader
        # its loop: wait (bounded, without blocking the loop) until they have
        threads = list(self._threads)
        for r in targets:
            reader = getattr(getattr(r, "_session", None), "idle_reader", None)
            if reader is not None:
                threads.append(reader)
        end = time.monotonic() + CLOSE_WAIT
        while any(t.is_alive() for t in threads) and time.monotonic() < end:
            await asyncio.sleep(0.005)
            threads += list(self._threads)

    async def __aenter__(self) -> AsyncDockerREPL:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ machinery
    def _guard(self) -> _Held:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return _Held(self, self._lock)

    def _live(self) -> DockerREPL:
        if self._closed:
            raise ReplClosed("this AsyncDockerREPL was closed")
        if self._repl is None:
            raise ReplClosed(
                "this AsyncDockerREPL is not started: use `async with`, `await repl.start()`"
                " or `await AsyncDockerREPL.open(...)`"
            )
        return self._repl

    async def _settle(self) -> None:
        """Wait for calls that outlived their cancellation (holding the lock)."""
        while self._pending:
            cf = self._pending[0]
            every = max(self._grace, 0.2) + 0.3
            while not cf.done():
                if self._repl is not None:
                    await self._interrupt_now(self._repl)
                fut = asyncio.wrap_future(cf)
                fut.add_done_callback(retrieve)
                await asyncio.wait({fut}, timeout=every)  # cancellable: nothing to stop
            self._pending.pop(0)
            outcome(cf)

    async def _offload(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` in a thread of ours, without the lock; cancelled, the caller leaves
        at once (``fn`` is one short, bounded host-side step)."""
        cf = spawn(fn, what, self._threads)
        return await asyncio.wrap_future(cf)

    async def _call(self, what: str, fn: Callable[[DockerREPL], T]) -> T:
        """``fn(repl)`` under the lock, in a thread of ours. Cancelled, the call is
        interrupted like a cell (the container's request stops, state kept)."""
        async with self._guard():
            repl = self._live()
            cf = spawn(functools.partial(fn, repl), what, self._threads)
            try:
                return await result(cf)
            except asyncio.CancelledError:
                await self._stop_call(repl, cf)
                raise

    async def _stop_call(self, repl: DockerREPL, cf: concurrent.futures.Future[Any]) -> None:
        """The caller of a call in flight was cancelled: interrupt it and wait for it
        to end (bounded: ``grace`` + CANCEL_MARGIN). The interrupt is sent again
        every ``grace`` + 0.3 s: one sent before the cell ran is dropped by the
        container, and one sent later than ``grace`` after the first cannot put off
        the kill of a cell that ignores it (that comes ``grace`` after the first)."""
        end = time.monotonic() + self._grace + CANCEL_MARGIN
        every = max(self._grace, 0.2) + 0.3
        while not cf.done():
            await self._interrupt_now(repl)
            left = end - time.monotonic()
            if left <= 0 or await wait(cf, min(every, left)):
                break
        if cf.done():
            error = outcome(cf)
            if error is not None:
                log.debug("dockerrepl: a cancelled call ended with %r", error)
        else:
            log.warning(
                "dockerrepl: a cancelled call did not end within %.1fs; the next call waits for it",
                self._grace + CANCEL_MARGIN,
            )
            self._pending.append(cf)

    async def _interrupt_now(self, repl: DockerREPL) -> None:
        # waited for: an interrupt still on its way must not reach the next cell
        await wait(spawn(repl.interrupt, "interrupt", self._threads), 2 * INTERRUPT_WAIT + 1)

    async def _spawned(self, what: str, fn: Callable[[], T], dispose: Callable[[T], None]) -> T:
        """``fn()`` that makes new REPLs (fork, resume), in a thread of ours.
        Cancelled, the caller leaves at once; what ``fn`` makes after that is disposed of."""
        lock = threading.Lock()
        left = [False]

        def run() -> T:
            made = fn()
            with lock:
                if left[0]:
                    dispose(made)
            return made

        cf = spawn(run, what, self._threads)
        try:
            return await result(cf)
        except asyncio.CancelledError:
            with lock:
                left[0] = True
                done = cf.done() and outcome(cf) is None
            if done:
                await wait(spawn(lambda: dispose(cf.result()), what, self._threads), CLOSE_WAIT)
            raise

    # ----------------------------------------------------------------- cells
    async def execute_code(
        self,
        code: str,
        *,
        timeout: Union[float, str, None] = "default",
        on_output: Optional[Callable[[str, str], None]] = None,
        filename: Optional[str] = None,
        display: bool = False,
        value: bool = False,
    ) -> REPLResult:
        """Run one cell; see :meth:`DockerREPL.execute_code` (same arguments, same result).

        ``on_output(stream, text)`` is called on the event loop's thread (so it may
        use asyncio objects, e.g. ``queue.put_nowait``), in order, before this
        returns; it must be a plain function. Cancelling the awaiting task
        interrupts the cell (KeyboardInterrupt in it; a cell that ignores that is
        killed after ``grace`` and the last checkpoint restored), waits for it to end
        (at most ``grace`` + :data:`CANCEL_MARGIN`), then ``CancelledError`` goes on;
        the next call sees the namespace as the interrupted cell left it.
        """
        if on_output is not None and (
            asyncio.iscoroutinefunction(on_output) or not callable(on_output)
        ):
            raise TypeError("on_output must be a plain function (it runs on the loop)")
        out = on_output if on_output is None else on_loop(on_output)
        return await self._call(
            "cell",
            lambda r: r.execute_code(
                code,
                timeout=timeout,
                on_output=out,
                filename=filename,
                display=display,
                value=value,
            ),
        )

    async def interrupt(self) -> None:
        """Interrupt the running cell (state kept); see :meth:`DockerREPL.interrupt`.

        Takes no lock: it is meant for a cell another task awaits. A no-op
        before :meth:`start` and after :meth:`aclose`."""
        repl = self._repl
        if repl is not None and not self._closed:
            await self._offload(repl.interrupt, "interrupt")

    # ------------------------------------------------- tools, variables, context
    async def define_tools(self, tools: Mapping[str, Any]) -> None:
        """Add or replace custom tools; see :meth:`DockerREPL.define_tools`."""
        await self._call("define_tools", lambda r: r.define_tools(tools))

    async def set_variables(
        self, values: Mapping[str, Any], *, file_threshold: int = 1 << 16
    ) -> None:
        """Bind JSON values as variables; see :meth:`DockerREPL.set_variables`."""
        await self._call(
            "set_variables", lambda r: r.set_variables(values, file_threshold=file_threshold)
        )

    async def load_context(self, context_payload: Payload) -> None:
        """Load ``context_payload`` as ``context_0`` (aliased as ``context``)."""
        await self._call("load_context", lambda r: r.load_context(context_payload))

    async def add_context(
        self, context_payload: Payload, context_index: Optional[int] = None
    ) -> int:
        """Add a context as ``context_N``; returns N. See :meth:`DockerREPL.add_context`."""
        return await self._call(
            "add_context", lambda r: r.add_context(context_payload, context_index)
        )

    async def get_context_count(self) -> int:
        """How many contexts have been loaded (after the calls made before this one)."""
        async with self._guard():
            return self._live().get_context_count()

    async def add_history(
        self, message_history: list[Any], history_index: Optional[int] = None
    ) -> int:
        """Store a message history as ``history_N``;
        returns N (see :meth:`DockerREPL.add_history`)."""
        return await self._call(
            "add_history", lambda r: r.add_history(message_history, history_index)
        )

    async def get_history_count(self) -> int:
        """How many histories have been stored (after the calls made before this one)."""
        async with self._guard():
            return self._live().get_history_count()

    async def append_compaction_entry(self, entry: Union[list[Any], dict[str, Any]]) -> None:
        """Append to the compaction ``history``; see :meth:`DockerREPL.append_compaction_entry`."""
        await self._call("compaction", lambda r: r.append_compaction_entry(entry))

    async def update_handler_address(self, address: Address) -> None:
        """Point ``llm_query`` at another LM Handler; also resets ``answer``."""
        await self._call("update_handler_address", lambda r: r.update_handler_address(address))

    # ------------------------------------------------------- files, checkpoints
    async def upload(
        self, local_path: str, remote_path: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> int:
        """Copy a host file into ``/workspace``; returns bytes. See :meth:`DockerREPL.upload`."""
        return await self._call(
            "upload", lambda r: r.upload(local_path, remote_path, max_bytes=max_bytes)
        )

    async def download(
        self, remote_path: str, local_path: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> int:
        """Copy a file from ``/workspace`` to the host; returns bytes.
        See :meth:`DockerREPL.download`."""
        return await self._call(
            "download", lambda r: r.download(remote_path, local_path, max_bytes=max_bytes)
        )

    async def checkpoint(self) -> list[str]:
        """Write ``/workspace/state.dill`` now; returns the names dill could not pickle."""
        return await self._call("checkpoint", lambda r: r.checkpoint())

    async def snapshot(self, *, keep: int = 8) -> Snapshot:
        """Remember the namespace in memory for :meth:`rollback`.
        See :meth:`DockerREPL.snapshot` (cost, ``keep``)."""
        return await self._call("snapshot", lambda r: r.snapshot(keep=keep))

    async def rollback(self, snapshot: Snapshot) -> None:
        """Return the namespace to ``snapshot``; see :meth:`DockerREPL.rollback`."""
        await self._call("rollback", lambda r: r.rollback(snapshot))

    async def discard_snapshot(self, snapshot: Snapshot) -> None:
        """Free a snapshot's memory now; see :meth:`DockerREPL.discard_snapshot`."""
        await self._call("discard_snapshot", lambda r: r.discard_snapshot(snapshot))

    # ------------------------------------------------------- sessions as values
    async def save(
        self, path: Union[str, os.PathLike[str]], *, max_bytes: int = MAX_SESSION_BYTES
    ) -> list[str]:
        """Write this session to one portable file; returns the names not saved.
        See :meth:`DockerREPL.save`."""
        return await self._call("save", lambda r: r.save(path, max_bytes=max_bytes))

    @classmethod
    async def resume(
        cls,
        path: Union[str, os.PathLike[str]],
        *,
        max_bytes: int = MAX_SESSION_BYTES,
        **options: Any,
    ) -> AsyncDockerREPL:
        """A new, started AsyncDockerREPL from a file :meth:`save` wrote; see
        :meth:`DockerREPL.resume` (same options, same errors). Cancelled, the REPL
        it was making is removed."""
        threads: set[threading.Thread] = set()
        born: list[DockerREPL] = []
        cf = spawn(
            lambda: Tracked.resume(path, max_bytes=max_bytes, **options), "resume", threads, born
        )
        try:
            repl = await result(cf)
        except asyncio.CancelledError:
            await stop_building(cf, born, threads)
            raise
        return cls._wrap(repl)

    async def fork(
        self, n: int = 1, *, pool: Optional[Any] = None, **overrides: Any
    ) -> list[AsyncDockerREPL]:
        """``n`` new, started AsyncDockerREPLs from this one's namespace and workspace;
        see :meth:`DockerREPL.fork` (same arguments; ``pool`` is a
        :class:`~dockerrepl.DockerREPLPool`). The caller owns them (``aclose()``).
        Cancelled, the children made are removed."""

        def dispose(children: list[DockerREPL]) -> None:
            for c in children:
                c.cleanup()

        async with self._guard():
            repl = self._live()
            children = await self._spawned(
                "fork", lambda: repl.fork(n, pool=pool, **overrides), dispose
            )
        return [type(self)._wrap(c) for c in children]

    # ------------------------------------------------------------ attributes
    @property
    def sync_repl(self) -> Optional[DockerREPL]:
        """The wrapped DockerREPL (None before :meth:`start`). Its methods block:
        call them from a thread, never on the event loop."""
        return self._repl

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed

    @property
    def transport(self) -> str:
        """``"proxy"`` or ``"channel"`` (``""`` before start); see :attr:`DockerREPL.transport`."""
        return "" if self._repl is None else self._repl.transport

    @property
    def container_id(self) -> Optional[str]:
        """The engine's id of the current container (None before start and once closed)."""
        return None if self._repl is None else self._repl.container_id

    @property
    def container_name(self) -> Optional[str]:
        """The container's name (``dockerrepl-<hex>``; None before start)."""
        return None if self._repl is None else self._repl.container_name

    @property
    def temp_dir(self) -> str:
        """The host directory mounted at ``/workspace`` (``""`` with the channel transport)."""
        return "" if self._repl is None else self._repl.temp_dir

    @property
    def restarts(self) -> int:
        """How many times the container was replaced."""
        return 0 if self._repl is None else self._repl.restarts

    @property
    def proxy_port(self) -> int:
        """TCP port of the proxy (0 with ``network="none"``, the channel, or before start)."""
        return 0 if self._repl is None else self._repl.proxy_port

    @property
    def restore_note(self) -> str:
        """What this REPL lacks of the session it was forked or resumed from ("" if nothing)."""
        return "" if self._repl is None else self._repl.restore_note

    @property
    def lacking(self) -> list[str]:
        """The names it lacks (values dill could not pickle, host tools not given again)."""
        return [] if self._repl is None else list(self._repl.lacking)

    @property
    def lm_handler_address(self) -> Optional[Address]:
        """``(host, port)`` of the LM Handler ``llm_query`` goes to."""
        if self._repl is None:
            address: Optional[Address] = self._args.get("lm_handler_address")
            return address
        return self._repl.lm_handler_address

    @lm_handler_address.setter
    def lm_handler_address(self, value: Optional[Address]) -> None:
        if self._repl is None:
            raise ReplClosed("start the AsyncDockerREPL first (or pass lm_handler_address=)")
        self._repl.lm_handler_address = value  # host-side only: checked, nothing sent


class _Held:
    """``async with``: the session's lock held, calls that outlived their
    cancellation waited for."""

    def __init__(self, owner: AsyncDockerREPL, lock: asyncio.Lock) -> None:
        self._owner = owner
        self._lock = lock

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        try:
            await self._owner._settle()
        except BaseException:
            self._lock.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()
