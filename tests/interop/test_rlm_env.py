"""dockerrepl's environment against rlm's own pieces (PyPI ``rlms``), on a real engine.

Our DockerREPL against rlm's LMHandler; rlm's client helpers against our
LMHandler; rlm's types out of the integration class; and the environment
contract rlm's RLM relies on: persistence, compaction, sub-calls, custom tools.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

import pytest

from dockerrepl import DockerREPL, LMHandler, host_tool
from dockerrepl import types as our_types
from dockerrepl.clients import EchoClient, ScriptedClient

pytestmark = pytest.mark.timeout(120)


def _script_lm(name: str) -> Any:
    """An rlm BaseLM answering ``<name>:<prompt>``; "" for "empty"; raises for "fail"."""
    from rlm.clients.base_lm import BaseLM
    from rlm.core.types import ModelUsageSummary, UsageSummary

    class ScriptLM(BaseLM):
        def __init__(self) -> None:
            super().__init__(model_name=name)
            self.calls = 0
            self.lock = threading.Lock()

        def completion(self, prompt: Any) -> str:
            with self.lock:
                self.calls += 1
            if prompt == "fail":
                raise RuntimeError("boom")
            return "" if prompt == "empty" else f"{name}:{prompt}"

        async def acompletion(self, prompt: Any) -> str:
            return self.completion(prompt)

        def get_usage_summary(self) -> Any:
            return UsageSummary({name: ModelUsageSummary(self.calls, 3 * self.calls, 5)})

        def get_last_usage(self) -> Any:
            return ModelUsageSummary(total_calls=1, total_input_tokens=3, total_output_tokens=5)

    return ScriptLM()


def test_our_repl_against_rlms_lm_handler(image: str, no_leftovers: None) -> None:
    from rlm.core.lm_handler import LMHandler as RlmLMHandler

    main, other = _script_lm("main"), _script_lm("other")
    handler = RlmLMHandler(main, other_backend_client=other)
    handler.register_client("other", other)
    handler.start()
    try:
        # depth 2: the default client unless a model is named
        with DockerREPL(image=image, lm_handler_address=handler.address, depth=2) as repl:
            r = repl.execute_code(
                "a = llm_query('hi')\n"
                "b = llm_query('empty')\n"
                "c = llm_query('fail')\n"
                "d = llm_query_batched(['x', 'fail', 'empty', 'y'])\n"
                "e = llm_query('hi', model='other')\n"
                "print(repr((a, b, c[:6], d[0], d[1][:6], d[2], d[3], e)))"
            )
            assert r.stderr == ""
            assert eval(r.stdout) == (
                "main:hi",
                "",  # rlm's own DockerREPL turns an empty answer into "Error: None"
                "Error:",
                "main:x",
                "Error:",
                "",
                "main:y",
                "other:hi",
            )
            # completions attributed to the cell, failed ones left out, as in rlm
            assert [c.response for c in r.rlm_calls] == [
                "main:hi",
                "",
                "main:x",
                "",
                "main:y",
                "other:hi",
            ]
            first = r.rlm_calls[0]
            assert isinstance(first, our_types.RLMChatCompletion)
            assert first.root_model == "main"
            usage = first.usage_summary.model_usage_summaries["main"]
            assert (usage.total_input_tokens, usage.total_output_tokens) == (3, 5)
        # depth 1 goes to the other backend (rlm's routing), and the env sends its depth
        with DockerREPL(image=image, lm_handler_address=handler.address, depth=1) as repl:
            r = repl.execute_code("print(llm_query('q'))")
            assert r.stdout == "other:q\n"
    finally:
        handler.stop()


def test_rlms_client_helpers_against_our_lm_handler() -> None:
    from rlm.core.comms_utils import (
        LMRequest,
        send_lm_request,
        send_lm_request_batched,
        socket_request,
    )
    from rlm.core.types import RLMChatCompletion as RlmCompletion

    def answer(prompt: Any) -> str:
        if prompt == "fail":
            raise RuntimeError("nope")
        return f"ok:{prompt}"

    with LMHandler(ScriptedClient(answer, model_name="scripted")) as handler:
        resp = send_lm_request(handler.address, LMRequest(prompt="hello", depth=1))
        assert resp.success
        assert isinstance(resp.chat_completion, RlmCompletion)
        assert resp.chat_completion.response == "ok:hello"
        assert resp.chat_completion.root_model == "scripted"
        assert resp.chat_completion.usage_summary.model_usage_summaries["scripted"].total_calls == 1

        batch = send_lm_request_batched(handler.address, ["a", "fail", "b"], depth=1)
        assert [r.success for r in batch] == [True, False, True]
        assert batch[0].chat_completion.response == "ok:a"
        assert batch[2].chat_completion.response == "ok:b"
        assert "nope" in batch[1].error

        # a single failing prompt is an error frame with all three keys
        raw = socket_request(handler.address, {"prompt": "fail", "depth": 0})
        assert set(raw) == {"error", "chat_completion", "chat_completions"}
        assert raw["chat_completion"] is None and "nope" in raw["error"]
        raw = socket_request(handler.address, {"depth": 0})
        assert raw["error"] and raw["chat_completion"] is None
        # a chat-message prompt travels as JSON and comes back as sent
        msgs = [{"role": "user", "content": "hi"}]
        resp = send_lm_request(handler.address, LMRequest(prompt=msgs))
        assert resp.chat_completion.prompt == msgs


def test_types_convert_to_rlms_own(image: str, handler: Any, no_leftovers: None) -> None:
    from rlm.core import types as rlm_types
    from rlm.utils.parsing import format_execution_result

    from dockerrepl.integrations.rlm import RlmDockerREPL

    with RlmDockerREPL(
        image=image,
        lm_handler_address=handler.address,
        depth=3,
        persistent=True,
        an_option_rlm_may_add_later=1,  # unknown keyword arguments are accepted
    ) as repl:
        # the attributes callers of rlm's DockerREPL read
        assert repl.depth == 3 and repl.persistent is True
        assert isinstance(repl.container_id, str) and repl.container_id
        assert os.path.isdir(repl.temp_dir)
        assert repl.proxy_port > 0
        assert repl.lm_handler_address == repl.proxy_server.lm_handler_address == handler.address
        r = repl.execute_code("x = [1, 2]\nprint(llm_query('p'))")
        assert isinstance(r, rlm_types.REPLResult)
        assert r.stdout == "echo:p\n" and r.stderr == ""
        assert r.locals["x"] == "[1, 2]"
        assert len(r.rlm_calls) == 1
        call = r.rlm_calls[0]
        assert isinstance(call, rlm_types.RLMChatCompletion)
        assert isinstance(call.usage_summary, rlm_types.UsageSummary)
        assert isinstance(
            call.usage_summary.model_usage_summaries["echo"], rlm_types.ModelUsageSummary
        )
        d = r.to_dict()
        assert set(d) == {
            "stdout",
            "stderr",
            "locals",
            "execution_time",
            "rlm_calls",
            "final_answer",
        }
        assert d["rlm_calls"][0]["response"] == "echo:p"
        assert "x" in format_execution_result(r)
        # dockerrepl's extra fields ride along as attributes
        assert r.status == "ok" and r.exception is None
        bad = repl.execute_code("1/0")
        assert bad.status == "error" and bad.exception == "ZeroDivisionError"
        assert "ZeroDivisionError" in bad.stderr
        # and back again
        ours = our_types.REPLResult.from_rlm(r)
        assert ours.rlm_calls[0].response == "echo:p"
        assert ours.to_dict()["rlm_calls"] == d["rlm_calls"]


def test_multi_turn_persistence(image: str, no_leftovers: None) -> None:
    from rlm.environments import SupportsPersistence

    with LMHandler(EchoClient("first")) as h1, LMHandler(EchoClient("second")) as h2:
        repl = DockerREPL(image=image, lm_handler_address=h1.address, context_payload="turn one")
        try:
            assert isinstance(repl, SupportsPersistence)
            cid = repl.container_id
            r = repl.execute_code(
                "x = 7\nanswer['content'] = llm_query(context)\nanswer['ready'] = True"
            )
            assert r.final_answer == "echo:turn one"
            assert repl.get_context_count() == 1 and repl.get_history_count() == 0

            messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
            assert repl.add_history(messages) == 0
            messages[0]["content"] = "changed after add_history"  # a deep copy was stored
            # next turn: new handler, answer reset, new context
            repl.update_handler_address(h2.address)
            assert repl.lm_handler_address == h2.address
            assert repl.proxy_server.lm_handler_address == h2.address
            assert repl.add_context({"turn": 2}) == 1
            assert repl.get_context_count() == 2
            r = repl.execute_code(
                "print(answer, x, context, context_0, context_1['turn'])\n"
                "print(history[0]['content'], history is history_0)\n"
                "print(llm_query('again'))"
            )
            assert r.stderr == ""
            assert r.final_answer is None
            assert r.stdout.splitlines() == [
                "{'content': '', 'ready': False} 7 turn one turn one 2",
                "q1 True",
                "echo:again",
            ]
            assert r.rlm_calls[0].root_model == "second"
            assert repl.add_history([{"role": "user", "content": "q2"}]) == 1
            # an explicit index replaces a context or adds the next one; no gaps
            with pytest.raises(ValueError):
                repl.add_context("gap", 5)
            assert repl.add_context("explicit", 2) == 2
            assert repl.get_context_count() == 3 and repl.get_history_count() == 2
            r = repl.execute_code(
                "context = 'overwritten'; history = None\nprint(history_1[0]['content'], context_2)"
            )
            assert r.stdout == "q2 explicit\n"
            r = repl.execute_code("print(context, history[0]['content'])")
            assert r.stdout == "turn one q1\n"  # the aliases come back
            assert repl.container_id == cid  # one container for the whole conversation
        finally:
            repl.cleanup()


def test_compaction_history_is_host_kept_and_healed(image: str, handler: Any) -> None:
    with DockerREPL(
        image=image, lm_handler_address=handler.address, compaction=True, context_payload="c"
    ) as repl:
        assert repl.execute_code("print(history)").stdout == "[]\n"
        repl.append_compaction_entry([{"role": "assistant", "content": "step 1"}])
        repl.append_compaction_entry({"type": "summary", "content": "sum 1"})
        r = repl.execute_code("print(len(history), history[1]['content'])")
        assert r.stdout == "2 sum 1\n"
        for damage in (
            "history = 'junk'",
            "history.append('x')",
            "history[0] = 'x'",
            "del history",
        ):
            repl.execute_code(damage)
            r = repl.execute_code("print(len(history), history[0][0]['content'])")
            assert r.stdout == "2 step 1\n", damage
        # add_history does not take over `history` while compaction owns it
        repl.add_history([{"role": "user", "content": "old turn"}])
        r = repl.execute_code("print(len(history), history_0[0]['content'])")
        assert r.stdout == "2 old turn\n"
        # a killed worker gets the compaction list back (it is not in the namespace)
        r = repl.execute_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
        assert r.status == "crashed"
        r = repl.execute_code("print(len(history), history[1]['content'])")
        assert r.stdout == "2 sum 1\n"
        # without compaction the method is a no-op, as in rlm
    with DockerREPL(image=image, lm_handler_address=handler.address) as plain:
        plain.append_compaction_entry({"type": "summary", "content": "x"})
        assert plain.execute_code("print('history' in dir())").stdout == "False\n"


def test_subcalls_order_failures_and_one_bound_for_all(image: str, handler: Any) -> None:
    from rlm.core.types import RLMChatCompletion as RlmCompletion
    from rlm.core.types import UsageSummary as RlmUsage

    lock = threading.Lock()
    state = {"now": 0, "max": 0, "calls": 0}

    def subcall_fn(prompt: str, model: str | None) -> Any:
        with lock:
            state["now"] += 1
            state["calls"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            time.sleep(0.05)
            if "bad" in prompt:
                raise RuntimeError("child failed")
            return RlmCompletion(
                root_model=model or "child",
                prompt=prompt,
                response=f"sub({prompt})",
                usage_summary=RlmUsage({}),
                execution_time=0.05,
            )
        finally:
            with lock:
                state["now"] -= 1

    with DockerREPL(
        image=image,
        lm_handler_address=handler.address,
        subcall_fn=subcall_fn,
        max_concurrent_subcalls=3,
    ) as repl:
        r = repl.execute_code(
            "one = rlm_query('a', model='m')\n"
            "bad = rlm_query('bad one')\n"
            "batch = rlm_query_batched(['p0', 'bad', 'p2', 'p3'])\n"
            "print(one, bad[:6], batch[0], batch[1][:6], batch[2], batch[3])"
        )
        assert r.stderr == ""
        assert r.stdout == "sub(a) Error: sub(p0) Error: sub(p2) sub(p3)\n"
        assert [c.response for c in r.rlm_calls] == ["sub(a)", "sub(p0)", "sub(p2)", "sub(p3)"]
        assert r.rlm_calls[0].root_model == "m"
        state.update(max=0, calls=0)
        # two batched calls at once from threads in the cell: one bound for both
        r = repl.execute_code(
            "import threading\n"
            "out = {}\n"
            "def go(tag):\n"
            "    out[tag] = rlm_query_batched([f'{tag}{i}' for i in range(8)])\n"
            "ts = [threading.Thread(target=go, args=(t,)) for t in 'xy']\n"
            "[t.start() for t in ts]\n"
            "[t.join() for t in ts]\n"
            "print(out['x'][7], out['y'][0], len(out['x']) + len(out['y']))"
        )
        assert r.stderr == ""
        assert r.stdout == "sub(x7) sub(y0) 16\n"
        assert state["calls"] == 16
        assert 1 <= state["max"] <= 3
        assert len(r.rlm_calls) == 16


def test_custom_tools(image: str, handler: Any) -> None:
    calls: list[Any] = []

    def lookup(key: str, default: Any = None) -> Any:
        """Look a key up in the host's table."""
        calls.append(key)
        table = {"a": [1, 2]}
        if key == "boom":
            raise KeyError(key)
        if key == "set":
            return {1, 2}
        if key == "custom":

            class QuotaError(Exception):
                pass

            raise QuotaError("over quota")
        return table.get(key, default)

    tools = {
        "double": "def double(x):\n    return 2 * x",
        "inc": "lambda x: x + 1",
        "Point": {
            "tool": (
                "import math\nclass Point:\n    def norm(self):\n        return math.hypot(3, 4)"
            ),
            "description": "a point",
        },
        "poem": "roses are red\nviolets are blue",  # rlm would exec this as code
        "config": {"tool": {"limits": [1, 2, 3]}, "description": "settings"},
        "answer_key": 42,
        "lookup": host_tool(lookup),
        "bare": len,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        repl = DockerREPL(image=image, lm_handler_address=handler.address, custom_tools=tools)
    try:
        assert any("bare" in str(w.message) for w in caught)
        r = repl.execute_code(
            "print(double(4), inc(1), Point().norm(), repr(poem), config['limits'][-1], answer_key)"
        )
        assert r.stderr == ""
        assert r.stdout == "8 2 5.0 'roses are red\\nviolets are blue' 3 42\n"
        r = repl.execute_code("bare('x')")
        assert r.exception == "NameError"
        r = repl.execute_code("print(lookup('a'), lookup('zz', default={'d': 1}))")
        assert r.stdout == "[1, 2] {'d': 1}\n"
        assert calls == ["a", "zz"]
        r = repl.execute_code("try:\n    lookup('boom')\nexcept KeyError as e:\n    print(repr(e))")
        assert r.stdout == "KeyError('boom')\n"
        r = repl.execute_code("lookup('custom')")
        assert r.exception == "QuotaError" and "over quota" in r.stderr
        r = repl.execute_code("lookup(object())")
        assert r.exception == "TypeError"  # arguments must be JSON
        assert len(calls) == 4  # ... found out in the container, before any host call
        r = repl.execute_code("lookup('set')")
        assert r.exception == "TypeError"  # so must the result be
        assert len(calls) == 5
        # callable tools come back after the model overwrites them; data is the model's
        repl.execute_code("double = 5\nlookup = None\nconfig['limits'].append(4)")
        r = repl.execute_code("print(double(1), lookup('a'), config['limits'])")
        assert r.stdout == "2 [1, 2] [1, 2, 3, 4]\n"
        # and survive a killed worker (the host-tool stub is not picklable: reinstalled)
        repl.checkpoint()
        assert repl.execute_code("import os\nos._exit(3)").status == "crashed"
        r = repl.execute_code("print(double(2), lookup('a'), inc(2))")
        assert r.stdout == "4 [1, 2] 3\n"
    finally:
        repl.cleanup()


@pytest.mark.parametrize(
    ("tools", "match"),
    [
        ({"context": "x"}, "reserved"),
        ({"llm_query": "def llm_query(p):\n    return p"}, "reserved"),
        ({"f": "lambda x: x +"}, "lambda"),
        ({"f": "def f(:\n    pass"}, "compile"),
        ({"f": "def g():\n    return 1"}, "'f'"),
        ({"not an identifier": 1}, "identifier"),
    ],
)
def test_bad_custom_tools_rejected_before_start(tools: dict[str, Any], match: str) -> None:
    # rejected while validating, before any container or proxy exists
    with pytest.raises(ValueError, match=match):
        DockerREPL(image="no-such-image:never", custom_tools=tools)


def test_custom_tool_not_json_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="neither code nor JSON"):
        DockerREPL(image="no-such-image:never", custom_tools={"obj": object()})


def test_use_dockerrepl_without_rlm_says_how_to_get_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['rlm'] = None\n"
        "from dockerrepl.integrations.rlm import use_dockerrepl\n"
        "try:\n"
        "    use_dockerrepl()\n"
        "except ImportError as e:\n"
        "    print('ImportError', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.startswith("ImportError")
    assert "pip install rlms" in out.stdout


def test_importing_the_integration_does_not_import_rlm() -> None:
    code = (
        "import sys\n"
        "import dockerrepl.integrations.rlm\n"
        "print(any(m == 'rlm' or m.startswith('rlm.') for m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout == "False\n"


def test_use_dockerrepl_patches_rlm_and_restores() -> None:
    import rlm.environments.docker_repl as rlm_docker

    from dockerrepl.integrations.rlm import RlmDockerREPL, restore_rlm_docker, use_dockerrepl

    original = rlm_docker.DockerREPL
    try:
        cls = use_dockerrepl()
        assert rlm_docker.DockerREPL is cls is RlmDockerREPL
        assert use_dockerrepl() is RlmDockerREPL  # twice is harmless
        with_defaults = use_dockerrepl({"timeout": 30})
        assert issubclass(with_defaults, RlmDockerREPL)
        assert rlm_docker.DockerREPL is with_defaults
    finally:
        restore_rlm_docker()
    assert rlm_docker.DockerREPL is original
