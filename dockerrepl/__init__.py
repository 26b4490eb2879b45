"""dockerrepl: run model-written Python in a Docker container, fast and safely.

A persistent REPL (variables kept between cells) whose code can call a language
model on the host with ``llm_query()``. A drop-in replacement for rlm's Docker
environment. Importing this package does nothing but define names.
"""

# A literal, set before the imports below: submodules read it, and vendoring
# tools and setup.cfg find it without importing anything.
__version__ = "0.1.0"

from .errors import DockerReplError
from .lm_handler import LMHandler
from .pool import DockerREPLPool
from .repl import DockerREPL, host_tool
from .types import ModelUsageSummary, REPLResult, RLMChatCompletion, UsageSummary

__all__ = [
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
