"""DockerREPL: a persistent Python REPL inside a Docker container (the public facade).

One long-lived container per REPL; cells travel as frames over the
``docker run -i`` pipes to the in-container supervisor, which runs them in a
worker process that keeps the namespace in memory. Checkpoints to
``/workspace/state.dill`` are taken in the background after every completed
cell, so a killed worker or container is restored up to the last completed cell.

Behind the facade, one job per module: the options (``_options``), the
conversation with the container (``_session``), the workspace and how files
reach the container (``_workspace``), the bounds on results (``_results``) and
custom tools (``_tools``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Optional, Union

from . import _exit, _options, _snapshots, _starts
from ._files import DEFAULT_MAX_FILE
from ._options import (
    MAX_TIMEOUT,
    Address,
    ReplOptions,
    check_address,
    check_index,
    check_limit,
    encode_payload,
    unknown_arguments,
)
from ._proxy import ChannelEndpoint, ProxyServer
from ._results import RESULT_STATUSES
from ._session import OutputCallback, Session
from ._sessions import (
    MAX_SESSION_BYTES,
    export_workspace,
    import_workspace,
    read_session_file,
    remove_scratch,
    scratch_dir,
    write_session_file,
)
from ._snapshots import Snapshot
from ._tools import RESERVED_NAMES, HostTool, host_tool, tool_specs
from .errors import SetupCodeError
from .types import REPLResult

__all__ = [
    "DEFAULT_CELL_TIMEOUT",
    "DEFAULT_IMAGE",
    "MAX_TIMEOUT",
    "RESERVED_NAMES",
    "RESULT_STATUSES",
    "DockerREPL",
    "HostTool",
    "host_tool",
]

log = logging.getLogger(__name__)

DEFAULT_IMAGE = _options.DEFAULT_IMAGE
#: Per-cell wall-clock limit unless the caller passes ``timeout=`` (None disables it).
DEFAULT_CELL_TIMEOUT = _options.DEFAULT_CELL_TIMEOUT


#: The longest ``filename`` :meth:`DockerREPL.execute_code` takes.
MAX_FILENAME = 255


def _check_bytes(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"max_bytes must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"max_bytes must be >= 1, not {value}")


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
        network: ``"bridge"`` (default) or ``"none"`` (no network in the
            container; ``llm_query`` still works, over a unix socket or the channel).
        user: run as this ``uid[:gid]`` (or ``name[:group]``) inside the container.
        read_only: read-only root filesystem with a tmpfs ``/tmp``.
        workspace_dir: an existing directory in which the host temp dir is
            created (default: the system's temp dir).
        docker: the docker CLI to use (e.g. ``"podman"``; docs/engines.md).
        docker_host: the engine's URL (``unix://``, ``tcp://``, ``ssh://``,
            ``npipe://``), given to every docker command as ``--host``; the process
            environment is not changed.
        context: a docker context's name, given as ``--context`` (not with
            ``docker_host``). Neither: the CLI's default (``$DOCKER_HOST``, ...).
        transport: ``"auto"`` (default): the proxy path (an HTTP proxy the
            container reaches on the docker bridge, a bind-mounted workspace) when
            the first container shows that it works here, else the channel;
            ``"proxy"``: only that (``TransportUnavailable`` where it cannot work);
            ``"channel"``: ``llm_query``, files and the bootstrap over the ``docker
            run -i`` pipe, state in a labelled named volume: any engine whose
            ``docker run -i`` works (remote, rootless, Podman, Docker Desktop, a
            container with the engine socket mounted). :attr:`transport` says which.
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
        docker_host: Optional[str] = None,
        context: Optional[str] = None,
        transport: str = "auto",
        runtime: Optional[str] = None,
        max_output_bytes: int = _options.DEFAULT_MAX_OUTPUT,
        repr_cap: int = _options.DEFAULT_REPR_CAP,
        max_llm_calls: Optional[int] = None,
        max_llm_tokens: Optional[int] = None,
        auto_checkpoint: Union[bool, str] = True,
        grace: float = _options.DEFAULT_GRACE,
        start_timeout: float = _options.DEFAULT_START_TIMEOUT,
        verify_security: bool = True,
        extra_args: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        if kwargs:
            # rlm's contract: accepted and ignored; said aloud, since a misspelt
            # option (memroy=...) would otherwise silently not apply
            log.warning("DockerREPL ignores unknown arguments: %s", unknown_arguments(kwargs))
        # Every argument is checked before anything starts: typed errors naming the
        # option, no docker command run, nothing to undo (tests/unit/test_repl_args.py).
        # locals() here is exactly the named arguments (and self, and kwargs).
        named = {k: v for k, v in locals().items() if k not in ("self", "kwargs")}
        options = ReplOptions.build(**named)
        # what fork() builds its children with (the context and setup code excepted:
        # a child gets the parent's namespace and workspace instead)
        self._init_args = {
            k: v for k, v in named.items() if k not in ("context_payload", "setup_code")
        }
        #: what this REPL lacks of the session it was forked or resumed from ("" if
        #: nothing, or if it was neither): also prepended to its first cell's stderr
        self.restore_note = ""
        #: the names it lacks (values dill could not pickle, host tools not given again)
        self.lacking: list[str] = []
        # the encoded context can be large: loaded below, not kept
        payload, options = options.context, replace(options, context=None)
        self._options = options
        self.image = options.image
        self.persistent = options.persistent
        self.depth = options.depth
        self.subcall_fn = options.subcall_fn
        self.compaction = options.compaction
        self.max_concurrent_subcalls = options.max_concurrent_subcalls
        self.timeout = options.timeout
        self.network = options.network
        self.custom_tools: dict[str, Any] = options.custom_tools
        self.custom_sub_tools: dict[str, Any] = options.custom_sub_tools
        self._built = threading.Event()  # set once __init__ has returned or raised
        self._pid = os.getpid()  # a forked child never closes its parent's container
        self._context_count = 0
        self._history_count = 0
        self._session = Session(options)
        try:
            self.setup()
            self._session.prime()
            if payload is not None:
                self._add_context(payload, 0)
                payload = None  # the encoded text is in the mount now
            if options.setup_code:
                # not self.execute_code: a subclass may return another result type
                res = DockerREPL.execute_code(self, options.setup_code)
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

    def setup(self) -> None:
        """Create the workspace, start the proxy and the container (called by ``__init__``)."""
        # closed at exit if still open (registers the atexit hook on the first start)
        _exit.track(self, 1)
        with _starts.naming(self._options.engine):
            self._session.start()

    # ----------------------------------------------------------------- cells
    def execute_code(
        self,
        code: str,
        *,
        timeout: Union[float, str, None] = "default",
        on_output: Optional[OutputCallback] = None,
        filename: Optional[str] = None,
        display: bool = False,
        value: bool = False,
    ) -> REPLResult:
        """Run one cell; state persists between cells.

        Never raises for problems in the code itself: exceptions, timeouts,
        crashes and memory exhaustion come back as a :class:`REPLResult` with
        ``status`` set and a message in ``stderr``. ``on_output(stream, text)``
        receives stdout/stderr chunks as they are printed.

        ``filename`` is what tracebacks call this code (default ``<cell-N>``),
        e.g. the script's path when the code came from a file. With
        ``display=True`` a trailing expression's value is printed through
        ``sys.displayhook``, as at Python's prompt (``2+2`` prints ``4``). With
        ``value=True`` it is returned instead, as ``REPLResult.value`` (JSON-able
        values as themselves, others as their repr with ``value_is_repr``; see
        :class:`~dockerrepl.types.REPLResult`).

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
        if filename is not None:
            if not isinstance(filename, str):
                raise TypeError(f"filename must be a str or None, not {type(filename).__name__}")
            if not 0 < len(filename) <= MAX_FILENAME or any(c in filename for c in "\n\r\0"):
                raise ValueError(
                    f"filename must be 1-{MAX_FILENAME} characters on one line, not {filename!r}"
                )
        if not isinstance(display, bool):
            raise TypeError(f"display must be True or False, not {type(display).__name__}")
        if not isinstance(value, bool):
            raise TypeError(f"value must be True or False, not {type(value).__name__}")
        limit = self.timeout if isinstance(timeout, str) and timeout == "default" else timeout
        return self._session.execute(
            code, check_limit("timeout", limit), on_output, filename, display, value
        )

    def interrupt(self) -> None:
        """Interrupt the running cell (KeyboardInterrupt inside it; state kept). Thread-safe.

        Never blocks for more than about a second: while a large frame is still
        being written to a container that does not read it (``docker pause``),
        the interrupt is not sent and a warning is logged; that cell then ends
        at its deadline.
        """
        self._session.interrupt()

    # ----------------------------------------------------- tools, variables
    def define_tools(self, tools: Mapping[str, Any]) -> None:
        """Add or replace custom tools in the running REPL.

        Same values and rules as ``custom_tools`` (code strings, JSON data,
        :func:`host_tool` functions; names checked with ``ValueError`` before
        anything is sent), plus one: a host tool may take the place of an LM
        helper (``llm_query``, ``llm_query_batched``, ``rlm_query``,
        ``rlm_query_batched``), for a host that answers LM calls itself. A tool
        replaces one of the same name; all survive a restarted worker or container.
        """
        if not isinstance(tools, Mapping):
            raise TypeError(f"tools must be a mapping, not {type(tools).__name__}")
        checked = tool_specs(tools)
        if not checked.specs:
            return
        self._session.call("define_tools", {"tools": checked.specs})
        # the session's specs (sent again to a new container by Session.prime) and its
        # host functions (the proxy's table: the same dict) take the new ones
        known = self._session.options.tools
        known.specs.update(checked.specs)
        for name in checked.specs:
            if name in checked.host:
                known.host[name] = checked.host[name]
            else:
                known.host.pop(name, None)
        self.custom_tools.update({k: tools[k] for k in checked.specs})

    def set_variables(self, values: Mapping[str, Any], *, file_threshold: int = 1 << 16) -> None:
        """Bind JSON values as variables of the REPL, without running code.

        Values whose JSON is longer than ``file_threshold`` characters travel as
        files in the workspace (as contexts do) and are not copied into
        checkpoints; smaller ones in one frame. Names must be identifiers other
        than the REPL's helpers and ``answer`` (``ValueError``); a value JSON
        cannot hold is a ``TypeError``; both before anything is sent.
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"values must be a mapping, not {type(values).__name__}")
        small: dict[str, Any] = {}
        large: list[tuple[str, tuple[str, str]]] = []
        for name, value in values.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"variable name {name!r} is not a Python identifier")
            if name in RESERVED_NAMES and name not in ("context", "history"):
                raise ValueError(f"variable name {name!r} is reserved by the REPL")
            try:
                text = json.dumps(value, ensure_ascii=False)
            except (TypeError, ValueError, RecursionError) as exc:
                raise TypeError(f"variable {name!r} is not JSON-serialisable: {exc}") from None
            if len(text) <= file_threshold:
                small[name] = value
            else:
                large.append((name, (value, "text") if isinstance(value, str) else (text, "json")))
        if small:
            self._session.call("set_vars", {"values": small})
        for name, encoded in large:
            self._load_file(name, encoded, [], stem=f"_var_{name}")

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
        index = check_index("context_index", context_index, self._context_count)
        return self._add_context(encode_payload("context", context_payload), index)

    def _add_context(self, encoded: tuple[str, str], index: int) -> int:
        self._load_file(f"context_{index}", encoded, ["context"] if index == 0 else [])
        self._context_count = max(self._context_count, index + 1)
        return index

    def _load_file(
        self, name: str, encoded: tuple[str, str], aliases: list[str], stem: str = ""
    ) -> None:
        """Write a payload into the workspace and load it in the REPL as ``name``."""
        self._session.check_open()
        path = self._session.workspace.write_payload(stem or name, encoded)
        args = {"name": name, "path": path, "kind": encoded[1], "aliases": aliases}
        self._session.call("load_file", args)

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
        index = check_index("history_index", history_index, self._history_count)
        encoded = encode_payload("history", message_history)
        aliases = ["history"] if index == 0 and not self.compaction else []
        self._load_file(f"history_{index}", encoded, aliases)
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
        history = self._session.compaction_history
        history.append(copy.deepcopy(entry))
        self._session.call("compaction", {"history": history})

    def update_handler_address(self, address: Address) -> None:
        """Point ``llm_query`` at another LM Handler; also resets ``answer``."""
        self._session.state.lm_handler_address = check_address("address", address)
        self._session.call("reset_answer", {})

    # ----------------------------------------------------------- checkpoints
    def checkpoint(self) -> list[str]:
        """Write ``/workspace/state.dill`` now, atomically.

        Returns the names of the variables dill could not pickle (skipped).
        """
        value = self._session.call("checkpoint", {"cell": self._session.cell})
        skipped = value.get("skipped") if isinstance(value, dict) else None
        return [str(k) for k in skipped] if isinstance(skipped, list) else []

    # ---------------------------------------------------- sessions as values
    def save(
        self, path: Union[str, os.PathLike[str]], *, max_bytes: int = MAX_SESSION_BYTES
    ) -> list[str]:
        """Write this session to one portable file at ``path``; returns the names not saved.

        The file (a zip: a JSON manifest with versions, and the workspace as a tar)
        holds the namespace as of the last completed cell (a checkpoint taken now),
        the contexts, histories, uploaded files, the compaction history and the
        code and data tools; host tools are named, and must be given again to
        :meth:`resume`. Values dill cannot pickle are not in it: their names are
        returned (and the REPL keeps them). A cell another thread runs is waited
        for; the REPL is unchanged. Over ``max_bytes`` (default 4 GiB):
        ``ValueError``, and no file is written.
        """
        _check_bytes(max_bytes)
        target = os.fspath(path)
        scratch = scratch_dir(os.path.dirname(os.path.abspath(target)))
        try:
            tar = os.path.join(scratch, "workspace.tar")
            info = export_workspace(self, tar, int(max_bytes))
            write_session_file(target, tar, info)
        finally:
            remove_scratch(scratch)
        return list(info["skipped"])

    @classmethod
    def resume(
        cls,
        path: Union[str, os.PathLike[str]],
        *,
        max_bytes: int = MAX_SESSION_BYTES,
        **options: Any,
    ) -> DockerREPL:
        """A new REPL from a file :meth:`save` wrote, in this process or any other.

        ``options`` are the constructor's (the saved session brings its own context and
        namespace: ``context_payload`` and ``setup_code`` are refused); host tools must be
        given again as ``custom_tools``. The file is checked before anything starts
        (the host never unpickles anything from it: only the new container does):
        :class:`~dockerrepl.errors.SessionFileError` says when it is foreign,
        truncated, corrupt, over ``max_bytes`` or from a newer format version.
        What the new REPL lacks is in :attr:`restore_note` and :attr:`lacking`.
        """
        for name in ("context_payload", "setup_code"):
            if options.get(name) is not None:
                raise ValueError(f"resume() takes no {name}: the saved session brings its own")
        _check_bytes(max_bytes)
        source = os.fspath(path)
        scratch = scratch_dir(options.get("workspace_dir"))
        try:
            manifest, tar = read_session_file(source, scratch, int(max_bytes))
            state = manifest["state"]
            if state.get("compaction") and "compaction" not in options:
                options["compaction"] = True
            repl = cls(**options)
            try:
                reply = import_workspace(repl, tar, state)
                repl._restored(
                    f"resumed from {source} (saved after cell {state.get('cell', '?')})",
                    list(manifest.get("skipped") or []),
                    reply,
                )
            except BaseException:
                repl.cleanup()
                raise
            return repl
        finally:
            remove_scratch(scratch)

    def fork(self, n: int = 1, *, pool: Optional[Any] = None, **overrides: Any) -> list[DockerREPL]:
        """``n`` new REPLs, each starting from this one's namespace and workspace.

        Each child gets the namespace as of the last completed cell (a cell another
        thread runs is waited for), the contexts, histories, uploaded files, tools
        (host tools too) and compaction history; afterwards the children and this
        REPL are independent. This REPL is unchanged and keeps the objects dill
        cannot pickle; a child lacks them and says so (:attr:`restore_note`,
        :attr:`lacking`, and its first cell's stderr). Children are built with this
        REPL's arguments and ``overrides``, or taken from ``pool``
        (a :class:`~dockerrepl.DockerREPLPool`: its options, no ``overrides``). The
        caller owns them (``cleanup()``); if one cannot be made, none is returned.
        """
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 256:
            raise ValueError(f"n must be an int from 1 to 256, not {n!r}")
        for name in ("context_payload", "setup_code"):
            if overrides.get(name) is not None:
                raise ValueError(f"fork() takes no {name}: a child gets the parent's namespace")
        if pool is not None and overrides:
            raise ValueError("children from a pool are built with the pool's options")
        self._session.check_open()
        args = {
            **self._init_args,
            "custom_tools": dict(self.custom_tools),
            "lm_handler_address": self.lm_handler_address,
            **overrides,
        }
        scratch = scratch_dir(self._options.workspace_dir)
        children: list[Optional[DockerREPL]] = [None] * n
        errors: list[BaseException] = []
        try:
            tar = os.path.join(scratch, "workspace.tar")
            info = export_workspace(self, tar, MAX_SESSION_BYTES)
            state = info["state"]
            why = f"forked from {self.container_name} after cell {state.get('cell')}"

            def make(i: int) -> None:
                try:
                    if pool is not None:
                        # the pool's replacements start after the fork: n `docker run`s
                        # meanwhile would take the CPU the children's restores need
                        take = getattr(pool, "_acquire", None)
                        child: DockerREPL = (
                            take(120.0, refill=False) if take is not None else pool.acquire()
                        )
                        children[i] = child
                        child.lm_handler_address = self.lm_handler_address
                        if self.custom_tools:
                            child.define_tools(self.custom_tools)
                    else:
                        child = DockerREPL(**args)
                        children[i] = child
                    reply = import_workspace(child, tar, state)
                    child._restored(why, info["skipped"], reply)
                except BaseException as exc:
                    errors.append(exc)

            threads = [
                threading.Thread(target=make, args=(i,), name="dockerrepl-fork", daemon=True)
                for i in range(1, n)
            ]
            for t in threads:
                t.start()
            make(0)
            for t in threads:
                t.join()
        finally:
            remove_scratch(scratch)
            refill = getattr(pool, "_fill", None)
            if refill is not None:
                refill()
        if errors:
            for c in children:
                if c is not None:
                    c.cleanup()
            raise errors[0]
        return [c for c in children if c is not None]

    def snapshot(self, *, keep: int = 8) -> Snapshot:
        """Remember the namespace as of the last completed cell, in memory, for :meth:`rollback`.

        A snapshot is a parked copy-on-write fork of the container's worker: taking
        one costs a fork (a few ms, whatever the namespace's size; nothing is
        pickled), keeping one costs the memory the worker changes afterwards (at
        most one more copy of the namespace, inside the ``memory`` limit; under
        memory pressure the kernel kills snapshots before the worker). At most
        ``keep`` (1-64) snapshots of this REPL are kept: taking one more drops the
        oldest. A cell another thread runs is waited for.
        """
        return _snapshots.take(self, keep)

    def rollback(self, snapshot: Snapshot) -> None:
        """Return the namespace to ``snapshot`` (variables, contexts, histories).

        Takes milliseconds whatever the namespace's size: a new worker is forked from
        the snapshot and the current one is killed only once it exists. Files in
        the workspace and the tools are not rolled back. The snapshot stays usable
        (roll back to it again). It survives a crashed or killed worker, but not a
        replaced container: then, or after it was dropped,
        :class:`~dockerrepl.errors.SnapshotLost`, and the REPL is unchanged.
        """
        _snapshots.rollback(self, snapshot)

    def discard_snapshot(self, snapshot: Snapshot) -> None:
        """Free a snapshot's memory now (rolling back to it then raises
        :class:`~dockerrepl.errors.SnapshotLost`). Idempotent."""
        _snapshots.discard(self, snapshot)

    def _restored(self, why: str, skipped: list[str], reply: dict[str, Any]) -> None:
        """Say what a forked or resumed REPL lacks (never a silent drop)."""
        lacking = sorted(set(skipped) | set(reply.get("skipped") or []))
        missing_tools = list(reply.get("host_tools_missing") or [])
        parts = []
        if lacking:
            parts.append("not carried over (dill cannot pickle them): " + ", ".join(lacking))
        if missing_tools:
            parts.append(
                "host tools not given again (pass them as custom_tools): "
                + ", ".join(missing_tools)
            )
        self.lacking = lacking + missing_tools
        if parts:
            self.restore_note = f"dockerrepl: {why}; " + "; ".join(parts) + "\n"
            self._session.pending_note = self.restore_note
            log.warning("%s", self.restore_note.strip())

    # ----------------------------------------------------------------- files
    def upload(
        self, local_path: str, remote_path: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> int:
        """Copy a host file into ``/workspace`` (``remote_path`` relative to it); returns bytes.

        Raises :class:`~dockerrepl.errors.WorkspacePathError` for paths that
        escape the workspace (``..``, absolute paths elsewhere, symlinks).
        """
        self._session.check_open()
        return self._session.workspace.upload(local_path, remote_path, max_bytes)

    def download(
        self, remote_path: str, local_path: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> int:
        """Copy a file from ``/workspace`` to the host; returns bytes. Symlinks are refused."""
        self._session.check_open()
        return self._session.workspace.download(remote_path, local_path, max_bytes)

    # ------------------------------------------------------------- rlm attrs
    @property
    def temp_dir(self) -> str:
        """The host directory mounted at ``/workspace`` ("" with the channel transport:
        ``/workspace`` is then a volume of the engine's)."""
        return self._session.workspace.temp_dir

    @property
    def transport(self) -> str:
        """How this REPL reaches its container: ``"proxy"`` (an HTTP proxy on the
        bridge, or a unix socket, and a bind-mounted workspace) or ``"channel"``
        (frames over the ``docker run -i`` pipe, a named volume); see ``transport=``."""
        return self._session.transport

    @property
    def restarts(self) -> int:
        """How many times the container was replaced."""
        return self._session.restarts

    @property
    def proxy(self) -> Union[ProxyServer, ChannelEndpoint, None]:
        """The REPL's LM endpoint: the proxy server, or the channel's (``transport``)."""
        return self._session.proxy

    @property
    def container_id(self) -> Optional[str]:
        """The engine's id of the current container (None once cleaned up)."""
        c = self._session.container
        if c is None or self._session.closed:
            return None
        return c.container_id()

    @property
    def container_name(self) -> Optional[str]:
        c = self._session.container
        return None if c is None else c.name

    @property
    def proxy_port(self) -> int:
        """TCP port of the proxy (0 with ``network="none"`` or the channel transport)."""
        return 0 if self.proxy is None else self.proxy.port

    @property
    def proxy_server(self) -> Any:
        """The socketserver serving the proxy (has ``lm_handler_address``, as in rlm)."""
        return None if self.proxy is None else self.proxy.server

    @property
    def lm_handler_address(self) -> Optional[Address]:
        return self._session.state.lm_handler_address

    @lm_handler_address.setter
    def lm_handler_address(self, value: Optional[Address]) -> None:
        self._session.state.lm_handler_address = (
            None if value is None else check_address("lm_handler_address", value)
        )

    # -------------------------------------------------------------- teardown
    def cleanup(self) -> None:
        """Stop the container and the proxy and remove the workspace. Idempotent, thread-safe.

        It does not wait for a cell running in another thread: that cell's
        container is removed at once, and its ``execute_code`` raises
        :class:`~dockerrepl.errors.ReplClosed` (so does any later call).
        """
        self._session.close(wait=10.0, kill_timeout=30.0)

    def _close_at_exit(self, deadline: float) -> None:
        """Close from the atexit hook (see :mod:`dockerrepl._exit`), by ``deadline``."""
        self._session.close_at_exit(deadline, self._built)

    def _discard(self) -> None:
        """Close from a finaliser: at once during teardown, else with short bounds
        (~0.1 s normally; with a hung daemon at most ~11 s: 1 s for the
        supervisor, 5 s for docker rm -f, 5 s for the CLI to exit)."""
        session: Optional[Session] = getattr(self, "_session", None)
        if session is None or session.closed or getattr(self, "_pid", None) != os.getpid():
            return
        if sys.is_finalizing():
            session.close_now()
        else:
            session.close(wait=1.0, kill_timeout=5.0)

    def __enter__(self) -> DockerREPL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __del__(self) -> None:
        try:
            self._discard()
        except Exception:
            pass
