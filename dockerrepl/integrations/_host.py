"""What the integrations share: calling a host function the way model code called it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ..pool import DockerREPLPool
    from ..repl import DockerREPL

__all__ = ["as_keywords", "run_awaitable"]


def as_keywords(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional arguments named after ``fn``'s parameters: DSPy's tools (RLM's
    ``invoke(**kwargs)`` wrappers) take keywords only, model code calls ``f(1, 2)``."""
    if not args:
        return args, kwargs
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return args, kwargs
    names = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            return args, kwargs
        if p.kind == p.POSITIONAL_OR_KEYWORD:
            names.append(p.name)
    if len(args) > len(names):
        return args, kwargs
    named = dict(zip(names, args))
    both = sorted(set(named) & set(kwargs))
    if both:
        raise TypeError(f"got multiple values for argument {both[0]!r}")
    return (), {**named, **kwargs}


def run_awaitable(awaitable: Any) -> Any:
    """Await ``awaitable`` from a thread with no running loop (a proxy thread)."""

    async def wait() -> Any:
        return await awaitable

    return asyncio.run(wait())


def open_repl(
    pool: Optional[DockerREPLPool],
    image: Optional[str],
    timeout: Optional[float],
    options: dict[str, Any],
    tools: dict[str, Any],
) -> DockerREPL:
    """A REPL from ``pool`` (warm) or a new one, with ``tools`` defined; removed again
    if they cannot be."""
    from ..repl import DockerREPL

    if pool is not None:
        repl = pool.acquire()
    else:
        repl = DockerREPL(image=image, timeout=timeout, **options)
    try:
        repl.define_tools(tools)
    except BaseException:
        repl.cleanup()
        raise
    return repl


def check_repl_options(
    pool: Optional[DockerREPLPool], image: Optional[str], timeout: Optional[float], options: Any
) -> None:
    """Every option checked now (TypeError/ValueError), nothing started; with ``pool=``
    the pool's options apply, so giving others too is a ValueError."""
    from .._options import ReplOptions

    if pool is not None and (image is not None or options):
        raise ValueError("with pool=, the pool's options apply: give image and options to it")
    if pool is None:
        ReplOptions.build(image=image, timeout=timeout, **options)
    else:
        ReplOptions.build(timeout=timeout)
