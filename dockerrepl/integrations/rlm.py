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

from typing import Any, Optional

from ..repl import DockerREPL

__all__ = ["RlmDockerREPL", "restore_rlm_docker", "use_dockerrepl"]

_ORIGINAL: list[Any] = []


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


def use_dockerrepl(defaults: Optional[dict[str, Any]] = None) -> type[DockerREPL]:
    """Make ``RLM(environment="docker")`` use dockerrepl; returns the class installed.

    ``defaults`` are keyword arguments for every environment rlm creates,
    overridden by its ``environment_kwargs`` (e.g. ``{"timeout": 300}``).
    Calling it again replaces the previous defaults; :func:`restore_rlm_docker`
    puts rlm's own class back. Raises ``ImportError`` (saying how to install
    it) when rlm is not installed.
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
        _docker_module().DockerREPL = _ORIGINAL.pop()
