"""The worker's REPL: its namespace, the code run in it, and what a cell's result shows.

``REPL`` is the worker process's state: the namespace (the ``__main__`` module's
dict), the configuration from the host's hello, and the cell being run.
"""

from __future__ import annotations

import ast
import json
import linecache
import os
import sys
import traceback
import types

from . import paths, protocol
from .reprs import bounded_repr

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Never listed in ``locals`` nor checkpointed as variables.
HIDDEN_LOCALS = frozenset(protocol.SCAFFOLD_FUNCS) | {"__builtins__"}
_HERE = os.path.abspath(__file__)


class Repl:
    """One worker's REPL state (one instance, :data:`REPL`)."""

    def __init__(self) -> None:
        #: the namespace cells run in (the ``__main__`` module's dict once the worker runs)
        self.ns: dict[str, Any] = {}
        #: the host's configuration, from the hello frame (set once per worker)
        self.config: dict[str, Any] = {}
        #: the cell being run, or the last one (the proxy attributes LM calls to it)
        self.cell_id = 0
        #: name -> (id(value), path, kind): skipped by checkpoints, reloaded on restore
        self.file_backed: dict[str, tuple[int, str, str]] = {}
        #: the last cell's trailing-expression value, when the host asked for it
        self.value: Any = None

    def new_namespace(self) -> dict[str, Any]:
        """A fresh ``__main__`` module whose dict becomes the namespace."""
        mod = types.ModuleType("__main__")
        b = __builtins__
        mod.__dict__["__builtins__"] = b if isinstance(b, dict) else b.__dict__
        sys.modules["__main__"] = mod
        self.ns = mod.__dict__
        return self.ns

    def user_names(self) -> list[str]:
        """The names a cell made (not ``_private`` ones, not the helpers)."""
        out = []
        for k in self.ns:
            # globals()[1] = ... puts a key that is not a str in the namespace
            if not isinstance(k, str) or k.startswith("_") or k in HIDDEN_LOCALS:
                continue
            out.append(k)
        return out

    def reset_answer(self) -> None:
        self.ns["answer"] = {"content": "", "ready": False}

    def load_file_var(self, name: str, path: str, kind: str) -> Any:
        """A variable read from a workspace file (text, or JSON)."""
        full = os.path.join(paths.WORKSPACE, path)
        with open(full, "rb") as f:
            text = f.read().decode("utf-8", "surrogatepass")
        value = json.loads(text) if kind == "json" else text
        self.ns[name] = value
        self.file_backed[name] = (id(value), path, kind)
        return value


REPL = Repl()


def exec_cell(
    code: str,
    cell_id: int,
    filename: str | None = None,
    display: bool = False,
    value: bool = False,
) -> tuple[str, str | None]:
    """Run ``code`` in the namespace: ``(status, exception name)``; its output and
    traceback go to the worker's stdout and stderr.

    ``filename`` is what tracebacks call the code (default ``<cell-N>``). With
    ``display``, a trailing expression statement's value goes to sys.displayhook,
    as at Python's prompt: it is compiled in "single" mode on its own, from the
    same parse, so every line keeps its number in tracebacks. With ``value``
    (and not ``display``), it is evaluated on its own instead and kept in
    ``REPL.value`` (None when the cell does not end with an expression).
    """
    ns = REPL.ns
    REPL.value = None
    if not isinstance(ns.get("answer"), dict):
        REPL.reset_answer()
    status, exc_name = "ok", None
    if not filename:
        filename = "<cell-%d>" % cell_id
    try:
        try:
            parts = _compile(code, filename, display, value and not display)
        except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as e:
            status, exc_name = "error", type(e).__name__
            text = "".join(traceback.format_exception_only(type(e), e))
            sys.stderr.write(text)
        else:
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
            try:
                for i, part in enumerate(parts):
                    if i == 1 and value and not display:
                        REPL.value = eval(part, ns)
                    else:
                        exec(part, ns)
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
        flush_std()
    return status, exc_name


def _compile(code: str, filename: str, display: bool, value: bool = False) -> list[Any]:
    """The code objects to run in order: the cell, or its body and then its trailing
    expression in "single" mode (which prints the value through sys.displayhook), or
    with ``value`` in "eval" mode (whose code object is named ``<expression>``)."""
    if not display and not value:
        return [compile(code, filename, "exec", dont_inherit=True)]
    tree = ast.parse(code, filename, "exec")
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return [compile(tree, filename, "exec", dont_inherit=True)]
    last = tree.body.pop()
    if value and isinstance(last, ast.Expr):
        return [
            compile(tree, filename, "exec", dont_inherit=True),
            compile(ast.Expression(body=last.value), filename, "eval", dont_inherit=True),
        ]
    return [
        compile(tree, filename, "exec", dont_inherit=True),
        compile(ast.Interactive(body=[last]), filename, "single", dont_inherit=True),
    ]


def cell_result(status: str, exc_name: str | None, value: bool = False) -> dict[str, Any]:
    """The worker's "done" frame's fields for a cell that ended so (with ``value``: the
    trailing expression's, see :func:`encode_value`)."""
    out = {
        "status": status,
        "exception": exc_name,
        "locals": _locals_snapshot(),
        "final_answer": _final_answer(),
    }
    if value:
        v, REPL.value = REPL.value, None
        out["value"] = encode_value(v, int(REPL.config.get("max_output", 1 << 20)))
    return out


def encode_value(value: Any, cap: int) -> dict[str, Any]:
    """A value for the result frame: ``{"kind": "json", "data": value}`` when it is JSON
    of at most ``cap`` characters, else ``{"kind": "repr", "data": repr, "dropped": n}``
    (the repr cut to ``cap`` characters, head and tail kept; never raises)."""
    if value is None:
        return {"kind": "json", "data": None}
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        if len(text) <= cap:
            return {"kind": "json", "data": value}
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
    # a long str is sliced first: its whole repr is never built
    try:
        text = repr(value[: cap + 1] if isinstance(value, str) else value)
        if not isinstance(text, str):
            raise TypeError("__repr__ returned %s" % type(text).__name__)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        text = bounded_repr(value, 1000)  # says what failed
    dropped = max(0, len(value) - cap) if isinstance(value, str) else 0
    if len(text) > cap:
        dropped += len(text) - cap
        text = protocol.cut(text, cap, "the value")
    return {"kind": "repr", "data": text, "dropped": dropped}


def flush_std() -> None:
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass


def _print_exception(exc: BaseException) -> None:
    tb = exc.__traceback__
    # drop the bootstrap's own frame at the top: users see their cell only
    while tb is not None and tb.tb_frame.f_code.co_filename == _HERE:
        tb = tb.tb_next
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:
        text = "%s: <unprintable exception>\n" % type(exc).__name__
    try:
        sys.stderr.write(text)
    except BaseException:
        os.write(2, text.encode("utf-8", "replace"))


def _locals_snapshot() -> dict[str, str]:
    cap = REPL.config.get("repr_cap", 1000)
    names = REPL.user_names()
    listed = [k for k in names if len(k) <= protocol.MAX_NAME][: protocol.MAX_LOCALS]
    if len(listed) < len(names):
        try:
            sys.stderr.write(
                "dockerrepl: locals lists %d of the %d names (at most %d, each at most %d"
                " characters long)\n"
                % (len(listed), len(names), protocol.MAX_LOCALS, protocol.MAX_NAME)
            )
            sys.stderr.flush()
        except BaseException:
            pass
    return {k: bounded_repr(REPL.ns[k], cap) for k in listed}


def _final_answer() -> str | None:
    ans = REPL.ns.get("answer")
    if isinstance(ans, dict) and ans.get("ready"):
        try:
            text = str(ans.get("content", ""))
        except BaseException as e:
            try:
                text = "<answer content could not be converted to str: %s>" % (e,)
            except BaseException:
                text = "<answer content could not be converted to str>"
        return protocol.cut(text, protocol.FINAL_ANSWER_CAP, "the final answer")
    return None
