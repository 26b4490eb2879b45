"""Plug dockerrepl into rlm (PyPI ``rlms``) as its Docker environment.

::

    from dockerrepl.integrations.rlm import use_dockerrepl
    use_dockerrepl()
    rlm = RLM(backend="openai", backend_kwargs={"model_name": "gpt-5-mini"},
              environment="docker", environment_kwargs={"image": "python:3.11-slim"})

rlm builds its environments by name at call time
(``from rlm.environments.docker_repl import DockerREPL``), so replacing that
module attribute makes every ``RLM(environment="docker")`` use dockerrepl,
child RLMs included. rlm is imported only when :func:`use_dockerrepl` runs.
"""

from __future__ import annotations

from typing import Any, Optional

from ..repl import DockerREPL

__all__ = ["RlmDockerREPL", "restore_rlm_docker", "use_dockerrepl"]

_ORIGINAL: list[Any] = []


class RlmDockerREPL(DockerREPL):
    """:class:`DockerREPL` whose results are rlm's own types (for rlm's logger and visualiser)."""

    def execute_code(self, code: str, **kwargs: Any) -> Any:  # rlm's REPLResult
        return super().execute_code(code, **kwargs).to_rlm()


def _docker_module() -> Any:
    try:
        import rlm.environments.docker_repl as module
    except ImportError as exc:
        raise ImportError(
            f"use_dockerrepl() needs rlm: install it with `pip install rlms` (import failed: {exc})"
        ) from exc
    return module


def use_dockerrepl(defaults: Optional[dict[str, Any]] = None) -> type[DockerREPL]:
    """Make ``RLM(environment="docker")`` use dockerrepl; returns the class installed.

    ``defaults`` are keyword arguments applied to every environment rlm
    creates unless its ``environment_kwargs`` set them (e.g. ``{"timeout": 300}``).
    Calling it twice is harmless.
    """
    module = _docker_module()
    if not _ORIGINAL:
        _ORIGINAL.append(module.DockerREPL)
    cls: type[DockerREPL] = RlmDockerREPL
    if defaults:
        preset = dict(defaults)

        class _WithDefaults(RlmDockerREPL):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **{**preset, **kwargs})

        _WithDefaults.__name__ = _WithDefaults.__qualname__ = "RlmDockerREPL"
        cls = _WithDefaults
    module.DockerREPL = cls
    return cls


def restore_rlm_docker() -> None:
    """Undo :func:`use_dockerrepl` (rlm's own DockerREPL again)."""
    if _ORIGINAL:
        _docker_module().DockerREPL = _ORIGINAL[0]
