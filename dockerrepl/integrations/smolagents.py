"""A smolagents code executor on a dockerrepl container (PyPI ``smolagents``, 1.23+).

::

    from smolagents import CodeAgent, InferenceClientModel
    from dockerrepl.integrations.smolagents import DockerREPLExecutor

    with CodeAgent(tools=[search], model=InferenceClientModel(),
                   executor=DockerREPLExecutor(timeout=120)) as agent:
        agent.run("...")

The agent's code runs in the container, in a namespace that persists between
steps. Its tools and managed agents stay on the host: in the container each is a
stub that calls it through dockerrepl's RPC (arguments and results as JSON), so a
tool keeps its credentials, files and network on the host, and a managed agent
runs its whole sub-run there. ``final_answer(x)`` hands ``x`` to the host's
``final_answer`` tool and ends the step. smolagents is imported only when an
executor is built, never when this module is imported.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional

from .._options import DEFAULT_CELL_TIMEOUT
from .._tools import RESERVED_NAMES, HostTool
from ..errors import DockerReplError
from ._host import check_repl_options, open_repl, run_awaitable

if TYPE_CHECKING:
    from ..pool import DockerREPLPool
    from ..repl import DockerREPL

__all__ = ["DockerREPLExecutor"]

log = logging.getLogger(__name__)

#: The host tool the container's ``final_answer`` calls (a ``_`` name: not in locals).
_FINAL_TOOL = "_dockerrepl_final_answer"
_FINAL_CODE = f"""\
class FinalAnswerException(BaseException):
    pass
def _dockerrepl_plain(value):
    import json
    try:
        json.dumps(value)
        return value
    except Exception:
        return repr(value)
def final_answer(*args, **kwargs):
    "Provides a final answer to the given problem; ends this step."
    {_FINAL_TOOL}(*[_dockerrepl_plain(a) for a in args],
                  **{{k: _dockerrepl_plain(v) for k, v in kwargs.items()}})
    raise FinalAnswerException()
"""


def _smolagents() -> Any:
    try:
        import smolagents.local_python_executor as lpe
    except ImportError as exc:
        raise ImportError(
            "dockerrepl.integrations.smolagents needs smolagents: pip install "
            f"'dockerrepl[smolagents]' (importing smolagents failed: {exc})"
        ) from exc
    return lpe


def _plain(value: Any) -> Any:
    """A tool's result as JSON: as is, else smolagents' text form, else ``str``."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        pass
    to_string = getattr(value, "to_string", None)
    return to_string() if callable(to_string) else str(value)


class DockerREPLExecutor:
    """smolagents' ``PythonExecutor`` on a dockerrepl container: ``CodeAgent(executor=...)``.

    Args:
        image: the image (default as :class:`~dockerrepl.DockerREPL`).
        timeout: seconds per code step (``None``: no limit); past it the step is
            interrupted, its variables kept, and the agent sees the error.
        pool: a :class:`~dockerrepl.DockerREPLPool` to take a warm container from.
        max_print_outputs_length: the longest ``logs`` kept (head and tail).
        **dockerrepl_options: any :class:`~dockerrepl.DockerREPL` option, checked here.

    The container starts at the first ``send_tools``/``send_variables``/call.
    It is registered as a virtual subclass of smolagents' ``PythonExecutor``.
    """

    def __init__(
        self,
        *,
        image: Optional[str] = None,
        timeout: Optional[float] = DEFAULT_CELL_TIMEOUT,
        pool: Optional[DockerREPLPool] = None,
        max_print_outputs_length: int = 50_000,
        **dockerrepl_options: Any,
    ) -> None:
        lpe = _smolagents()
        lpe.PythonExecutor.register(DockerREPLExecutor)
        check_repl_options(pool, image, timeout, dockerrepl_options)
        self.image = image
        self.timeout = timeout
        self.pool = pool
        self.options = dict(dockerrepl_options)
        self.max_print_outputs_length = max_print_outputs_length
        #: the agent's tools and managed agents, by name (called on the host)
        self.tools: dict[str, Any] = {}
        #: smolagents' CodeAgent reads ``state["_print_outputs"]`` after a failed step
        self.state: dict[str, Any] = {"_print_outputs": ""}
        self.repl: Optional[DockerREPL] = None
        self._lock = threading.Lock()
        self._defined: set[str] = set()
        self._final: list[Any] = []
        self._context: Optional[contextvars.Context] = None

    # ------------------------------------------------------------ the container
    def _start(self) -> DockerREPL:
        with self._lock:
            if self.repl is None:
                tools = {_FINAL_TOOL: HostTool(self._final_answer)}
                self.repl = open_repl(self.pool, self.image, self.timeout, self.options, tools)
            return self.repl

    def cleanup(self) -> None:
        """Remove the container (``CodeAgent.cleanup()`` and its ``with`` call this)."""
        with self._lock:
            repl, self.repl = self.repl, None
            self._defined.clear()
        if repl is not None:
            repl.cleanup()

    # ------------------------------------------------------------ PythonExecutor
    def send_tools(self, tools: Mapping[str, Any]) -> None:
        """Make the agent's tools and managed agents callable from the code (on the host)."""
        repl = self._start()
        self.tools.update(tools)
        new: dict[str, Any] = {}
        for name in tools:
            if name in self._defined:
                continue
            if not name.isidentifier() or name in RESERVED_NAMES:
                raise ValueError(f"tool name {name!r} cannot be a global of the sandbox")
            new[name] = _FINAL_CODE if name == "final_answer" else HostTool(self._caller(name))
        if new:
            repl.define_tools(new)
            self._defined.update(new)

    def send_variables(self, variables: Mapping[str, Any]) -> None:
        """Bind the agent's state as variables: JSON values; others are skipped (logged)."""
        repl = self._start()
        plain: dict[str, Any] = {}
        for name, value in variables.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                log.warning("DockerREPLExecutor: variable %r is not JSON; not sent", name)
                continue
            if isinstance(name, str) and name.isidentifier() and name not in RESERVED_NAMES:
                plain[name] = value
        if plain:
            repl.set_variables(plain)

    def __call__(self, code_action: str) -> Any:
        """Run one code step: smolagents' ``CodeOutput(output, logs, is_final_answer)``."""
        lpe = _smolagents()
        repl = self._start()
        self._final = []
        self._context = contextvars.copy_context()
        try:
            res = repl.execute_code(code_action, timeout=self.timeout, value=True)
        except DockerReplError as exc:
            raise lpe.InterpreterError(f"the Docker sandbox failed: {exc}") from exc
        finally:
            self._context = None
        logs = res.stdout
        cap = self.max_print_outputs_length
        if len(logs) > cap:
            logs = f"{logs[: cap // 2]}\n... [output cut] ...\n{logs[-(cap - cap // 2) :]}"
        self.state["_print_outputs"] = logs
        if self._final:
            return lpe.CodeOutput(output=self._final[0], logs=logs, is_final_answer=True)
        if res.status != "ok":
            what = res.exception or res.status
            raise lpe.InterpreterError(
                f"{logs}\nExecuting code yielded an error ({what}):\n{res.stderr.strip()}"
            )
        return lpe.CodeOutput(output=res.value, logs=logs, is_final_answer=False)

    # ------------------------------------------------------------ host side
    def _caller(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            tool = self.tools[name]
            caller = self._context

            def run() -> Any:
                out = tool(*args, **kwargs)
                if hasattr(out, "__await__"):
                    out = run_awaitable(out)
                return _plain(out)

            return caller.copy().run(run) if caller is not None else run()

        call.__name__ = name
        return call

    def _final_answer(self, *args: Any, **kwargs: Any) -> None:
        tool = self.tools.get("final_answer")
        value = tool(*args, **kwargs) if tool is not None else (args[0] if args else None)
        self._final.append(value)
