"""A smolagents CodeAgent whose code runs in a dockerrepl container, while its tool and
its managed agent run on the host (DockerREPLExecutor).

    python examples/smolagents_agent.py [IMAGE]

The models are scripted (no key needed): the manager asks its managed agent, which calls
the host tool, then answers. Needs ``pip install 'dockerrepl[smolagents]'``; with no
registry, build an image first (``scripts/build-image.sh``) and pass its tag.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from smolagents import CodeAgent, Tool
from smolagents.models import ChatMessage, MessageRole, Model

from dockerrepl.integrations.smolagents import DockerREPLExecutor


class Scripted(Model):
    """Answers each step with the next code block of its script."""

    def __init__(self, steps: list[str]) -> None:
        super().__init__(model_id="scripted")
        self.steps = list(steps)

    def generate(self, messages: Any, stop_sequences: Any = None, **kwargs: Any) -> ChatMessage:
        code = self.steps.pop(0)
        text = f"Thought: next\n<code>\n{code}\n</code>"
        return ChatMessage(role=MessageRole.ASSISTANT, content=text)


class HostInfo(Tool):
    name = "host_info"
    description = "Facts only the host knows (here: its process id)."
    inputs = {"what": {"type": "string", "description": "what to tell"}}
    output_type = "string"

    def forward(self, what: str) -> str:
        return f"{what}: the host's pid is {os.getpid()}"


def main() -> int:
    image = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DOCKERREPL_IMAGE")
    helper = CodeAgent(
        tools=[HostInfo()],
        model=Scripted(["final_answer(host_info(what='asked'))"]),
        executor=DockerREPLExecutor(image=image, timeout=60),
        name="helper",
        description="Knows about the host.",
        verbosity_level=0,
    )
    manager = CodeAgent(
        tools=[],
        model=Scripted(
            [
                "import os\nreport = helper(task='Tell me about the host')\n"
                "print('container pid:', os.getpid())",
                "final_answer({'report': report[-60:], 'sandbox_pid': os.getpid()})",
            ]
        ),
        executor=DockerREPLExecutor(image=image, timeout=60),
        managed_agents=[helper],
        verbosity_level=0,
    )
    try:
        print(manager.run("Ask the helper about the host."))
    finally:
        manager.cleanup()
        helper.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
