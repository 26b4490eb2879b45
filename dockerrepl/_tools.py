"""Custom tools: what crosses into the container (code, data) and what stays on the host.

rlm's ``custom_tools`` maps names to values: code strings become functions in
the REPL, JSON-able data becomes a variable, and a :class:`HostTool` becomes a
stub in the REPL that calls the host function through the proxy.
"""

from __future__ import annotations

import ast
import json
import textwrap
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

from ._bootstrap import protocol

__all__ = [
    "LM_HELPERS",
    "RESERVED_NAMES",
    "HostTool",
    "ToolSpecs",
    "code_kind",
    "host_tool",
    "tool_specs",
]

#: Names the REPL owns: restored after every cell and refused as custom-tool names.
RESERVED_NAMES = protocol.RESERVED_NAMES
#: The reserved names a :class:`HostTool` may take over: a host that answers LM calls
#: itself (DSPy's own ``llm_query``, with its budget) puts its function there.
LM_HELPERS = frozenset({"llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched"})


class HostTool:
    """A host function exposed in the REPL as a stub that calls it through the proxy.

    Arguments and the result cross as JSON; an exception comes back as an
    exception of the same name (a builtin type when one exists). The function
    runs on the host with arguments chosen by model-written code: treat it as
    an API exposed to untrusted callers.
    """

    def __init__(self, fn: Callable[..., Any], description: str = "") -> None:
        if not callable(fn):
            raise TypeError("host_tool() needs a callable")
        self.fn = fn
        self.description = description or (fn.__doc__ or "").strip()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def host_tool(fn: Callable[..., Any], description: str = "") -> HostTool:
    """Mark ``fn`` as a host tool for ``custom_tools`` (see :class:`HostTool`)."""
    return HostTool(fn, description)


class ToolSpecs(NamedTuple):
    """Checked custom tools: the specs sent to the container, and the host functions."""

    specs: dict[str, dict[str, Any]]
    host: dict[str, Callable[..., Any]]


def code_kind(name: str, value: str) -> Optional[tuple[str, str]]:
    """``("expr", src)`` for a lambda, ``("code", src)`` for code that binds ``name``, else None.

    rlm runs every multi-line string as code; here a string is code only when it
    parses as Python and binds the tool's name at top level (``def``, ``class``,
    an assignment or an import), so a multi-line data string stays data. A string
    that starts like code but does not compile, or code that never binds the
    name, is rejected with a ``ValueError`` rather than guessed at.
    """
    src = textwrap.dedent(value).strip()
    looks_like_code = src.startswith(("def ", "class ", "async def ", "lambda"))
    if src.startswith("lambda"):
        try:
            tree: ast.AST = ast.parse(src, mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"custom tool {name!r}: the lambda does not compile: {exc}") from None
        if isinstance(tree, ast.Expression) and isinstance(tree.body, ast.Lambda):
            return "expr", src
    try:
        module = ast.parse(src)
    except SyntaxError as exc:
        if looks_like_code:
            raise ValueError(f"custom tool {name!r}: the code does not compile: {exc}") from None
        return None
    bound: set[str] = set()
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    if name in bound:
        return "code", src
    if looks_like_code:
        raise ValueError(f"custom tool {name!r}: its code defines {sorted(bound)} but not {name!r}")
    return None


def tool_specs(tools: Mapping[str, Any]) -> ToolSpecs:
    """Check custom tools; ``ValueError``/``TypeError`` for a name or value that cannot be one."""
    specs: dict[str, dict[str, Any]] = {}
    host: dict[str, Callable[..., Any]] = {}
    for name, entry in tools.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"custom tool name {name!r} is not a Python identifier")
        value = entry["tool"] if isinstance(entry, dict) and "tool" in entry else entry
        if name in RESERVED_NAMES and not (name in LM_HELPERS and isinstance(value, HostTool)):
            raise ValueError(
                f"custom tool name {name!r} is reserved by the REPL"
                + (" (only a host_tool may replace it)" if name in LM_HELPERS else "")
            )
        code = code_kind(name, value) if isinstance(value, str) else None
        if isinstance(value, HostTool):
            specs[name] = {"kind": "host"}
            host[name] = value.fn
        elif code is not None:
            specs[name] = {"kind": code[0], "code": code[1]}
        elif callable(value):
            warnings.warn(
                f"custom tool {name!r} is a host callable and cannot cross into the container; "
                "it is skipped (pass a code string, or wrap it with dockerrepl.host_tool)",
                # tool_specs <- ReplOptions.build <- DockerREPL.__init__ <- the caller
                stacklevel=4,
            )
        else:
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"custom tool {name!r} is neither code nor JSON data: {exc}"
                ) from None
            specs[name] = {"kind": "data", "value": value}
    return ToolSpecs(specs, host)
