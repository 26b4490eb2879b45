"""dockerrepl's DockerREPLExecutor under real smolagents (PyPI): a CodeAgent with a scripted
model, a host tool, a managed agent and final_answer; variables, logs and errors as
smolagents expects them."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from docker_helpers import import_or_skip, our_containers

smolagents = import_or_skip("smolagents", "the smolagents tests need: pip install smolagents")

from smolagents import CodeAgent, Tool  # noqa: E402
from smolagents.local_python_executor import PythonExecutor  # noqa: E402
from smolagents.models import ChatMessage, MessageRole, Model  # noqa: E402

from dockerrepl.integrations.smolagents import DockerREPLExecutor  # noqa: E402


class Scripted(Model):
    """A model that answers each step with the next code block of its script."""

    def __init__(self, steps: list[str]) -> None:
        super().__init__(model_id="scripted")
        self.steps = list(steps)
        self.seen: list[Any] = []

    def generate(self, messages: Any, stop_sequences: Any = None, **kwargs: Any) -> ChatMessage:
        self.seen.append(messages)
        code = self.steps.pop(0)
        return ChatMessage(
            role=MessageRole.ASSISTANT, content=f"Thought: go\n<code>\n{code}\n</code>"
        )


class WeatherTool(Tool):
    name = "weather"
    description = "The weather in a city."
    inputs = {"city": {"type": "string", "description": "the city"}}
    output_type = "string"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.threads: list[str] = []

    def forward(self, city: str) -> str:
        self.calls.append(city)
        self.threads.append(threading.current_thread().name)
        return f"sunny in {city}"


@pytest.fixture
def executor(image: str) -> Iterator[DockerREPLExecutor]:
    ex = DockerREPLExecutor(image=image, timeout=30)
    yield ex
    ex.cleanup()
    assert not our_containers()


def test_lazy_import_and_the_executor_type(executor: DockerREPLExecutor) -> None:
    assert isinstance(executor, PythonExecutor)
    assert executor.repl is None
    code = "import sys, dockerrepl.integrations.smolagents; print('smolagents' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_code_agent_with_a_host_tool_and_final_answer(executor: DockerREPLExecutor) -> None:
    weather = WeatherTool()
    model = Scripted(
        [
            "w = weather(city='Paris')\nprint(w)\nn = len(w)",
            "final_answer({'report': w, 'n': n, 'extra': bonus})",
        ]
    )
    with CodeAgent(tools=[weather], model=model, executor=executor, max_steps=4) as agent:
        out = agent.run("weather?", additional_args={"bonus": 7})
        assert out == {"report": "sunny in Paris", "n": 14, "extra": 7}
        assert weather.calls == ["Paris"]  # on the host
        assert "sunny in Paris" in str(model.seen[1])  # the step's logs reached the model
        assert executor.repl is not None
    assert executor.repl is None  # the agent's cleanup removed the container


def test_a_managed_agent_runs_on_the_host(image: str) -> None:
    inner_exec = DockerREPLExecutor(image=image, timeout=30)
    outer_exec = DockerREPLExecutor(image=image, timeout=30)
    weather = WeatherTool()
    inner = CodeAgent(
        tools=[weather],
        model=Scripted(["final_answer(weather(city='Oslo'))"]),
        executor=inner_exec,
        name="forecaster",
        description="Knows the weather.",
    )
    outer = CodeAgent(
        tools=[],
        model=Scripted(["r = forecaster(task='weather in Oslo')\nfinal_answer(r)"]),
        executor=outer_exec,
        managed_agents=[inner],
    )
    try:
        out = outer.run("ask the forecaster")
        assert "sunny in Oslo" in str(out)
        assert weather.calls == ["Oslo"]
    finally:
        outer.cleanup()
        inner.cleanup()
    assert not our_containers()


def test_errors_logs_values_and_state(executor: DockerREPLExecutor) -> None:
    executor.send_tools({})
    executor.send_variables({"x": 40, "skip": object()})
    out = executor("print('hi')\nx + 2")
    assert (out.output, out.logs, out.is_final_answer) == (42, "hi\n", False)
    with pytest.raises(Exception, match="ZeroDivisionError") as info:
        executor("print('before')\n1 / 0")
    assert "before" in str(info.value)
    assert executor.state["_print_outputs"] == "before\n"
    assert executor("x").output == 40  # state kept
    with pytest.raises(Exception, match="NameError"):
        executor("skip")  # not JSON: not sent
