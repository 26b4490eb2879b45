"""rlm's own ``RLM`` end to end with ``environment="docker"`` running on dockerrepl.

rlm's ``openai`` backend (the openai SDK) talks to a scripted OpenAI-compatible
server on 127.0.0.1 (``fake_openai``). The script plays the root model: a
```repl block that calls ``llm_query`` (or ``rlm_query``), then a block that
sets ``answer["ready"]`` — how rlm's RLM takes a final answer. Sub-LM calls
(a single user message, no system prompt) are answered ``sub:<prompt>``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dockerrepl import host_tool

pytestmark = pytest.mark.timeout(180)

Messages = list[dict[str, Any]]


def _turn(messages: Messages) -> int:
    m = re.search(r"Turn (\d+)/", str(messages[-1].get("content", "")))
    return int(m.group(1)) if m else 0


def _repl(code: str) -> str:
    return f"Let me work in the REPL.\n```repl\n{code}\n```\n"


def _is_sub_call(messages: Messages) -> bool:
    return messages[0].get("role") != "system"


def _rlm(fake: Any, image: str, **kwargs: Any) -> Any:
    from rlm import RLM

    env_kwargs = {"image": image, "timeout": 60, **kwargs.pop("environment_kwargs", {})}
    return RLM(
        backend="openai",
        backend_kwargs={
            "model_name": "gpt-4o-mini",
            "base_url": fake.url,
            "api_key": "dummy",
            "max_retries": 0,
        },
        environment="docker",
        environment_kwargs=env_kwargs,
        max_iterations=4,
        **kwargs,
    )


def test_one_shot(
    fake_openai: Any, image: str, dockerrepl_for_rlm: Any, no_leftovers: None, tmp_path: Any
) -> None:
    from rlm.core.types import RLMChatCompletion
    from rlm.logger import RLMLogger

    def script(messages: Messages) -> str:
        if _is_sub_call(messages):
            return "sub:" + messages[-1]["content"]
        if _turn(messages) == 1:
            return _repl("r = llm_query(PREFIX + context)\nprint(r)")
        return _repl("answer['content'] = r.upper()\nanswer['ready'] = True")

    fake_openai.answer = script
    rlm = _rlm(
        fake_openai,
        image,
        logger=RLMLogger(log_dir=str(tmp_path)),
        verbose=True,  # rlm's rich printer renders our results too
        # setup_code runs once; an option rlm's DockerREPL does not know is accepted
        environment_kwargs={"setup_code": "PREFIX = 'hello '", "some_future_option": 1},
    )
    result = rlm.completion("the context")
    assert isinstance(result, RLMChatCompletion)
    assert result.response == "SUB:HELLO THE CONTEXT"
    assert result.usage_summary.model_usage_summaries["gpt-4o-mini"].total_calls == 3
    # the REPL output went back to the model as rlm formats it
    second_turn = fake_openai.messages[-1]
    assert any("sub:hello the context" in str(m.get("content")) for m in second_turn)
    # rlm's logger wrote our results (as rlm's types) to its JSONL file
    (log_file,) = tmp_path.iterdir()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    blocks = [b for e in lines if e["type"] == "iteration" for b in e["code_blocks"]]
    assert blocks[0]["result"]["stdout"] == "sub:hello the context\n"
    assert blocks[0]["result"]["rlm_calls"][0]["response"] == "sub:hello the context"
    assert blocks[1]["result"]["final_answer"] == "SUB:HELLO THE CONTEXT"


def test_persistent_two_turns_one_container(
    fake_openai: Any, image: str, dockerrepl_for_rlm: Any, no_leftovers: None
) -> None:
    def script(messages: Messages) -> str:
        if _is_sub_call(messages):
            return "sub:" + messages[-1]["content"]
        second = "2 contexts" in messages[-1]["content"] or any(
            "2 contexts" in str(m.get("content")) for m in messages
        )
        if not second:
            if _turn(messages) == 1:
                return _repl("kept = llm_query(context)\nprint(kept)")
            return _repl("answer['content'] = kept\nanswer['ready'] = True")
        if _turn(messages) == 1:
            return _repl("r2 = llm_query(context_1)\nprint(kept, r2, len(history))")
        return _repl(
            "answer['content'] = '|'.join([kept, r2, context, history[0]['role']])\n"
            "answer['ready'] = True"
        )

    fake_openai.answer = script
    rlm = _rlm(fake_openai, image, persistent=True)
    try:
        first = rlm.completion("turn one")
        assert first.response == "sub:turn one"
        env = rlm._persistent_env
        assert type(env).__module__ == "dockerrepl.integrations.rlm"
        cid = env.container_id
        assert cid
        assert env.get_context_count() == 1 and env.get_history_count() == 1
        second = rlm.completion("turn two")
        # state from turn one (kept), the new context_1, the stored history_0
        assert second.response == "sub:turn one|sub:turn two|turn one|system"
        assert rlm._persistent_env is env
        assert env.container_id == cid  # one container for the whole conversation
        assert env.get_context_count() == 2 and env.get_history_count() == 2
    finally:
        rlm.close()


def test_max_depth_2_rlm_query_spawns_a_child_on_dockerrepl(
    fake_openai: Any, image: str, dockerrepl_for_rlm: Any, no_leftovers: None
) -> None:
    def script(messages: Messages) -> str:
        if _is_sub_call(messages):
            return "sub:" + messages[-1]["content"]
        is_root = str(messages[1]["content"]).startswith("Answer the following: ROOT")
        if is_root:
            if _turn(messages) == 1:
                return _repl(
                    "r = rlm_query('child task')\n"
                    "rs = rlm_query_batched(['child a', 'child b'])\n"
                    "print(r, rs)"
                )
            return _repl("answer['content'] = tag(r) + ' ' + ','.join(rs)\nanswer['ready'] = True")
        if _turn(messages) == 1:
            return _repl(
                "import os\n"
                "r = llm_query('leaf ' + context)\n"
                "mine = os.path.isdir('/workspace/.dockerrepl')"
            )
        return _repl("answer['content'] = tag(r) + f'/{mine}'\nanswer['ready'] = True")

    fake_openai.answer = script
    rlm = _rlm(
        fake_openai,
        image,
        max_depth=2,
        custom_tools={"tag": "def tag(x):\n    return 'root:' + x"},
        custom_sub_tools={"tag": "def tag(x):\n    return 'child:' + x"},
    )
    result = rlm.completion("root context", root_prompt="ROOT")
    # the child ran its own RLM loop in a dockerrepl container, with the sub-tools
    assert result.response == (
        "root:child:sub:leaf child task/True "
        "child:sub:leaf child a/True,child:sub:leaf child b/True"
    )
    system_prompts = [m[0]["content"] for m in fake_openai.messages if not _is_sub_call(m)]
    assert len(system_prompts) == 2 + 3 * 2  # root: 2 turns; three children: 2 turns each


def test_compaction(
    fake_openai: Any, image: str, dockerrepl_for_rlm: Any, no_leftovers: None
) -> None:
    summaries: list[str] = []

    def script(messages: Messages) -> str:
        if _is_sub_call(messages):
            return "sub:" + messages[-1]["content"]
        if "Summarize your progress so far" in str(messages[-1]["content"]):
            summaries.append(f"SUMMARY {len(summaries) + 1}")
            return summaries[-1]
        if _turn(messages) == 1:
            return _repl("n1 = len(history)\nfirst = history[0]['content']\nhistory = 'clobbered'")
        return _repl(
            "answer['content'] = '|'.join(map(str, [n1, first, type(history).__name__, "
            "len(history), history[-1]['content']]))\n"
            "answer['ready'] = True"
        )

    fake_openai.answer = script
    # a tiny threshold: rlm compacts before every iteration
    rlm = _rlm(fake_openai, image, compaction=True, compaction_threshold_pct=0.0001)
    result = rlm.completion("some context")
    # turn 1 saw [summary 1]; the model's `history = ...` was healed; turn 2 saw
    # [summary 1, turn-1 messages, summary 2]
    assert result.response == "1|SUMMARY 1|list|3|SUMMARY 2"
    assert summaries == ["SUMMARY 1", "SUMMARY 2"]


def test_custom_tools_code_data_and_host_tool(
    fake_openai: Any, image: str, dockerrepl_for_rlm: Any, no_leftovers: None
) -> None:
    seen: list[Any] = []

    def fetch(key: str) -> dict[str, Any]:
        """Fetch a record from the host's database."""
        seen.append(key)
        if key == "missing":
            raise LookupError(f"no record {key!r}")
        return {"key": key, "value": len(key)}

    def script(messages: Messages) -> str:
        if _is_sub_call(messages):
            return "sub:" + messages[-1]["content"]
        if _turn(messages) == 1:
            return _repl(
                "rec = fetch(settings['key'])\n"
                "try:\n    fetch('missing')\nexcept LookupError as e:\n    err = str(e)\n"
                "print(rec, err)"
            )
        return _repl(
            "answer['content'] = f\"{double(rec['value'])} {err} {notes.count(chr(10))}\"\n"
            "answer['ready'] = True"
        )

    fake_openai.answer = script
    rlm = _rlm(
        fake_openai,
        image,
        custom_tools={
            "double": {"tool": "def double(x):\n    return 2 * x", "description": "doubles"},
            "fetch": {"tool": host_tool(fetch), "description": "fetch a record by key"},
            "settings": {"key": "abcd"},
            "notes": "line one\nline two\nline three",
        },
    )
    result = rlm.completion("ctx")
    assert result.response == "8 no record 'missing' 2"
    assert seen == ["abcd", "missing"]
    # rlm described the tools to the model
    system = fake_openai.messages[0][0]["content"]
    assert "`fetch`: fetch a record by key" in system
    assert "`double`: doubles" in system
