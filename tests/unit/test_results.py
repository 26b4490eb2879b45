"""Result frames are untrusted: bound_result checks and caps every field (no engine needed)."""

from __future__ import annotations

from typing import Any

import pytest

from dockerrepl._results import RESULT_STATUSES, bound_result
from dockerrepl.types import REPLResult, RLMChatCompletion, UsageSummary

pytestmark = pytest.mark.timeout(30)

CAP, REPR_CAP = 1000, 50
SLACK = 64 << 10  # what the host allows past max_output for marker lines and notes


def bound(frame: Any, **kwargs: Any) -> REPLResult:
    args: dict[str, Any] = {
        "max_output": CAP,
        "repr_cap": REPR_CAP,
        "rlm_calls": [],
        "execution_time": 0.25,
        **kwargs,
    }
    return bound_result(frame, **args)


def test_an_honest_frame_passes_through_unchanged():
    call = RLMChatCompletion("m", "p", "r", UsageSummary(), 0.1)
    frame = {
        "status": "error",
        "stdout": "out\n",
        "stderr": "Traceback ...\n",
        "locals": {"x": "1", "s": "'abc'"},
        "final_answer": "42",
        "exception": "ZeroDivisionError",
        "truncated": {"stdout": 10},
    }
    r = bound(frame, rlm_calls=[call])
    assert (r.status, r.stdout, r.final_answer) == ("error", "out\n", "42")
    assert r.stderr == frame["stderr"]
    assert r.locals == {"x": "1", "s": "'abc'"}
    assert r.exception == "ZeroDivisionError"
    assert r.output_truncated == {"stdout": 10}
    assert r.execution_time == 0.25
    assert r.rlm_calls == [call]


def test_an_empty_frame_is_an_ok_result_with_nothing_in_it():
    r = bound({})
    assert (r.status, r.stdout, r.stderr, r.locals, r.final_answer) == ("ok", "", "", {}, None)
    assert r.exception is None and r.output_truncated == {}


@pytest.mark.parametrize("status", ["pwned", "", 5, None, ["ok"], {"ok": 1}, "OK"])
def test_an_unknown_status_is_crashed(status):
    assert bound({"status": status}).status == "crashed"


@pytest.mark.parametrize("status", sorted(RESULT_STATUSES))
def test_every_known_status_is_kept(status):
    assert bound({"status": status}).status == status


@pytest.mark.parametrize("value", [5, None, b"bytes", ["a"], {"a": 1}, 1.5, True])
def test_output_of_the_wrong_type_is_dropped(value):
    r = bound({"stdout": value, "stderr": value, "final_answer": value, "exception": value})
    assert (r.stdout, r.stderr, r.final_answer, r.exception) == ("", "", None, None)


def test_oversize_output_keeps_head_and_tail_and_says_so():
    r = bound({"stdout": "H" * 5000 + "T" * (SLACK + 5000), "stderr": "e" * (CAP + SLACK)})
    assert CAP <= len(r.stdout) < CAP + 200
    assert r.stdout.startswith("H" * (CAP // 2)) and r.stdout.endswith("T" * (CAP // 2))
    assert "dropped by the host" in r.stdout
    assert r.output_truncated == {"stdout": 10_000 + SLACK - CAP}
    assert r.stderr == "e" * (CAP + SLACK)  # within the slack: left alone


def test_truncation_counts_are_checked_and_added_to():
    frame = {
        "stdout": "x" * (CAP + SLACK + 1),
        "truncated": {"stdout": 7, "stderr": -5, "other": 3, "x": True},
    }
    assert bound(frame).output_truncated == {"stdout": 7 + SLACK + 1}
    for bad in (True, 1.5, "3", None):
        assert bound({"truncated": {"stderr": bad}}).output_truncated == {}
    assert bound({"truncated": ["stdout", 5]}).output_truncated == {}


def test_locals_are_filtered_capped_and_counted():
    frame = {
        "locals": {
            **{f"n{i}": "v" * 5000 for i in range(12_000)},
            "a": [1],
            "b": None,
            "x" * 2000: "y",
        }
    }
    r = bound(frame)
    assert len(r.locals) == 10_000
    assert "a" not in r.locals and "b" not in r.locals and "x" * 2000 not in r.locals
    assert max(len(v) for v in r.locals.values()) <= REPR_CAP + 64
    assert r.locals["n0"] == "v" * REPR_CAP + "... (5000 chars)"


def test_a_repr_within_the_slack_is_kept_whole():
    r = bound({"locals": {"s": "z" * (REPR_CAP + 64)}})
    assert r.locals == {"s": "z" * (REPR_CAP + 64)}


@pytest.mark.parametrize("value", [[("a", "1")], "a=1", 5, None])
def test_locals_that_are_not_a_dict_are_dropped(value):
    assert bound({"locals": value}).locals == {}


def test_non_str_local_names_are_dropped():
    assert bound({"locals": {1: "x", None: "y", "ok": "z"}}).locals == {"ok": "z"}


def test_the_final_answer_is_capped_at_16_mi_characters():
    r = bound({"final_answer": "A" * (17 << 20)})
    assert r.final_answer is not None
    assert (16 << 20) <= len(r.final_answer) < (16 << 20) + 200
    assert "characters of the final answer dropped by the host" in r.final_answer


def test_the_exception_name_is_cut_to_200_characters():
    assert bound({"exception": "E" * 5000}).exception == "E" * 200


def test_the_frame_is_not_changed():
    frame = {"stdout": "x" * (CAP + SLACK + 1), "locals": {"a": "b" * 500}}
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in frame.items()}
    bound(frame)
    assert frame == before
