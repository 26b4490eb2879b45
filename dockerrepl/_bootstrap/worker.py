"""The worker process: runs cells and the host's operations on the namespace.

Forked by the supervisor; its fds 0/1/2 are /dev/null and two pipes, so nothing
user code prints can forge a protocol frame; it speaks to the supervisor over a
socketpair (``ctrl``).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

from . import paths, protocol
from .checkpoint import CHECKPOINTER
from .namespace import REPL, cell_result, exec_cell, flush_std
from .scaffold import install_scaffold, reload_scaffold, set_compaction, set_tools
from .sessions import op_drop_export, op_export, op_import
from .snapshots import op_snapshot
from .store import STORE, restore_checkpoint, start_epoch

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Iterable
    from typing import Any


# --------------------------------------------------------------------------- operations
def op_load_file(args: dict[str, Any]) -> dict[str, Any]:
    name = args["name"]
    REPL.load_file_var(name, args["path"], args.get("kind", "text"))
    for alias in args.get("aliases") or ():
        REPL.ns[alias] = REPL.ns[name]
    return {"name": name}


def op_set_vars(args: dict[str, Any]) -> dict[str, Any]:
    for k, v in (args.get("values") or {}).items():
        REPL.ns[k] = v
    return {}


def op_compaction(args: dict[str, Any]) -> dict[str, Any]:
    set_compaction(args.get("history") or [])
    return {}


def op_reset_answer(args: dict[str, Any]) -> dict[str, Any]:
    REPL.reset_answer()
    return {}


def op_define_tools(args: dict[str, Any]) -> dict[str, Any]:
    set_tools(args.get("tools") or {})
    return {}


def op_checkpoint(args: dict[str, Any]) -> dict[str, Any]:
    return {"skipped": CHECKPOINTER.sync(args.get("cell", REPL.cell_id)), "path": paths.STATE_FILE}


def op_restore(args: dict[str, Any]) -> dict[str, Any]:
    cell, note = restore_checkpoint()
    install_scaffold()
    return {"cell": cell, "note": note}


def op_names(args: dict[str, Any]) -> dict[str, Any]:
    return {"names": REPL.user_names()}


#: The host's "call" operations by name (cell code can replace them: the supervisor
#: bounds their replies).
OPS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "load_file": op_load_file,
    "set_vars": op_set_vars,
    "compaction": op_compaction,
    "reset_answer": op_reset_answer,
    "define_tools": op_define_tools,
    "checkpoint": op_checkpoint,
    "restore": op_restore,
    "names": op_names,
    "export": op_export,
    "drop_export": op_drop_export,
    "import": op_import,
    "snapshot": op_snapshot,
}


def run_cell(
    code: str,
    cell_id: int,
    filename: str | None = None,
    display: bool = False,
    value: bool = False,
) -> dict[str, Any]:
    """Run one cell; the "done" frame's fields."""
    REPL.cell_id = cell_id
    try:
        CHECKPOINTER.report()
    except Exception:
        pass
    status, exc_name = exec_cell(code, cell_id, filename, display, value)
    install_scaffold()
    return cell_result(status, exc_name, value)


def reap_children(pids: Iterable[Any], wait: float = 2.0) -> None:
    """Collect killed children (a zombie keeps its pid until reaped)."""
    left = [p for p in pids if isinstance(p, int) and not isinstance(p, bool) and p > 0]
    end = time.monotonic() + wait
    while left:
        for p in list(left):
            try:
                done, _ = os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                done = p
            if done:
                left.remove(p)
        if not left or time.monotonic() > end:
            break
        time.sleep(0.01)


# --------------------------------------------------------------------------- the process
def worker_main(
    ctrl: socket.socket, config: dict[str, Any], restore: bool, expect_cell: int = 0
) -> None:
    """Entry point of the forked worker process."""
    REPL.config.update(config)
    CHECKPOINTER.ctrl = ctrl
    REPL.new_namespace()
    os.chdir(paths.WORKSPACE)
    sys.stdin = open(os.devnull)
    import io

    enc: dict[str, Any] = {
        "encoding": "utf-8",
        "errors": "backslashreplace",
        "line_buffering": True,
    }
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), **enc)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), **enc)
    # (typeshed calls them Final: they are not, and cells expect them to be these)
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin  # type: ignore[misc]
    # the supervisor's wake-up pipe and SIGCHLD handler are not the worker's business
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    note = _restore(expect_cell) if restore else None
    if STORE.epoch == 0:
        start_epoch()  # nothing restored, or the restore failed before it took one
    install_scaffold()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    protocol.send_frame(ctrl, {"type": "started", "pid": os.getpid(), "note": note})
    serve(ctrl, config.get("auto_checkpoint", True))


def _restore(expect_cell: int) -> str | None:
    """The checkpoint and the scaffold back; the note that says how it went."""
    # SIGINT stays ignored (inherited from the supervisor) until the namespace
    # is back: an interrupted restore would leave an empty namespace
    note: str | None
    try:
        _, note = restore_checkpoint(expect_cell)
    except BaseException as e:
        note = "restoring the checkpoint failed (%s: %s); the namespace starts empty" % (
            type(e).__name__,
            e,
        )
        try:
            # keep it from being overwritten by the next (empty) checkpoint
            os.replace(paths.STATE_FILE, paths.STATE_FILE + ".unrestorable")
            note += "; the file was kept as state.dill.unrestorable"
        except OSError:
            pass
    try:
        reload_scaffold()
    except Exception as e:
        note = (note or "") + "; custom tools could not be reinstalled (%s: %s)" % (
            type(e).__name__,
            e,
        )
    return note


def serve(ctrl: socket.socket, auto: Any, checkpoint_now: bool = False) -> None:
    """Answer the supervisor's requests until it closes ``ctrl``; ``checkpoint_now``:
    first write the namespace as it is (a worker made from a snapshot)."""
    if checkpoint_now and auto == "sync":
        CHECKPOINTER.sync_changed(REPL.cell_id)
    elif checkpoint_now and auto:
        CHECKPOINTER.request(REPL.cell_id)
    reader = protocol.FrameReader()
    # An interrupt is for the request in flight. One that comes while none is (the
    # worker waits for the next, or is past its answer) is late, for a request that
    # has ended, unless the next request is in the socket already: the supervisor
    # interrupts as soon as it has forwarded a cell, which may still be unread. Such
    # an early interrupt is kept for that cell; dropped, the cell would run on until
    # its worker is killed, and the namespace fall back to the last checkpoint.
    early = False
    while True:
        answered = True
        try:
            msg = _read_frame(ctrl, reader)  # returns with SIGINT held back
        except KeyboardInterrupt:
            early = _request_waiting(ctrl, reader)
            continue
        if msg is None:
            os._exit(0)
        try:
            kind = msg.get("type")
            if kind in ("exec", "call"):
                answered = False
                if early and kind == "exec":
                    early = False
                    raise KeyboardInterrupt  # answered below, as an interrupted cell
                early = False
            # one that came while the frame was read is for it: raised here
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            if kind == "exec":
                name = msg.get("filename")
                res = run_cell(
                    msg.get("code", ""),
                    int(msg.get("id", 0)),
                    name if isinstance(name, str) else None,
                    msg.get("display") is True,
                    msg.get("value") is True,
                )
                res["type"] = "done"
                res["id"] = msg.get("id")
                if auto == "sync" and res["status"] in protocol.WORKER_STATUSES:
                    # durable before the result: a container killed right after the
                    # cell still restores it (costs the dump, on changed namespaces)
                    CHECKPOINTER.sync_changed(int(msg.get("id", 0)))
                ok = auto is True and res["status"] in protocol.WORKER_STATUSES
                _answer(ctrl, res, int(msg.get("id", 0)) if ok else None)
                answered = True
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            elif kind == "reap":
                reap_children(msg.get("pids") or [])
            elif kind == "call":
                reply = _call(msg)
                flush_std()
                changed = reply["ok"] and msg.get("op") in ("load_file", "set_vars", "define_tools")
                _answer(ctrl, reply, REPL.cell_id if auto and changed else None)
                answered = True
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        except KeyboardInterrupt:
            if answered:
                # past the answer: for the next request, if it is here already
                early = _request_waiting(ctrl, reader)
                continue
            # the interrupt raced the reply; tell the supervisor the cell is over
            try:
                protocol.send_frame(
                    ctrl,
                    {
                        "type": "done",
                        "id": msg.get("id"),
                        "status": "error",
                        "exception": "KeyboardInterrupt",
                        "locals": {},
                        "final_answer": None,
                    },
                )
            except Exception:
                os._exit(3)


def _answer(ctrl: socket.socket, frame: dict[str, Any], snapshot_cell: int | None) -> None:
    """Send a request's answer and ask for the snapshot after ``snapshot_cell`` (None:
    none), with SIGINT held back: from the answer on, an interrupt is for the next
    request, and the caller lets it through once it has marked this one answered."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    protocol.send_frame(ctrl, frame)
    if snapshot_cell is not None:
        CHECKPOINTER.request(snapshot_cell)


def _read_frame(ctrl: socket.socket, reader: protocol.FrameReader) -> Any:
    """The supervisor's next frame (None at EOF), read with SIGINT held back: an
    interrupt is taken only while nothing of a frame has been read (in the wait),
    so none can cut a frame half-parsed, and lose it. Returns with SIGINT still
    held back: the caller lets it through once it knows what the frame is."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    while True:
        whole, value = reader.take()
        if whole:
            return value
        if not reader.buf:
            # an owed snapshot is forked once the worker idles (SIGINT still held back:
            # a late one waits for the select below, never cuts the fork short)
            CHECKPOINTER.idle(ctrl)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            select.select([ctrl], [], [])  # KeyboardInterrupt here: nothing read yet
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            data = ctrl.recv(1 << 16)
        except InterruptedError:
            continue
        if not data:
            return None
        reader.feed(data)


def _request_waiting(ctrl: socket.socket, reader: protocol.FrameReader) -> bool:
    """Whether the supervisor's next frame is here (read in part, or waiting)."""
    return bool(reader.buf) or bool(select.select([ctrl], [], [], 0)[0])


def _call(msg: dict[str, Any]) -> dict[str, Any]:
    """Run one host operation: its reply frame."""
    fn = OPS.get(msg.get("op"))  # type: ignore[arg-type]
    try:
        if fn is None:
            raise ValueError("unknown operation %r" % (msg.get("op"),))
        value = fn(msg.get("args") or {})
        return {"type": "reply", "id": msg.get("id"), "ok": True, "value": value}
    except BaseException as e:
        if isinstance(e, SystemExit):
            e = RuntimeError("SystemExit during %s" % msg.get("op"))
        return {
            "type": "reply",
            "id": msg.get("id"),
            "ok": False,
            "error": "%s: %s" % (type(e).__name__, e),
            "exception": type(e).__name__,
        }
