"""Result and usage types, with rlm's field names and ``to_dict()`` shapes.

``to_rlm()`` / ``from_rlm()`` convert to and from rlm's own dataclasses when
rlm is installed (imported lazily, inside the methods).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

__all__ = ["ModelUsageSummary", "REPLResult", "RLMChatCompletion", "UsageSummary"]


def _rlm_types() -> Any:
    try:
        import rlm.core.types as rlm_types
    except ImportError as exc:
        raise ImportError("converting to rlm's types needs rlm: pip install rlms") from exc
    return rlm_types


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


@dataclass
class ModelUsageSummary:
    """Token and call counts for one model."""

    total_calls: int = 0
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    total_cost: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "total_calls": self.total_calls,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
        }
        if self.total_cost is not None:
            out["total_cost"] = self.total_cost
        return out

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]]) -> ModelUsageSummary:
        data = data or {}
        cost = data.get("total_cost")
        return cls(
            total_calls=int(data.get("total_calls") or 0),
            total_input_tokens=int(data.get("total_input_tokens") or 0),
            total_output_tokens=int(data.get("total_output_tokens") or 0),
            total_cost=float(cost) if cost is not None else None,
        )

    @classmethod
    def coerce(cls, obj: Any) -> ModelUsageSummary:
        """Ours, rlm's, a dict or None -> ours."""
        if isinstance(obj, cls):
            return obj
        if obj is None:
            return cls()
        if isinstance(obj, dict):
            return cls.from_dict(obj)
        to_dict = getattr(obj, "to_dict", None)
        if callable(to_dict):
            return cls.from_dict(to_dict())
        return cls(
            total_calls=int(getattr(obj, "total_calls", 0) or 0),
            total_input_tokens=int(getattr(obj, "total_input_tokens", 0) or 0),
            total_output_tokens=int(getattr(obj, "total_output_tokens", 0) or 0),
            total_cost=getattr(obj, "total_cost", None),
        )

    def to_rlm(self) -> Any:
        return _rlm_types().ModelUsageSummary.from_dict(self.to_dict())


@dataclass
class UsageSummary:
    """Usage per model name."""

    model_usage_summaries: dict[str, ModelUsageSummary] = field(default_factory=dict)

    @property
    def total_cost(self) -> Optional[float]:
        costs = [
            s.total_cost for s in self.model_usage_summaries.values() if s.total_cost is not None
        ]
        return sum(costs) if costs else None

    @property
    def total_input_tokens(self) -> int:
        return sum(s.total_input_tokens for s in self.model_usage_summaries.values())

    @property
    def total_output_tokens(self) -> int:
        return sum(s.total_output_tokens for s in self.model_usage_summaries.values())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_usage_summaries": {k: v.to_dict() for k, v in self.model_usage_summaries.items()}
        }
        if self.total_cost is not None:
            out["total_cost"] = self.total_cost
        return out

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]]) -> UsageSummary:
        raw = (data or {}).get("model_usage_summaries") or {}
        return cls(
            {str(k): ModelUsageSummary.from_dict(v) for k, v in raw.items() if isinstance(v, dict)}
        )

    def to_rlm(self) -> Any:
        return _rlm_types().UsageSummary.from_dict(self.to_dict())

    @classmethod
    def from_rlm(cls, obj: Any) -> UsageSummary:
        return cls.from_dict(obj.to_dict())


@dataclass
class RLMChatCompletion:
    """One LM call made from the environment (rlm's ``C`` on the wire)."""

    root_model: str
    prompt: Union[str, dict[str, Any], list[Any], None]
    response: str
    usage_summary: UsageSummary
    execution_time: float
    metadata: Optional[dict[str, Any]] = None
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "root_model": self.root_model,
            "prompt": self.prompt,
            "response": self.response,
            "usage_summary": self.usage_summary.to_dict(),
            "execution_time": self.execution_time,
        }
        if self.metadata is not None:
            out["metadata"] = self.metadata
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RLMChatCompletion:
        return cls(
            root_model=str(data.get("root_model") or ""),
            prompt=data.get("prompt"),
            response=str(data.get("response") or ""),
            usage_summary=UsageSummary.from_dict(data.get("usage_summary")),
            execution_time=float(data.get("execution_time") or 0.0),
            metadata=data.get("metadata") if isinstance(data.get("metadata"), dict) else None,
            error=str(data["error"]) if data.get("error") is not None else None,
        )

    def to_rlm(self) -> Any:
        return _rlm_types().RLMChatCompletion.from_dict(self.to_dict())

    @classmethod
    def from_rlm(cls, obj: Any) -> RLMChatCompletion:
        return cls.from_dict(obj.to_dict())


class REPLResult:
    """What one cell produced. rlm's fields, plus ``status``, ``exception``,
    ``output_truncated``, and (asked for with ``execute_code(..., value=True)``) ``value``.

    ``value`` is the cell's trailing expression's value when it is JSON of at most
    ``max_output_bytes`` characters (tuples come back as lists, dict keys as str),
    else its ``repr`` cut to that size, with ``value_is_repr`` True (and what was cut
    counted in ``output_truncated["value"]``). None when the cell does not end with
    an expression, or did not end ``ok``.

    ``to_dict()`` has exactly rlm's shape (the extra fields are not in it).
    """

    def __init__(
        self,
        stdout: str,
        stderr: str,
        locals: dict[str, Any],
        execution_time: Optional[float] = None,
        rlm_calls: Optional[list[RLMChatCompletion]] = None,
        final_answer: Optional[str] = None,
        *,
        status: str = "ok",
        exception: Optional[str] = None,
        output_truncated: Optional[dict[str, int]] = None,
        value: Any = None,
        value_is_repr: bool = False,
    ) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.locals = locals
        self.execution_time = execution_time
        self.rlm_calls: list[RLMChatCompletion] = list(rlm_calls or [])
        self.final_answer = final_answer
        self.status = status
        self.exception = exception
        self.output_truncated: dict[str, int] = dict(output_truncated or {})
        self.value = value
        self.value_is_repr = value_is_repr

    @property
    def llm_calls(self) -> list[RLMChatCompletion]:
        """rlm's other name for :attr:`rlm_calls`."""
        return self.rlm_calls

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __repr__(self) -> str:
        return (
            f"REPLResult(status={self.status!r}, stdout={self.stdout[:200]!r}, "
            f"stderr={self.stderr[:200]!r}, locals={len(self.locals)} names, "
            f"execution_time={self.execution_time}, rlm_calls={len(self.rlm_calls)}, "
            f"final_answer={self.final_answer!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "stdout": self.stdout,
            "stderr": self.stderr,
            "locals": {k: _json_safe(v) for k, v in self.locals.items()},
            "execution_time": self.execution_time,
            "rlm_calls": [c.to_dict() for c in self.rlm_calls],
            "final_answer": self.final_answer,
        }

    def to_rlm(self) -> Any:
        t = _rlm_types()
        return t.REPLResult(
            stdout=self.stdout,
            stderr=self.stderr,
            locals=dict(self.locals),
            execution_time=self.execution_time,
            rlm_calls=[c.to_rlm() for c in self.rlm_calls],
            final_answer=self.final_answer,
        )

    @classmethod
    def from_rlm(cls, obj: Any) -> REPLResult:
        return cls(
            stdout=obj.stdout,
            stderr=obj.stderr,
            locals=dict(obj.locals),
            execution_time=obj.execution_time,
            rlm_calls=[RLMChatCompletion.from_rlm(c) for c in (obj.rlm_calls or [])],
            final_answer=obj.final_answer,
        )
