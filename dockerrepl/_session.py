"""One REPL's conversation with its container: the protocol, over the ``docker run -i`` pipes.

A :class:`Session` owns the container (and its replacements), the proxy the
container calls ``llm_query`` through, the request ids and what is in flight:
hello, internal calls, cells, interrupts, the re-sync after a request the host
stopped waiting for, and the restart that replaces a dead or misbehaving
container and restores the last checkpoint. :class:`~dockerrepl.DockerREPL` is
the facade in front of it.

Threads: one call at a time holds ``lock`` (an RLock: a restart re-primes the
new worker from inside the call that restarts it); ``send_lock`` serialises
frames, so :meth:`Session.interrupt` can be sent from any thread; ``close``
may come from another thread while a cell runs and ends it at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union

from . import _exit
from ._container import Container
from ._docker import Engine
from ._labels import repl_labels
from ._options import ReplOptions
from ._proxy import ChannelEndpoint, ProxyServer, ProxyState
from ._results import _TEXT_SLACK, bound_result
from ._runspec import ContainerConfig
from ._staging import PROTOCOL_VERSION
from ._starts import start_container
from ._transfer import SessionFiles
from ._transports import PROBE_TIMEOUT, TransportStart
from ._workspace import MountedWorkspace, Workspace
from .errors import (
    ContainerDied,
    DockerReplError,
    ProtocolError,
    ReplClosed,
    SnapshotLost,
)
from .types import REPLResult, RLMChatCompletion

__all__ = ["EXIT_WAIT", "HOST_MARGIN", "INTERRUPT_WAIT", "OutputCallback", "Session"]

# what a REPL says is documented under the facade's logger (docs/usage.md, security.md)
log = logging.getLogger(__name__.rpartition(".")[0] + ".repl")

#: Extra seconds the host waits past a cell's timeout + grace before it declares
#: the whole container unresponsive and replaces it.
HOST_MARGIN = 20.0
#: The longest :meth:`Session.interrupt` waits to hand its frame to the container.
INTERRUPT_WAIT = 1.0
#: At exit, the longest one REPL's constructor or another thread's call is waited for.
EXIT_WAIT = 10.0
# Images known to ship dill themselves: no need to send the host's with the code.
_IMAGE_HAS_DILL: dict[tuple[Engine, str], bool] = {}

OutputCallback = Callable[[str, str], None]


class Session(TransportStart, SessionFiles):
    """The container side of one DockerREPL; nothing starts until :meth:`start`.

    It holds no reference to its facade: a DockerREPL dropped without ``cleanup()``
    is finalised at once, also in the interpreter's teardown (no cycle to wait for)."""

    def __init__(self, options: ReplOptions) -> None:
        self.options = options
        #: replaced by start() with the transport's own
        self.workspace: Workspace = MountedWorkspace(options.workspace_dir, shared=False)
        #: "proxy" or "channel" once started (see DockerREPL.transport)
        self.transport = ""
        #: rlm's compaction ``history``, kept on the host (see DockerREPL.append_compaction_entry)
        self.compaction_history: list[Any] = []
        self.state = ProxyState(
            token="",  # made by start()
            depth=options.depth,
            lm_handler_address=options.lm_handler_address,
            subcall_fn=options.subcall_fn,
            max_concurrent_subcalls=options.max_concurrent_subcalls,
            max_llm_calls=options.max_llm_calls,
            max_llm_tokens=options.max_llm_tokens,
            host_tools=options.tools.host,
        )
        self.lock = threading.RLock()
        # set while no call holds the session: the channel's idle reader may read then
        self.idle = threading.Event()
        self.idle.set()
        self._depth = 0
        self.send_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self.closed = False
        # clear while start() runs: close() from another thread (cleanup() of a REPL
        # whose constructor, or async start, is still running) waits for it to fail
        self.not_starting = threading.Event()
        self.not_starting.set()
        self.done = threading.Event()  # set once close() has finished
        #: the channel transport's idle reader (it ends soon after close())
        self.idle_reader: Optional[threading.Thread] = None
        # The request the host sent and stopped waiting for (a KeyboardInterrupt or an
        # on_output callback raising while it ran): ("result"|"reply", id). Its answer
        # is read, and dropped, before the next request is sent (see sync).
        self.in_flight: Optional[tuple[str, int]] = None
        self.in_flight_interrupted = False
        # After a container restart the new worker appends its own restore note to the
        # first cell's stderr; when it says just what the host's note already said, it
        # is dropped (one note per restore). The worker's line the host expects:
        self.restore_echo: Optional[str] = None
        #: a note for the next cell's stderr (what a fork or a resume did not carry over)
        self.pending_note = ""
        self.cell = 0
        self.req = 0
        self.restarts = 0
        self.last_completed = 0  # the last cell that ended ok or error
        self.container: Optional[Container] = None
        self.proxy: Union[ProxyServer, ChannelEndpoint, None] = None
        self.proxy_target: dict[str, Any] = {}
        #: why transport="auto" did not take the proxy path ("" if it did, or was not asked)
        self.fallback_reason = ""

    # ----------------------------------------------------------------- start
    def prime(self) -> None:
        """Tell a new worker what a checkpoint does not hold: the tools, the compaction history."""
        if self.options.compaction:
            self.call("compaction", {"history": self.compaction_history})
        if self.options.tools.specs:
            self.call("define_tools", {"tools": self.options.tools.specs})

    def hello(self, restore: bool, probe: bool = False) -> dict[str, Any]:
        opts = self.options
        extra: dict[str, Any] = {}
        if probe:
            extra["probe"] = {"nonce": self.workspace.probe_nonce(), "timeout": PROBE_TIMEOUT}
        return {
            "type": "hello",
            "version": PROTOCOL_VERSION,
            "config": {
                **extra,
                "depth": opts.depth,
                "proxy": self.proxy_target,
                "token": self.state.token,
                "max_output": opts.max_output_bytes,
                "repr_cap": opts.repr_cap,
                "compaction": opts.compaction,
                "auto_checkpoint": opts.auto_checkpoint,
                "grace": opts.grace,
                "restore": restore,
            },
        }

    def start_container(self, restore: bool, probe: bool = False) -> dict[str, Any]:
        """Start a container of the session's transport; returns its ready frame."""
        opts = self.options
        workspace, code_dir = self.workspace.mounts()
        cfg = ContainerConfig(
            image=opts.image,
            workspace=workspace,
            workspace_volume=self.workspace.volume,
            code_dir=code_dir,
            host_gateway=self.transport == "proxy",
            docker=opts.engine,
            memory=opts.memory,
            cpus=opts.cpus,
            pids_limit=opts.pids_limit,
            network=opts.network,
            user=opts.user,
            read_only=opts.read_only,
            runtime=opts.runtime,
            extra_args=opts.extra_args,
            start_timeout=opts.start_timeout,
            labels=repl_labels(self.workspace.root),
        )
        container = Container(
            cfg,
            self.workspace.log_path(),
            copy_dill=not _IMAGE_HAS_DILL.get((opts.engine, opts.image)),
        )
        endpoint = self.proxy
        if isinstance(endpoint, ChannelEndpoint):
            # answers go to the container that asked, never to its replacement
            def reply(frame: dict[str, Any], c: Container = container) -> None:
                self.send_to(c, frame, time.monotonic() + HOST_MARGIN)

            container.on_rpc = lambda frame: endpoint.dispatch(frame, reply)
        self.container = container  # before it starts: close() can abort it
        if self.closed:
            # close() from another thread read no container: this one must not start
            raise ReplClosed("this DockerREPL was cleaned up while its container started")
        if _exit.exiting():
            # the atexit hook has begun (a pool member starting in its thread):
            # a container started now would outlive its cleanup
            raise ReplClosed("the interpreter is exiting: no container is started")
        ready = start_container(container, self.hello(restore, probe))
        if self.closed:
            raise ReplClosed("this DockerREPL was cleaned up while its container started")
        if ready.get("dill") == "image":
            _IMAGE_HAS_DILL[(opts.engine, cfg.image)] = True
        elif ready.get("dill") is None:
            log.warning("dill is not available in %s: checkpoints will fail", opts.image)
        if ready.get("channel_private") is False and not restore:
            # the image lacks ctypes (no prctl), or an init shares the channel's pipes:
            # cell code could then forge frames; the host's bounds still hold (security.md)
            log.warning(
                "the bootstrap could not make its host channel private in %s"
                " (nondumpable=%s): cell code could forge result frames",
                opts.image,
                ready.get("nondumpable"),
            )
        if opts.verify_security:
            container.verify(container.inspect())
        return ready

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the session for one call (re-entrant); the idle reader keeps off."""
        with self.lock:
            self._depth += 1
            self.idle.clear()
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.idle.set()

    # --------------------------------------------------------------- channel
    def next_req(self) -> int:
        self.req += 1
        return self.req

    def check_open(self) -> None:
        if self.closed:
            raise ReplClosed("this DockerREPL was cleaned up")

    def send(self, obj: dict[str, Any], deadline: Optional[float] = None) -> None:
        """Send a frame; ``TimeoutError`` when the container takes none of it by ``deadline``."""
        container = self.container
        if container is None:
            raise ContainerDied("no container")
        with self.send_lock:
            container.send(obj, deadline)

    def send_to(self, container: Container, obj: dict[str, Any], deadline: float) -> None:
        """Send a frame to ``container`` if it is still the session's (an rpc answer)."""
        with self.send_lock:
            if self.container is container and not container.broken:
                container.send(obj, deadline)

    def call(self, op: str, args: dict[str, Any], timeout: float = 600.0) -> Any:
        """Run an internal operation in the worker; raise on failure."""
        with self.held():
            rid, container = self.begin_request()
            deadline = time.monotonic() + timeout + self.options.grace + HOST_MARGIN
            request = {"type": "call", "id": rid, "op": op, "args": args, "timeout": timeout}
            try:
                return self._call_reply(op, request, container, deadline)
            except BaseException:
                if self.in_flight is not None:
                    self.abandon()  # e.g. KeyboardInterrupt during a long load_file
                raise

    def begin_request(self) -> tuple[int, Container]:
        """Before a request answered by a ``reply`` (a call, a file transfer): a live
        container in step, a new id, and that id in flight. The caller holds the session."""
        self.check_open()
        if self.ensure_container() + self.sync():
            self.restore_echo = None  # no host note shown: the worker's is the one
        rid = self.next_req()
        container = self.container
        if container is None:
            raise ContainerDied("no container")
        self.in_flight = ("reply", rid)
        self.in_flight_interrupted = False
        return rid, container

    def _call_reply(
        self, op: str, request: dict[str, Any], container: Container, deadline: float
    ) -> Any:
        rid = request["id"]
        sent = False
        while True:
            try:
                if not sent:
                    self.send(request, deadline)
                    sent = True
                msg = container.recv(deadline)
            except TimeoutError:
                self.restart("the container did not answer an internal request")
                raise ContainerDied(
                    f"internal operation {op!r} timed out; the container was replaced"
                ) from None
            if msg.get("id") != rid:
                continue
            if msg.get("type") in ("reply", "error"):
                self.in_flight = None
            if msg.get("type") == "reply":
                if not msg.get("ok"):
                    err = str(msg.get("error"))
                    if msg.get("exception") == "SnapshotLost":
                        raise SnapshotLost(f"{op}: {err}")
                    if msg.get("exception") in (
                        "TypeError",
                        "ValueError",
                        "NameError",
                        "SyntaxError",
                    ):
                        raise ValueError(f"{op} failed in the REPL: {err}")
                    raise DockerReplError(f"{op} failed in the REPL: {err}")
                return msg.get("value")
            if msg.get("type") == "error":
                raise ProtocolError(str(msg.get("error")))

    def ensure_container(self) -> str:
        """Replace a container that exited or whose channel is out of step; returns a note."""
        c = self.container
        if c is None or not c.alive():
            return self.restart("the container had exited") + "\n"
        if c.broken:
            return self.restart("a frame to the container was cut short") + "\n"
        return ""

    def abandon(self) -> None:
        """The host stopped waiting for the request in flight: interrupt it now.

        Its answer is read (and dropped) by :meth:`sync` before the next request.
        """
        c = self.container
        if self.in_flight is None or c is None or c.broken or not c.alive():
            return  # a dead or broken container is replaced before its next use
        self.in_flight_interrupted = self.send_interrupt(c)

    def interrupt(self) -> None:
        """Interrupt the running cell, from any thread (see DockerREPL.interrupt)."""
        container = self.container
        if container is not None and not self.closed:
            self.send_interrupt(container)

    def send_interrupt(self, container: Container) -> bool:
        """Send an interrupt frame, waiting at most about INTERRUPT_WAIT; True if sent."""
        if not self.send_lock.acquire(timeout=INTERRUPT_WAIT):
            log.warning("dockerrepl: interrupt not sent: the container is not taking input")
            return False
        try:
            # a few bytes: written whole or not at all (see Container.send)
            container.send({"type": "interrupt"}, time.monotonic() + INTERRUPT_WAIT)
            return True
        except (DockerReplError, TimeoutError) as exc:
            log.warning("dockerrepl: interrupt not sent: %s", exc)
            return False
        finally:
            self.send_lock.release()

    def sync(self) -> str:
        """Bring the channel back in step after a request the host stopped waiting for.

        The request was interrupted (see :meth:`abandon`); a ping tells whether
        it still runs. Its answer is awaited (grace + HOST_MARGIN, longer while
        its worker restores) and dropped; a container that does not answer in
        time is replaced. Returns a note for stderr ("" when all went well).
        """
        stale = self.in_flight
        container = self.container
        if stale is None or container is None:
            return ""
        kind, rid = stale
        margin = self.options.grace + HOST_MARGIN
        restore_bound = self.options.start_timeout
        try:
            if not self.in_flight_interrupted:
                self.in_flight_interrupted = self.send_interrupt(container)
            ping = self.next_req()
            deadline = time.monotonic() + margin
            ceiling = deadline + restore_bound + margin
            self.send({"type": "ping", "id": ping}, deadline)
            busy = False
            while True:
                msg = container.recv(deadline)
                mtype, mid = msg.get("type"), msg.get("id")
                if mtype == "pong" and mid == ping:
                    if not msg.get("busy"):
                        break  # the stale request had ended (its answer, if any, came first)
                    busy = True
                elif mtype == kind and mid == rid:
                    if kind == "result":
                        self.restore_echo = None  # dropped with the result it was in
                        if msg.get("status") in ("ok", "error"):
                            self.last_completed = rid
                    if busy:
                        break
                elif mtype == "progress" and mid == rid and msg.get("state") == "restoring":
                    deadline = min(ceiling, time.monotonic() + restore_bound + margin)
                elif mtype == "error":
                    raise ProtocolError(str(msg.get("error")))
        except (TimeoutError, DockerReplError) as exc:
            what = f"cell {rid}" if kind == "result" else "an internal request"
            return self.restart(f"the interrupted {what} did not end ({exc})") + "\n"
        self.in_flight = None
        return ""

    def restart(self, why: str) -> str:
        """Replace the container and restore the last checkpoint; returns a note for stderr."""
        if self.closed:
            # close() from another thread removed the container under this call
            raise ReplClosed("cleanup() was called while this call ran; its container is gone")
        log.warning("dockerrepl: %s; starting a new container", why)
        old = self.container
        self.container = None
        self.in_flight = None  # whatever ran in the old container ends with it
        if old is not None:
            old.kill()
        self.restarts += 1
        try:
            ready = self.start_container(restore=True)
            # read by the new supervisor from the workspace before its worker restored
            saved = ready.get("checkpoint")
            if not isinstance(saved, int) or isinstance(saved, bool):
                saved = None
            self.prime()
        except DockerReplError as exc:
            if self.closed:
                raise ReplClosed(
                    "cleanup() was called while this call ran; its container is gone"
                ) from exc
            raise ContainerDied(f"{why}, and a replacement could not be started: {exc}") from exc
        if saved is None:
            self.restore_echo = "dockerrepl: no checkpoint existed; the namespace starts empty\n"
            restored = "no checkpoint was found: the namespace starts empty"
        else:
            self.restore_echo = (
                f"dockerrepl: state restored from the checkpoint taken after cell {saved}\n"
            )
            restored = f"the checkpoint taken after cell {saved} was restored"
            if saved < self.last_completed:
                # checkpoints are written in the background after each cell: one still
                # on its way died with the container (see DockerREPL.checkpoint())
                lost = saved + 1, self.last_completed
                cells = f"cells {lost[0]}-{lost[1]}" if lost[0] < lost[1] else f"cell {lost[1]}"
                restored += f" (changes made by {cells}, if any, were not in it)"
        return f"dockerrepl: {why}; a new container was started and {restored}"

    # ----------------------------------------------------------------- cells
    def execute(
        self,
        code: str,
        limit: Optional[float],
        on_output: Optional[OutputCallback],
        filename: Optional[str] = None,
        display: bool = False,
        value: bool = False,
    ) -> REPLResult:
        """Run one cell (see DockerREPL.execute_code); the arguments are checked already."""
        start = time.perf_counter()
        with self.held():
            self.check_open()
            note, self.pending_note = self.pending_note, ""
            note += self.ensure_container()
            note += self.sync()
            self.cell += 1
            cell = self.cell
            self.state.current_cell = cell
            msg = {
                "type": "exec",
                "id": cell,
                "code": code,
                "timeout": limit,
                "stream": on_output is not None,
            }
            if filename is not None:
                msg["filename"] = filename
            if display:
                msg["display"] = True
            if value:
                msg["value"] = True
            notes: list[str] = []
            try:
                res = self.run_cell(msg, limit, on_output, notes)
                note += "".join(notes)
            except ContainerDied as exc:
                self.state.abandon_through(cell)
                note += "".join(notes)
                note += self.restart(f"the container died during the cell ({exc})") + "\n"
                return self._lost(cell, start, "crashed", note)
            except ProtocolError as exc:
                # frames from the container are untrusted: one that breaks the protocol
                # ends that container; the REPL goes on in a new one
                self.state.abandon_through(cell)
                note += self.restart(f"the container broke the protocol ({exc})") + "\n"
                return self._lost(cell, start, "crashed", note)
            except TimeoutError:
                self.state.abandon_through(cell)
                note += (
                    self.restart(f"the container stopped answering (cell timeout {limit}s)") + "\n"
                )
                return self._lost(cell, start, "timeout", note)
            except BaseException:
                # the host gave up on the cell (KeyboardInterrupt, an on_output callback
                # raising): stop it in the container, and re-raise to the caller
                self.state.abandon_through(cell)
                self.abandon()
                raise
            echo, self.restore_echo = self.restore_echo, None
            stderr = res.get("stderr")
            if echo and isinstance(stderr, str) and ("\n" + stderr).endswith("\n" + echo):
                res["stderr"] = stderr[: -len(echo)]
            if note:
                res["stderr"] = note + str(res.get("stderr", ""))
            if res.get("status") not in ("ok", "error"):
                self.state.abandon_through(cell)
            else:
                self.last_completed = cell
            return self.result(cell, start, res)

    def _lost(self, cell: int, start: float, status: str, note: str) -> REPLResult:
        return self.result(cell, start, {"status": status, "stdout": "", "stderr": note})

    def result(self, cell: int, start: float, res: dict[str, Any]) -> REPLResult:
        calls = [RLMChatCompletion.from_dict(c) for c in self.state.take(cell)]
        return bound_result(
            res,
            max_output=self.options.max_output_bytes,
            repr_cap=self.options.repr_cap,
            rlm_calls=calls,
            execution_time=time.perf_counter() - start,
        )

    def run_cell(
        self,
        msg: dict[str, Any],
        limit: Optional[float],
        on_output: Optional[OutputCallback],
        notes: list[str],
    ) -> dict[str, Any]:
        """Send a cell and wait for its result.

        A container that dies before showing any sign of the cell (the
        supervisor acknowledges a cell still running after 100 ms; a request the
        cell made to the host, an LM call or a host tool, is a sign too) never
        ran it, or ran it for a moment without asking the host for anything: it
        was killed between cells and the docker CLI noticed late. It is replaced
        and the cell sent once more.
        """
        seen = [False]
        margin = self.options.grace + HOST_MARGIN
        for attempt in (1, 2):
            self.in_flight = ("result", msg["id"])
            self.in_flight_interrupted = False
            try:
                # a container that takes no input (paused) gets as long as it would to answer
                self.send(msg, None if limit is None else time.monotonic() + limit + margin)
                res = self.await_result(msg["id"], limit, on_output, seen)
            except ContainerDied as exc:
                if seen[0] or self.state.asked >= msg["id"] or attempt == 2:
                    raise
                notes.append(self.restart(f"the container had died ({exc})") + "\n")
                seen[0] = False
                continue
            self.in_flight = None
            return res
        raise AssertionError("unreachable")

    def await_result(
        self,
        cell: int,
        limit: Optional[float],
        on_output: Optional[OutputCallback],
        seen: Optional[list[bool]] = None,
    ) -> dict[str, Any]:
        container = self.container
        assert container is not None
        margin = self.options.grace + HOST_MARGIN
        restore_bound = self.options.start_timeout
        deadline = None if limit is None else time.monotonic() + limit + margin
        # Progress frames move the deadline, never past this ceiling: the cell's own
        # time plus two restores (one before it runs, one after its worker dies). Frames
        # are untrusted; forged ones cannot keep the host waiting any longer.
        ceiling = None if deadline is None else deadline + 2 * (restore_bound + margin)
        streamed = 0  # characters handed to on_output; the supervisor stops at the cap
        cap = self.options.max_output_bytes + _TEXT_SLACK
        while True:
            msg = container.recv(deadline)
            kind = msg.get("type")
            if msg.get("id") == cell and seen is not None:
                seen[0] = True
            if kind == "progress":
                if msg.get("id") == cell and limit is not None and ceiling is not None:
                    # a restore has its own bound; the cell's clock restarts after it
                    state = msg.get("state")
                    if state == "restoring":
                        deadline = min(ceiling, time.monotonic() + restore_bound + margin)
                    elif state == "running":
                        deadline = min(ceiling, time.monotonic() + limit + margin)
                continue
            if kind == "output":
                if on_output is not None and msg.get("id") == cell:
                    data = str(msg.get("data"))
                    streamed += len(data)
                    if streamed > cap:
                        continue
                    try:
                        on_output(str(msg.get("stream")), data)
                    except Exception:
                        log.exception("on_output callback failed")
                continue
            if kind == "result" and msg.get("id") == cell:
                return msg
            if kind == "error":
                raise ProtocolError(str(msg.get("error")))

    # -------------------------------------------------------------- teardown
    def close(self, wait: float, kill_timeout: float, lock_timeout: float = -1) -> None:
        """Stop the container and the proxy, remove the workspace. Idempotent, thread-safe."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        if not self.not_starting.is_set():
            # Another thread is starting the container (a constructor, an async start
            # being cancelled): stop it and let that start fail (it sees `closed`, so it
            # tries no other transport) before the teardown below, else what it
            # creates after this point (container, proxy, workspace) would outlive us.
            starting = self.container
            if starting is not None:
                starting.stop_starting(kill_timeout)
            self.not_starting.wait(kill_timeout + wait if lock_timeout < 0 else lock_timeout)
        locked = self.lock.acquire(blocking=False)
        if not locked:
            # a call holds the session (a cell running in another thread): stop its
            # container now, so that call ends at once (it sees closed: ReplClosed)
            busy = self.container
            if busy is not None:
                busy.abort(kill_timeout)
            locked = self.lock.acquire(timeout=lock_timeout)
        try:
            container, self.container = self.container, None
            if container is not None:
                purge = self.workspace.purge_on_close()
                container.close(wait, purge=purge, kill_timeout=kill_timeout)
        finally:
            try:
                if self.proxy is not None:
                    self.proxy.close()
                self.workspace.remove()
            finally:
                if locked:
                    self.lock.release()
                self.done.set()

    def close_at_exit(self, deadline: float, built: threading.Event) -> None:
        """Close from the atexit hook by ``deadline``, starting no thread (3.12 refuses them).

        A constructor still running in another thread (``built`` unset: a pool member
        starting) has its container stopped, and is waited for: it removes its own
        workspace as it fails."""

        def left(most: float) -> float:
            return max(0.1, min(most, deadline - time.monotonic()))

        if not built.is_set():
            starting = self.container
            if starting is not None:
                starting.abort(left(5.0))
            built.wait(left(EXIT_WAIT))
        self.close(wait=left(2.0), kill_timeout=left(5.0), lock_timeout=left(EXIT_WAIT))
        self.done.wait(left(EXIT_WAIT))

    def close_now(self) -> None:
        """Close during the interpreter's teardown: no thread, no process, no wait.

        Here ``Thread.start()`` waits for ever (3.9-3.11) or raises (3.12+), and
        any other thread may be frozen holding a lock. So: close the channel
        (the supervisor sees EOF and exits; ``--rm`` removes the container, as
        when the host is killed), stop listening, remove the workspace.
        """
        if self.closed:
            return
        self.closed = True
        container, self.container = self.container, None
        try:
            if container is not None:
                container.detach(purge=self.workspace.purge_on_close())
            if self.proxy is not None:
                self.proxy.close()
        finally:
            self.workspace.remove(start_processes=False)
