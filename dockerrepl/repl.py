"""DockerREPL: a persistent Python REPL inside a Docker container.

One long-lived container per REPL; cells travel as frames over the
``docker run -i`` pipes to the in-container supervisor, which runs them in a
worker process that keeps the namespace in memory. Checkpoints to
``/workspace/state.dill`` are taken in the background after every completed
cell, so a killed worker or container is restored up to the last completed cell.
"""

from __future__ import annotations

import ast
import copy
import io
import json
import logging
import math
import numbers
import os
import stat
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

from . import __version__, _exit, _options
from ._bootstrap import protocol
from ._container import (
    CODE_MOUNT,
    PROXY_SOCKET,
    Container,
    ContainerConfig,
    bridge_gateway,
    check_extra_args,
    owner_label,
    pid_namespace,
)
from ._files import DEFAULT_MAX_FILE, copy_in, copy_out, open_dir, remove_tree, write_new
from ._options import (
    check_cpus,
    check_docker,
    check_flag,
    check_image,
    check_mapping,
    check_memory,
    check_runtime,
    check_user,
    check_workspace_dir,
    encode_payload,
)
from ._proxy import ProxyServer, ProxyState
from ._staging import PROTOCOL_VERSION, stage_code
from .errors import (
    BootstrapError,
    ContainerDied,
    DockerReplError,
    ProtocolError,
    ReplClosed,
    SetupCodeError,
)
from .types import REPLResult, RLMChatCompletion

__all__ = ["DEFAULT_CELL_TIMEOUT", "DEFAULT_IMAGE", "RESERVED_NAMES", "DockerREPL", "host_tool"]

log = logging.getLogger(__name__)

DEFAULT_IMAGE = _options.DEFAULT_IMAGE
#: Per-cell wall-clock limit unless the caller passes ``timeout=`` (None disables it).
DEFAULT_CELL_TIMEOUT = _options.DEFAULT_CELL_TIMEOUT
#: The longest finite timeout accepted (about 115 days); ``None`` or ``inf`` means no limit.
MAX_TIMEOUT = 1e7
#: Names the REPL owns: restored after every cell and refused as custom-tool names.
RESERVED_NAMES = protocol.RESERVED_NAMES
#: Every ``REPLResult.status``; anything else a container reports becomes "crashed".
RESULT_STATUSES = protocol.RESULT_STATUSES
#: Extra seconds the host waits past a cell's timeout + grace before it declares
#: the whole container unresponsive and replaces it.
HOST_MARGIN = 20.0
# Bounds on a result frame's fields (the bootstrap's MAX_LOCALS, MAX_NAME and
# FINAL_ANSWER_CAP), with slack for its marker lines and notes.
_MAX_LOCALS = protocol.MAX_LOCALS
_MAX_NAME = protocol.MAX_NAME
_REPR_SLACK = protocol.REPR_SLACK
_FINAL_ANSWER_CAP = protocol.FINAL_ANSWER_CAP
_TEXT_SLACK = protocol.TEXT_SLACK
#: The longest :meth:`DockerREPL.interrupt` waits to hand its frame to the container.
INTERRUPT_WAIT = 1.0
#: At exit, the longest one REPL's constructor or another thread's call is waited for.
EXIT_WAIT = 10.0
# Images known to ship dill themselves: no need to copy the host's into the mount.
_IMAGE_HAS_DILL: dict[tuple[str, str], bool] = {}

OutputCallback = Callable[[str, str], None]
Address = tuple[str, int]


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


def _code_kind(name: str, value: str) -> Optional[tuple[str, str]]:
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


def _tool_specs(
    tools: Mapping[str, Any],
) -> tuple[dict[str, dict[str, Any]], dict[str, Callable[..., Any]]]:
    """Validate custom tools; return (specs for the container, host functions)."""
    specs: dict[str, dict[str, Any]] = {}
    host: dict[str, Callable[..., Any]] = {}
    for name, entry in tools.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"custom tool name {name!r} is not a Python identifier")
        if name in RESERVED_NAMES:
            raise ValueError(f"custom tool name {name!r} is reserved by the REPL")
        value = entry["tool"] if isinstance(entry, dict) and "tool" in entry else entry
        code = _code_kind(name, value) if isinstance(value, str) else None
        if isinstance(value, HostTool):
            specs[name] = {"kind": "host"}
            host[name] = value.fn
        elif code is not None:
            specs[name] = {"kind": code[0], "code": code[1]}
        elif callable(value):
            warnings.warn(
                f"custom tool {name!r} is a host callable and cannot cross into the container; "
                "it is skipped (pass a code string, or wrap it with dockerrepl.host_tool)",
                stacklevel=3,
            )
        else:
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"custom tool {name!r} is neither code nor JSON data: {exc}"
                ) from None
            specs[name] = {"kind": "data", "value": value}
    return specs, host


def _number(name: str, value: Any) -> float:
    """``value`` as a float: a real number, not a bool (``True`` is not a duration)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"{name} must not be NaN")
    return out


def _limit(name: str, value: Any) -> Optional[float]:
    """A wall-clock limit in seconds: positive, at most MAX_TIMEOUT; ``None`` or ``inf``: none."""
    if value is None:
        return None
    out = _number(name, value)
    if out == math.inf:
        return None
    if not 0 < out <= MAX_TIMEOUT:
        raise ValueError(
            f"{name} must be > 0 and <= {MAX_TIMEOUT:g} seconds, or None for no limit (got {out!r})"
        )
    return out


def _count(name: str, value: Any, *, minimum: int = 1, hint: str = "") -> int:
    """A whole number >= ``minimum`` (an integral float such as 1e6 is accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        out = int(value)
    elif math.isfinite(float(value)) and float(value).is_integer():
        out = int(float(value))
    else:
        raise TypeError(f"{name} must be a whole number, not {value!r}")
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}{hint}, not {out}")
    return out


def _address(name: str, value: Any) -> Address:
    """An LM Handler address: ``(host, port)`` with a str host and a port in 1-65535."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a (host, port) tuple, not {type(value).__name__}")
    if len(value) != 2:
        raise ValueError(f"{name} must be a (host, port) pair, not {len(value)} items")
    host, port = value
    if not isinstance(host, str) or not host:
        raise TypeError(f"{name}: the host must be a non-empty str, not {host!r}")
    if isinstance(port, bool) or not isinstance(port, numbers.Integral):
        raise TypeError(f"{name}: the port must be an int, not {type(port).__name__}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"{name}: the port must be in 1-65535, not {port}")
    return host, int(port)


def _index(name: str, value: Optional[int], count: int) -> int:
    """A ``context_N`` / ``history_N`` index: the next free one, or one already used."""
    if value is None:
        return count
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
    index = int(value)
    if not 0 <= index <= count:
        raise ValueError(
            f"{name} must be between 0 and {count} (replace one or add the next), not {index}"
        )
    return index


class DockerREPL:
    """A Python REPL in a Docker container, with ``llm_query()`` to the host.

    The first four arguments are the seed's (``image``, ``lm_handler_address``,
    ``context_payload``, ``setup_code``); the next group is rlm's environment
    contract; the keyword-only options are dockerrepl's. Unknown keyword
    arguments are accepted and ignored (rlm passes some).

    Args:
        image: the image; default ``$DOCKERREPL_IMAGE`` or ``python:3.11-slim``.
            Any image with Python 3.8+ as ``python3`` or ``python`` works.
        lm_handler_address: ``(host, port)`` of an LM Handler (ours or rlm's).
        context_payload: ``str``, ``dict`` or ``list`` loaded as ``context``.
        setup_code: code run once after start (e.g. imports). If it does not
            run to its end (an exception, a timeout), the container is removed
            and :class:`~dockerrepl.errors.SetupCodeError` raised, with the
            cell's stderr as its ``traceback``.
        persistent, depth, subcall_fn, custom_tools, custom_sub_tools,
            compaction, max_concurrent_subcalls: rlm's environment contract.
        timeout: per-cell wall-clock limit in seconds, > 0 and at most
            ``MAX_TIMEOUT``; ``None`` or ``float("inf")``: no limit. A bool or
            NaN is refused.
        memory: memory limit in docker's notation (``"512m"``, ``"2g"``, bytes
            as an int), at least ``"6m"``; swap is always off; ``None``: none.
        cpus: CPU limit, at least 0.01; default 1.0 (a cell's Python uses one
            core anyway; a runaway cell cannot take the host's others);
            ``None``: none.
        pids_limit: the most processes and threads the container may hold, a
            positive int; ``None``: no limit of ours (the engine's default).
        network: ``"bridge"`` (default) or ``"none"`` (``llm_query`` then goes
            through a unix socket in the mount).
        user: run as this ``uid[:gid]`` (or ``name[:group]``) inside the container.
        read_only: read-only root filesystem with a tmpfs ``/tmp``.
        workspace_dir: an existing directory in which the host temp dir is
            created (default: the system's temp dir).
        docker: the docker CLI to use.
        max_output_bytes: per-cell cap on each of stdout/stderr (head and tail
            kept), >= 1.
        repr_cap: the longest repr kept per variable in ``REPLResult.locals``, >= 1.
        max_llm_calls, max_llm_tokens: budgets; past them ``llm_query`` returns
            an ``"Error: budget exceeded ..."`` string.
        auto_checkpoint: ``True``: snapshot the namespace in the background after
            each cell (a container killed before that cell's snapshot is on disk,
            milliseconds for a small namespace and up to about a second for a
            worker's first cell or 100 MB of state on a loaded machine, loses that
            cell's changes, and says so; see docs/security.md); ``"sync"``: write
            the snapshot before the result returns (nothing completed is ever
            lost; each cell that changes the namespace pays the dump); ``False``:
            only :meth:`checkpoint`.
        grace: seconds (>= 0) a cell gets between its interrupt and the kill of
            its worker.
        start_timeout: seconds (> 0) a container may take to become ready; past
            it :class:`~dockerrepl.errors.BootstrapError`.
        extra_args: more ``docker run`` options, e.g. ``["--device", "/dev/fuse"]``
            or ``["--storage-opt", "size=2g"]`` where the engine supports it.
            Options that break the channel (``-t``, ``--init``, ...), pass the
            host's environment (``-e``, ``--env-file``) or have their own argument
            here (``--memory``, ``--user``, ...) raise ``ValueError``; ones that
            widen the sandbox (``--privileged``, ``--cap-add``, ``--security-opt``,
            ``--pid``, ...) are refused too unless ``verify_security=False``.

    Wrong argument types raise ``TypeError`` and impossible values
    ``ValueError`` (a missing ``workspace_dir``: ``FileNotFoundError``; one
    this process cannot write: ``PermissionError``), all before anything is
    started: no docker command, no directory.

    A REPL never cleaned up is closed when the interpreter exits (an
    ``atexit`` hook registered by the first start), with bounded waits.
    """

    def __init__(
        self,
        image: Optional[str] = None,
        lm_handler_address: Optional[Address] = None,
        context_payload: Union[str, dict[str, Any], list[Any], None] = None,
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
        runtime: Optional[str] = None,
        max_output_bytes: int = 1_000_000,
        repr_cap: int = 1000,
        max_llm_calls: Optional[int] = None,
        max_llm_tokens: Optional[int] = None,
        auto_checkpoint: Union[bool, str] = True,
        grace: float = 2.0,
        start_timeout: float = 120.0,
        verify_security: bool = True,
        extra_args: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        if kwargs:
            # rlm's contract: accepted and ignored; said aloud, since a misspelt
            # option (memroy=...) would otherwise silently not apply
            log.warning("DockerREPL ignores unknown arguments: %s", ", ".join(sorted(kwargs)))
        # Every argument is checked before anything starts: typed errors naming the
        # option, no docker command run, nothing to undo (tests/unit/test_repl_args.py).
        if not isinstance(network, str):
            raise TypeError(f"network must be a str, not {type(network).__name__}")
        if network not in ("bridge", "none"):
            raise ValueError(f"network must be 'bridge' or 'none', not {network!r}")
        timeout = _limit("timeout", timeout)
        if setup_code is not None and not isinstance(setup_code, str):
            raise TypeError(f"setup_code must be a str, not {type(setup_code).__name__}")
        if image is not None:
            check_image("image", image)
        image = image or check_image(
            "$DOCKERREPL_IMAGE", os.environ.get("DOCKERREPL_IMAGE") or DEFAULT_IMAGE
        )
        memory = check_memory("memory", memory)
        cpus = check_cpus("cpus", cpus)
        if pids_limit is not None:
            pids_limit = _count("pids_limit", pids_limit, hint=" (None: no limit)")
        user = check_user("user", user)
        read_only = check_flag("read_only", read_only)
        runtime = check_runtime("runtime", runtime)
        docker = check_docker("docker", docker)
        verify_security = check_flag("verify_security", verify_security)
        max_output_bytes = _count("max_output_bytes", max_output_bytes)
        repr_cap = _count("repr_cap", repr_cap)
        grace = _number("grace", grace)
        if not 0 <= grace <= MAX_TIMEOUT:
            raise ValueError(f"grace must be >= 0 seconds, not {grace!r}")
        start_limit = _limit("start_timeout", start_timeout)
        if start_limit is None:
            raise ValueError("start_timeout must be a finite number of seconds")
        workspace_dir = check_workspace_dir("workspace_dir", workspace_dir)
        if lm_handler_address is not None:
            lm_handler_address = _address("lm_handler_address", lm_handler_address)
        for name, budget in (("max_llm_calls", max_llm_calls), ("max_llm_tokens", max_llm_tokens)):
            if budget is not None:
                _count(name, budget, minimum=0, hint=" (None: no budget)")
        if (
            auto_checkpoint is not True
            and auto_checkpoint is not False
            and (not isinstance(auto_checkpoint, str) or auto_checkpoint != "sync")
        ):
            raise ValueError(
                f"auto_checkpoint must be True, False or 'sync', not {auto_checkpoint!r}"
            )
        # rlm's environment contract
        persistent = check_flag("persistent", persistent)
        compaction = check_flag("compaction", compaction)
        depth = _count("depth", depth, minimum=0)
        max_concurrent_subcalls = _count("max_concurrent_subcalls", max_concurrent_subcalls)
        if subcall_fn is not None and not callable(subcall_fn):
            raise TypeError(f"subcall_fn must be callable or None, not {type(subcall_fn).__name__}")
        tools = check_mapping("custom_tools", custom_tools)
        sub_tools = (
            None
            if custom_sub_tools is None
            else check_mapping("custom_sub_tools", custom_sub_tools)
        )
        # encoded now, so that a context JSON cannot hold fails before anything starts
        context = (
            None if context_payload is None else encode_payload("context_payload", context_payload)
        )
        self.image = image
        self.persistent = persistent
        self.depth = depth
        self.subcall_fn = subcall_fn
        self.compaction = compaction
        self.max_concurrent_subcalls = max_concurrent_subcalls
        self.timeout = timeout
        self.network = network
        self.custom_tools: dict[str, Any] = tools
        self.custom_sub_tools: dict[str, Any] = dict(tools) if sub_tools is None else sub_tools
        self._tool_specs, host_tools = _tool_specs(self.custom_tools)
        extra = check_extra_args(extra_args, allow_widening=not verify_security)
        self._options = {
            "extra_args": extra,
            "memory": memory,
            "cpus": cpus,
            "pids_limit": pids_limit,
            "user": user,
            "read_only": read_only,
            "runtime": runtime,
            "docker": docker,
            "start_timeout": start_limit,
        }
        self._max_output = max_output_bytes
        self._repr_cap = repr_cap
        self._auto_checkpoint = auto_checkpoint
        self._grace = grace
        self._verify = verify_security
        self._workspace_dir = workspace_dir
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        # The request the host sent and stopped waiting for (a KeyboardInterrupt or an
        # on_output callback raising while it ran): ("result"|"reply", id). Its answer
        # is read, and dropped, before the next request is sent (see _sync).
        self._in_flight: Optional[tuple[str, int]] = None
        self._in_flight_interrupted = False
        self._close_lock = threading.Lock()
        # After a container restart the new worker appends its own restore note to the
        # first cell's stderr; when it says just what the host's note already said, it
        # is dropped (one note per restore). The worker's line the host expects:
        self._restore_echo: Optional[str] = None
        self._closed = False
        self._done = threading.Event()  # set once _close has finished
        self._built = threading.Event()  # set once __init__ has returned or raised
        self._pid = os.getpid()  # a forked child never closes its parent's container
        self._cell = 0
        self._req = 0
        self._context_count = 0
        self._history_count = 0
        self._compaction_history: list[Any] = []
        self._container: Optional[Container] = None
        self.proxy: Optional[ProxyServer] = None
        self.temp_dir = ""
        self._root = ""
        self._code_dir = ""
        self.restarts = 0
        self._last_completed = 0  # the last cell that ended ok or error
        self._state = ProxyState(
            token="",
            depth=depth,
            lm_handler_address=lm_handler_address,
            subcall_fn=subcall_fn,
            max_concurrent_subcalls=max_concurrent_subcalls,
            max_llm_calls=max_llm_calls,
            max_llm_tokens=max_llm_tokens,
            host_tools=host_tools,
        )
        try:
            self.setup()
            if self.compaction:
                self._call("compaction", {"history": self._compaction_history})
            if self._tool_specs:
                self._call("define_tools", {"tools": self._tool_specs})
            if context is not None:
                self._add_context(context, 0)
                context = None  # the encoded text is in the mount now
            if setup_code:
                # not self.execute_code: a subclass may return another result type
                res = DockerREPL.execute_code(self, setup_code)
                if res.status != "ok":
                    # the caller's own code, not the model's: say so now, not in a log
                    what = res.exception or res.status
                    raise SetupCodeError(
                        f"setup_code failed ({what}); the REPL was removed", res.stderr, res.status
                    )
        except BaseException:
            self.cleanup()
            raise
        finally:
            self._built.set()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Create the workspace, start the proxy and the container (called by ``__init__``)."""
        import secrets

        # closed at exit if still open (registers the atexit hook on the first start)
        _exit.track(self, 1)
        self._root = tempfile.mkdtemp(prefix="dockerrepl-", dir=self._workspace_dir)
        self.temp_dir = os.path.join(self._root, "workspace")
        boot_dir = os.path.join(self.temp_dir, ".dockerrepl")  # state, writable inside
        os.makedirs(boot_dir)
        # a non-root container user must be able to write state and checkpoints;
        # the 0700 parent keeps other host users out
        os.chmod(self.temp_dir, 0o777 if self._options["user"] else 0o755)
        os.chmod(boot_dir, 0o777 if self._options["user"] else 0o755)
        # the code, outside the workspace and mounted read-only: nothing a cell does
        # can change what the next container runs as its supervisor
        self._code_dir = os.path.join(self._root, "code")
        os.makedirs(self._code_dir)
        os.chmod(self._code_dir, 0o755)
        docker = str(self._options["docker"])
        stage_code(self._code_dir, copy_dill=not _IMAGE_HAS_DILL.get((docker, self.image)))
        self._state.token = secrets.token_urlsafe(24)
        if self.network == "none":
            # beside the code, mounted read-only, not in the workspace: a cell that
            # swapped /workspace/.dockerrepl for a symlink made the host bind, chmod
            # and (at cleanup) unlink proxy.sock in a host directory of its choosing
            sock = os.path.join(self._code_dir, PROXY_SOCKET)
            self.proxy = ProxyServer(self._state, unix_path=sock)
            target: dict[str, Any] = {"unix": f"{CODE_MOUNT}/{PROXY_SOCKET}"}
        else:
            self.proxy = ProxyServer(self._state, host=bridge_gateway(docker))
            target = {"host": "host.docker.internal", "port": self.proxy.port}
        self._proxy_target = target
        self._start_container(restore=False)

    def _hello(self, restore: bool) -> dict[str, Any]:
        return {
            "type": "hello",
            "version": PROTOCOL_VERSION,
            "config": {
                "depth": self.depth,
                "proxy": self._proxy_target,
                "token": self._state.token,
                "max_output": self._max_output,
                "repr_cap": self._repr_cap,
                "compaction": self.compaction,
                "auto_checkpoint": self._auto_checkpoint,
                "grace": self._grace,
                "restore": restore,
            },
        }

    def _start_container(self, restore: bool) -> None:
        opts = self._options
        cfg = ContainerConfig(
            image=self.image,
            workspace=self.temp_dir,
            code_dir=self._code_dir,
            docker=str(opts["docker"]),
            memory=opts["memory"],  # type: ignore[arg-type]
            cpus=opts["cpus"],  # type: ignore[arg-type]
            pids_limit=opts["pids_limit"],  # type: ignore[arg-type]
            network=self.network,
            user=opts["user"],  # type: ignore[arg-type]
            read_only=bool(opts["read_only"]),
            runtime=opts["runtime"],  # type: ignore[arg-type]
            extra_args=opts["extra_args"],  # type: ignore[arg-type]
            start_timeout=float(opts["start_timeout"]),  # type: ignore[arg-type]
            labels={
                "dockerrepl.version": __version__,
                "dockerrepl.owner": owner_label(),
                "dockerrepl.pidns": pid_namespace(),
                "dockerrepl.workspace": self._root,
            },
        )
        container = Container(cfg, os.path.join(self._root, "docker-run.log"))
        self._container = container  # before it starts: cleanup() can abort it
        if _exit.exiting():
            # the atexit hook has begun (a pool member starting in its thread):
            # a container started now would outlive its cleanup
            raise ReplClosed("the interpreter is exiting: no container is started")
        ready = container.start(self._hello(restore))
        if self._closed:
            raise ReplClosed("this DockerREPL was cleaned up while its container started")
        if ready.get("dill") == "image":
            _IMAGE_HAS_DILL[(cfg.docker, cfg.image)] = True
        elif ready.get("dill") is None:
            log.warning("dill is not available in %s: checkpoints will fail", self.image)
        if ready.get("channel_private") is False and not restore:
            # the image lacks ctypes (no prctl), or an init shares the channel's pipes:
            # cell code could then forge frames; the host's bounds still hold (security.md)
            log.warning(
                "the bootstrap could not make its host channel private in %s"
                " (nondumpable=%s): cell code could forge result frames",
                self.image,
                ready.get("nondumpable"),
            )
        if self._verify:
            container.verify(container.inspect())

    # --------------------------------------------------------------- channel
    def _next_req(self) -> int:
        self._req += 1
        return self._req

    def _send(self, obj: dict[str, Any], deadline: Optional[float] = None) -> None:
        """Send a frame; ``TimeoutError`` when the container takes none of it by ``deadline``."""
        container = self._container
        if container is None:
            raise ContainerDied("no container")
        with self._send_lock:
            container.send(obj, deadline)

    def _call(self, op: str, args: dict[str, Any], timeout: float = 600.0) -> Any:
        """Run an internal operation in the worker; raise on failure."""
        with self._lock:
            self._check_open()
            if self._ensure_container() + self._sync():
                self._restore_echo = None  # no host note shown: the worker's is the one
            rid = self._next_req()
            container = self._container
            assert container is not None
            deadline = time.monotonic() + timeout + self._grace + HOST_MARGIN
            request = {"type": "call", "id": rid, "op": op, "args": args, "timeout": timeout}
            self._in_flight = ("reply", rid)
            self._in_flight_interrupted = False
            try:
                return self._call_reply(op, request, container, deadline)
            except BaseException:
                if self._in_flight is not None:
                    self._abandon()  # e.g. KeyboardInterrupt during a long load_file
                raise

    def _call_reply(
        self, op: str, request: dict[str, Any], container: Container, deadline: float
    ) -> Any:
        rid = request["id"]
        sent = False
        while True:
            try:
                if not sent:
                    self._send(request, deadline)
                    sent = True
                msg = container.recv(deadline)
            except TimeoutError:
                self._restart("the container did not answer an internal request")
                raise ContainerDied(
                    f"internal operation {op!r} timed out; the container was replaced"
                ) from None
            if msg.get("id") != rid:
                continue
            if msg.get("type") in ("reply", "error"):
                self._in_flight = None
            if msg.get("type") == "reply":
                if not msg.get("ok"):
                    err = str(msg.get("error"))
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

    def _check_open(self) -> None:
        if self._closed:
            raise ReplClosed("this DockerREPL was cleaned up")

    def _ensure_container(self) -> str:
        """Replace a container that exited or whose channel is out of step; returns a note."""
        c = self._container
        if c is None or not c.alive():
            return self._restart("the container had exited") + "\n"
        if c.broken:
            return self._restart("a frame to the container was cut short") + "\n"
        return ""

    def _abandon(self) -> None:
        """The host stopped waiting for the request in flight: interrupt it now.

        Its answer is read (and dropped) by :meth:`_sync` before the next request.
        """
        c = self._container
        if self._in_flight is None or c is None or c.broken or not c.alive():
            return  # a dead or broken container is replaced before its next use
        self._in_flight_interrupted = self._send_interrupt(c)

    def _send_interrupt(self, container: Container) -> bool:
        """Send an interrupt frame, waiting at most about INTERRUPT_WAIT; True if sent."""
        if not self._send_lock.acquire(timeout=INTERRUPT_WAIT):
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
            self._send_lock.release()

    def _sync(self) -> str:
        """Bring the channel back in step after a request the host stopped waiting for.

        The request was interrupted (see :meth:`_abandon`); a ping tells whether
        it still runs. Its answer is awaited (grace + HOST_MARGIN, longer while
        its worker restores) and dropped; a container that does not answer in
        time is replaced. Returns a note for stderr ("" when all went well).
        """
        stale = self._in_flight
        container = self._container
        if stale is None or container is None:
            return ""
        kind, rid = stale
        margin = self._grace + HOST_MARGIN
        restore_bound = float(self._options["start_timeout"])  # type: ignore[arg-type]
        try:
            if not self._in_flight_interrupted:
                self._in_flight_interrupted = self._send_interrupt(container)
            ping = self._next_req()
            deadline = time.monotonic() + margin
            ceiling = deadline + restore_bound + margin
            self._send({"type": "ping", "id": ping}, deadline)
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
                        self._restore_echo = None  # dropped with the result it was in
                        if msg.get("status") in ("ok", "error"):
                            self._last_completed = rid
                    if busy:
                        break
                elif mtype == "progress" and mid == rid and msg.get("state") == "restoring":
                    deadline = min(ceiling, time.monotonic() + restore_bound + margin)
                elif mtype == "error":
                    raise ProtocolError(str(msg.get("error")))
        except (TimeoutError, DockerReplError) as exc:
            what = f"cell {rid}" if kind == "result" else "an internal request"
            return self._restart(f"the interrupted {what} did not end ({exc})") + "\n"
        self._in_flight = None
        return ""

    def _restart(self, why: str) -> str:
        """Replace the container and restore the last checkpoint; returns a note for stderr."""
        if self._closed:
            # cleanup() from another thread removed the container under this call
            raise ReplClosed("cleanup() was called while this call ran; its container is gone")
        log.warning("dockerrepl: %s; starting a new container", why)
        old = self._container
        self._container = None
        self._in_flight = None  # whatever ran in the old container ends with it
        if old is not None:
            old.kill()
        self.restarts += 1
        saved = self._checkpoint_cell()
        try:
            self._start_container(restore=True)
            self._after_restore()
        except DockerReplError as exc:
            if self._closed:
                raise ReplClosed(
                    "cleanup() was called while this call ran; its container is gone"
                ) from exc
            raise ContainerDied(f"{why}, and a replacement could not be started: {exc}") from exc
        if saved is None:
            self._restore_echo = "dockerrepl: no checkpoint existed; the namespace starts empty\n"
            restored = "no checkpoint was found: the namespace starts empty"
        else:
            self._restore_echo = (
                f"dockerrepl: state restored from the checkpoint taken after cell {saved}\n"
            )
            restored = f"the checkpoint taken after cell {saved} was restored"
            if saved < self._last_completed:
                # checkpoints are written in the background after each cell: one still
                # on its way died with the container (see DockerREPL.checkpoint())
                lost = saved + 1, self._last_completed
                cells = f"cells {lost[0]}-{lost[1]}" if lost[0] < lost[1] else f"cell {lost[1]}"
                restored += f" (changes made by {cells}, if any, were not in it)"
        return f"dockerrepl: {why}; a new container was started and {restored}"

    def _checkpoint_cell(self) -> Optional[int]:
        """The cell the checkpoint in the mount was taken after (None: no checkpoint).

        The file is the container's: opened without following links, never a
        FIFO, read bounded, and only one integer is taken from it.
        """
        # every component opened without following a link: a cell can replace
        # .dockerrepl (or the files) with a symlink to anywhere on the host
        try:
            wfd = open_dir(self.temp_dir)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.stat("state.dill", dir_fd=wfd, follow_symlinks=False).st_mode):
                return None
            dfd = os.open(".dockerrepl", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=wfd)
            try:
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open("state.meta.json", flags, dir_fd=dfd)
            finally:
                os.close(dfd)
        except OSError:
            return None
        finally:
            os.close(wfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            meta = json.loads(os.read(fd, 1 << 16))
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        cell = meta.get("cell") if isinstance(meta, dict) else None
        return cell if isinstance(cell, int) and not isinstance(cell, bool) else None

    def _after_restore(self) -> None:
        if self.compaction:
            self._call("compaction", {"history": self._compaction_history})
        if self._tool_specs:
            self._call("define_tools", {"tools": self._tool_specs})

    # ----------------------------------------------------------------- cells
    def execute_code(
        self,
        code: str,
        *,
        timeout: Union[float, str, None] = "default",
        on_output: Optional[OutputCallback] = None,
    ) -> REPLResult:
        """Run one cell; state persists between cells.

        Never raises for problems in the code itself: exceptions, timeouts,
        crashes and memory exhaustion come back as a :class:`REPLResult` with
        ``status`` set and a message in ``stderr``. ``on_output(stream, text)``
        receives stdout/stderr chunks as they are printed.

        Raises :class:`~dockerrepl.errors.ReplClosed` when the REPL was cleaned
        up, also when :meth:`cleanup` is called from another thread while the
        cell runs (the cell is stopped with its container, at once). An
        exception raised in the host while it waits (``KeyboardInterrupt``, an
        ``on_output`` callback raising one) interrupts the cell in the
        container and propagates; the next call first waits (bounded) for that
        cell to end, so it starts in step, with the namespace as the
        interrupted cell left it.
        """
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        limit = self.timeout if isinstance(timeout, str) and timeout == "default" else timeout
        limit = _limit("timeout", limit)
        start = time.perf_counter()
        with self._lock:
            self._check_open()
            note = self._ensure_container()
            note += self._sync()
            self._cell += 1
            cell = self._cell
            self._state.current_cell = cell
            msg = {
                "type": "exec",
                "id": cell,
                "code": code,
                "timeout": limit,
                "stream": on_output is not None,
            }
            notes: list[str] = []
            try:
                res = self._run_cell(msg, limit, on_output, notes)
                note += "".join(notes)
            except ContainerDied as exc:
                self._state.abandon_through(cell)
                note += "".join(notes)
                note += self._restart(f"the container died during the cell ({exc})") + "\n"
                return self._result(
                    cell, start, {"status": "crashed", "stdout": "", "stderr": note}
                )
            except ProtocolError as exc:
                # frames from the container are untrusted: one that breaks the protocol
                # ends that container; the REPL goes on in a new one
                self._state.abandon_through(cell)
                note += self._restart(f"the container broke the protocol ({exc})") + "\n"
                return self._result(
                    cell, start, {"status": "crashed", "stdout": "", "stderr": note}
                )
            except TimeoutError:
                self._state.abandon_through(cell)
                note += (
                    self._restart(f"the container stopped answering (cell timeout {limit}s)") + "\n"
                )
                return self._result(
                    cell, start, {"status": "timeout", "stdout": "", "stderr": note}
                )
            except BaseException:
                # the host gave up on the cell (KeyboardInterrupt, an on_output callback
                # raising): stop it in the container, and re-raise to the caller
                self._state.abandon_through(cell)
                self._abandon()
                raise
            echo, self._restore_echo = self._restore_echo, None
            stderr = res.get("stderr")
            if echo and isinstance(stderr, str) and ("\n" + stderr).endswith("\n" + echo):
                res["stderr"] = stderr[: -len(echo)]
            if note:
                res["stderr"] = note + str(res.get("stderr", ""))
            if res.get("status") not in ("ok", "error"):
                self._state.abandon_through(cell)
            else:
                self._last_completed = cell
            return self._result(cell, start, res)

    def _run_cell(
        self,
        msg: dict[str, Any],
        limit: Optional[float],
        on_output: Optional[OutputCallback],
        notes: list[str],
    ) -> dict[str, Any]:
        """Send a cell and wait for its result.

        A container that dies before showing any sign of the cell (the
        supervisor acknowledges a cell still running after 20 ms) never ran
        it, or ran it for a few milliseconds: it was killed between cells and
        the docker CLI noticed late. It is replaced and the cell sent once more.
        """
        seen = [False]
        margin = self._grace + HOST_MARGIN
        for attempt in (1, 2):
            self._in_flight = ("result", msg["id"])
            self._in_flight_interrupted = False
            try:
                # a container that takes no input (paused) gets as long as it would to answer
                self._send(msg, None if limit is None else time.monotonic() + limit + margin)
                res = self._await_result(msg["id"], limit, on_output, seen)
            except ContainerDied as exc:
                if seen[0] or attempt == 2:
                    raise
                notes.append(self._restart(f"the container had died ({exc})") + "\n")
                seen[0] = False
                continue
            self._in_flight = None
            return res
        raise AssertionError("unreachable")

    def _await_result(
        self,
        cell: int,
        limit: Optional[float],
        on_output: Optional[OutputCallback],
        seen: Optional[list[bool]] = None,
    ) -> dict[str, Any]:
        container = self._container
        assert container is not None
        margin = self._grace + HOST_MARGIN
        restore_bound = float(self._options["start_timeout"])  # type: ignore[arg-type]
        deadline = None if limit is None else time.monotonic() + limit + margin
        # Progress frames move the deadline, never past this ceiling: the cell's own
        # time plus two restores (one before it runs, one after its worker dies). Frames
        # are untrusted; forged ones cannot keep the host waiting any longer.
        ceiling = None if deadline is None else deadline + 2 * (restore_bound + margin)
        streamed = 0  # characters handed to on_output; the supervisor stops at the cap
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
                    if streamed > self._max_output + _TEXT_SLACK:
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

    def _result(self, cell: int, start: float, res: dict[str, Any]) -> REPLResult:
        # The result frame comes from the container: every field is checked and bounded,
        # never trusted. The supervisor keeps to the same bounds, so an honest result
        # never meets them (docs/security.md, "Frames are untrusted").
        calls = [RLMChatCompletion.from_dict(c) for c in self._state.take(cell)]
        raw_locals = res.get("locals")
        raw_trunc = res.get("truncated")
        status = res.get("status", "ok")
        cap, repr_cap = self._max_output, self._repr_cap
        truncated = {
            k: v
            for k, v in (raw_trunc.items() if isinstance(raw_trunc, dict) else ())
            if k in ("stdout", "stderr") and type(v) is int and v >= 0
        }

        def cut(value: str, keep: int, what: str) -> str:
            half = keep // 2
            return (
                f"{value[:half]}\n... [dockerrepl: {len(value) - keep} characters of {what}"
                f" dropped by the host] ...\n{value[len(value) - (keep - half) :]}"
            )

        def text(key: str) -> str:
            value = res.get(key, "")
            if not isinstance(value, str):
                return ""
            # the supervisor sends at most max_output_bytes, a marker line and its notes
            if len(value) > cap + _TEXT_SLACK:
                truncated[key] = truncated.get(key, 0) + len(value) - cap
                return cut(value, cap, key)
            return value

        stdout, stderr = text("stdout"), text("stderr")
        locals_: dict[str, str] = {}
        for k, v in raw_locals.items() if isinstance(raw_locals, dict) else ():
            if len(locals_) >= _MAX_LOCALS:
                break
            if isinstance(k, str) and isinstance(v, str) and len(k) <= _MAX_NAME:
                too_long = len(v) > repr_cap + _REPR_SLACK
                locals_[k] = f"{v[:repr_cap]}... ({len(v)} chars)" if too_long else v
        answer = res.get("final_answer")
        if isinstance(answer, str) and len(answer) > _FINAL_ANSWER_CAP + _TEXT_SLACK:
            answer = cut(answer, _FINAL_ANSWER_CAP, "the final answer")
        exception = res.get("exception")
        return REPLResult(
            stdout=stdout,
            stderr=stderr,
            locals=locals_,
            execution_time=time.perf_counter() - start,
            rlm_calls=calls,
            final_answer=answer if isinstance(answer, str) else None,
            status=status if isinstance(status, str) and status in RESULT_STATUSES else "crashed",
            exception=exception[:200] if isinstance(exception, str) else None,
            output_truncated=truncated,
        )

    def interrupt(self) -> None:
        """Interrupt the running cell (KeyboardInterrupt inside it; state kept). Thread-safe.

        Never blocks for more than about a second: while a large frame is still
        being written to a container that does not read it (``docker pause``),
        the interrupt is not sent and a warning is logged; that cell then ends
        at its deadline.
        """
        container = self._container
        if container is not None and not self._closed:
            self._send_interrupt(container)

    # --------------------------------------------------------------- context
    def load_context(self, context_payload: Union[str, dict[str, Any], list[Any]]) -> None:
        """Load ``context_payload`` as ``context_0`` (aliased as ``context``)."""
        self.add_context(context_payload, 0)

    def add_context(
        self,
        context_payload: Union[str, dict[str, Any], list[Any]],
        context_index: Optional[int] = None,
    ) -> int:
        """Add a context as ``context_N``; returns N.

        ``context_index`` defaults to the next free index; a given one must be
        at most :meth:`get_context_count` (replace a context, or add the next).
        """
        index = _index("context_index", context_index, self._context_count)
        return self._add_context(encode_payload("context", context_payload), index)

    def _add_context(self, encoded: tuple[str, str], index: int) -> int:
        path, kind = self._write_payload(f"context_{index}", encoded)
        self._call(
            "load_file",
            {
                "name": f"context_{index}",
                "path": path,
                "kind": kind,
                "aliases": ["context"] if index == 0 else [],
            },
        )
        self._context_count = max(self._context_count, index + 1)
        return index

    def get_context_count(self) -> int:
        """How many contexts have been loaded."""
        return self._context_count

    def add_history(self, message_history: list[Any], history_index: Optional[int] = None) -> int:
        """Store a message history (deep copy) as ``history_N``; returns N.

        ``history_index`` defaults to the next free index; a given one must be
        at most :meth:`get_history_count` (replace a history, or add the next).
        """
        if not isinstance(message_history, list):
            raise TypeError("message_history must be a list")
        index = _index("history_index", history_index, self._history_count)
        encoded = encode_payload("history", message_history)
        path, kind = self._write_payload(f"history_{index}", encoded)
        aliases = ["history"] if index == 0 and not self.compaction else []
        self._call(
            "load_file",
            {"name": f"history_{index}", "path": path, "kind": kind, "aliases": aliases},
        )
        self._history_count = max(self._history_count, index + 1)
        return index

    def get_history_count(self) -> int:
        """How many histories have been stored."""
        return self._history_count

    def append_compaction_entry(self, entry: Union[list[Any], dict[str, Any]]) -> None:
        """Append to the host-kept compaction ``history`` (no-op unless ``compaction``)."""
        if not self.compaction:
            return
        try:
            json.dumps(entry)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"compaction entry is not JSON-serialisable: {exc}") from None
        self._compaction_history.append(copy.deepcopy(entry))
        self._call("compaction", {"history": self._compaction_history})

    def update_handler_address(self, address: Address) -> None:
        """Point ``llm_query`` at another LM Handler; also resets ``answer``."""
        self._state.lm_handler_address = _address("address", address)
        self._call("reset_answer", {})

    def _write_payload(self, stem: str, encoded: tuple[str, str]) -> tuple[str, str]:
        """Write an :func:`~dockerrepl._options.encode_payload` result into the mount."""
        self._check_open()
        data, kind = encoded
        rel = f"{stem}.txt" if kind == "text" else f"{stem}.json"
        self._write_new(rel, data)
        return rel, kind

    def _write_new(self, rel: str, text: str) -> None:
        """Write ``rel`` in the mount as a new file.

        The container can write the mount: whatever it left at that name (a
        symlink to a host file, a FIFO, a deep directory tree) is replaced, never
        followed or opened; a directory is moved out of the mount and removed.
        """

        def write(f: Any) -> None:
            out = io.TextIOWrapper(f, encoding="utf-8", errors="surrogatepass")
            out.write(text)
            out.flush()
            out.detach()

        write_new(self.temp_dir, rel, write, self._root)

    # ----------------------------------------------------------- checkpoints
    def checkpoint(self) -> list[str]:
        """Write ``/workspace/state.dill`` now, atomically.

        Returns the names of the variables dill could not pickle (skipped).
        """
        value = self._call("checkpoint", {"cell": self._cell})
        skipped = value.get("skipped") if isinstance(value, dict) else None
        return [str(k) for k in skipped] if isinstance(skipped, list) else []

    # ----------------------------------------------------------------- files
    def upload(
        self, local_path: str, remote_path: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> int:
        """Copy a host file into ``/workspace`` (``remote_path`` relative to it); returns bytes.

        Raises :class:`~dockerrepl.errors.WorkspacePathError` for paths that
        escape the workspace (``..``, absolute paths elsewhere, symlinks).
        """
        self._check_open()
        return copy_in(self.temp_dir, local_path, remote_path, max_bytes)

    def download(
        self, remote_path: str, local_path: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> int:
        """Copy a file from ``/workspace`` to the host; returns bytes. Symlinks are refused."""
        self._check_open()
        return copy_out(self.temp_dir, remote_path, local_path, max_bytes)

    # ------------------------------------------------------------- rlm attrs
    @property
    def container_id(self) -> Optional[str]:
        """The engine's id of the current container (None once cleaned up)."""
        c = self._container
        if c is None or self._closed:
            return None
        return c.container_id()

    @property
    def container_name(self) -> Optional[str]:
        return None if self._container is None else self._container.name

    @property
    def proxy_port(self) -> int:
        """TCP port of the proxy (0 with ``network="none"``: a unix socket)."""
        return 0 if self.proxy is None else self.proxy.port

    @property
    def proxy_server(self) -> Any:
        """The socketserver serving the proxy (has ``lm_handler_address``, as in rlm)."""
        return None if self.proxy is None else self.proxy.server

    @property
    def lm_handler_address(self) -> Optional[Address]:
        return self._state.lm_handler_address

    @lm_handler_address.setter
    def lm_handler_address(self, value: Optional[Address]) -> None:
        self._state.lm_handler_address = (
            None if value is None else _address("lm_handler_address", value)
        )

    # -------------------------------------------------------------- teardown
    def cleanup(self) -> None:
        """Stop the container and the proxy and remove the workspace. Idempotent, thread-safe.

        It does not wait for a cell running in another thread: that cell's
        container is removed at once, and its ``execute_code`` raises
        :class:`~dockerrepl.errors.ReplClosed` (so does any later call).
        """
        self._close(wait=10.0, kill_timeout=30.0)

    def _close(self, wait: float, kill_timeout: float, lock_timeout: float = -1) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        locked = self._lock.acquire(blocking=False)
        if not locked:
            # a call holds the REPL (a cell running in another thread): stop its
            # container now, so that call ends at once (it sees _closed: ReplClosed)
            busy = self._container
            if busy is not None:
                busy.abort(kill_timeout)
            locked = self._lock.acquire(timeout=lock_timeout)
        try:
            container, self._container = self._container, None
            if container is not None:
                # a non-root host user cannot delete files the container's root made
                container.close(wait, purge=os.geteuid() != 0, kill_timeout=kill_timeout)
        finally:
            try:
                if self.proxy is not None:
                    self.proxy.close()
                if self._root:
                    remove_tree(self._root, ignore_errors=True)
            finally:
                if locked:
                    self._lock.release()
                self._done.set()

    def _close_at_exit(self, deadline: float) -> None:
        """Close from the atexit hook (see :mod:`dockerrepl._exit`), by ``deadline``.

        Starts no thread (Python 3.12 refuses them there). A constructor still
        running in another thread (a pool member starting) has its container
        stopped, and is waited for: it removes its own workspace as it fails.
        """

        def left(most: float) -> float:
            return max(0.1, min(most, deadline - time.monotonic()))

        if not self._built.is_set():
            starting = self._container
            if starting is not None:
                starting.abort(left(5.0))
            self._built.wait(left(EXIT_WAIT))
        self._close(wait=left(2.0), kill_timeout=left(5.0), lock_timeout=left(EXIT_WAIT))
        self._done.wait(left(EXIT_WAIT))

    def _close_now(self) -> None:
        """Close during the interpreter's teardown: no thread, no process, no wait.

        Here ``Thread.start()`` waits for ever (3.9-3.11) or raises (3.12+), and
        any other thread may be frozen holding a lock. So: close the channel
        (the supervisor sees EOF and exits; ``--rm`` removes the container, as
        when the host is killed), stop listening, remove the workspace.
        """
        if self._closed:
            return
        self._closed = True
        container, self._container = self._container, None
        try:
            if container is not None:
                container.detach(purge=os.geteuid() != 0)
            if self.proxy is not None:
                self.proxy.close()
        finally:
            if self._root:
                remove_tree(self._root, ignore_errors=True)

    def _discard(self) -> None:
        """Close from a finaliser: at once during teardown, else with short bounds
        (~0.1 s normally; with a hung daemon at most ~11 s: 1 s for the
        supervisor, 5 s for docker rm -f, 5 s for the CLI to exit)."""
        if getattr(self, "_closed", True) or getattr(self, "_pid", None) != os.getpid():
            return
        if sys.is_finalizing():
            self._close_now()
        else:
            self._close(wait=1.0, kill_timeout=5.0)

    def __enter__(self) -> DockerREPL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __del__(self) -> None:
        try:
            self._discard()
        except Exception:
            pass


# re-exported for error messages elsewhere
_ = BootstrapError
