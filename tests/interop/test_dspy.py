"""dockerrepl's DockerInterpreter under real DSPy (PyPI ``dspy``; CI runs this file on the
3.4 line in the main venv and on the 3.3 line in a second one, see scripts/test.sh).

The behaviours of DSPy's interpreter protocol (shared/reference: the conformance list,
numbered as there), then DSPy's own modules driving it: RLM end to end over HTTP against
the fake OpenAI-compatible server (root and sub LM), Flex, ProgramOfThought and CodeAct
through ``interpreter_factory``; timeouts, async tools, ``dspy.context``, concurrent
factories, a warm pool, and nothing left behind.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from docker_helpers import import_or_skip, our_containers
from fake_openai import FakeOpenAI

dspy = import_or_skip("dspy", "the DSPy tests need dspy: pip install 'dockerrepl[dspy]'")

from dspy.primitives.code_interpreter import (  # noqa: E402
    CodeExecutionError,
    CodeInterpreter,
    CodeInterpreterError,
    FinalOutput,
)

from dockerrepl import DockerREPLPool  # noqa: E402
from dockerrepl.integrations.dspy import DockerInterpreter  # noqa: E402

VERSION = tuple(int(p) for p in dspy.__version__.split(".")[:2])


@pytest.fixture
def make(image: str) -> Iterator[Any]:
    """``make(**kw)``: a DockerInterpreter on the test image, shut down after the test;
    and no container of this process is left behind."""
    made: list[DockerInterpreter] = []

    def build(**kw: Any) -> DockerInterpreter:
        kw.setdefault("image", image)
        kw.setdefault("timeout", 60)
        it = DockerInterpreter(**kw)
        made.append(it)
        return it

    yield build
    for it in made:
        it.shutdown()
    assert not our_containers()


# ------------------------------------------------------------------ the protocol
def test_1_is_a_code_interpreter_and_imports_dspy_lazily(make: Any) -> None:
    it = make()
    assert isinstance(it, CodeInterpreter)
    assert isinstance(it.tools, dict) and it.tools == {}
    assert it.repl is None  # nothing started by the constructor
    code = "import sys, dockerrepl.integrations.dspy; print('dspy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_2_start_twice_then_an_expression(make: Any) -> None:
    it = make()
    it.start()
    it.start()
    assert it.execute("40 + 2") == 42


def test_3_printed_output_and_trailing_values(make: Any) -> None:
    it = make()
    assert it.execute("print('hello')") == "hello"
    assert it.execute("6 * 7") == 42
    assert it.execute("x = 1") is None
    assert it.execute("print('a')\n{1, 2}") == "{1, 2}"  # not JSON: its repr
    assert it.execute("[1, (2, 3)]") == [1, [2, 3]]


def test_4_state_persists_and_variables_are_injected(make: Any) -> None:
    it = make()
    it.execute("y = 5")
    assert it.execute("y * 2") == 10
    assert it.execute("injected + 2", {"injected": 40}) == 42


def test_5_two_instances_share_nothing(make: Any) -> None:
    a, b = make(), make()
    a.execute("only_in_a = 1")
    with pytest.raises(CodeExecutionError, match="NameError"):
        b.execute("only_in_a")


def test_6_syntax_and_runtime_errors_then_it_still_works(make: Any) -> None:
    it = make()
    with pytest.raises(SyntaxError):
        it.execute("if")
    with pytest.raises(CodeExecutionError, match="ZeroDivisionError"):
        it.execute("1 / 0")
    assert it.execute("1 + 1") == 2


def test_7_a_host_tool_round_trips(make: Any) -> None:
    calls: list[tuple[int, int]] = []

    def add(left: int, right: int) -> int:
        calls.append((left, right))
        return left + right

    it = make(tools={"add": add})
    assert it.execute("add(left=19, right=23)") == 42
    assert it.execute("add(1, 2)") == 3  # positional, named after the parameters
    assert calls == [(19, 23), (1, 2)]
    # a tool added after the first execute, and an error raised by a tool
    it.tools["fail"] = lambda: {}["missing"]
    with pytest.raises(CodeExecutionError, match="KeyError") as info:
        it.execute("fail()")
    assert isinstance(info.value.__cause__, KeyError)


def test_8_submit_untyped_typed_and_missing_field(make: Any) -> None:
    it = make()
    assert it.execute("SUBMIT(42)") == FinalOutput({"output": 42})
    it.output_fields = [{"name": "answer", "type": "str"}, {"name": "score", "type": "int"}]
    assert it.execute("SUBMIT(answer='yes', score=42)") == FinalOutput(
        {"answer": "yes", "score": 42}
    )
    assert it.execute("SUBMIT('no', 1)") == FinalOutput({"answer": "no", "score": 1})
    with pytest.raises(CodeExecutionError, match="score"):
        it.execute("SUBMIT(answer='yes')")


def test_9_nothing_runs_after_submit(make: Any) -> None:
    it = make()
    code = "try:\n    SUBMIT(1)\nexcept Exception:\n    pass\nafter = True\n"
    assert it.execute(code) == FinalOutput({"output": 1})
    assert it.execute("'after' in globals()") is False


def test_10_shutdown_is_idempotent_and_terminal(make: Any) -> None:
    it = make()
    it.execute("1")
    it.shutdown()
    it.shutdown()
    with pytest.raises(CodeInterpreterError):
        it.start()
    with pytest.raises(CodeInterpreterError):
        it.execute("1")


def test_11_the_factory_and_its_instructions(image: str) -> None:
    factory = DockerInterpreter.factory(image=image, timeout=30)
    text = factory.execution_instructions
    assert isinstance(text, str) and text and text == DockerInterpreter.execution_instructions
    assert factory.execution_instructions == text  # stable
    assert not isinstance(factory, CodeInterpreter)  # DSPy refuses one that is both
    a, b = factory(), factory()
    assert isinstance(a, DockerInterpreter) and a is not b
    with pytest.raises(ValueError, match="memory"):
        DockerInterpreter.factory(memory=12)  # options checked at once
    if VERSION >= (3, 4):
        dspy.configure(interpreter_factory=factory)
        try:
            from dspy.primitives.code_interpreter import resolve_interpreter_factory

            assert resolve_interpreter_factory(None) is factory
        finally:
            dspy.configure(interpreter_factory=None)


# ------------------------------------------------------------------ more behaviours
def test_timeout_keeps_the_namespace(make: Any) -> None:
    it = make(timeout=1.5)
    it.execute("kept = 7")
    with pytest.raises(CodeExecutionError, match="timeout") as info:
        it.execute("import time\nwhile True:\n    time.sleep(0.05)")
    assert "state kept" in str(info.value)
    assert it.execute("kept") == 7


def test_a_crash_restores_the_checkpoint(make: Any) -> None:
    it = make()
    it.execute("kept = [1, 2]")
    time.sleep(0.3)  # the background snapshot
    with pytest.raises(CodeExecutionError, match="restored"):
        it.execute("import os\nos._exit(3)")
    assert it.execute("kept") == [1, 2]


def test_a_lost_sandbox_is_terminal(make: Any) -> None:
    it = make()
    it.execute("1")
    assert it.repl is not None
    it.repl.cleanup()  # the sandbox gone under the interpreter
    with pytest.raises(CodeInterpreterError):
        it.execute("1")
    with pytest.raises(CodeInterpreterError):
        it.execute("1")


def test_concurrent_execute_is_refused(make: Any) -> None:
    it = make()
    it.start()
    t = threading.Thread(target=it.execute, args=("import time\ntime.sleep(1.5)",))
    t.start()
    time.sleep(0.5)
    with pytest.raises(CodeInterpreterError, match="already"):
        it.execute("1")
    t.join()
    assert it.execute("2") == 2


def test_async_tools_are_awaited(make: Any) -> None:
    import asyncio

    async def slow_double(x: int) -> int:
        await asyncio.sleep(0.01)
        return 2 * x

    it = make(tools={"slow_double": slow_double})
    assert it.execute("slow_double(x=21)") == 42


def test_tools_see_the_callers_dspy_context(make: Any) -> None:
    def which_lm() -> str:
        lm = dspy.settings.lm
        return "none" if lm is None else lm.model

    it = make(tools={"which_lm": which_lm})
    with dspy.context(lm=dspy.LM("openai/in-context", api_key="x", cache=False)):
        assert it.execute("which_lm()") == "openai/in-context"


def test_variables_are_sent_only_when_changed(make: Any) -> None:
    it = make()
    it.start()
    sent: list[dict[str, Any]] = []
    repl = it.repl
    real = repl.set_variables

    def spy(values: Any, **kw: Any) -> None:
        sent.append(dict(values))
        real(values, **kw)

    repl.set_variables = spy  # type: ignore[method-assign]
    big = "word " * 40000  # 200 KB: a workspace file
    assert it.execute("len(big), n", {"big": big, "n": 1}) == [len(big), 1]
    assert it.execute("n + 1", {"big": big, "n": 1}) == 2
    assert len(sent) == 1  # the second time nothing changed
    assert it.execute("n", {"big": big, "n": 2}) == 2
    assert sent[-1] == {"n": 2}
    # a variable the code rebinds is bound again, as DSPy's interpreters do
    it.execute("n = 99")
    assert it.execute("n", {"big": big, "n": 2}) == 2
    assert it.execute("import os\nos.path.exists('_var_big.txt')") is True


def test_concurrent_factories_and_nothing_left_behind(image: str) -> None:
    factory = DockerInterpreter.factory(image=image, timeout=30)
    out: dict[int, Any] = {}

    def run(i: int) -> None:
        it = factory()
        try:
            out[i] = it.execute(f"v = {i}\nv * 2")
        finally:
            it.shutdown()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {i: 2 * i for i in range(4)}
    assert not our_containers()


def test_a_pool_gives_warm_containers(image: str) -> None:
    with DockerREPLPool(size=2, image=image) as pool:
        factory = DockerInterpreter.factory(pool=pool, timeout=30)
        with pytest.raises(ValueError):
            DockerInterpreter(pool=pool, memory="1g")
        deadline = time.monotonic() + 60
        while pool.ready_count < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        it = factory()
        t0 = time.perf_counter()
        assert it.execute("1 + 1") == 2
        took = time.perf_counter() - t0
        it.shutdown()
        assert took < 2.0, took  # no container start in it (a cold one is ~0.5 s+)
    assert not our_containers()


# ------------------------------------------------------------------ DSPy's modules
def _action(reasoning: str, code: str) -> str:
    """An RLM action step as DSPy's ChatAdapter parses it."""
    return (
        f"[[ ## reasoning ## ]]\n{reasoning}\n\n[[ ## code ## ]]\n```python\n{code}\n```\n\n"
        "[[ ## completed ## ]]"
    )


def lookup(key: str) -> str:
    """Look a key up in the host's table."""
    return {"a": "apple"}.get(key, "?")


def test_12_rlm_end_to_end_over_http(image: str) -> None:
    """A real dspy.RLM forward pass: root LM and sub LM are two fake OpenAI servers."""
    turns = [0]

    def root(messages: Any) -> str:
        turns[0] += 1
        if turns[0] == 1:
            return _action(
                "explore",
                "n = len(context)\nmood = llm_query('mood of: ' + context[:20])\n"
                "print(n, mood, lookup(key='a'))",
            )
        return _action("done", "SUBMIT(answer=f'{n}:{mood}:{lookup(key=\"a\")}')")

    made: list[DockerInterpreter] = []

    class Recording(DockerInterpreter):
        def start(self) -> None:
            if self not in made:
                made.append(self)
            super().start()

    with (
        FakeOpenAI(answer=root, tokens=None) as rs,
        FakeOpenAI(answer=lambda m: "cheerful", tokens=None) as ss,
    ):
        lm = dspy.LM("openai/root", api_base=rs.url, api_key="x", cache=False)
        sub = dspy.LM("openai/sub", api_base=ss.url, api_key="x", cache=False)
        factory = Recording.factory(image=image, timeout=60)
        rlm = dspy.RLM(
            "context, query -> answer",
            max_iters=4,
            sub_lm=sub,
            tools=[lookup],
            interpreter_factory=factory,
        )
        with dspy.context(lm=lm):
            pred = rlm(context="It was the best of times", query="mood?")
        assert pred.answer == "24:cheerful:apple"
        assert pred.trajectory[0]["output"].strip() == "24 cheerful apple"
        assert len(ss.requests) == 1  # llm_query went to the sub LM, over HTTP
        assert ss.requests[0]["body"]["model"] == "sub"
        assert turns[0] == 2
    assert len(made) == 1 and made[0]._ended  # one interpreter, shut down
    assert not our_containers()


def test_rlm_llm_budget_applies(image: str) -> None:
    def root(messages: Any) -> str:
        return (
            _action("spend", "print([llm_query('q') for _ in range(3)])")
            if "Error" not in str(messages[-1])
            else _action("stop", "SUBMIT(answer='x')")
        )

    with (
        FakeOpenAI(answer=root, tokens=None) as rs,
        FakeOpenAI(answer=lambda m: "ok", tokens=None) as ss,
    ):
        lm = dspy.LM("openai/root", api_base=rs.url, api_key="x", cache=False)
        sub = dspy.LM("openai/sub", api_base=ss.url, api_key="x", cache=False)
        rlm = dspy.RLM(
            "question -> answer",
            max_iters=3,
            max_llm_calls=2,
            sub_lm=sub,
            interpreter_factory=DockerInterpreter.factory(image=image, timeout=60),
        )
        with dspy.context(lm=lm):
            pred = rlm(question="q")
        assert len(ss.requests) == 2  # DSPy's own budget stopped the third call
        assert "Error" in pred.trajectory[0]["output"] or "budget" in str(pred.trajectory)
    assert not our_containers()


def test_program_of_thought_with_a_factory(image: str) -> None:
    lm = dspy.utils.DummyLM(
        [
            {
                "reasoning": "compute",
                "generated_code": "```python\nresult = 6 * 7\nSUBMIT(result)\n```",
            },
            {"reasoning": "read it", "answer": "42"},
        ]
    )
    pot = dspy.ProgramOfThought(
        "question -> answer",
        max_iters=2,
        interpreter_factory=DockerInterpreter.factory(image=image, timeout=60),
    )
    with dspy.context(lm=lm):
        pred = pot(question="6 times 7?")
    assert pred.answer == "42"
    assert not our_containers()


def double(x: int) -> int:
    """Double a number."""
    return 2 * x


def test_code_act_with_a_factory(image: str) -> None:
    lm = dspy.utils.DummyLM(
        [
            {
                "reasoning": "use the tool",
                "generated_code": "```python\nprint(double(21))\n```",
                "finished": True,
            },
            {"reasoning": "done", "answer": "42"},
        ]
    )
    act = dspy.CodeAct(
        "question -> answer",
        tools=[double],
        max_iters=2,
        interpreter_factory=DockerInterpreter.factory(image=image, timeout=60),
    )
    with dspy.context(lm=lm):
        pred = act(question="double 21")
    assert pred.answer == "42"
    outputs = [v for k, v in pred.trajectory.items() if k.startswith("code_output")]
    assert outputs and "42" in str(outputs[0])
    assert not our_containers()


FLEX_SRC = """
class AskModule(dspy.Module):
    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question, total -> answer")

    def forward(self, question):
        total = add(left=19, right=23)
        result = self.predict(question=question, total=str(total))
        return dspy.Prediction(answer=result.answer + "/" + str(total))
"""


def add(left: int, right: int) -> int:
    """Add two numbers."""
    return left + right


def test_13_flex_with_a_host_tool_survives_save_and_load(image: str, tmp_path: Any) -> None:
    if not hasattr(dspy, "Flex"):
        pytest.fail(f"dspy {dspy.__version__} has no Flex (3.3 and 3.4 do)")
    factory = DockerInterpreter.factory(image=image, timeout=60)
    flex = dspy.Flex("question -> answer", tools=[add], interpreter_factory=factory)
    flex.load_state({"module_src": FLEX_SRC})
    lm = dspy.utils.DummyLM([{"answer": "ok"}, {"answer": "again"}])
    with dspy.context(lm=lm):
        assert flex(question="sum?").answer == "ok/42"
        path = str(tmp_path / "flex.json")
        flex.save(path)
        loaded = dspy.Flex("question -> answer", tools=[add], interpreter_factory=factory)
        loaded.load(path)
        assert loaded(question="sum?").answer == "again/42"
    assert not our_containers()
