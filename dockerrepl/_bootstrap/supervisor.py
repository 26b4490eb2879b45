"""The supervisor: the container's main process, between the host and the worker.

It talks to the host over stdin/stdout with frames, owns the worker's stdout/stderr
pipes, enforces cell deadlines (SIGINT, then SIGKILL + respawn + restore) and exits
when its stdin closes (the host's dead-man switch).
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import sys
import time

from . import parking, paths, protocol
from .files import purge_workspace
from .hardening import capability_sets, channel_shared_with_init
from .output import OutputBuffer, clean_locals, clean_reply, clean_value
from .procs import PIDS_NOTE, OomCounter, in_container, pids_exhausted
from .relay import Relay
from .report import cgroup_limits, checkpoint_cell, dill_origin, probe
from .slot import WorkerSlot
from .transfer import Transfers

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn


# seconds after which a still-running cell is acknowledged to the host (see start_request)
ACK_DELAY = 0.02


class Supervisor(WorkerSlot):
    """The host's requests: each forwarded to the worker, answered when it is done
    (or when it died), within its deadline."""

    def __init__(self, nondumpable: bool = False) -> None:
        WorkerSlot.__init__(self, nondumpable)
        self.oom = OomCounter()
        self.host_reader = protocol.FrameReader()
        self.current: dict[str, Any] | None = None  # the request the worker is busy with
        self.deadline: float | None = None
        self.kill_at: float | None = None
        self.interrupted = ""  # why the cell was interrupted: "timeout" or "interrupt"
        self.restart_note: str | None = None
        # the cell's output (their cap is the hello's max_output)
        self.out = OutputBuffer(1 << 20)
        self.err = OutputBuffer(1 << 20)
        self.streamed = 0
        # the current cell's timeout; its clock starts once the worker runs
        self.timeout_s: float | None = None
        # SIGCHLD wakes select() through this pipe (PEP 475 retries EINTR)
        self.wake_r = self.wake_w = -1
        # why the supervisor killed the worker, for the cell's note
        self.kill_reason: str | None = None
        # when to tell the host that a still-running cell did arrive
        self.ack_at: float | None = None
        # the channel transport: LM calls as frames (None with the proxy transport)
        self.relay: Relay | None = None
        self.transfers = Transfers()

    # -- host channel --
    def send_host(self, obj: Any) -> None:
        protocol.write_all(1, protocol.encode(obj))

    # -- request handling --
    def start_request(self, msg: dict[str, Any]) -> None:
        if self.current is not None:
            self.send_host(
                {
                    "type": "error",
                    "id": msg.get("id"),
                    "error": "busy: a request is already running",
                }
            )
            return
        self.current = msg
        self.interrupted = ""
        self.kill_at = None
        self.kill_reason = None
        self.timeout_s = protocol.positive(msg.get("timeout"))
        # the cell's clock starts when a worker can run it: restoring a checkpoint
        # first is not the cell's time (an interrupt in the middle of a restore would
        # leave an empty namespace that the next checkpoint writes over the good one)
        self.deadline = None
        self.streamed = 0
        # A cell still running after ACK_DELAY says so: a container that dies before
        # any sign of a cell never ran it (killed between cells; the host notices a
        # moment late), and the host may send that cell again. Fast cells send nothing.
        self.ack_at = time.monotonic() + ACK_DELAY if msg.get("type") == "exec" else None
        if self.worker_pid is None:
            self.spawn_worker(restore=True)
            self.progress("restoring")
        if self.worker_started:
            self.start_clock()
            self.forward(msg)

    def start_clock(self) -> None:
        if self.timeout_s is not None:
            self.deadline = time.monotonic() + self.timeout_s

    def progress(self, state: str) -> None:
        """Tell the host how a request is doing (a restore may take longer than its margin)."""
        if self.current is not None:
            self.send_host({"type": "progress", "id": self.current.get("id"), "state": state})

    def forward(self, msg: dict[str, Any]) -> None:
        if self.ctrl is None:
            return  # no worker: the request waits for the next one's "started"
        try:
            protocol.send_frame(self.ctrl, msg)
        except OSError:
            pass  # the worker died; its EOF is handled by the loop

    def on_worker_frame(self, msg: dict[str, Any]) -> None:
        # Cell code can write to the worker's end of this socket (it is in the
        # worker's memory, and children inherit it): a frame is taken only where
        # the worker itself would send it, and what it carries is bounded.
        kind = msg.get("type")
        if kind == "snapshot":
            self.writers.note(msg.get("pid"), self.worker_pid)
            return
        if kind == "parked":
            self.parked.add(msg, self.worker_pid)
            return
        if kind == "started":
            if self.worker_started:
                return  # once per worker: a repeat would restart the clock and re-send
            self.worker_started = True
            if msg.get("note"):
                self.restart_note = str(msg.get("note"))[: protocol.MAX_NOTES]
            if self.current is not None:
                self.progress("running")
                self.start_clock()
                self.forward(self.current)
            return
        if self.current is None or msg.get("id") != self.current.get("id"):
            return
        self.drain_output()
        if kind == "done" and self.current.get("type") == "exec":
            self.finish_cell(msg)
        elif kind == "reply" and self.current.get("type") == "call":
            self.current = None
            self.ack_at = None
            protocol.write_all(1, clean_reply(msg))

    def finish_cell(
        self, msg: dict[str, Any], status: str | None = None, note: str | None = None
    ) -> None:
        req = self.current
        if req is None:
            return  # (callers set it: the cell this answers)
        self.current = None
        self.deadline = self.kill_at = self.ack_at = None
        st = status or msg.get("status", "ok")
        if not status and st not in protocol.WORKER_STATUSES:
            st = "error"  # all a worker ever reports; the other statuses are the supervisor's
        if (
            self.interrupted
            and st in ("ok", "error")
            and msg.get("exception") == "KeyboardInterrupt"
        ):
            st = "timeout" if self.interrupted == "timeout" else "interrupted"
        if st in ("ok", "error", "timeout", "interrupted") and not note:
            self.last_good_cell = req.get("id", 0)
        err = self.err.text()
        notes = []
        if st == "timeout" and not note:
            notes.append(
                "dockerrepl: cell exceeded its %ss timeout and was interrupted; state kept"
                % (req.get("timeout"),)
            )
        if note:
            notes.append(note)
        if st != "ok" and in_container() and pids_exhausted():
            # a flood left no process slots: nothing could fork, not even a snapshot
            killed = self.writers.sweep(spare=self.worker_pid)
            self.reap_orphans()
            mine = [pid for pid, ppid in killed if ppid == self.worker_pid]
            if mine and self.ctrl is not None:
                # the worker is their parent: until it reaps them they hold their pids
                self.forward({"type": "reap", "pids": mine})
            notes.append("dockerrepl: " + PIDS_NOTE % len(killed))
        if self.restart_note:
            notes.append("dockerrepl: " + self.restart_note)
            self.restart_note = None
        if notes:
            text = protocol.cut("\n".join(notes), protocol.MAX_NOTES, "notes")
            err = err + ("" if not err or err.endswith("\n") else "\n") + text + "\n"
        exc = msg.get("exception")
        answer = msg.get("final_answer")
        result = {
            "type": "result",
            "id": req.get("id"),
            "stdout": self.out.text(),
            "stderr": err,
            "status": st,
            "exception": exc[:200] if isinstance(exc, str) else None,
            "locals": clean_locals(msg.get("locals"), int(self.config.get("repr_cap", 1000))),
            "final_answer": protocol.cut(answer, protocol.FINAL_ANSWER_CAP, "the final answer")
            if isinstance(answer, str)
            else None,
            "truncated": {"stdout": self.out.dropped, "stderr": self.err.dropped},
            "value": clean_value(msg.get("value"), self.out.cap) if req.get("value") else None,
        }
        self.out.reset()
        self.err.reset()
        self.send_host(result)

    def worker_died(self, status: int | None) -> None:
        """The worker exited: answer the request it was running, then respawn lazily."""
        self.worker_pid = None
        if self.ctrl is not None:
            try:
                self.ctrl.close()
            except OSError:
                pass
            self.ctrl = None
        if status is None:
            status = 0
        self.drain_output()
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                signame = signal.Signals(sig).name
            except ValueError:
                signame = str(sig)
            how = "killed by %s" % signame
        else:
            how = "exited with status %d" % os.WEXITSTATUS(status)
        oom = self.oom.suspected()
        if self.current is not None:
            req = self.current
            if self.kill_reason:
                st, why = "crashed", self.kill_reason
            elif self.interrupted == "interrupt" and self.kill_at is not None:
                st = "interrupted"
                why = "the cell ignored the interrupt; the worker was killed"
            elif self.kill_at is not None or self.interrupted == "timeout":
                st = "timeout"
                why = (
                    "cell exceeded its %ss timeout and ignored the interrupt; the worker was killed"
                    % req.get("timeout")
                )
            elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                st = "oom" if oom else "crashed"
                why = "the worker was %s%s" % (how, " (out of memory)" if oom else "")
            else:
                st = "crashed"
                why = "the worker %s" % how
            self.kill_reason = None
            flood = None
            if st in ("timeout", "interrupted"):
                # a cell that had to be killed may have left processes outside its group;
                # whether they filled the pids limit is read before the sweep frees it
                full = in_container() and pids_exhausted()
                killed = self.writers.sweep()
                self.reap_orphans()
                if full:
                    flood = PIDS_NOTE % len(killed)
            self.spawn_worker(restore=True)
            self.progress("restoring")
            # wait for the new worker to come up so the note can say what was restored
            note = self.wait_started()
            # the restore has waited for the snapshot writers the sweep spared: they
            # are done, or too late to be waited for
            self.writers.kill_spared()
            self.restart_note = None
            # A worker that cannot even start here (the container's memory taken by its
            # tmpfs, a process killing every new worker) will not start for the next
            # cell either: answer this one, then exit, and the host starts a new
            # container that restores the checkpoint at the next cell.
            give_up = not self.worker_started
            text = "dockerrepl: %s; a new worker was started and %s%s" % (
                why,
                note or "the namespace starts empty",
                "; the container will be replaced" if give_up else "",
            )
            if flood:
                text += "\ndockerrepl: " + flood
            if req.get("type") == "exec":
                self.current = req
                self.finish_cell(
                    {
                        "status": st,
                        "exception": None,
                        "locals": {},
                        "final_answer": None,
                    },
                    status=st,
                    note=text,
                )
            else:
                self.current = None
                self.send_host(
                    {
                        "type": "reply",
                        "id": req.get("id"),
                        "ok": False,
                        "error": text,
                        "exception": "WorkerDied",
                    }
                )
            if give_up:
                self.shutdown(False)
        else:
            self.restart_note = "the worker %s between cells; it was restarted" % how

    def wait_started(self) -> str | None:
        """Block until a freshly spawned worker sends 'started' (bounded)."""
        end = time.monotonic() + 120
        while time.monotonic() < end and self.ctrl is not None:
            if (
                self.writers.spared_until is not None
                and time.monotonic() >= self.writers.spared_until
            ):
                self.writers.kill_spared()  # a restore slower than that does not extend their time
            waited: list[Any] = [self.ctrl, self.out_r, self.err_r]
            r, _, _ = select.select(waited, [], [], 0.5)
            if self.out_r in r or self.err_r in r:
                self.drain_output()
            if self.ctrl in r:
                data = self.recv_ctrl()
                if data is None:
                    continue
                if not data:
                    return "the replacement worker failed to start"
                self.ctrl_reader.feed(data)
                try:
                    frames = self.ctrl_reader.frames()
                except (ValueError, RecursionError):
                    return "the replacement worker failed to start (protocol error)"
                for m in frames:
                    if isinstance(m, dict) and m.get("type") == "started":
                        self.worker_started = True
                        return m.get("note")
        return None

    def drain_output(self) -> None:
        for fd, buf, name in ((self.out_r, self.out, "stdout"), (self.err_r, self.err, "stderr")):
            while True:
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if not data:
                    break
                self.on_output(buf, name, data)

    def on_output(self, buf: OutputBuffer, name: str, data: bytes) -> None:
        buf.add(data)
        req = self.current
        if req is not None and req.get("stream"):
            cap = self.config.get("max_output", 1 << 20)
            if self.streamed < cap:
                chunk = data[: cap - self.streamed]
                self.streamed += len(chunk)
                self.send_host(
                    {
                        "type": "output",
                        "id": req.get("id"),
                        "stream": name,
                        "data": chunk.decode("utf-8", "replace"),
                    }
                )

    # -- timers --
    def on_timer(self) -> None:
        now = time.monotonic()
        if self.ack_at is not None and now >= self.ack_at:
            self.ack_at = None
            self.progress("accepted")
        if self.writers.spared_until is not None and now >= self.writers.spared_until:
            self.writers.kill_spared()
        if self.current is None or self.worker_pid is None:
            return
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = now + 3600  # once
            self.sigkill_worker()
            return
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            self.interrupt("timeout")

    def interrupt(self, why: str) -> None:
        if self.worker_pid is None or self.current is None or not self.worker_started:
            return  # nothing runs yet (a restore): the cell can be interrupted once it does
        self.interrupted = why
        try:
            os.kill(self.worker_pid, signal.SIGINT)
        except OSError:
            pass
        self.kill_at = time.monotonic() + float(self.config.get("grace", 2.0))

    def next_timeout(self) -> float | None:
        t = [
            x
            for x in (self.deadline, self.kill_at, self.ack_at, self.writers.spared_until)
            if x is not None
        ]
        if not t:
            return None
        return max(0.0, min(t) - time.monotonic())

    # -- main loop --
    def handle_host(self, msg: Any) -> None:
        if not isinstance(msg, dict):
            self.send_host({"type": "error", "id": None, "error": "a message must be an object"})
            return
        kind = msg.get("type")
        if kind == "exec" and not isinstance(msg.get("code"), str):
            self.send_host({"type": "error", "id": msg.get("id"), "error": "exec needs str code"})
        elif kind == "call" and not isinstance(msg.get("op"), str):
            self.send_host({"type": "error", "id": msg.get("id"), "error": "call needs a str op"})
        elif kind == "call" and msg.get("op") in ("rollback", "drop_snapshot"):
            parking.handle(self, msg)
        elif kind in ("exec", "call"):
            self.start_request(msg)
        elif kind == "interrupt":
            self.interrupt("interrupt")
        elif kind == "ping":
            self.send_host({"type": "pong", "id": msg.get("id"), "busy": self.current is not None})
        elif kind == "shutdown":
            self.shutdown(bool(msg.get("purge")))
        elif kind == "rpc_reply":
            if self.relay is not None:
                self.relay.on_reply(msg)
        elif kind == "fput":
            reply = self.transfers.put(msg)
            if reply is not None:
                self.send_host(reply)
        elif kind == "fget":
            self.send_host(self.transfers.get(msg, self.send_host))
        else:
            self.send_host(
                {"type": "error", "id": msg.get("id"), "error": "unknown message type %r" % (kind,)}
            )

    def shutdown(self, purge: bool) -> NoReturn:
        self.kill_worker()
        if purge:
            purge_workspace()
        os._exit(0)

    def run(self) -> NoReturn:
        # hello first (blocking), so the worker starts with its configuration
        fl = fcntl.fcntl(0, fcntl.F_GETFL)
        fcntl.fcntl(0, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        hello = None
        while hello is None:
            if not self.read_host(block=True):
                os._exit(0)
            frames = self.host_reader.frames()
            if frames:
                hello = frames.pop(0)
                pending = frames
        if hello.get("type") != "hello" or hello.get("version") != protocol.VERSION:
            self.send_host(
                {
                    "type": "error",
                    "error": "protocol mismatch: bootstrap speaks version %d, host sent %r"
                    % (protocol.VERSION, hello.get("version")),
                }
            )
            os._exit(2)
        self.config = hello.get("config") or {}
        cap = int(self.config.get("max_output", 1 << 20))
        self.out, self.err = OutputBuffer(cap), OutputBuffer(cap)
        dill_from = dill_origin()
        try:
            # a new volume (the channel transport) starts empty; a mount has it already
            os.makedirs(paths.STATE_DIR, exist_ok=True)
        except OSError:
            pass  # a read-only or foreign workspace: checkpoints will say why they fail
        proxy = self.config.get("proxy") or {}
        if proxy.get("relay"):
            # the channel transport: the worker (forked below) calls the relay
            self.relay = Relay(self.send_host)
            self.config["proxy"] = {"unix": self.relay.name, "relay": True}
        checks = probe(self.config) if self.config.get("probe") else None
        self.spawn_worker(restore=bool(self.config.get("restore")))
        self.send_host(
            {
                "type": "ready",
                "version": protocol.VERSION,
                "python": sys.version.split()[0],
                "dill": dill_from,
                "pid": os.getpid(),
                "uid": os.getuid(),
                # True: cell code cannot open this process's fds (the host channel)
                # through /proc, ptrace it or read its memory; no other process holds them
                "nondumpable": self.nondumpable,
                "channel_private": self.nondumpable and not channel_shared_with_init(),
                # what the engine applied, read before any cell ran (verify() checks it)
                "caps": capability_sets(),
                "limits": cgroup_limits(),
                # the cell the checkpoint in the workspace was taken after (a restart's note)
                "checkpoint": checkpoint_cell(),
                "probe": checks,
            }
        )
        for m in pending:
            self.handle_host(m)
        # Wake select() when the worker dies (select() is retried after EINTR, PEP 475;
        # the ctrl socket's EOF never comes while a child of the cell holds a copy).
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        relay = self.relay
        while True:
            fds: list[Any] = [0, self.out_r, self.err_r, self.wake_r]
            wfds: list[int] = []
            if self.ctrl is not None:
                fds.append(self.ctrl)
            if relay is not None:
                fds += relay.read_fds()
                wfds = relay.write_fds()
            try:
                r, w, _ = select.select(fds, wfds, [], self.next_timeout())
            except InterruptedError:
                r, w = [], []
            if relay is not None:
                for fd in w:
                    relay.on_writable(fd)
                for fd in r:
                    if isinstance(fd, int) and relay.owns(fd):
                        relay.on_readable(fd)
            if self.wake_r in r:
                try:
                    os.read(self.wake_r, 4096)
                except OSError:
                    pass
            if 0 in r:
                if not self.read_host(block=False):
                    self.shutdown(purge=False)  # stdin closed: the host is gone
                for m in self.host_reader.frames():
                    self.handle_host(m)
            if self.out_r in r or self.err_r in r:
                self.drain_output()
            if self.ctrl is not None and self.ctrl in r:
                self.pump_ctrl()
            self.reap_orphans()
            if self.worker_pid is not None:
                status = self.reap_worker(block=False)
                if status is not None:
                    self.worker_died(status)
            self.on_timer()

    def pump_ctrl(self) -> None:
        """Read what the worker sent and act on its frames (non-blocking)."""
        data = self.recv_ctrl()
        if data:
            self.ctrl_reader.feed(data)
            try:
                frames = self.ctrl_reader.frames()
                if not all(isinstance(m, dict) for m in frames):
                    raise ValueError("a frame that is not an object")
            except (ValueError, RecursionError) as e:
                # cell code (or a child it forked, which inherits the socket) wrote
                # garbage: the worker's reports cannot be trusted any more
                frames = []
                self.kill_reason = (
                    "the worker broke the protocol (%s); it was killed" % str(e)[:200]
                )
                self.worker_died(self.kill_worker())
            for m in frames:
                self.on_worker_frame(m)
        elif data == b"":
            self.worker_died(self.kill_worker())

    def read_host(self, block: bool) -> bool:
        while True:
            try:
                data = os.read(0, 1 << 20)
            except BlockingIOError:
                if block:
                    select.select([0], [], [])
                    continue
                return True
            except InterruptedError:
                continue
            if not data:
                return False
            self.host_reader.feed(data)
            if not block:
                continue
            return True
