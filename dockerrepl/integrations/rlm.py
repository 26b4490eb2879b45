"""Plug dockerrepl into rlm (PyPI ``rlms``) as its Docker environment.

::

    from dockerrepl.integrations.rlm import use_dockerrepl
    use_dockerrepl()
    rlm = RLM(backend="openai", backend_kwargs={"model_name": "gpt-5-mini"},
              environment="docker", environment_kwargs={"image": "python:3.11-slim"})

rlm builds its environments by name at call time
(``from rlm.environments.docker_repl import DockerREPL`` inside
``rlm.environments.get_environment``), so replacing that module attribute makes
every ``RLM(environment="docker")`` use dockerrepl, child RLMs spawned by
``rlm_query`` included. rlm is imported only when :func:`use_dockerrepl` (or a
conversion to rlm's types) runs, never when this module is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ..repl import DockerREPL
from . import _rlm_pool

if TYPE_CHECKING:
    from ..pool import DockerREPLPool

__all__ = ["RlmDockerREPL", "restore_rlm_docker", "use_dockerrepl"]

_ORIGINAL: list[Any] = []
# the pool of use_dockerrepl(pool=N), while it is installed (0 or 1)
_POOL: list[DockerREPLPool] = []


class RlmDockerREPL(DockerREPL):
    """:class:`DockerREPL` whose cells return rlm's own ``REPLResult``.

    rlm's logger and visualiser call ``to_dict()`` on rlm's types; the
    completions in ``rlm_calls`` are rlm's ``RLMChatCompletion`` too.
    dockerrepl's extra fields (``status``, ``exception``, ``output_truncated``)
    are set as attributes on the rlm result, so they are still there.
    """

    def execute_code(self, code: str, **kwargs: Any) -> Any:  # rlm's REPLResult
        ours = super().execute_code(code, **kwargs)
        theirs = ours.to_rlm()
        theirs.status = ours.status
        theirs.exception = ours.exception
        theirs.output_truncated = ours.output_truncated
        return theirs


def _docker_module() -> Any:
    try:
        import rlm.environments.docker_repl as module
    except ImportError as exc:
        raise ImportError(
            "dockerrepl.integrations.rlm needs rlm: install it with `pip install rlms` "
            f"(importing rlm.environments.docker_repl failed: {exc})"
        ) from exc
    return module


def use_dockerrepl(defaults: Optional[dict[str, Any]] = None, *, pool: int = 0) -> type[DockerREPL]:
    """Make ``RLM(environment="docker")`` use dockerrepl; returns the class installed.

    ``defaults`` are keyword arguments for every environment rlm creates,
    overridden by its ``environment_kwargs`` (e.g. ``{"timeout": 300}``).
    Calling it again replaces the previous defaults; :func:`restore_rlm_docker`
    puts rlm's own class back. Raises ``ImportError`` (saying how to install
    it) when rlm is not installed.

    ``pool=N`` (N > 0) keeps N REPLs started with ``defaults`` warm (a
    :class:`~dockerrepl.DockerREPLPool`, process-wide): each environment rlm
    constructs is taken from it and given its completion's own arguments
    (``lm_handler_address``, ``context_payload``, ``setup_code``, ``subcall_fn``,
    ``custom_tools``, ``custom_sub_tools``, ``max_concurrent_subcalls``,
    ``persistent``) after, so construction costs milliseconds instead of a
    container start. A construction whose other options differ from the pool's
    (give the image and limits in ``defaults``, not in ``environment_kwargs``)
    starts its own container, as without a pool, and a warning names the options
    once. The pool is closed by :func:`restore_rlm_docker`, by the next
    ``use_dockerrepl`` and at exit.
    """
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 0:
        raise ValueError(f"pool must be an int >= 0, not {pool!r}")
    module = _docker_module()
    preset = dict(defaults or {})
    cls: type[DockerREPL] = RlmDockerREPL
    warm: Optional[DockerREPLPool] = None
    if pool:
        # defaults checked (a TypeError/ValueError names the option) before anything
        # is replaced
        cls, warm = _rlm_pool.install(RlmDockerREPL, preset, pool)
    _close_pool()
    if not _ORIGINAL:
        _ORIGINAL.append(module.DockerREPL)
    if warm is not None:
        _POOL.append(warm)
    elif preset:

        class _WithDefaults(RlmDockerREPL):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **{**preset, **kwargs})

        cls = _WithDefaults
    cls.__name__ = cls.__qualname__ = "RlmDockerREPL"
    module.DockerREPL = cls
    return cls


def _close_pool() -> None:
    while _POOL:
        _POOL.pop().close()


def restore_rlm_docker() -> None:
    """Undo :func:`use_dockerrepl` (rlm's own DockerREPL again); closes its pool."""
    _close_pool()
    if _ORIGINAL:
        _docker_module().DockerREPL = _ORIGINAL.pop()
