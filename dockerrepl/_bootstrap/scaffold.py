"""What the REPL gives a cell: ``llm_query`` & co, ``SHOW_VARS``, ``answer``, the
context and history aliases, and the custom tools, put back after every cell.

The helpers are module-level functions so that dill pickles them by reference
(``dockerrepl_bootstrap.scaffold.llm_query``) when a checkpointed function uses one.
"""

from __future__ import annotations

import json
import os
import sys
import types

from . import paths, protocol
from .client import post
from .namespace import HIDDEN_LOCALS, REPL

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any


class Scaffold:
    """What the host sent besides cells (one instance, :data:`SCAFFOLD`)."""

    def __init__(self) -> None:
        #: name -> the callable custom tool, put back after every cell (as rlm does)
        self.tools: dict[str, Any] = {}
        #: the host's compaction list, the copy the namespace was given, its entries' ids
        self.compaction: list[Any] | None = None
        self.given: list[Any] | None = None
        self.given_ids: list[int] | None = None
        #: the last "tools" and "compaction" sent, as saved in SCAFFOLD_FILE
        self.sent: dict[str, Any] = {}
        #: a budget error was told in a cell's stderr (once per worker)
        self.budget_noted = False
        #: classes made for host exceptions with no builtin of their name
        self.host_exceptions: dict[str, type[Exception]] = {}


SCAFFOLD = Scaffold()


# --------------------------------------------------------------------------- the helpers
def _note_budget(msg: str) -> None:
    if "budget exceeded" in msg and not SCAFFOLD.budget_noted:
        SCAFFOLD.budget_noted = True
        try:
            sys.stderr.write("dockerrepl: " + msg + "\n")
        except Exception:
            pass


def _single(path: str, prompt: Any, model: str | None, timeout: float) -> str:
    try:
        d = post(
            path, {"prompt": prompt, "model": model, "depth": REPL.config.get("depth", 1)}, timeout
        )
    except Exception as e:
        return "Error: %s" % (e,)
    if isinstance(d, dict) and isinstance(d.get("response"), str):
        return str(d["response"])
    err = d.get("error") if isinstance(d, dict) else d
    msg = "Error: %s" % (err,)
    _note_budget(msg)
    return msg


def _batched(path: str, prompts: Iterable[Any], model: str | None, timeout: float) -> Any:
    try:
        prompts = list(prompts)
    except TypeError:
        return "Error: prompts must be a list"
    if not prompts:
        return []
    depth = REPL.config.get("depth", 1)
    try:
        d = post(path, {"prompts": prompts, "model": model, "depth": depth}, timeout)
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


def llm_query(prompt: Any, model: str | None = None) -> str:
    """Ask the host's language model; returns its answer, or a string starting with "Error: "."""
    return _single("/llm_query", prompt, model, REPL.config.get("llm_timeout", 600))


def llm_query_batched(prompts: Iterable[Any], model: str | None = None) -> Any:
    """Ask the host's language model several prompts concurrently; answers in prompt order."""
    return _batched("/llm_query_batched", prompts, model, REPL.config.get("llm_timeout", 600))


def rlm_query(prompt: Any, model: str | None = None) -> str:
    """Recursive sub-call (a child RLM on the host); a plain llm_query when recursion is off."""
    return _single("/rlm_query", prompt, model, REPL.config.get("rlm_timeout", 3600))


def rlm_query_batched(prompts: Iterable[Any], model: str | None = None) -> Any:
    """Several recursive sub-calls, concurrently; answers in prompt order."""
    return _batched("/rlm_query_batched", prompts, model, REPL.config.get("rlm_timeout", 3600))


def SHOW_VARS() -> str:
    """A short listing of the REPL's variables and their types."""
    avail = {}
    for k, v in list(REPL.ns.items()):
        if k.startswith("_") or k in HIDDEN_LOCALS or k == "answer":
            continue
        if isinstance(v, types.ModuleType):
            continue
        avail[k] = type(v).__name__
    if not avail:
        return "No variables created yet. Use ```repl``` blocks to create variables."
    return "Available variables: %s" % (avail,)


_HELPERS = {
    "llm_query": llm_query,
    "llm_query_batched": llm_query_batched,
    "rlm_query": rlm_query,
    "rlm_query_batched": rlm_query_batched,
    "SHOW_VARS": SHOW_VARS,
}
assert tuple(_HELPERS) == protocol.SCAFFOLD_FUNCS


def host_tool_stub(tool_name: str) -> Callable[..., Any]:
    """A function that calls the host tool ``tool_name`` through the proxy."""

    def stub(*args: Any, **kwargs: Any) -> Any:
        d = post(
            "/host_tool",
            {"tool": tool_name, "args": list(args), "kwargs": kwargs},
            REPL.config.get("llm_timeout", 600),
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
            cls = SCAFFOLD.host_exceptions.get(str(exc_name))
            if cls is None:
                # a class of that name (not importable in here); tracebacks show the bare name
                cls = type(str(exc_name), (RuntimeError,), {"__module__": "__main__"})
                SCAFFOLD.host_exceptions[str(exc_name)] = cls
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


# --------------------------------------------------------------------------- installing it
def install_scaffold() -> None:
    """Put the helpers, ``answer``, the aliases and the tools (back) in the namespace."""
    ns = REPL.ns
    ns.update(_HELPERS)
    if not isinstance(ns.get("answer"), dict):
        REPL.reset_answer()
    if "context_0" in ns:
        ns["context"] = ns["context_0"]
    for name, obj in SCAFFOLD.tools.items():
        if ns.get(name) is not obj:
            ns[name] = obj
    if REPL.config.get("compaction"):
        canonical = SCAFFOLD.compaction
        if canonical is not None:
            given = SCAFFOLD.given
            # healed when rebound, resized, or an entry replaced (cheap: identities only)
            if (
                given is None
                or len(given) != len(canonical)
                or [id(e) for e in given] != SCAFFOLD.given_ids
                or ns.get("history") is not given
            ):
                import copy

                SCAFFOLD.given = copy.deepcopy(canonical)
                SCAFFOLD.given_ids = [id(e) for e in SCAFFOLD.given]
                ns["history"] = SCAFFOLD.given
    elif "history_0" in ns:
        ns["history"] = ns["history_0"]


def set_compaction(history: list[Any]) -> None:
    """The host's compaction list, given to the namespace as ``history``."""
    SCAFFOLD.compaction = history
    SCAFFOLD.given = None
    _save("compaction", history)
    install_scaffold()


def set_tools(tools: dict[str, Any]) -> None:
    """Install (or replace) custom tools: code strings exec'd, data set, host tools as
    stubs; kept with those sent before, for a respawned worker."""
    _define_tools(tools, restoring=False)
    merged = dict(SCAFFOLD.sent.get("tools") or {})
    merged.update(tools)
    _save("tools", merged)


def reload_scaffold() -> None:
    """After a respawn: the compaction list and the callable tools, as last sent."""
    try:
        with open(paths.SCAFFOLD_FILE) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    SCAFFOLD.sent.update(saved)
    if "compaction" in saved:
        SCAFFOLD.compaction = saved["compaction"]
        SCAFFOLD.given = None
    if "tools" in saved:
        _define_tools(saved["tools"], restoring=True)


def _save(key: str, value: Any) -> None:
    SCAFFOLD.sent[key] = value
    tmp = paths.SCAFFOLD_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(SCAFFOLD.sent, f)
    os.replace(tmp, paths.SCAFFOLD_FILE)


def _define_tools(tools: dict[str, Any], restoring: bool) -> None:
    ns = REPL.ns
    for name, spec in tools.items():
        kind = spec.get("kind")
        SCAFFOLD.tools.pop(name, None)  # replaced: the old one is not put back
        if kind == "code":
            ns.pop(name, None)
            exec(compile(spec["code"], "<tool %s>" % name, "exec", dont_inherit=True), ns)
            if name not in ns:
                raise ValueError("custom tool %r: its code did not define %r" % (name, name))
        elif kind == "expr":
            ns[name] = eval(
                compile(spec["code"], "<tool %s>" % name, "eval", dont_inherit=True), ns
            )
        elif kind == "data":
            # data is the model's to change; a restore keeps what the checkpoint had
            if not restoring or name not in ns:
                ns[name] = spec["value"]
            continue
        elif kind == "host":
            ns[name] = host_tool_stub(name)
        else:
            continue
        if callable(ns.get(name)):
            SCAFFOLD.tools[name] = ns[name]
