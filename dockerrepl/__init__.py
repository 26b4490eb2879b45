"""dockerrepl: run model-written Python in a Docker container, fast and safely.

A persistent REPL (variables kept between cells) whose code can call a language
model on the host with ``llm_query()``. A drop-in replacement for rlm's Docker
environment. Importing this package does nothing but define names.

The public names are loaded on first use (PEP 562): ``python -m dockerrepl gc``
and other light entry points import the package without loading the REPL, the
proxy and the LM Handler.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import DockerReplError
from .types import ModelUsageSummary, REPLResult, RLMChatCompletion, UsageSummary

if TYPE_CHECKING:
    from .aio import AsyncDockerREPL
    from .lm_handler import LMHandler
    from .pool import DockerREPLPool
    from .repl import DockerREPL, host_tool

__all__ = [
    "AsyncDockerREPL",
    "DockerREPL",
    "DockerREPLPool",
    "DockerReplError",
    "LMHandler",
    "ModelUsageSummary",
    "REPLResult",
    "RLMChatCompletion",
    "UsageSummary",
    "__version__",
    "host_tool",
]

# lazy public name -> the submodule that defines it
_LAZY = {
    "AsyncDockerREPL": "aio",
    "DockerREPL": "repl",
    "DockerREPLPool": "pool",
    "LMHandler": "lm_handler",
    "host_tool": "repl",
}
# submodules `import dockerrepl` used to load, still reachable as attributes
_SUBMODULES = frozenset({"lm_handler", "pool", "repl"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
