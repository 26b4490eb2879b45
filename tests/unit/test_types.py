"""Result and usage types: rlm's field names and to_dict() shapes (contract §1 and §3)."""

from __future__ import annotations

import json

import pytest
from docker_helpers import import_or_skip

from dockerrepl import ModelUsageSummary, REPLResult, RLMChatCompletion, UsageSummary

pytestmark = pytest.mark.timeout(10)


def usage(cost=None):
    return UsageSummary(
        {
            "gpt-a": ModelUsageSummary(2, 30, 10, cost),
            "gpt-b": ModelUsageSummary(1, 5, 1),
        }
    )


def completion(**kw):
    base = {
        "root_model": "gpt-a",
        "prompt": "what?",
        "response": "that",
        "usage_summary": usage(),
        "execution_time": 0.25,
    }
    base.update(kw)
    return RLMChatCompletion(**base)


# --------------------------------------------------------------------------- usage
def test_model_usage_summary_shape():
    assert ModelUsageSummary(1, 2, 3).to_dict() == {
        "total_calls": 1,
        "total_input_tokens": 2,
        "total_output_tokens": 3,
    }
    assert ModelUsageSummary(1, 2, 3, 0.5).to_dict() == {
        "total_calls": 1,
        "total_input_tokens": 2,
        "total_output_tokens": 3,
        "total_cost": 0.5,
    }
    assert ModelUsageSummary() == ModelUsageSummary(0, 0, 0, None)


@pytest.mark.parametrize("cost", [None, 0.0, 1.25])
def test_model_usage_round_trip(cost):
    m = ModelUsageSummary(4, 5, 6, cost)
    assert ModelUsageSummary.from_dict(m.to_dict()) == m
    assert ModelUsageSummary.from_dict(None) == ModelUsageSummary()


def test_model_usage_coerce():
    m = ModelUsageSummary(1, 2, 3)
    assert ModelUsageSummary.coerce(m) is m
    assert ModelUsageSummary.coerce(None) == ModelUsageSummary()
    assert ModelUsageSummary.coerce(m.to_dict()) == m

    class Attrs:
        total_calls, total_input_tokens, total_output_tokens, total_cost = 1, 2, 3, None

    assert ModelUsageSummary.coerce(Attrs()) == m


def test_usage_summary_shape_and_totals():
    u = usage()
    assert u.to_dict() == {
        "model_usage_summaries": {
            "gpt-a": {"total_calls": 2, "total_input_tokens": 30, "total_output_tokens": 10},
            "gpt-b": {"total_calls": 1, "total_input_tokens": 5, "total_output_tokens": 1},
        }
    }
    assert u.total_cost is None  # and no total_cost key above
    assert (u.total_input_tokens, u.total_output_tokens) == (35, 11)
    priced = usage(cost=0.75)
    assert priced.total_cost == 0.75
    assert priced.to_dict()["total_cost"] == 0.75
    assert priced.to_dict()["model_usage_summaries"]["gpt-a"]["total_cost"] == 0.75


def test_usage_summary_round_trip():
    for u in (usage(), usage(0.1), UsageSummary()):
        assert UsageSummary.from_dict(u.to_dict()) == u
    assert UsageSummary.from_dict(None) == UsageSummary()
    assert UsageSummary().to_dict() == {"model_usage_summaries": {}}


# --------------------------------------------------------------------------- completion
def test_completion_shape():
    d = completion().to_dict()
    assert d == {
        "root_model": "gpt-a",
        "prompt": "what?",
        "response": "that",
        "usage_summary": usage().to_dict(),
        "execution_time": 0.25,
    }
    json.dumps(d)


def test_completion_optional_keys_only_when_set():
    d = completion(metadata={"trace": [1]}, error="llm() call failed - x").to_dict()
    assert d["metadata"] == {"trace": [1]}
    assert d["error"] == "llm() call failed - x"
    assert set(completion(error="e").to_dict()) == {
        "root_model",
        "prompt",
        "response",
        "usage_summary",
        "execution_time",
        "error",
    }


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"prompt": [{"role": "user", "content": "m"}]},
        {"prompt": {"role": "user", "content": "m"}},
        {"metadata": {"a": 1}},
        {"error": "boom", "response": ""},
    ],
)
def test_completion_round_trip(kw):
    c = completion(**kw)
    assert RLMChatCompletion.from_dict(c.to_dict()) == c
    assert RLMChatCompletion.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_completion_from_sparse_dict():
    c = RLMChatCompletion.from_dict({"response": "only this"})
    assert c.response == "only this"
    assert c.root_model == ""
    assert c.usage_summary == UsageSummary()
    assert c.execution_time == 0.0
    assert c.metadata is None and c.error is None


# --------------------------------------------------------------------------- REPLResult
def test_repl_result_fields_and_defaults():
    r = REPLResult("out", "err", {"x": "1"})
    assert (r.stdout, r.stderr, r.locals) == ("out", "err", {"x": "1"})
    assert r.execution_time is None
    assert r.rlm_calls == []
    assert r.final_answer is None
    assert r.status == "ok" and r.ok
    assert r.exception is None
    assert r.output_truncated == {}
    assert r.llm_calls is r.rlm_calls
    # rlm's positional order
    r2 = REPLResult("o", "e", {}, 1.5, [completion()], "final")
    assert r2.execution_time == 1.5
    assert r2.final_answer == "final"
    assert len(r2.rlm_calls) == 1


def test_repl_result_to_dict_is_rlms_shape():
    r = REPLResult(
        "o",
        "e",
        {"x": "1", "n": 5, "nested": {"a": [1, (2, 3)]}, "obj": object()},
        0.5,
        [completion()],
        "42",
        status="error",
        exception="ValueError",
        output_truncated={"stdout": 3},
    )
    d = r.to_dict()
    assert set(d) == {"stdout", "stderr", "locals", "execution_time", "rlm_calls", "final_answer"}
    assert d["rlm_calls"] == [completion().to_dict()]
    assert d["final_answer"] == "42"
    assert d["locals"]["x"] == "1" and d["locals"]["n"] == 5
    assert d["locals"]["nested"] == {"a": [1, [2, 3]]}
    assert isinstance(d["locals"]["obj"], str)  # not JSON: its repr
    json.dumps(d)


def test_repl_result_status_values():
    for st in ("ok", "error", "timeout", "interrupted", "crashed", "oom"):
        r = REPLResult("", "", {}, status=st)
        assert r.ok is (st == "ok")


def test_repl_result_repr_is_bounded():
    r = REPLResult("x" * 100_000, "y" * 100_000, {str(i): "v" for i in range(1000)})
    assert len(repr(r)) < 1000


def test_json_safe_survives_a_broken_repr():
    class Broken:
        def __repr__(self):
            raise RuntimeError("no")

    d = REPLResult("", "", {"b": Broken()}).to_dict()
    assert d["locals"]["b"] == "<Broken>"


# --------------------------------------------------------------------------- rlm's own types
def test_conversion_to_and_from_rlm():
    rlm_types = import_or_skip("rlm.core.types", "needs rlm: pip install rlms")
    c = completion(metadata={"m": 1})
    theirs = c.to_rlm()
    assert isinstance(theirs, rlm_types.RLMChatCompletion)
    assert theirs.to_dict() == c.to_dict()
    assert RLMChatCompletion.from_rlm(theirs) == c
    u = usage(0.5)
    assert u.to_rlm().to_dict() == u.to_dict()
    assert UsageSummary.from_rlm(u.to_rlm()) == u
    r = REPLResult("o", "", {"x": "1"}, 0.1, [c], None)
    rr = r.to_rlm()
    assert isinstance(rr, rlm_types.REPLResult)
    assert rr.stdout == "o" and rr.locals == {"x": "1"}
    assert rr.rlm_calls[0].to_dict() == c.to_dict()
    back = REPLResult.from_rlm(rr)
    assert back.to_dict() == r.to_dict()


def test_rlm_parses_our_dicts():
    rlm_types = import_or_skip("rlm.core.types", "needs rlm: pip install rlms")
    c = completion(error="x")
    assert rlm_types.RLMChatCompletion.from_dict(c.to_dict()).to_dict() == c.to_dict()
