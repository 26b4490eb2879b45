"""dockerrepl's in-container bootstrap: supervisor + worker.

The host mounts this file read-only at ``/opt/dockerrepl`` and starts it as the
container's main process. Its state (checkpoint metadata, locks, the tools and
compaction list, the proxy's unix socket) lives in ``/workspace/.dockerrepl``,
which cell code can write; the code it runs from cannot be changed from inside.
It must run on any Python >= 3.8 with only the standard library (dill is
optional and found on ``sys.path`` or in ``lib`` beside this file), and it
imports nothing from the host package.

Processes:

* the **supervisor** (this process) talks to the host over stdin/stdout with
  length-prefixed JSON frames, owns the worker's stdout/stderr pipes, enforces
  cell deadlines (SIGINT, then SIGKILL + respawn + restore) and exits when its
  stdin closes (the host's dead-man switch);
* the **worker** (forked from the supervisor) holds the REPL namespace and runs
  cells. Its fds 0/1/2 are /dev/null and two pipes, so nothing user code prints
  can forge a protocol frame; it speaks to the supervisor over a socketpair.

When started as a script this file imports itself as the module
``dockerrepl_bootstrap`` so that the REPL helpers (``llm_query`` ...) live in an
importable module and dill pickles them by reference in checkpoints.
"""

import errno
import fcntl
import json
import linecache
import os
import reprlib
import select
import signal
import socket
import struct
import sys
import time
import traceback
import types

PROTOCOL_VERSION = 1
HERE = os.path.dirname(os.path.abspath(__file__))
BOOT_FILE = os.path.abspath(__file__)
# Always /workspace in a container (the host passes no environment in); the
# override exists so tests can run this file under the host Python.
WORKSPACE = os.environ.get("DOCKERREPL_WORKSPACE") or "/workspace"
# writable state, apart from the (read-only) code in HERE
STATE_DIR = os.path.join(WORKSPACE, ".dockerrepl")
STATE_FILE = os.path.join(WORKSPACE, "state.dill")
META_FILE = os.path.join(STATE_DIR, "state.meta.json")
LOCK_FILE = os.path.join(STATE_DIR, "checkpoint.lock")
# held (shared) by every snapshot child from before its fork until it exits, so a
# restore can wait (exclusive) until no snapshot is still on its way
PENDING_FILE = os.path.join(STATE_DIR, "checkpoint.pending")
# The newest worker's epoch. Every checkpoint carries an order key [epoch, seq]: a
# worker takes a new epoch, above any on disk, when it starts (and when it restores),
# and numbers its snapshots in the order its namespace went through them. A write
# whose key is not above the one on disk, or whose epoch a newer worker has passed,
# is dropped, so the state on disk only ever moves forward.
EPOCH_FILE = os.path.join(STATE_DIR, "checkpoint.epoch")
# the exit status of a snapshot child that wrote nothing because a newer snapshot
# is on disk or on its way (not a failure)
SNAPSHOT_DROPPED = 3
HEADER = struct.Struct(">I")
MAX_HOST_FRAME = 1 << 30
SCAFFOLD_FUNCS = ("llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched", "SHOW_VARS")
RESERVED = SCAFFOLD_FUNCS + ("answer", "context", "history")
HIDDEN_LOCALS = frozenset(SCAFFOLD_FUNCS) | {"__builtins__"}
# the name snapshot writers give themselves (for `docker top`; any process can take
# it, so the sweep goes by what the supervisor was told at fork, not by this name)
SNAPSHOT_COMM = "drepl-snapshot"
# The sweep spares at most this many snapshot writers (one writing, one waiting: all
# a worker ever has), the newest the worker reported, for at most SNAPSHOT_SPARE
# seconds (the restore's own wait for them); then they are killed.
MAX_SPARED = 2
SNAPSHOT_SPARE = 60.0
# seconds after which a still-running cell is acknowledged to the host (see start_request)
ACK_DELAY = 0.02
# Bounds on what a cell's result may carry (the host enforces the same ones, plus a
# small slack, on every result frame): names listed in locals, the length of one
# name, the characters of final_answer, and of the supervisor's own notes.
MAX_LOCALS = 10000
MAX_NAME = 1000
FINAL_ANSWER_CAP = 16 << 20
MAX_NOTES = 16 << 10
# An internal operation's reply ({}, a name, a checkpoint's path and skipped names) is a
# few hundred bytes. Cell code can replace the worker's operations or write to its
# control socket, so a reply is cut down to its keys and refused over this size.
MAX_REPLY = 1 << 20
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
NONDUMPABLE = [False]  # the supervisor made itself non-dumpable (main)


# --------------------------------------------------------------------------- #
# keeping the supervisor out of the cell's reach
# --------------------------------------------------------------------------- #
def _set_dumpable(flag):
    """prctl(PR_SET_DUMPABLE, flag); True if the flag now reads back as asked.

    A process that is not dumpable can be neither ptrace'd nor opened through
    /proc/<pid>/{fd,mem,environ,...} by other processes of the same uid
    unless they hold CAP_SYS_PTRACE, which ``--cap-drop ALL`` removes. The flag
    survives fork and is reset by execve. ctypes may be missing from a minimal
    image: then nothing happens and False is returned.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.restype = ctypes.c_int
        if prctl(PR_SET_DUMPABLE, int(flag), 0, 0, 0) != 0:
            return False
        return prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == int(flag)
    except Exception:
        return False


def _channel_shared_with_init():
    """True when another process (a ``docker run --init`` init) holds this process's
    stdout, the host channel, and can be reached through /proc: then cell code could
    write frames through /proc/1/fd/1 whatever this process does."""
    if os.getpid() == 1:
        return False
    try:
        theirs = os.stat("/proc/1/fd/1")
        mine = os.fstat(1)
    except OSError:
        return False  # no /proc, or init is out of reach: so it is for the worker too
    return (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino)


def _close_fds_except(keep):
    """Close every descriptor of this process but ``keep`` (the worker, after fork)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except (OSError, ValueError):
        fds = range(3, 4096)  # no /proc: the supervisor never holds more than a few
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _clean_locals(raw, cap):
    """The worker's locals as they may go to the host: str to str, bounded."""
    out = {}
    if not isinstance(raw, dict):
        return out
    for k, v in raw.items():
        if len(out) >= MAX_LOCALS:
            break
        if isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_NAME:
            out[k] = v if len(v) <= cap + 64 else v[:cap] + "... (%d chars)" % len(v)
    return out


def _clean_reply(msg):
    """A worker's reply to a host "call", encoded as it may go to the host: its keys,
    bounded (the frame is encoded once, here, to measure it)."""
    rid = msg.get("id")
    if msg.get("ok") is True:
        reply = {"type": "reply", "id": rid, "ok": True, "value": msg.get("value")}
    else:
        exc = msg.get("exception")
        reply = {
            "type": "reply",
            "id": rid,
            "ok": False,
            "error": _cut(str(msg.get("error")), MAX_NOTES, "the error"),
            "exception": exc[:200] if isinstance(exc, str) else None,
        }
    frame = encode(reply)
    if len(frame) - HEADER.size <= MAX_REPLY:
        return frame
    return encode(
        {
            "type": "reply",
            "id": rid,
            "ok": False,
            "error": "the worker's reply was %d bytes, over the limit of %d (did cell code"
            " replace a dockerrepl operation?)" % (len(frame) - HEADER.size, MAX_REPLY),
            "exception": "RuntimeError",
        }
    )


def _cut(text, cap, what):
    """``text`` with at most ``cap`` characters: head and tail kept, the middle said."""
    if not isinstance(text, str) or len(text) <= cap:
        return text
    half = cap // 2
    return "%s\n... [dockerrepl: %d characters of %s dropped] ...\n%s" % (
        text[:half],
        len(text) - cap,
        what,
        text[len(text) - (cap - half) :],
    )


# --------------------------------------------------------------------------- #
# framing (the same format as the host's dockerrepl._wire; duplicated because
# this file may import nothing from the host package)
# --------------------------------------------------------------------------- #
def encode(obj):
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )
    return HEADER.pack(len(body)) + body


def write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class FrameReader:
    """Incremental frame parser for a non-blocking fd or socket."""

    def __init__(self, limit):
        self.buf = bytearray()
        self.limit = limit

    def feed(self, data):
        self.buf += data

    def frames(self):
        out = []
        while len(self.buf) >= 4:
            (n,) = HEADER.unpack_from(self.buf)
            if n > self.limit:
                raise ValueError("frame of %d bytes over the limit" % n)
            if len(self.buf) < 4 + n:
                break
            body = bytes(self.buf[4 : 4 + n])
            del self.buf[: 4 + n]
            out.append(json.loads(body.decode("utf-8", "surrogatepass")))
        return out


def sock_send(sock, obj):
    sock.sendall(encode(obj))


def sock_recv(sock):
    """Blocking receive of one frame from the supervisor/worker socketpair."""
    head = _recv_n(sock, 4)
    if head is None:
        return None
    (n,) = HEADER.unpack(head)
    body = _recv_n(sock, n)
    if body is None:
        return None
    return json.loads(body.decode("utf-8", "surrogatepass"))


def _recv_n(sock, n):
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except InterruptedError:
            continue
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# =========================================================================== #
# worker side: the REPL namespace and the helpers visible inside it
# =========================================================================== #
CONFIG = {}  # set once per worker from the host's hello frame
_cell_id = 0
_budget_noted = False
_pool = None
#: Kept-alive connections to the proxy per process, shared by its threads (the host's
#: MAX_CONNECTIONS): a cell's 256 threads wait here for one, not in the host's backlog.
PROXY_POOL = 32


class _ProxyConnection:
    """A minimal kept-alive HTTP/1.1 client for the host proxy (pooled: _ProxyPool).

    http.client parses every response's headers with the email package; the
    proxy's answers are tiny and regular, so this reads status, Content-Length
    and the body, and sends each request in a single write.
    """

    def __init__(self, target):
        self.target = target
        self.sock = None
        self.rfile = None

    def connect(self, timeout):
        if self.target.get("unix"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.target["unix"])
        else:
            s = socket.create_connection(
                (self.target.get("host", "host.docker.internal"), int(self.target.get("port", 0))),
                timeout,
            )
            # without this, Nagle + delayed ACK add ~40 ms to every llm_query
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.rfile = s.makefile("rb")

    def close(self):
        for f in (self.rfile, self.sock):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self.sock = self.rfile = None

    def request(self, path, body, headers, timeout):
        if self.sock is None:
            self.connect(timeout)
        self.sock.settimeout(timeout)
        head = (
            "POST %s HTTP/1.1\r\nHost: dockerrepl\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n" % (path, len(body))
        )
        head += "".join("%s: %s\r\n" % kv for kv in headers.items()) + "\r\n"
        self.sock.sendall(head.encode("latin-1") + body)
        status_line = self.rfile.readline(8193)
        if not status_line:
            raise ConnectionResetError("the proxy closed the connection")
        parts = status_line.split(None, 2)
        status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
        length, close = 0, False
        while True:
            line = self.rfile.readline(8193)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            raise ConnectionResetError("the proxy closed the connection mid-answer")
        if close:
            self.close()
        return status, data


class _ProxyPool:
    """At most PROXY_POOL connections to the proxy, lent to one thread at a time.

    The host holds a thread and a descriptor for each open connection, so a cell's
    threads share a few instead of keeping one each. Idle ones are reused most
    recent first; the host may close idle ones (after a cell, or to make room), and
    a request that finds its connection closed is sent once more on a new one.
    """

    def __init__(self, target, size):
        import threading

        self.target = target
        self.pid = os.getpid()
        self.slots = threading.BoundedSemaphore(size)
        self.lock = threading.Lock()
        self.idle = []

    def get(self, timeout):
        if not self.slots.acquire(timeout=timeout):
            raise TimeoutError("no connection to the host proxy came free in %ss" % (timeout,))
        with self.lock:
            if self.idle:
                return self.idle.pop()
        return _ProxyConnection(self.target)

    def put(self, conn):
        if conn.sock is not None:
            with self.lock:
                self.idle.append(conn)
        self.slots.release()


def _proxy_pool():
    global _pool
    pool = _pool
    # a forked child must not share its parent's connections (or its lock states)
    if pool is None or pool.pid != os.getpid():
        pool = _pool = _ProxyPool(CONFIG.get("proxy") or {}, PROXY_POOL)
    return pool


def _post(path, payload, timeout):
    """POST JSON to the proxy; returns the decoded answer. Raises on transport errors."""
    body = json.dumps(payload).encode("utf-8", "surrogatepass")
    headers = {
        "Authorization": "Bearer " + CONFIG.get("token", ""),
        "X-DockerREPL-Cell": str(_cell_id),
    }
    pool = _proxy_pool()
    start = time.monotonic()
    conn = pool.get(timeout)
    try:
        timeout = max(0.001, timeout - (time.monotonic() - start))
        for attempt in (0, 1):
            reused = conn.sock is not None
            try:
                status, data = conn.request(path, body, headers, timeout)
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle kept-alive connection: retry once
                raise
            except BaseException:
                conn.close()  # a half-read answer would poison the next request
                raise
            try:
                return json.loads(data.decode("utf-8", "replace"))
            except ValueError:
                return {"error": "proxy answered HTTP %d with a non-JSON body" % status}
        return {"error": "unreachable"}
    finally:
        pool.put(conn)


def _note_budget(msg):
    global _budget_noted
    if isinstance(msg, str) and "budget exceeded" in msg and not _budget_noted:
        _budget_noted = True
        try:
            sys.stderr.write("dockerrepl: " + msg + "\n")
        except Exception:
            pass


def _single(path, prompt, model, timeout):
    try:
        d = _post(
            path, {"prompt": prompt, "model": model, "depth": CONFIG.get("depth", 1)}, timeout
        )
    except Exception as e:
        return "Error: %s" % (e,)
    if isinstance(d, dict) and isinstance(d.get("response"), str):
        return d["response"]
    err = d.get("error") if isinstance(d, dict) else d
    msg = "Error: %s" % (err,)
    _note_budget(msg)
    return msg


def _batched(path, prompts, model, timeout):
    try:
        prompts = list(prompts)
    except TypeError:
        return "Error: prompts must be a list"
    if not prompts:
        return []
    try:
        d = _post(
            path, {"prompts": prompts, "model": model, "depth": CONFIG.get("depth", 1)}, timeout
        )
    except Exception as e:
        return ["Error: %s" % (e,)] * len(prompts)
    if isinstance(d, dict) and isinstance(d.get("responses"), list):
        out = [r if isinstance(r, str) else "Error: %s" % (r,) for r in d["responses"]]
        for r in out:
            _note_budget(r)
        return out
    msg = "Error: %s" % (d.get("error") if isinstance(d, dict) else d,)
    _note_budget(msg)
    return [msg] * len(prompts)


def llm_query(prompt, model=None):
    """Ask the host's language model; returns its answer, or a string starting with "Error: "."""
    return _single("/llm_query", prompt, model, CONFIG.get("llm_timeout", 600))


def llm_query_batched(prompts, model=None):
    """Ask the host's language model several prompts concurrently; answers in prompt order."""
    return _batched("/llm_query_batched", prompts, model, CONFIG.get("llm_timeout", 600))


def rlm_query(prompt, model=None):
    """Recursive sub-call (a child RLM on the host); a plain llm_query when recursion is off."""
    return _single("/rlm_query", prompt, model, CONFIG.get("rlm_timeout", 3600))


def rlm_query_batched(prompts, model=None):
    """Several recursive sub-calls, concurrently; answers in prompt order."""
    return _batched("/rlm_query_batched", prompts, model, CONFIG.get("rlm_timeout", 3600))


def SHOW_VARS():
    """A short listing of the REPL's variables and their types."""
    ns = NS
    avail = {}
    for k, v in list(ns.items()):
        if k.startswith("_") or k in HIDDEN_LOCALS or k == "answer":
            continue
        if isinstance(v, types.ModuleType):
            continue
        avail[k] = type(v).__name__
    if not avail:
        return "No variables created yet. Use ```repl``` blocks to create variables."
    return "Available variables: %s" % (avail,)


_host_exceptions = {}


def _host_tool_stub(tool_name):
    def stub(*args, **kwargs):
        d = _post(
            "/host_tool",
            {"tool": tool_name, "args": list(args), "kwargs": kwargs},
            CONFIG.get("llm_timeout", 600),
        )
        if isinstance(d, dict) and "result" in d and "error" not in d:
            return d["result"]
        exc_name = (
            (d or {}).get("exception", "RuntimeError") if isinstance(d, dict) else "RuntimeError"
        )
        msg = (d or {}).get("error", "host tool failed") if isinstance(d, dict) else str(d)
        exc_args = d.get("args") if isinstance(d, dict) else None
        if not isinstance(exc_args, list):
            exc_args = [msg]
        import builtins

        cls = getattr(builtins, str(exc_name), None)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            cls = _host_exceptions.get(str(exc_name))
            if cls is None:
                # a class of that name (not importable in here); tracebacks show the bare name
                cls = type(str(exc_name), (RuntimeError,), {"__module__": "__main__"})
                _host_exceptions[str(exc_name)] = cls
        try:
            err = cls(*exc_args)
        except Exception:
            err = cls(msg)
        raise err

    stub.__name__ = tool_name
    stub.__qualname__ = tool_name
    stub.__doc__ = (
        "Calls the host function %r through the proxy (JSON arguments and result)." % tool_name
    )
    return stub


# --- bounded reprs for REPLResult.locals ----------------------------------- #
class _BoundedRepr(reprlib.Repr):
    def __init__(self, cap):
        reprlib.Repr.__init__(self)
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdeque = 30
        self.maxdict = 20
        self.maxset = self.maxfrozenset = 30
        self.maxstring = cap
        self.maxlong = cap
        self.maxother = cap

    # reprlib sorts sets, an O(n log n) cost per cell on big sets: show them unsorted
    def repr_set(self, x, level):
        return self._unsorted(x, level, "{", "}", self.maxset, "set()")

    def repr_frozenset(self, x, level):
        return self._unsorted(x, level, "frozenset({", "})", self.maxfrozenset, "frozenset()")

    def _unsorted(self, x, level, left, right, maxn, empty):
        if not x:
            return empty
        if level <= 0:
            return left + "..." + right
        import itertools

        pieces = [self.repr1(e, level - 1) for e in itertools.islice(x, maxn)]
        if len(x) > maxn:
            pieces.append("...")
        return left + ", ".join(pieces) + right

    def repr_instance(self, x, level):
        s = repr(x)
        return s


def bounded_repr(value, cap):
    try:
        if isinstance(value, (str, bytes, bytearray)):
            if len(value) > cap:
                # escapes (\x00, \U000e0001) make a repr up to 10x longer than its text
                return repr(value[:cap])[:cap] + "... (%d total)" % len(value)
            s = repr(value)
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            s = _BoundedRepr(cap).repr(value)
        else:
            s = repr(value)
        if not isinstance(s, str):
            s = "<%s with a non-str __repr__>" % type(value).__name__
    except BaseException as e:  # a broken __repr__ must not fail the cell
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        s = "<%s object; repr failed: %s: %s>" % (
            type(value).__name__[:200],
            type(e).__name__[:200],
            str(e)[:200],
        )
    if len(s) > cap:
        s = s[:cap] + "... (%d chars)" % len(s)
    return s


# --- the namespace ----------------------------------------------------------- #
NS = {}
_main_module = None
_file_backed = {}  # name -> (id(obj), path, kind): skipped by checkpoints, reloaded on restore
_compaction = {"list": None, "given": None, "ids": None}
_tools = {}  # name -> the callable custom tool, put back after every cell (as rlm does)
# what the host sent for compaction and tools, kept in the mount so a respawned
# worker (timeout kill, crash) gets them back: neither lives in the namespace
SCAFFOLD_FILE = os.path.join(STATE_DIR, "scaffold.json")
_scaffold_sent = {}
_known_bad = {}  # name -> id(obj) of values dill could not pickle


def _install_scaffold():
    g = globals()
    for name in SCAFFOLD_FUNCS:
        NS[name] = g[name]
    if not isinstance(NS.get("answer"), dict):
        NS["answer"] = {"content": "", "ready": False}
    if "context_0" in NS:
        NS["context"] = NS["context_0"]
    for name, obj in _tools.items():
        if NS.get(name) is not obj:
            NS[name] = obj
    if CONFIG.get("compaction"):
        canonical = _compaction["list"]
        if canonical is not None:
            current = NS.get("history")
            # healed when rebound, resized, or an entry replaced (cheap: identities only)
            if (
                current is None
                or current is not _compaction["given"]
                or len(current) != len(canonical)
                or [id(e) for e in current] != _compaction["ids"]
            ):
                import copy

                _compaction["given"] = copy.deepcopy(canonical)
                _compaction["ids"] = [id(e) for e in _compaction["given"]]
                NS["history"] = _compaction["given"]
    elif "history_0" in NS:
        NS["history"] = NS["history_0"]


def _new_namespace():
    global _main_module
    mod = types.ModuleType("__main__")
    mod.__dict__["__builtins__"] = (
        __builtins__ if isinstance(__builtins__, dict) else __builtins__.__dict__
    )
    sys.modules["__main__"] = mod
    _main_module = mod
    # NS is shared with SHOW_VARS; rebind module global
    globals()["NS"] = mod.__dict__
    return mod.__dict__


def _user_names():
    out = []
    for k, v in NS.items():
        # globals()[1] = ... puts a key that is not a str in the namespace
        if not isinstance(k, str) or k.startswith("_") or k in HIDDEN_LOCALS:
            continue
        out.append(k)
    return out


def _locals_snapshot():
    cap = CONFIG.get("repr_cap", 1000)
    names = _user_names()
    listed = [k for k in names if len(k) <= MAX_NAME][:MAX_LOCALS]
    if len(listed) < len(names):
        try:
            sys.stderr.write(
                "dockerrepl: locals lists %d of the %d names (at most %d, each at most %d"
                " characters long)\n" % (len(listed), len(names), MAX_LOCALS, MAX_NAME)
            )
            sys.stderr.flush()
        except BaseException:
            pass
    return {k: bounded_repr(NS[k], cap) for k in listed}


def _final_answer():
    ans = NS.get("answer")
    if isinstance(ans, dict) and ans.get("ready"):
        try:
            text = str(ans.get("content", ""))
        except BaseException as e:
            try:
                text = "<answer content could not be converted to str: %s>" % (e,)
            except BaseException:
                text = "<answer content could not be converted to str>"
        return _cut(text, FINAL_ANSWER_CAP, "the final answer")
    return None


def _print_exception(exc):
    tb = exc.__traceback__
    # drop the bootstrap's own frames at the top: users see their cell only
    while tb is not None and tb.tb_frame.f_code.co_filename == BOOT_FILE:
        tb = tb.tb_next
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:
        text = "%s: <unprintable exception>\n" % type(exc).__name__
    try:
        sys.stderr.write(text)
    except BaseException:
        os.write(2, text.encode("utf-8", "replace"))


def run_cell(code, cell_id):
    global _cell_id
    _cell_id = cell_id
    try:
        CHECKPOINTER.report()
    except Exception:
        pass
    if not isinstance(NS.get("answer"), dict):
        NS["answer"] = {"content": "", "ready": False}
    status, exc_name = "ok", None
    filename = "<cell-%d>" % cell_id
    try:
        try:
            compiled = compile(code, filename, "exec", dont_inherit=True)
        except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as e:
            status, exc_name = "error", type(e).__name__
            text = "".join(traceback.format_exception_only(type(e), e))
            sys.stderr.write(text)
        else:
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
            try:
                exec(compiled, NS)
            except SystemExit as e:
                status, exc_name = "error", "SystemExit"
                sys.stderr.write("SystemExit: %s\n" % ("" if e.code is None else e.code))
            except BaseException as e:
                status, exc_name = "error", type(e).__name__
                _print_exception(e)
    except KeyboardInterrupt:  # arrived between exec() and here
        status, exc_name = "error", "KeyboardInterrupt"
        sys.stderr.write("KeyboardInterrupt\n")
    finally:
        _flush_std()
    _install_scaffold()
    return {
        "status": status,
        "exception": exc_name,
        "locals": _locals_snapshot(),
        "final_answer": _final_answer(),
    }


def _flush_std():
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass


# --- checkpoints -------------------------------------------------------------- #
class _Counter:
    def write(self, b):
        return len(b)


def _dill():
    import dill

    return dill


_SCALARS = (str, bytes, int, float, complex, bool, type(None))


def _fingerprint():
    """Identity and content digest of a namespace made only of values that cannot
    change in place; ``None`` when any value is mutable (then every cell is
    snapshotted). str and bytes cache their hash, so a 100 MB string costs its
    hash once, not every cell.
    """
    fp = []
    for k in _user_names():
        v = NS[k]
        t = type(v)
        try:
            if t in _SCALARS or (
                t in (tuple, frozenset) and len(v) <= 64 and all(type(e) in _SCALARS for e in v)
            ):
                fp.append((k, t, id(v), hash(v)))
            elif t is types.ModuleType:
                fp.append((k, t, id(v)))
            elif t is types.FunctionType:
                fp.append((k, t, id(v), hash(v.__code__), id(v.__defaults__), id(v.__closure__)))
            elif (
                k == "answer"
                and t is dict
                and len(v) <= 8
                and all(type(e) in _SCALARS for e in v.values())
            ):
                fp.append((k, t, tuple(sorted((str(a), b) for a, b in v.items()))))
            else:
                return None
        except Exception:
            return None
    return tuple(fp)


def _checkpoint_state():
    state = {}
    file_backed = {}
    for k in _user_names():
        v = NS[k]
        fb = _file_backed.get(k)
        if fb is not None and fb[0] == id(v):
            file_backed[k] = [fb[1], fb[2]]
            continue
        if _known_bad.get(k) == id(v):
            continue
        if _tools.get(k) is v:
            continue  # reinstalled from scaffold.json on restore (host-tool stubs do not pickle)
        if k == "history" and CONFIG.get("compaction"):
            continue
        if k == "context" and "context_0" in NS and NS["context_0"] is v:
            continue
        if k == "history" and "history_0" in NS and NS["history_0"] is v:
            continue
        state[k] = v
    return state, file_backed


# Limits a cell may have lowered for its own process (and so for the snapshot
# children it forks): too small a file size or descriptor count would make every
# checkpoint fail, silently, until a crash lost everything since the last good one.
_WRITE_LIMITS = ("RLIMIT_FSIZE", "RLIMIT_NOFILE")


class _WritingConditions:
    """While writing state: umask 022, the cell's soft limits raised to their hard
    limits, SIGXFSZ ignored (an oversize write fails with EFBIG instead of killing).

    A cell's ``os.umask(0o777)`` made ``state.dill`` mode 000; with ``--cap-drop
    ALL`` not even root could read it back, and the next restore lost everything.
    """

    def __enter__(self):
        self.umask = os.umask(0o022)
        self.limits = []
        try:
            import resource
        except ImportError:
            resource = None
        for name in _WRITE_LIMITS if resource is not None else ():
            which = getattr(resource, name, None)
            if which is None:
                continue
            try:
                soft, hard = resource.getrlimit(which)
                if soft != hard:
                    resource.setrlimit(which, (hard, hard))
                    self.limits.append((resource, which, soft, hard))
            except (OSError, ValueError):
                pass
        try:
            self.xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except (AttributeError, ValueError, OSError):
            self.xfsz = None
        return self

    def __exit__(self, *exc):
        os.umask(self.umask)
        for resource, which, soft, hard in self.limits:
            try:
                resource.setrlimit(which, (soft, hard))
            except (OSError, ValueError):
                pass
        if self.xfsz is not None:
            try:
                signal.signal(signal.SIGXFSZ, self.xfsz)
            except (ValueError, OSError):
                pass
        return False


def _open_lock(path):
    """A lock file's descriptor; one it creates is made 0666 whatever the cell's umask
    (created 000, nobody could open it again: --cap-drop ALL leaves no DAC override)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        os.fchmod(fd, 0o666)
    except OSError:
        pass  # not ours (another uid made it): it was made right then
    return fd


def _open_for_write(path, binary):
    """A new file, mode 0644 whatever the umask (fchmod is not subject to it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        return os.fdopen(fd, "wb" if binary else "w")
    except BaseException:
        os.close(fd)
        raise


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read(64).strip() or 0)
    except (OSError, ValueError):
        return 0


def _order_of(meta):
    """The order key [epoch, seq] of a checkpoint's metadata; [-1, -1] (older than any)
    when it has none (an older bootstrap wrote it, or it is unreadable)."""
    order = meta.get("order")
    if (
        isinstance(order, list)
        and len(order) == 2
        and all(type(i) is int for i in order)  # not isinstance: True is no key
    ):
        return order
    return [-1, -1]


# the worker's order key: its epoch (0 until it claimed one) and its last snapshot's
# seq (never reset within a worker, also when a restore gives it a new epoch)
_ORDER = {"epoch": 0, "seq": 0}


def _claim_epoch():
    """Take an epoch above every one on disk (the caller holds LOCK_FILE exclusively,
    or gave up waiting for it). Snapshots of earlier workers, still on their way, then
    drop themselves, and this worker's snapshots replace whatever the disk holds: a
    worker that restored the checkpoint of cell K writes cell K+1 over a "newer"
    file an earlier worker's late snapshot may have left."""
    epoch = max(_read_int(EPOCH_FILE), _order_of(_read_meta())[0], _ORDER["epoch"]) + 1
    # seq goes on counting: the snapshot children compare seqs alone (_Wanted)
    _ORDER["epoch"] = epoch
    tmp = "%s.tmp.%d" % (EPOCH_FILE, os.getpid())
    try:
        with _WritingConditions(), _open_for_write(tmp, False) as f:
            f.write("%d\n" % epoch)
        os.replace(tmp, EPOCH_FILE)
    except OSError:
        # not written: this worker's snapshots still win on disk (their epoch is the
        # highest); only an earlier worker's late snapshot is no longer stopped
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _start_epoch(wait=10.0):
    """``_claim_epoch`` under the lock, for a worker that restores nothing (the first
    one, or one whose restore failed): its first snapshot must replace whatever an
    earlier session left in a reused workspace."""
    try:
        lock = _open_lock(LOCK_FILE)
    except OSError:
        lock = None  # the epoch is still taken, in memory: this worker's writes win
    try:
        if lock is not None:
            _lock_exclusive(lock, deadline=time.time() + wait)
        _claim_epoch()
    finally:
        if lock is not None:
            os.close(lock)


def _next_order():
    _ORDER["seq"] += 1
    return [_ORDER["epoch"], _ORDER["seq"]]


def _superseded(order):
    """Whether a write with ``order`` would go backwards: a newer worker has taken an
    epoch, or the checkpoint on disk is as new or newer. Asked under LOCK_FILE."""
    if _read_int(EPOCH_FILE) > order[0]:
        return True
    return _order_of(_read_meta()) >= order


def _lock_exclusive(fd, deadline=None, give_up=None):
    """flock(LOCK_EX) on ``fd``: True once held; False at ``deadline`` or as soon as
    ``give_up()`` says so (asked between tries, every 2 ms)."""
    if deadline is None and give_up is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        if give_up is not None and give_up():
            return False
        if deadline is not None and time.time() > deadline:
            return False
        time.sleep(0.002)


def _remove_dead_writers_files():
    """Temporary state files exist only while their writer holds LOCK_FILE: one seen
    under the lock is a killed writer's (out of memory, a kill of its pid)."""
    prefix = os.path.basename(STATE_FILE) + ".tmp."
    try:
        names = os.listdir(WORKSPACE)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(WORKSPACE, name))
            except OSError:
                pass


def write_checkpoint(state, file_backed, cell_id, order, give_up=None):
    """Dump ``state`` to STATE_FILE atomically unless a newer checkpoint is on disk.

    Returns the names that were skipped, or None when nothing was written: the
    disk already holds a newer checkpoint, a newer worker has started, or
    ``give_up()`` said, while this waited for the lock, that a newer snapshot is
    on its way.
    """
    with _WritingConditions():
        return _write_checkpoint(state, file_backed, cell_id, order, give_up)


def _write_checkpoint(state, file_backed, cell_id, order, give_up):
    dill = _dill()
    skipped = [k for k, i in _known_bad.items() if k in NS and id(NS[k]) == i]
    lock = _open_lock(LOCK_FILE)
    try:
        if not _lock_exclusive(lock, give_up=give_up):
            return None
        if give_up is not None and give_up():
            return None  # the newer snapshot will write; this one's dump would be wasted
        # Writers take the lock in no particular order (the first snapshot child of
        # a worker imports dill itself and comes late): the order key, checked
        # under the lock, is what keeps an older state from replacing a newer one.
        if _superseded(order):
            return None
        _remove_dead_writers_files()
        tmp = "%s.tmp.%d" % (STATE_FILE, os.getpid())
        meta_tmp = META_FILE + ".tmp"
        try:
            try:
                with _open_for_write(tmp, True) as f:
                    dill.dump(state, f, recurse=True)
            except Exception:
                bad = []
                for k, v in list(state.items()):
                    try:
                        dill.dump(v, _Counter(), recurse=True)
                    except Exception:
                        bad.append(k)
                if not bad:
                    raise  # not a value dill cannot pickle: the write itself failed
                for k in bad:
                    state.pop(k, None)
                skipped.extend(bad)
                with _open_for_write(tmp, True) as f:
                    dill.dump(state, f, recurse=True)
            meta = {
                "cell": cell_id,
                "order": order,
                "skipped": sorted(set(skipped)),
                "file_backed": file_backed,
                "time": time.time(),
                "bad_ids": {k: id(NS[k]) for k in skipped if k in NS},
            }
            with _open_for_write(meta_tmp, False) as f:
                json.dump(meta, f)
            # asked again right before the replace: a restore that gave up waiting
            # for the lock may have taken a new epoch during the dump
            if _superseded(order):
                return None
            os.replace(tmp, STATE_FILE)
            os.replace(meta_tmp, META_FILE)
        finally:
            for path in (tmp, meta_tmp):
                if os.path.exists(path):
                    os.unlink(path)
    finally:
        os.close(lock)
    return sorted(set(skipped))


class _Wanted:
    """The seq of the worker's newest snapshot, in memory its snapshot children share
    (an anonymous shared mapping made before the first fork).

    A snapshot child waiting for the lock behind another writer gives up as soon as
    a newer one is on its way: it would only write a state the newer one replaces.
    """

    def __init__(self):
        self.map = None

    def set(self, seq):
        if self.map is None:
            try:
                import mmap

                self.map = mmap.mmap(-1, 8)
            except (ImportError, OSError, ValueError):
                return  # then no child gives up: each writes in turn, in order
        self.map[0:8] = struct.pack("=q", seq)

    def newer_than(self, seq):
        """For a child: whether a newer snapshot than ``seq`` is on its way. Read until
        two reads agree (the worker may be writing the value right now)."""
        if self.map is None:
            return False
        last = None
        while True:
            value = struct.unpack("=q", self.map[0:8])[0]
            if value == last:
                return value > seq
            last = value


class _Checkpointer:
    """Background snapshots, in order, converging on the last completed cell.

    Each completed cell forks a copy-on-write snapshot of the namespace at that
    cell boundary; the cell itself never waits for a write. Children write one
    at a time (LOCK_FILE); one that waits for its turn and sees a newer snapshot
    on its way exits (coalescing), and one whose state is older than the file on
    disk writes nothing (see ``write_checkpoint``). The file on disk converges on
    the last completed cell even while the worker is busy with the next one.
    """

    def __init__(self):
        self.last_fp = None
        # snapshot child pid -> (the cell it snapshots, its seq, its error pipe)
        self.cells = {}
        # the newest snapshot that ended, as (seq, cell, None) or (seq, cell, why it failed)
        self.outcome = None
        self.told = False  # a failure was reported since the last good snapshot
        self.wanted = _Wanted()

    def reap(self, block=False):
        for pid in list(self.cells):
            try:
                done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                done, status = pid, None
            if done:
                self._learn_bad()
                self._record(pid, status)

    def _record(self, pid, status):
        cell, seq, fd = self.cells.pop(pid)
        why = _child_error(fd)
        if status is not None and os.WIFEXITED(status):
            if os.WEXITSTATUS(status) == SNAPSHOT_DROPPED:
                return  # a newer snapshot is on disk or on its way: not an outcome
            if os.WEXITSTATUS(status) == 0:
                why = None
        if status is not None and status != 0:
            why = why or _describe_status(status)
        newest = self.outcome[0] if self.outcome else -1
        if seq >= newest:
            self.outcome = (seq, cell, why)
            if why is None:
                self.told = False
        if why is not None:
            self.last_fp = None  # try again after the next cell, changed or not

    def report(self):
        """Say in the cell's stderr that the newest snapshot failed: once per run of
        failures (a limit the cell set fails every snapshot after it)."""
        self.reap()
        if not self.outcome or self.outcome[2] is None or self.told:
            return
        self.told = True
        _, cell, why = self.outcome
        good = _read_meta().get("cell")
        sys.stderr.write(
            "dockerrepl: the checkpoint after cell %s failed (%s); a crash now would restore"
            " %s\n" % (cell, why, "the one after cell %s" % good if good is not None else "nothing")
        )

    def _learn_bad(self):
        try:
            with open(META_FILE) as f:
                meta = json.load(f)
            for k, i in (meta.get("bad_ids") or {}).items():
                _known_bad[k] = i
        except Exception:
            pass

    def request(self, cell_id):
        self.reap()
        fp = _fingerprint()
        if fp is not None and fp == self.last_fp:
            return  # nothing can have changed since the last snapshot: skip the fork
        self.last_fp = fp
        order = _next_order()
        state, fb = _checkpoint_state()
        _flush_std()
        pending = _open_lock(PENDING_FILE)
        err_r = err_w = None
        try:
            if self.wanted.map is None:
                self.wanted.set(0)  # mapped before the fork, so the child shares it
            err_r, err_w = os.pipe()
            fcntl.flock(pending, fcntl.LOCK_SH)
            pid = os.fork()
        except OSError:
            # no process left under the pids limit (a flood the cell left behind), or
            # no memory: skip this snapshot, the next completed cell tries again. The
            # worker must not die for it: its namespace is newer than any checkpoint.
            for fd in (pending, err_r, err_w):
                if fd is not None:
                    os.close(fd)
            self.last_fp = None
            return
        except BaseException:
            for fd in (pending, err_r, err_w):
                if fd is not None:
                    os.close(fd)
            raise
        if pid == 0:  # the child: a copy-on-write snapshot of the namespace
            code = 1
            os.close(err_r)
            try:
                if _CTRL[0] is not None:
                    _CTRL[0].close()  # so the supervisor sees EOF if the worker dies
                # its own process group: killing a runaway worker must not kill the snapshot
                os.setpgid(0, 0)
                _set_comm(SNAPSHOT_COMM)  # a name for `docker top`; it grants nothing
                try:
                    os.nice(10)  # cells come first; the snapshot uses what is left
                except Exception:
                    pass
                wanted = self.wanted
                done = write_checkpoint(
                    state, fb, cell_id, order, give_up=lambda: wanted.newer_than(order[1])
                )
                code = SNAPSHOT_DROPPED if done is None else 0
            except BaseException as e:
                code = 1
                _note_child_error(err_w, e)
            finally:
                os._exit(code)
        os.close(pending)  # the child's copy of the descriptor keeps the lock
        os.close(err_w)
        os.set_inheritable(err_r, False)
        self.cells[pid] = (cell_id, order[1], err_r)
        _report_snapshot(pid)
        # only now that the child exists: an older child that gives up for it must
        # be sure a newer snapshot is really on its way
        self.wanted.set(order[1])
        if "dill" not in sys.modules:
            # once per worker, after the first snapshot is on its way: later
            # snapshot children inherit dill and land in ~5 ms instead of ~50 ms
            # (importing it is most of a small snapshot's time), which shrinks the
            # window in which a killed container loses the last completed cell
            try:
                _dill()
            except Exception:
                pass

    def sync_changed(self, cell_id):
        """``sync`` unless nothing can have changed; a failure is reported in stderr."""
        fp = _fingerprint()
        if fp is not None and fp == self.last_fp:
            return
        try:
            self.sync(cell_id)
        except Exception as e:
            self.last_fp = None
            sys.stderr.write("dockerrepl: the checkpoint failed: %s: %s\n" % (type(e).__name__, e))
            _flush_std()

    def sync(self, cell_id):
        """Write the namespace now, in this process. Snapshot children still waiting
        give up (this one is newer); one that is writing is waited for (the lock)."""
        self.reap()
        order = _next_order()
        self.wanted.set(order[1])
        self.last_fp = _fingerprint()
        state, fb = _checkpoint_state()
        skipped = write_checkpoint(state, fb, cell_id, order)
        self.reap()
        if skipped is None:
            self.last_fp = None
            raise RuntimeError(
                "not written: a newer checkpoint is on disk (another worker wrote to %s)"
                % STATE_FILE
            )
        for k in skipped:
            if k in NS:
                _known_bad[k] = id(NS[k])
        return skipped


def _report_snapshot(pid):
    """Tell the supervisor a snapshot writer was forked, so its sweep spares it."""
    try:
        if _CTRL[0] is not None:
            sock_send(_CTRL[0], {"type": "snapshot", "pid": pid})
    except OSError:
        pass


def _note_child_error(fd, exc):
    """In a snapshot child that failed: the reason, through a pipe to the worker (a
    pipe, not a file: the file size limit that failed the snapshot applies to files)."""
    try:
        text = ("%s: %s" % (type(exc).__name__, exc))[:500]
        os.write(fd, text.encode("utf-8", "replace"))
    except BaseException:
        pass


def _child_error(fd):
    """What the snapshot child wrote to its pipe (it has exited: no wait)."""
    try:
        return os.read(fd, 2000).decode("utf-8", "replace") or None
    except OSError:
        return None
    finally:
        os.close(fd)


def _describe_status(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return "its writer was killed by signal %d%s" % (
            sig,
            ", out of memory?" if sig == signal.SIGKILL else "",
        )
    return "its writer exited with status %d" % os.WEXITSTATUS(status)


def _set_comm(name):
    """Name this process (``/proc/self/comm``, 15 bytes at most); best effort."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


def _read_meta():
    try:
        with open(META_FILE) as f:
            return json.load(f)
    except Exception:
        return {}


def restore_checkpoint(expect_cell=0, wait=60.0):
    """Load the last checkpoint into NS; returns (cell_id or None, note).

    Snapshots of later cells may still be on their way in the old worker's
    children: wait (bounded) until none is pending. Then, under the lock, this
    worker takes a new epoch (see EPOCH_FILE): what it writes from now on
    replaces what it restored, and a snapshot of an earlier worker that is
    still late after the wait writes nothing.
    """
    deadline = time.time() + wait
    late = False
    pending = _open_lock(PENDING_FILE)
    try:
        while True:
            try:
                fcntl.flock(pending, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.time() > deadline:
                    late = True
                    break
                time.sleep(0.01)
    finally:
        os.close(pending)
    lock = _open_lock(LOCK_FILE)
    try:
        _lock_exclusive(lock, deadline=deadline)
        _claim_epoch()
        if not os.path.exists(STATE_FILE):
            return None, "no checkpoint existed; the namespace starts empty"
        meta = _read_meta()
        for name, (path, kind) in (meta.get("file_backed") or {}).items():
            try:
                _load_file_var(name, path, kind)
            except Exception:
                pass
        dill = _dill()
        with open(STATE_FILE, "rb") as f:
            state = dill.load(f)
        NS.update(state)
    finally:
        os.close(lock)
    skipped = meta.get("skipped") or []
    note = "state restored from the checkpoint taken after cell %s" % meta.get("cell", "?")
    have = meta.get("cell")
    if isinstance(have, int) and isinstance(expect_cell, int) and have < expect_cell and not late:
        note += "; changes made by cells %d-%d, if any, are not in it" % (have + 1, expect_cell)
    if late:
        note += " (a later snapshot was still being written after %ds;" % wait
        note += " changes up to cell %s may be lost)" % expect_cell
    if skipped:
        note += "; not restorable (dill cannot pickle them): %s" % ", ".join(skipped)
    return meta.get("cell"), note


def _load_file_var(name, path, kind):
    full = os.path.join(WORKSPACE, path)
    if kind == "json":
        with open(full, "rb") as f:
            value = json.loads(f.read().decode("utf-8", "surrogatepass"))
    else:
        with open(full, "rb") as f:
            value = f.read().decode("utf-8", "surrogatepass")
    NS[name] = value
    _file_backed[name] = (id(value), path, kind)
    return value


# --- worker operations (host "call" frames) --------------------------------- #
def op_load_file(args):
    name = args["name"]
    _load_file_var(name, args["path"], args.get("kind", "text"))
    for alias in args.get("aliases") or ():
        NS[alias] = NS[name]
    return {"name": name}


def op_set_vars(args):
    for k, v in (args.get("values") or {}).items():
        NS[k] = v
    return {}


def _save_scaffold(key, value):
    _scaffold_sent[key] = value
    tmp = SCAFFOLD_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_scaffold_sent, f)
    os.replace(tmp, SCAFFOLD_FILE)


def _reload_scaffold():
    """After a respawn: the compaction list and the callable tools, as last sent."""
    try:
        with open(SCAFFOLD_FILE) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    _scaffold_sent.update(saved)
    if "compaction" in saved:
        _compaction["list"] = saved["compaction"]
        _compaction["given"] = None
    if "tools" in saved:
        _define_tools(saved["tools"], restoring=True)


def op_compaction(args):
    _compaction["list"] = args.get("history") or []
    _compaction["given"] = None
    _save_scaffold("compaction", _compaction["list"])
    _install_scaffold()
    return {}


def op_reset_answer(args):
    NS["answer"] = {"content": "", "ready": False}
    return {}


def op_define_tools(args):
    """Install custom tools: code strings exec'd, data set, host tools as stubs."""
    tools = args.get("tools") or {}
    _define_tools(tools, restoring=False)
    _save_scaffold("tools", tools)
    return {}


def _define_tools(tools, restoring):
    for name, spec in tools.items():
        kind = spec.get("kind")
        if kind == "code":
            NS.pop(name, None)
            exec(compile(spec["code"], "<tool %s>" % name, "exec", dont_inherit=True), NS)
            if name not in NS:
                raise ValueError("custom tool %r: its code did not define %r" % (name, name))
        elif kind == "expr":
            NS[name] = eval(
                compile(spec["code"], "<tool %s>" % name, "eval", dont_inherit=True), NS
            )
        elif kind == "data":
            # data is the model's to change; a restore keeps what the checkpoint had
            if not restoring or name not in NS:
                NS[name] = spec["value"]
            continue
        elif kind == "host":
            NS[name] = _host_tool_stub(name)
        else:
            continue
        if callable(NS.get(name)):
            _tools[name] = NS[name]


def op_checkpoint(args):
    return {"skipped": CHECKPOINTER.sync(args.get("cell", _cell_id)), "path": STATE_FILE}


def op_restore(args):
    cell, note = restore_checkpoint()
    _install_scaffold()
    return {"cell": cell, "note": note}


def op_names(args):
    return {"names": _user_names()}


OPS = {
    "load_file": op_load_file,
    "set_vars": op_set_vars,
    "compaction": op_compaction,
    "reset_answer": op_reset_answer,
    "define_tools": op_define_tools,
    "checkpoint": op_checkpoint,
    "restore": op_restore,
    "names": op_names,
}

CHECKPOINTER = _Checkpointer()
_CTRL = [None]


def worker_main(ctrl, config, restore, expect_cell=0):
    """Entry point of the forked worker process."""
    CONFIG.update(config)
    _CTRL[0] = ctrl
    _new_namespace()
    lib = os.path.join(HERE, "lib")
    if os.path.isdir(lib) and lib not in sys.path:
        sys.path.append(lib)  # after the image's own site-packages: the image's dill wins
    os.chdir(WORKSPACE)
    sys.stdin = open(os.devnull)
    enc = {"encoding": "utf-8", "errors": "backslashreplace", "line_buffering": True}
    import io

    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), **enc)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), **enc)
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
    # the supervisor's wake-up pipe and SIGCHLD handler are not the worker's business
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    note = None
    if not restore:
        _start_epoch()
    if restore:
        # SIGINT stays ignored (inherited from the supervisor) until the namespace
        # is back: an interrupted restore would leave an empty namespace
        try:
            _, note = restore_checkpoint(expect_cell)
        except BaseException as e:
            note = "restoring the checkpoint failed (%s: %s); the namespace starts empty" % (
                type(e).__name__,
                e,
            )
            try:
                # keep it from being overwritten by the next (empty) checkpoint
                os.replace(STATE_FILE, STATE_FILE + ".unrestorable")
                note += "; the file was kept as state.dill.unrestorable"
            except OSError:
                pass
        try:
            _reload_scaffold()
        except Exception as e:
            note = (note or "") + "; custom tools could not be reinstalled (%s: %s)" % (
                type(e).__name__,
                e,
            )
    if _ORDER["epoch"] == 0:
        _start_epoch()  # the restore failed before it took one
    _install_scaffold()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sock_send(ctrl, {"type": "started", "pid": os.getpid(), "note": note})
    auto = config.get("auto_checkpoint", True)
    while True:
        try:
            msg = sock_recv(ctrl)
        except KeyboardInterrupt:
            continue  # a late interrupt for a cell that already finished
        if msg is None:
            os._exit(0)
        try:
            kind = msg.get("type")
            if kind == "exec":
                res = run_cell(msg.get("code", ""), int(msg.get("id", 0)))
                res["type"] = "done"
                res["id"] = msg.get("id")
                if auto == "sync" and res["status"] in ("ok", "error"):
                    # durable before the result: a container killed right after the
                    # cell still restores it (costs the dump, on changed namespaces)
                    CHECKPOINTER.sync_changed(int(msg.get("id", 0)))
                sock_send(ctrl, res)
                if auto is True and res["status"] in ("ok", "error"):
                    CHECKPOINTER.request(int(msg.get("id", 0)))
            elif kind == "reap":
                reap_children(msg.get("pids") or [])
            elif kind == "call":
                fn = OPS.get(msg.get("op"))
                try:
                    if fn is None:
                        raise ValueError("unknown operation %r" % (msg.get("op"),))
                    value = fn(msg.get("args") or {})
                    reply = {"type": "reply", "id": msg.get("id"), "ok": True, "value": value}
                except BaseException as e:
                    if isinstance(e, SystemExit):
                        e = RuntimeError("SystemExit during %s" % msg.get("op"))
                    reply = {
                        "type": "reply",
                        "id": msg.get("id"),
                        "ok": False,
                        "error": "%s: %s" % (type(e).__name__, e),
                        "exception": type(e).__name__,
                    }
                _flush_std()
                sock_send(ctrl, reply)
                if (
                    auto
                    and reply["ok"]
                    and msg.get("op") in ("load_file", "set_vars", "define_tools")
                ):
                    CHECKPOINTER.request(_cell_id)
        except KeyboardInterrupt:
            # the interrupt raced the reply; tell the supervisor the cell is over
            try:
                sock_send(
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


# =========================================================================== #
# supervisor side
# =========================================================================== #
class OutputBuffer:
    """Keeps the head and tail of a stream up to ``cap`` bytes; counts the rest."""

    def __init__(self, cap):
        self.cap = cap
        self.reset()

    def reset(self):
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0
        self.total = 0

    def add(self, data):
        self.total += len(data)
        half = self.cap // 2
        room = half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.cap - half:
                cut = len(self.tail) - (self.cap - half)
                del self.tail[:cut]
                self.dropped += cut

    def text(self):
        if not self.dropped:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        return "%s\n... [dockerrepl: %d bytes of output dropped] ...\n%s" % (
            bytes(self.head).decode("utf-8", "replace"),
            self.dropped,
            bytes(self.tail).decode("utf-8", "replace"),
        )


class Supervisor:
    def __init__(self):
        self.config = {}
        self.host_reader = FrameReader(MAX_HOST_FRAME)
        self.worker_pid = None
        self.ctrl = None
        self.ctrl_reader = None
        self.out_r = self.err_r = None
        self.worker_started = False
        self.current = None  # the request the worker is busy with
        self.deadline = None
        self.kill_at = None
        self.interrupted = False
        self.restart_note = None
        self.out = self.err = None
        self.streamed = 0
        self.last_good_cell = 0
        self.timeout_s = None  # the current cell's timeout; its clock starts once the worker runs
        # SIGCHLD wakes select() through this pipe (PEP 475 retries EINTR)
        self.wake_r = self.wake_w = None
        self.kill_reason = None  # why the supervisor killed the worker, for the cell's note
        self.worker_status = None  # the worker's wait status, when reap_orphans collected it
        self.ack_at = None  # when to tell the host that a still-running cell did arrive
        # snapshot writers the worker reported: [(pid, start time)], newest last
        self.snapshots = []
        self.spared_until = None  # when the writers a sweep spared are killed

    # -- host channel --
    def send_host(self, obj):
        write_all(1, encode(obj))

    # -- worker lifecycle --
    def spawn_worker(self, restore):
        if self.out_r is None:
            self.out_r, out_w = os.pipe()
            self.err_r, err_w = os.pipe()
            self._pipe_w = (out_w, err_w)
            for fd in (self.out_r, self.err_r):
                fl = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        out_w, err_w = self._pipe_w
        parent, child = socket.socketpair()
        try:
            pid = os.fork()
        except OSError:
            # the pids limit is full of what earlier cells left behind: clear it and
            # try once more (if that fails too, this process exits, the container
            # with it, and the host starts a fresh one)
            self.sweep()
            time.sleep(0.1)
            self.reap_orphans()  # as pid 1, the killed orphans' pids are ours to free
            pid = os.fork()
        if pid == 0:
            try:
                parent.close()
                os.setpgid(0, 0)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                # Nothing of the supervisor's may stay open in the worker (the host
                # channel was fds 0/1 until the dup2s above), and only then can the
                # worker be dumpable again: a non-dumpable worker's /proc/self files
                # belong to root, so as a non-root user it could not name its snapshot
                # children (/proc/self/comm), read /proc/self/environ, or let its own
                # children read its /proc entries. The supervisor stays non-dumpable.
                _close_fds_except({0, 1, 2, child.fileno()})
                if NONDUMPABLE[0]:
                    _set_dumpable(1)
                child.set_inheritable(False)
                worker_main(child, self.config, restore, self.last_good_cell)
            except BaseException:
                try:
                    traceback.print_exc()
                except BaseException:
                    pass
            os._exit(70)
        child.close()
        try:
            # the child does this too; doing it here as well closes the race in which
            # a kill (stdin closed right after start) comes before the child's setpgid:
            # killpg then found no group and the supervisor waited for ever
            os.setpgid(pid, pid)
        except OSError:
            pass
        self.worker_pid = pid
        self.worker_status = None
        self.ctrl = parent
        self.ctrl.setblocking(False)
        self.ctrl_reader = FrameReader(1 << 30)
        self.worker_started = False

    # -- the sweep --
    def note_snapshot(self, pid):
        """The worker forked a snapshot writer. Cell code can send this frame too,
        naming its own children: so only a child of the worker counts, only the
        newest MAX_SPARED are kept, and a sweep spares them for SNAPSHOT_SPARE s."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
            return
        st = _proc_stat(pid)
        if st is None or self.worker_pid is None or st[0] != self.worker_pid:
            return
        self.snapshots = (self.snapshots + [(pid, st[1])])[-MAX_SPARED:]

    def sweep(self, spare=None):
        """sweep_processes, sparing the reported snapshot writers for a bounded time."""
        keep = [(pid, start) for pid, start in self.snapshots if _proc_start(pid) == start]
        self.snapshots = keep
        killed = sweep_processes(spare=spare, keep=keep)
        if keep and self.spared_until is None:
            self.spared_until = time.monotonic() + SNAPSHOT_SPARE
        return killed

    def kill_spared(self):
        """Kill the snapshot writers a sweep spared (matched by pid and start time)."""
        if self.spared_until is None:
            return
        for pid, start in self.snapshots:
            if _proc_start(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.snapshots = []
        self.spared_until = None

    def kill_worker(self):
        if self.worker_pid is None:
            return None
        self.sigkill_worker()
        status = self.reap_worker(block=True)
        return status

    def sigkill_worker(self):
        """SIGKILL the worker's process group and the worker itself.

        Both: cell code can move the worker out of its group (``setpgid``) while a
        child stays in it; killing only the group then succeeded without reaching
        the worker, and the blocking wait for it never returned (the container
        outlived its host, and timeouts waited for the host's margin).
        """
        for kill, target in ((os.killpg, self.worker_pid), (os.kill, self.worker_pid)):
            try:
                kill(target, signal.SIGKILL)
            except OSError:
                pass  # no such group (or worker) any more

    def reap_worker(self, block):
        if self.worker_pid is None:
            return None
        status, self.worker_status = self.worker_status, None
        if status is None:
            try:
                pid, status = os.waitpid(self.worker_pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                pid, status = self.worker_pid, 0
            if not pid:
                return None
        self.worker_pid = None
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        return status

    def reap_orphans(self):
        """As pid 1 (``docker run`` without ``--init``), collect every exited child.

        Processes the worker leaves behind (``setsid`` forks, snapshot writers of a
        killed worker) are re-parented to pid 1; until it waits for them they stay
        zombies and hold pids under the pids limit. The worker's own status is kept
        for :meth:`reap_worker`.
        """
        if os.getpid() != 1:
            return
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            if pid == self.worker_pid and self.worker_status is None:
                self.worker_status = status

    # -- request handling --
    def start_request(self, msg):
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
        self.interrupted = False
        self.kill_at = None
        self.kill_reason = None
        self.timeout_s = _positive(msg.get("timeout"))
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

    def start_clock(self):
        if self.timeout_s is not None:
            self.deadline = time.monotonic() + self.timeout_s

    def progress(self, state):
        """Tell the host how a request is doing (a restore may take longer than its margin)."""
        if self.current is not None:
            self.send_host({"type": "progress", "id": self.current.get("id"), "state": state})

    def forward(self, msg):
        try:
            sock_send_blocking(self.ctrl, msg)
        except OSError:
            pass  # the worker died; its EOF is handled by the loop

    def on_worker_frame(self, msg):
        # Cell code can write to the worker's end of this socket (it is in the
        # worker's memory, and children inherit it): a frame is taken only where
        # the worker itself would send it, and what it carries is bounded.
        kind = msg.get("type")
        if kind == "snapshot":
            self.note_snapshot(msg.get("pid"))
            return
        if kind == "started":
            if self.worker_started:
                return  # once per worker: a repeat would restart the clock and re-send
            self.worker_started = True
            if msg.get("note"):
                self.restart_note = str(msg.get("note"))[:MAX_NOTES]
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
            write_all(1, _clean_reply(msg))

    def finish_cell(self, msg, status=None, note=None):
        req = self.current
        self.current = None
        self.deadline = self.kill_at = self.ack_at = None
        st = status or msg.get("status", "ok")
        if not status and st not in ("ok", "error"):
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
        if st != "ok" and _in_container() and _pids_exhausted():
            # a flood left no process slots: nothing could fork, not even a snapshot
            killed = self.sweep(spare=self.worker_pid)
            self.reap_orphans()
            mine = [pid for pid, ppid in killed if ppid == self.worker_pid]
            if mine and self.ctrl is not None:
                # the worker is their parent: until it reaps them they hold their pids
                self.forward({"type": "reap", "pids": mine})
            notes.append(
                "dockerrepl: the container had run out of processes (pids limit);"
                " %d left-over processes were killed" % len(killed)
            )
        if self.restart_note:
            notes.append("dockerrepl: " + self.restart_note)
            self.restart_note = None
        if notes:
            text = _cut("\n".join(notes), MAX_NOTES, "notes")
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
            "locals": _clean_locals(msg.get("locals"), int(self.config.get("repr_cap", 1000))),
            "final_answer": _cut(answer, FINAL_ANSWER_CAP, "the final answer")
            if isinstance(answer, str)
            else None,
            "truncated": {"stdout": self.out.dropped, "stderr": self.err.dropped},
        }
        self.out.reset()
        self.err.reset()
        self.send_host(result)

    def worker_died(self, status):
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
        oom = _oom_suspected()
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
            if st in ("timeout", "interrupted"):
                # a cell that had to be killed may have left processes outside its group
                self.sweep()
                self.reap_orphans()
            self.spawn_worker(restore=True)
            self.progress("restoring")
            # wait for the new worker to come up so the note can say what was restored
            note = self.wait_started()
            # the restore has waited for the snapshot writers the sweep spared: they
            # are done, or too late to be waited for
            self.kill_spared()
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
            if req.get("type") == "exec":
                self.current = req
                self.finish_cell(
                    {
                        "status": st,
                        "exception": None,
                        "locals": self.names_locals(),
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

    def names_locals(self):
        return {}

    def wait_started(self):
        """Block until a freshly spawned worker sends 'started' (bounded)."""
        end = time.monotonic() + 120
        while time.monotonic() < end and self.ctrl is not None:
            if self.spared_until is not None and time.monotonic() >= self.spared_until:
                self.kill_spared()  # a restore slower than that does not extend their time
            r, _, _ = select.select([self.ctrl, self.out_r, self.err_r], [], [], 0.5)
            if self.out_r in r or self.err_r in r:
                self.drain_output()
            if self.ctrl in r:
                try:
                    data = self.ctrl.recv(1 << 16)
                except BlockingIOError:
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

    def drain_output(self):
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

    def on_output(self, buf, name, data):
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
    def on_timer(self):
        now = time.monotonic()
        if self.ack_at is not None and now >= self.ack_at:
            self.ack_at = None
            self.progress("accepted")
        if self.spared_until is not None and now >= self.spared_until:
            self.kill_spared()
        if self.current is None or self.worker_pid is None:
            return
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = now + 3600  # once
            self.sigkill_worker()
            return
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            self.interrupt("timeout")

    def interrupt(self, why):
        if self.worker_pid is None or self.current is None or not self.worker_started:
            return  # nothing runs yet (a restore): the cell can be interrupted once it does
        self.interrupted = why
        try:
            os.kill(self.worker_pid, signal.SIGINT)
        except OSError:
            pass
        self.kill_at = time.monotonic() + float(self.config.get("grace", 2.0))

    def next_timeout(self):
        t = [
            x
            for x in (self.deadline, self.kill_at, self.ack_at, self.spared_until)
            if x is not None
        ]
        if not t:
            return None
        return max(0.0, min(t) - time.monotonic())

    # -- main loop --
    def handle_host(self, msg):
        if not isinstance(msg, dict):
            self.send_host({"type": "error", "id": None, "error": "a message must be an object"})
            return
        kind = msg.get("type")
        if kind == "exec" and not isinstance(msg.get("code"), str):
            self.send_host({"type": "error", "id": msg.get("id"), "error": "exec needs str code"})
        elif kind == "call" and not isinstance(msg.get("op"), str):
            self.send_host({"type": "error", "id": msg.get("id"), "error": "call needs a str op"})
        elif kind in ("exec", "call"):
            self.start_request(msg)
        elif kind == "interrupt":
            self.interrupt("interrupt")
        elif kind == "ping":
            self.send_host({"type": "pong", "id": msg.get("id"), "busy": self.current is not None})
        elif kind == "shutdown":
            self.shutdown(bool(msg.get("purge")))
        else:
            self.send_host(
                {"type": "error", "id": msg.get("id"), "error": "unknown message type %r" % (kind,)}
            )

    def shutdown(self, purge):
        self.kill_worker()
        if purge:
            _purge_workspace()
        os._exit(0)

    def run(self):
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
        if hello.get("type") != "hello" or hello.get("version") != PROTOCOL_VERSION:
            self.send_host(
                {
                    "type": "error",
                    "error": "protocol mismatch: bootstrap speaks version %d, host sent %r"
                    % (PROTOCOL_VERSION, hello.get("version")),
                }
            )
            os._exit(2)
        self.config = hello.get("config") or {}
        cap = int(self.config.get("max_output", 1 << 20))
        self.out, self.err = OutputBuffer(cap), OutputBuffer(cap)
        dill_from = _dill_origin()
        self.spawn_worker(restore=bool(self.config.get("restore")))
        self.send_host(
            {
                "type": "ready",
                "version": PROTOCOL_VERSION,
                "python": sys.version.split()[0],
                "dill": dill_from,
                "pid": os.getpid(),
                "uid": os.getuid(),
                # True: cell code cannot open this process's fds (the host channel)
                # through /proc, ptrace it or read its memory; no other process holds them
                "nondumpable": NONDUMPABLE[0],
                "channel_private": NONDUMPABLE[0] and not _channel_shared_with_init(),
            }
        )
        for m in pending:
            self.handle_host(m)
        # Wake select() when the worker dies. A handler alone does not: select() is
        # retried after EINTR (PEP 475), and the ctrl socket's EOF never comes while a
        # child the cell forked still holds a copy of it.
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        while True:
            fds = [0, self.out_r, self.err_r, self.wake_r]
            if self.ctrl is not None:
                fds.append(self.ctrl)
            try:
                r, _, _ = select.select(fds, [], [], self.next_timeout())
            except InterruptedError:
                r = []
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
                try:
                    data = self.ctrl.recv(1 << 16)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data:
                    self.ctrl_reader.feed(data)
                    try:
                        frames = self.ctrl_reader.frames()
                        if not all(isinstance(m, dict) for m in frames):
                            raise ValueError("a frame that is not an object")
                    except (ValueError, RecursionError) as e:
                        # cell code (or a child it forked, which inherits the socket)
                        # wrote garbage: the worker's reports cannot be trusted any more
                        frames = []
                        self.kill_reason = (
                            "the worker broke the protocol (%s); it was killed" % str(e)[:200]
                        )
                        self.worker_died(self.kill_worker())
                    for m in frames:
                        self.on_worker_frame(m)
                elif data == b"":
                    self.worker_died(self.kill_worker())
            self.reap_orphans()
            if self.worker_pid is not None:
                status = self.reap_worker(block=False)
                if status is not None:
                    self.worker_died(status)
            self.on_timer()

    def read_host(self, block):
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


def sock_send_blocking(sock, obj):
    data = encode(obj)
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            select.select([], [sock], [])
            continue
        except InterruptedError:
            continue
        view = view[n:]


def _positive(value):
    """A timeout from the host: a finite number > 0, else None (no limit)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if 0 < value < float("inf") else None


def _in_container():
    """True when this supervisor runs under the container's init (docker run --init).

    The sweep below kills every other process it can see: it must never run
    where the bootstrap was started by something else (tests on the host).
    """
    if os.getpid() == 1:
        return True
    if os.getppid() != 1:
        return False
    try:
        with open("/proc/1/cmdline", "rb") as f:
            init = f.read().split(b"\0", 1)[0]
    except OSError:
        return False
    return os.path.basename(init) in (b"docker-init", b"tini", b"tini-static", b"dumb-init")


def sweep_processes(spare=None, keep=()):
    """Kill what a killed worker left behind: children that left its process group
    (``setsid``), fork floods that fill the pids limit. Spares init, the
    supervisor, ``spare`` and the ``keep`` list of ``(pid, start time)``: the
    snapshot writers the supervisor was told of (they finish the last completed
    cell's checkpoint, which the restore waits for). A process's name spares
    nothing: any process can call itself ``drepl-snapshot``. Returns
    ``[(pid, parent pid)]`` of the processes it killed (zombies included: they
    still hold a pid).
    """
    if not _in_container():
        return []
    me, killed = os.getpid(), []
    keep = set(keep)
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit() or int(name) in (1, me, spare):
            continue
        pid = int(name)
        st = _proc_stat(pid)
        if st is None or (pid, st[1]) in keep:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, st[0]))
        except OSError:
            pass
    return killed


def _proc_stat(pid):
    """(parent pid, start time in clock ticks) of a process, from /proc; None if gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _proc_start(pid):
    st = _proc_stat(pid)
    return None if st is None else st[1]


def reap_children(pids, wait=2.0):
    """Worker side: collect killed children (a zombie keeps its pid until reaped)."""
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


def _pids_exhausted():
    """True when the container's pids cgroup is (nearly) full (cgroup v1 or v2)."""
    for d in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        try:
            with open(d + "/pids.max") as f:
                limit = f.read().strip()
            with open(d + "/pids.current") as f:
                current = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if not limit.isdigit():
            return False
        return current >= int(limit) - 2
    return False


def _dill_origin():
    lib = os.path.join(HERE, "lib")
    try:
        import importlib.util

        spec = importlib.util.find_spec("dill")
    except Exception:
        spec = None
    if spec is not None and spec.origin:
        return "image"
    if os.path.isdir(os.path.join(lib, "dill")):
        return "mount"
    return None


def _oom_suspected():
    """Best effort: did the kernel's OOM killer act in this container's cgroup?"""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "oom_kill":
                count = int(parts[1])
                prev = _OOM_SEEN[0]
                _OOM_SEEN[0] = count
                return count > prev
    return False


_OOM_SEEN = [0]


def _purge_workspace():
    """Empty the workspace (the host asked: it may not delete what root made here)."""
    try:
        names = os.listdir(WORKSPACE)
    except OSError:
        return
    for name in names:
        remove_tree(os.path.join(WORKSPACE, name))


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _ident(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _gone(op, name, dfd, chmod):
    """op(name, dir_fd=dfd) (os.unlink or os.rmdir); on EACCES/EPERM make dfd writable
    (a cell may have set 0500; with --cap-drop ALL even root needs that), try again."""
    for attempt in (0, 1):
        try:
            op(name, dir_fd=dfd)
            return True
        except FileNotFoundError:
            return True
        except PermissionError:
            if attempt or not chmod:
                return False
            try:
                os.fchmod(dfd, 0o700)
            except OSError:
                return False
        except OSError:
            return False
    return False


def _open_child(dfd, name):
    """The directory name in dfd, opened without following a link (a mode 000 the
    cell set is undone through an O_PATH descriptor); None if it cannot be."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except PermissionError:
        pass
    except OSError:
        return None
    try:
        pfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            os.chmod("/proc/self/fd/%d" % pfd, 0o700)
        finally:
            os.close(pfd)
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except (OSError, AttributeError):
        return None


def remove_tree(path):
    """rm -rf path, best effort: no recursion (a cell nests directories thousands
    deep; shutil.rmtree dies of RecursionError there), no symlink followed, two
    descriptors at most (down by name with O_NOFOLLOW, up through '..' checked
    against the inode it came down from). The host's dockerrepl._files.remove_tree
    is the same walk."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    fd = -1
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except OSError:
            return
        if not _is_dir_mode(st.st_mode):
            _gone(os.unlink, name, pfd, False)
            return
        fd = _open_child(pfd, name)
        if fd is None:
            fd = -1
            return
        stack = [(name, _ident(fd))]
        skip = [set()]
        while True:
            child = None
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        if entry.name in skip[-1]:
                            continue
                        try:
                            is_dir = entry.is_dir(follow_symlinks=False)
                        except OSError:
                            is_dir = False
                        if is_dir:
                            child = entry.name
                            break
                        if not _gone(os.unlink, entry.name, fd, True):
                            skip[-1].add(entry.name)
            except OSError:
                pass
            if child is not None:
                cfd = _open_child(fd, child)
                if cfd is None:
                    skip[-1].add(child)
                    continue
                os.close(fd)
                fd = cfd
                stack.append((child, _ident(fd)))
                skip.append(set())
                continue
            done = stack.pop()[0]
            skip.pop()
            if not stack:
                os.close(fd)
                fd = -1
                _gone(os.rmdir, done, pfd, False)
                return
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            if _ident(fd) != stack[-1][1]:
                return  # moved while it was removed: stop rather than follow it
            if not _gone(os.rmdir, done, fd, True):
                skip[-1].add(done)
    except OSError:
        pass
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(pfd)


def _is_dir_mode(mode):
    return (mode & 0o170000) == 0o040000


def main():
    # before anything else: cell code must never find this process reachable
    NONDUMPABLE[0] = _set_dumpable(0)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are for the worker
    try:
        _oom_suspected()  # record the baseline count
    except Exception:
        pass
    try:
        Supervisor().run()
    except BrokenPipeError:
        os._exit(0)
    except OSError as e:
        if e.errno == errno.EPIPE:
            os._exit(0)
        raise


if __name__ == "__main__":
    # Re-import this file as a proper module so the REPL helpers are importable
    # by name (dill then pickles them by reference, not by value).
    sys.path.insert(0, HERE)
    import dockerrepl_bootstrap

    dockerrepl_bootstrap.main()
