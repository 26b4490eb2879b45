"""A Docker code interpreter for DSPy (PyPI ``dspy``, 3.3 and 3.4): ``dspy.RLM``,
``dspy.Flex``, ``dspy.ProgramOfThought`` and ``dspy.CodeAct`` run their code in a
dockerrepl container.

::

    import dspy
    from dockerrepl.integrations.dspy import DockerInterpreter

    dspy.configure(lm=dspy.LM("openai/gpt-5-mini"),
                   interpreter_factory=DockerInterpreter.factory(timeout=120))
    rlm = dspy.RLM("context, query -> answer", max_iterations=10)

The class satisfies DSPy's ``CodeInterpreter`` protocol structurally (DSPy checks
it with ``isinstance`` on a runtime-checkable protocol): ``tools``,
``output_fields``, ``start()``, ``execute()``, ``shutdown()``. dspy is imported
only when an interpreter is built, never when this module is imported.

How it maps: the DSPy tools (``llm_query``, ``llm_query_batched``, the user's
tools, the ``__dspy_*`` facade tools) are dockerrepl host tools, run on the host
in the ``contextvars`` context of the thread that called :meth:`execute` (so
``dspy.context(lm=...)`` and RLM's budget apply); ``SUBMIT`` is a function in
the REPL that hands its value to the host and ends the cell with an exception
``except Exception`` does not catch; variables are bound without running code
(large ones as workspace files), and only when they changed.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import json
import keyword
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional

from .._bootstrap.reprs import bounded_repr
from .._options import DEFAULT_CELL_TIMEOUT, DEFAULT_REPR_CAP
from .._tools import LM_HELPERS, RESERVED_NAMES, HostTool
from ..errors import DockerReplError
from ._host import as_keywords, check_repl_options, open_repl, run_awaitable

if TYPE_CHECKING:
    from ..pool import DockerREPLPool
    from ..repl import DockerREPL
    from ..types import REPLResult

__all__ = ["DockerInterpreter", "DockerInterpreterFactory"]

#: The host tool SUBMIT calls with its value (a ``_`` name: not in ``locals``).
_SUBMIT_TOOL = "_dockerrepl_submit"
#: Variables whose JSON is longer go into the REPL as workspace files.
LARGE_VARIABLE = 1 << 16
#: Exception names that mean the code did not compile.
_SYNTAX_ERRORS = frozenset({"SyntaxError", "IndentationError", "TabError"})


def _dspy() -> Any:
    try:
        import dspy
    except ImportError as exc:
        raise ImportError(
            "dockerrepl.integrations.dspy needs DSPy: pip install 'dockerrepl[dspy]' "
            f"(or 'dspy>=3.3,<4'); importing dspy failed: {exc}"
        ) from exc
    return dspy


def _errors() -> tuple[type[Exception], type[Exception], Any]:
    """DSPy's ``CodeInterpreterError``, ``CodeExecutionError`` and ``FinalOutput``."""
    from dspy.primitives.code_interpreter import (
        CodeExecutionError,
        CodeInterpreterError,
        FinalOutput,
    )

    return CodeInterpreterError, CodeExecutionError, FinalOutput


def _jsonable(value: Any, what: str) -> tuple[Any, str]:
    """``(value, its JSON text)``: as is when JSON takes it, else through pydantic's
    JSON mode (models, dataclasses, sets, datetimes, ...). ``TypeError`` otherwise."""
    try:
        return value, json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        pass
    try:
        from pydantic_core import to_jsonable_python

        converted = to_jsonable_python(value)
        return converted, json.dumps(converted, ensure_ascii=False)
    except Exception as exc:
        raise TypeError(f"{what} is not JSON-compatible ({type(value).__name__}): {exc}") from None


def _submit_code(output_fields: Optional[list[dict[str, Any]]]) -> str:
    """The REPL's ``SUBMIT``: untyped ``SUBMIT(value)`` or one parameter per output field."""
    names = [str(f["name"]) for f in output_fields or []]
    if names:
        params = ", ".join(names)
        fields = ", ".join(f"{n!r}: _dockerrepl_plain({n})" for n in names)
        doc = f"Submit the final outputs ({params}); ends this execution."
    else:
        params = "output"
        fields = "'output': _dockerrepl_plain(output)"
        doc = "Submit the final output; ends this execution."
    return (
        "class _DockerreplSubmitted(BaseException):\n"
        "    pass\n"
        "def _dockerrepl_plain(value):\n"
        "    import json\n"
        "    try:\n"
        "        json.dumps(value)\n"
        "        return value\n"
        "    except Exception:\n"
        "        return repr(value)\n"
        f"def SUBMIT({params}):\n"
        f"    {doc!r}\n"
        f"    {_SUBMIT_TOOL}({{{fields}}})\n"
        "    raise _DockerreplSubmitted()\n"
    )


def _check_output_fields(fields: Any) -> Optional[list[dict[str, Any]]]:
    if fields is None:
        return None
    out = [dict(f) for f in fields]
    names = [f.get("name") for f in out]
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"output field name {name!r} is not a Python identifier")
    if len(set(names)) != len(names):
        raise ValueError("output field names must be unique")
    return out


class DockerInterpreter:
    """DSPy's ``CodeInterpreter`` on a dockerrepl container (see the module docs).

    Args:
        tools: host functions callable by name from the code (more can be added
            to :attr:`tools` until the next :meth:`execute`); JSON in and out.
        output_fields: ``[{"name": ..., "type": ...}]`` for a typed ``SUBMIT``
            (RLM sets it after construction).
        image: the image (default as :class:`~dockerrepl.DockerREPL`).
        timeout: seconds per execution (``None``: no limit). Past it the code is
            interrupted and the namespace kept; :meth:`execute` raises
            ``CodeExecutionError`` saying so.
        pool: a :class:`~dockerrepl.DockerREPLPool` to take a warm container
            from (its members' options apply; give no other options).
        **dockerrepl_options: any :class:`~dockerrepl.DockerREPL` option
            (``memory``, ``network``, ``cpus``, ...), checked here.

    Nothing starts until :meth:`start` or the first :meth:`execute`.
    """

    execution_instructions = (
        "Python (CPython) runs in an isolated Docker container as a persistent REPL: variables, "
        "imports and functions persist across executions. The standard library is available, plus "
        "what the image has installed; the host's files, environment and network are not. Host "
        "tools and SUBMIT are global functions; tool arguments and results are JSON values. Print "
        "what you need to see (a trailing expression's value is shown when nothing is printed). "
        "Each execution has a time limit: past it the code is interrupted and the variables kept."
    )

    def __init__(
        self,
        tools: Optional[Mapping[str, Callable[..., Any]]] = None,
        output_fields: Optional[list[dict[str, Any]]] = None,
        *,
        image: Optional[str] = None,
        timeout: Optional[float] = DEFAULT_CELL_TIMEOUT,
        pool: Optional[DockerREPLPool] = None,
        **dockerrepl_options: Any,
    ) -> None:
        _dspy()  # a clear ImportError now, not at the first execute
        check_repl_options(pool, image, timeout, dockerrepl_options)
        self.tools: dict[str, Callable[..., Any]] = dict(tools or {})
        self.output_fields: Optional[list[dict[str, Any]]] = _check_output_fields(output_fields)
        self.image = image
        self.timeout = timeout
        self.pool = pool
        self.options = dict(dockerrepl_options)
        opts = pool.repl_kwargs if pool is not None else dockerrepl_options
        self._repr_cap = int(opts.get("repr_cap", DEFAULT_REPR_CAP))
        self.repl: Optional[DockerREPL] = None
        self._start_lock = threading.Lock()
        self._exec_lock = threading.Lock()
        self._ended = False
        # what the REPL has: tool names, the SUBMIT it was given, variables' digests
        self._defined: set[str] = set()
        self._submit_src = ""
        self._sent: dict[str, bytes] = {}
        # name -> the repr the REPL's locals show while it still holds what was sent
        self._expect: dict[str, str] = {}
        # per execute: the caller's context, SUBMIT's values, host tools' exceptions
        self._context: Optional[contextvars.Context] = None
        self._submitted: list[Any] = []
        self._tool_errors: list[BaseException] = []

    # ------------------------------------------------------------------ factory
    @classmethod
    def factory(cls, **options: Any) -> DockerInterpreterFactory:
        """A zero-argument callable making a new interpreter with ``options`` per call
        (``interpreter_factory=`` of RLM, Flex, ProgramOfThought, CodeAct, or
        ``dspy.configure``); it carries :attr:`execution_instructions`. The options
        are checked now."""
        return DockerInterpreterFactory(cls, options)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the container (or take one from the pool); idempotent."""
        interpreter_error, _, _ = _errors()
        if self._ended:
            raise interpreter_error("this DockerInterpreter was shut down; make a new one")
        with self._start_lock:
            if self.repl is not None:
                return
            try:
                repl = self._new_repl()
            except (DockerReplError, OSError) as exc:
                raise interpreter_error(f"the Docker sandbox did not start: {exc}") from exc
            if self._ended:  # shut down from another thread while it started
                repl.cleanup()
                raise interpreter_error("this DockerInterpreter was shut down while it started")
            self.repl = repl

    def _new_repl(self) -> DockerREPL:
        tools = {_SUBMIT_TOOL: HostTool(self._submit)}
        return open_repl(self.pool, self.image, self.timeout, self.options, tools)

    def shutdown(self) -> None:
        """Remove the container; idempotent and terminal."""
        self._ended = True
        with self._start_lock:
            repl, self.repl = self.repl, None
        if repl is not None:
            repl.cleanup()

    def __enter__(self) -> DockerInterpreter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __call__(self, code: str, variables: Optional[dict[str, Any]] = None) -> Any:
        return self.execute(code, variables)

    # ---------------------------------------------------------------- execution
    def execute(self, code: str, variables: Optional[dict[str, Any]] = None) -> Any:
        """Run ``code`` in the persistent namespace, after binding ``variables``.

        Returns ``FinalOutput`` when the code called ``SUBMIT``, else the value of
        a trailing expression when it is not None (a JSON value, or the repr of
        another), else what it printed (stderr after stdout), else None. Raises
        ``SyntaxError`` for code that does not compile, ``CodeExecutionError`` for
        an exception in the code or a tool it called, and for a timeout, a crash or
        memory exhaustion after which the namespace was kept or restored (the
        message says which), ``CodeInterpreterError`` when the sandbox is lost, after
        :meth:`shutdown`, for another ``execute`` still running, or bad arguments.
        """
        interpreter_error, execution_error, final_output = _errors()
        if not self._exec_lock.acquire(blocking=False):
            raise interpreter_error("this DockerInterpreter already has an execution running")
        try:
            if not isinstance(code, str):
                raise interpreter_error(f"code must be a str, not {type(code).__name__}")
            if variables is not None and not isinstance(variables, dict):
                raise interpreter_error("variables must be a dict of names to JSON values")
            self.start()
            repl = self.repl
            if repl is None:
                raise interpreter_error("this DockerInterpreter was shut down")
            self._context = contextvars.copy_context()
            self._submitted = []
            self._tool_errors = []
            try:
                self._sync_tools(repl)
                self._sync_variables(repl, variables or {})
                res = repl.execute_code(code, timeout=self.timeout, value=True)
            except (ValueError, TypeError) as exc:
                raise interpreter_error(str(exc)) from exc
            except DockerReplError as exc:
                self.shutdown()
                raise interpreter_error(f"the Docker sandbox was lost: {exc}") from exc
            self._check_variables(res)
            if self._submitted:
                return final_output(self._submitted[0])
            return self._outcome(res, execution_error)
        finally:
            self._context = None
            self._exec_lock.release()

    def _outcome(self, res: REPLResult, execution_error: type[Exception]) -> Any:
        if res.status == "ok":
            if res.value is not None:
                return res.value
            out = res.stdout.rstrip("\n")
            if res.stderr.strip():
                out = (out + "\n" if out else "") + res.stderr.rstrip("\n")
            return out or None
        if res.status == "error" and res.exception in _SYNTAX_ERRORS:
            raise SyntaxError(res.stderr.strip())
        if res.status == "error":
            text = res.stderr.strip()
            if res.stdout.strip():
                text = f"{res.stdout.rstrip()}\n{text}"
            cause = next((e for e in self._tool_errors if type(e).__name__ == res.exception), None)
            raise execution_error(text) from cause
        # timeout, interrupted, crashed, oom: the stderr note says what was kept
        what = {
            "timeout": f"the execution exceeded its {self.timeout}s timeout",
            "interrupted": "the execution was interrupted",
            "crashed": "the sandbox's Python process crashed",
            "oom": "the execution ran out of memory",
        }.get(res.status, res.status)
        raise execution_error(f"{what}:\n{res.stderr.strip()}")

    # ---------------------------------------------------------------- tools
    def _sync_tools(self, repl: DockerREPL) -> None:
        """Define new tool names (each a host stub that looks its function up at call
        time, so replacing a function needs nothing) and a changed SUBMIT."""
        new: dict[str, Any] = {}
        for name in self.tools:
            if name in self._defined:
                continue
            bad = (
                not isinstance(name, str)
                or not name.isidentifier()
                or keyword.iskeyword(name)
                or name == "SUBMIT"
                or (name in RESERVED_NAMES and name not in LM_HELPERS)
            )
            if bad:
                raise ValueError(f"tool name {name!r} cannot be a global of the sandbox")
            new[name] = HostTool(self._tool_caller(name))
        self.output_fields = _check_output_fields(self.output_fields)
        submit = _submit_code(self.output_fields)
        if submit != self._submit_src:
            new["SUBMIT"] = submit
        if new:
            repl.define_tools(new)
            self._defined.update(n for n in new if n != "SUBMIT")
            self._submit_src = submit

    def _tool_caller(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            fn = self.tools.get(name)
            if fn is None:
                raise NameError(f"the tool {name!r} was removed")
            caller = self._context

            def run() -> Any:
                a, kw = as_keywords(fn, args, kwargs)
                out = fn(*a, **kw)
                if inspect.isawaitable(out):
                    out = run_awaitable(out)
                return _jsonable(out, f"the result of {name}")[0]

            try:
                # a copy per call: several tools may run at once, each in its own thread
                return caller.copy().run(run) if caller is not None else run()
            except Exception as exc:
                self._tool_errors.append(exc)
                raise

        call.__name__ = name
        return call

    def _submit(self, value: Any) -> None:
        self._submitted.append(value)

    # ---------------------------------------------------------------- variables
    def _sync_variables(self, repl: DockerREPL, variables: dict[str, Any]) -> None:
        """Bind what changed since it was sent (on the host, or rebound by the code)."""
        changed: dict[str, Any] = {}
        for name, value in variables.items():
            bad = (
                not isinstance(name, str)
                or not name.isidentifier()
                or keyword.iskeyword(name)
                or name == "SUBMIT"
                or name in self.tools
                or (name in RESERVED_NAMES and name not in ("context", "history"))
            )
            if bad:
                raise ValueError(
                    f"variable name {name!r} must be an identifier distinct from the tools"
                )
            plain, text = _jsonable(value, f"variable {name!r}")
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if self._sent.get(name) == digest:
                continue
            changed[name] = plain
            self._sent[name] = digest
            if len(text) <= LARGE_VARIABLE:
                self._expect[name] = bounded_repr(json.loads(text), self._repr_cap)
            elif isinstance(plain, str):
                self._expect[name] = bounded_repr(plain, self._repr_cap)
            else:
                self._expect.pop(name, None)  # large JSON: trusted, not checked
        if changed:
            repl.set_variables(changed, file_threshold=LARGE_VARIABLE)

    def _check_variables(self, res: REPLResult) -> None:
        """A sent variable the code rebound or changed is sent again next time (as
        DSPy's own interpreters, which bind every variable before every execution)."""
        for name, expected in list(self._expect.items()):
            if name.startswith("_"):
                continue  # not in locals
            if res.locals.get(name) != expected:
                self._sent.pop(name, None)
                self._expect.pop(name, None)


class DockerInterpreterFactory:
    """``DockerInterpreter.factory(**options)``: a zero-argument callable with
    ``execution_instructions``; each call makes a new :class:`DockerInterpreter`
    (thread-safe: nothing is shared but the options and the pool)."""

    def __init__(self, cls: type[DockerInterpreter], options: dict[str, Any]) -> None:
        if "tools" in options or "output_fields" in options:
            raise TypeError("the factory's interpreters get their tools from DSPy")
        self.cls = cls
        self.options = dict(options)
        cls(**self.options)  # checks the options (nothing starts)
        self.execution_instructions: str = cls.execution_instructions

    def __call__(self) -> DockerInterpreter:
        return self.cls(**self.options)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.cls.__name__}.factory({shown})"
