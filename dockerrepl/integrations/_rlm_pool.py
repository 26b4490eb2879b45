"""rlm's per-completion environments from a warm pool (``use_dockerrepl(pool=N)``).

rlm constructs ``DockerREPL(**environment_kwargs)`` for every completion, with
that completion's ``lm_handler_address`` and ``context_payload`` (and, as set,
``subcall_fn``, ``custom_tools``, ...). The class installed here answers that
construction with a REPL that is already running: its ``__new__`` takes one from
the pool and applies the completion's own arguments to it; ``__init__`` then has
nothing left to do. Everything else must match the pool's options; a
construction where it does not starts its own container, as without a pool.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional

from .._options import DEFAULTS, ReplOptions, check_count
from ..errors import ReplClosed, SetupCodeError
from ..pool import DockerREPLPool
from ..repl import DockerREPL

__all__ = ["PER_COMPLETION", "install"]

log = logging.getLogger(__name__.rpartition(".")[0] + ".rlm")

#: What rlm gives each completion: applied to a pooled REPL once it is acquired.
PER_COMPLETION = frozenset(
    {
        "lm_handler_address",
        "context_payload",
        "setup_code",
        "subcall_fn",
        "custom_tools",
        "custom_sub_tools",
        "max_concurrent_subcalls",
        "persistent",
    }
)

_warned: set[tuple[str, ...]] = set()
_warned_lock = threading.Lock()


def _container_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The options a pooled REPL was started with that a completion cannot change."""
    return {k: kwargs.get(k, v) for k, v in DEFAULTS.items() if k not in PER_COMPLETION}


def install(
    base: type[DockerREPL], preset: Mapping[str, Any], size: int
) -> tuple[type[DockerREPL], DockerREPLPool]:
    """``base`` with ``preset`` defaults whose constructions come from a warm pool of
    ``size``, and that pool (started now, from ``preset``, which is checked first)."""
    known = {k: v for k, v in preset.items() if k in DEFAULTS}
    ReplOptions.build(**known)  # a bad default fails here, in the caller's thread
    holder: list[DockerREPLPool] = []

    class _Pooled(base):  # type: ignore[valid-type,misc]
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            if not args and holder:  # rlm passes keywords only; else built as usual
                repl = _take(holder[0], {**preset, **kwargs})
                if repl is not None:
                    repl.__dict__["_dockerrepl_adopted"] = True
                    return repl
            return object.__new__(cls)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if self.__dict__.pop("_dockerrepl_adopted", False):
                return  # from the pool, set up by __new__
            super().__init__(*args, **{**preset, **kwargs})

    class _Member(_Pooled):
        """A pool member: started with the pool's options only (no per-completion
        defaults), and an instance of the installed class (isinstance holds)."""

        def __new__(cls, *args: Any, **kwargs: Any) -> _Member:
            return object.__new__(cls)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # type.__call__ runs the *returned* object's __init__: a handed-out
            # member gets here with the completion's arguments, already applied
            if self.__dict__.pop("_dockerrepl_adopted", False):
                return
            base.__init__(self, *args, **kwargs)

    for c in (_Pooled, _Member):
        c.__name__ = c.__qualname__ = "RlmDockerREPL"
        c.__module__ = base.__module__
    static = {k: v for k, v in known.items() if k not in PER_COMPLETION}
    pool = DockerREPLPool(size, repl_class=_Member, **static)
    holder.append(pool)
    return _Pooled, pool


def _adopt(repl: DockerREPL, given: Mapping[str, Any]) -> None:
    """Give a pooled REPL one completion's own arguments (as its constructor would)."""
    if given.get("lm_handler_address") is not None:
        repl.lm_handler_address = given["lm_handler_address"]
    changes: dict[str, Any] = {}
    if "subcall_fn" in given:
        repl.subcall_fn = repl._session.state.subcall_fn = given["subcall_fn"]
        changes["subcall_fn"] = given["subcall_fn"]
    if "max_concurrent_subcalls" in given:
        n = check_count("max_concurrent_subcalls", given["max_concurrent_subcalls"])
        # the proxy's semaphore is made at the first sub-call: none was made yet
        repl.max_concurrent_subcalls = repl._session.state.max_concurrent_subcalls = n
        changes["max_concurrent_subcalls"] = n
    if "persistent" in given:
        repl.persistent = changes["persistent"] = bool(given["persistent"])
    if changes:
        repl._options = repl._session.options = replace(repl._options, **changes)
        repl._init_args.update(changes)
    tools = given.get("custom_tools")
    if tools:
        repl.define_tools(tools)
    sub_tools = given.get("custom_sub_tools")
    repl.custom_sub_tools = dict(tools or {}) if sub_tools is None else dict(sub_tools)
    if given.get("context_payload") is not None:
        repl.load_context(given["context_payload"])
    code = given.get("setup_code")
    if code:
        res = DockerREPL.execute_code(repl, code)
        if res.status != "ok":
            raise SetupCodeError(
                f"setup_code failed ({res.exception or res.status}); the REPL was removed",
                res.stderr,
                res.status,
            )


def _take(pool: DockerREPLPool, kwargs: dict[str, Any]) -> Optional[DockerREPL]:
    """A pooled REPL set up for ``kwargs``, or None when they need a container of their own."""
    ours = _container_options(pool.repl_kwargs)
    theirs = _container_options(kwargs)
    if theirs != ours:
        differ = tuple(sorted(k for k in ours if ours[k] != theirs[k]))
        with _warned_lock:
            first = differ not in _warned
            _warned.add(differ)
        if first:
            log.warning(
                "use_dockerrepl(pool=...): an environment with other %s than the pool's"
                " starts its own container (give them in use_dockerrepl's defaults)",
                ", ".join(differ),
            )
        return None
    # the same checks (and errors) as a DockerREPL built with these arguments
    ReplOptions.build(**{k: v for k, v in kwargs.items() if k in DEFAULTS})
    try:
        # the replacement starts once this one is set up (pool._fill below), not during
        repl = pool._acquire(float(kwargs.get("start_timeout") or 120.0), refill=False)
    except ReplClosed:
        return None  # restore_rlm_docker() ran meanwhile: a container of its own
    try:
        _adopt(repl, {k: v for k, v in kwargs.items() if k in PER_COMPLETION})
    except BaseException:
        repl.cleanup()
        raise
    finally:
        pool._fill()
    return repl
