"""A result frame from the container, checked and bounded into a :class:`REPLResult`.

The frame comes from the container: every field is checked and bounded, never
trusted. The supervisor keeps to the same bounds, so an honest result never
meets them (docs/security.md, "Frames are untrusted").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._bootstrap import protocol
from .types import REPLResult, RLMChatCompletion

__all__ = ["RESULT_STATUSES", "bound_result"]

#: Every ``REPLResult.status``; anything else a container reports becomes "crashed".
RESULT_STATUSES = protocol.RESULT_STATUSES
# Bounds on a result frame's fields (the bootstrap's MAX_LOCALS, MAX_NAME and
# FINAL_ANSWER_CAP), with slack for its marker lines and notes: the wire contract.
_MAX_LOCALS = protocol.MAX_LOCALS
_MAX_NAME = protocol.MAX_NAME
_REPR_SLACK = protocol.REPR_SLACK
_FINAL_ANSWER_CAP = protocol.FINAL_ANSWER_CAP
_TEXT_SLACK = protocol.TEXT_SLACK


def _cut(value: str, keep: int, what: str) -> str:
    """``value``'s first and last ``keep`` characters in all, and a note of what was dropped."""
    half = keep // 2
    return (
        f"{value[:half]}\n... [dockerrepl: {len(value) - keep} characters of {what}"
        f" dropped by the host] ...\n{value[len(value) - (keep - half) :]}"
    )


def bound_result(
    frame: Mapping[str, Any],
    *,
    max_output: int,
    repr_cap: int,
    rlm_calls: list[RLMChatCompletion],
    execution_time: float,
) -> REPLResult:
    """The :class:`REPLResult` for a result ``frame``; wrong types are dropped, sizes capped.

    stdout/stderr: at most ``max_output`` characters (head and tail kept) past a
    slack; locals: at most 10,000 str names of at most 1000 characters with str
    reprs of ``repr_cap`` (+ slack); ``final_answer``: at most 16 Mi characters;
    an unknown ``status`` becomes ``"crashed"``; ``exception``: 200 characters.
    """
    raw_trunc = frame.get("truncated")
    truncated = {
        k: v
        for k, v in (raw_trunc.items() if isinstance(raw_trunc, dict) else ())
        if k in ("stdout", "stderr") and type(v) is int and v >= 0
    }

    def text(key: str) -> str:
        value = frame.get(key, "")
        if not isinstance(value, str):
            return ""
        # the supervisor sends at most max_output_bytes, a marker line and its notes
        if len(value) > max_output + _TEXT_SLACK:
            truncated[key] = truncated.get(key, 0) + len(value) - max_output
            return _cut(value, max_output, key)
        return value

    stdout, stderr = text("stdout"), text("stderr")
    locals_: dict[str, str] = {}
    raw_locals = frame.get("locals")
    for k, v in raw_locals.items() if isinstance(raw_locals, dict) else ():
        if len(locals_) >= _MAX_LOCALS:
            break
        if isinstance(k, str) and isinstance(v, str) and len(k) <= _MAX_NAME:
            too_long = len(v) > repr_cap + _REPR_SLACK
            locals_[k] = f"{v[:repr_cap]}... ({len(v)} chars)" if too_long else v
    answer = frame.get("final_answer")
    if isinstance(answer, str) and len(answer) > _FINAL_ANSWER_CAP + _TEXT_SLACK:
        answer = _cut(answer, _FINAL_ANSWER_CAP, "the final answer")
    status = frame.get("status", "ok")
    exception = frame.get("exception")
    value, value_is_repr = _value(frame.get("value"), max_output, truncated)
    return REPLResult(
        stdout=stdout,
        stderr=stderr,
        locals=locals_,
        execution_time=execution_time,
        rlm_calls=rlm_calls,
        final_answer=answer if isinstance(answer, str) else None,
        status=status if isinstance(status, str) and status in RESULT_STATUSES else "crashed",
        exception=exception[:200] if isinstance(exception, str) else None,
        output_truncated=truncated,
        value=value,
        value_is_repr=value_is_repr,
    )


def _value(raw: Any, max_output: int, truncated: dict[str, int]) -> tuple[Any, bool]:
    """A result's trailing-expression value and whether it is a repr, bounded as the
    bootstrap bounds it (see ``protocol.VALUE_KINDS``); what was cut is counted in
    ``truncated["value"]``."""
    if not isinstance(raw, dict) or raw.get("kind") not in protocol.VALUE_KINDS:
        return None, False
    data = raw.get("data")
    dropped = raw.get("dropped")
    if raw["kind"] == "repr":
        if not isinstance(data, str):
            return None, False
        if type(dropped) is int and dropped > 0:
            truncated["value"] = dropped
        if len(data) > max_output + _TEXT_SLACK:
            truncated["value"] = truncated.get("value", 0) + len(data) - max_output
            data = _cut(data, max_output, "the value")
        return data, True
    if data is None or isinstance(data, (bool, int, float)):
        return data, False
    size = len(data) if isinstance(data, str) else len(json.dumps(data, ensure_ascii=False))
    if size > max_output + _TEXT_SLACK:
        truncated["value"] = size - max_output
        text = data if isinstance(data, str) else json.dumps(data)
        return _cut(text, max_output, "the value"), True
    return data, False
