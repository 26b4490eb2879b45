"""LM clients with rlm's BaseLM shape: ``model_name``, ``completion(prompt) -> str``,
``acompletion``, ``get_usage_summary()``, ``get_last_usage()``.

* :class:`EchoClient` answers ``echo:<prompt>`` (tests, benchmarks, dry runs);
* :class:`ScriptedClient` answers from a list or a function;
* :class:`OpenAIClient` speaks to any OpenAI-compatible chat-completions endpoint
  with the standard library (``urllib``), with timeouts and retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

from .errors import ClientError
from .types import ModelUsageSummary, UsageSummary

__all__ = ["BaseClient", "EchoClient", "OpenAIClient", "ScriptedClient"]

log = logging.getLogger(__name__)


def _prompt_text(prompt: Any) -> str:
    """A prompt as text: a str itself, a message list's last content, else JSON."""
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and isinstance(prompt[-1], dict)
        and "content" in prompt[-1]
    ):
        return str(prompt[-1]["content"])
    if isinstance(prompt, dict) and "content" in prompt:
        return str(prompt["content"])
    return json.dumps(prompt, ensure_ascii=False, default=str)


class BaseClient:
    """Usage accounting shared by the clients (thread-safe; last usage per thread)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._usage_lock = threading.Lock()
        self._calls = 0
        self._in = 0
        self._out = 0
        self._last = threading.local()

    def _record(self, input_tokens: int, output_tokens: int) -> None:
        with self._usage_lock:
            self._calls += 1
            self._in += input_tokens
            self._out += output_tokens
        self._last.usage = ModelUsageSummary(1, input_tokens, output_tokens)

    def completion(self, prompt: Any) -> str:
        raise NotImplementedError

    async def acompletion(self, prompt: Any) -> str:
        """Run :meth:`completion` in a thread (the clients are synchronous)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.completion, prompt)

    def get_usage_summary(self) -> UsageSummary:
        with self._usage_lock:
            return UsageSummary(
                {self.model_name: ModelUsageSummary(self._calls, self._in, self._out)}
            )

    def get_last_usage(self) -> ModelUsageSummary:
        """The usage of the last call made by this thread."""
        usage = getattr(self._last, "usage", None)
        return usage if isinstance(usage, ModelUsageSummary) else ModelUsageSummary()


class EchoClient(BaseClient):
    """Answers ``"echo:" + prompt``; tokens are whitespace-separated words."""

    def __init__(self, model_name: str = "echo") -> None:
        super().__init__(model_name)

    def completion(self, prompt: Any) -> str:
        text = _prompt_text(prompt)
        answer = "echo:" + text
        self._record(len(text.split()), len(answer.split()))
        return answer


class ScriptedClient(BaseClient):
    """Answers from a list (in order, thread-safe) or from ``fn(prompt) -> str``.

    A list that runs out raises :class:`ClientError`.
    """

    def __init__(
        self, responses: Union[Iterable[str], Callable[[Any], str]], model_name: str = "scripted"
    ) -> None:
        super().__init__(model_name)
        self._fn: Optional[Callable[[Any], str]] = responses if callable(responses) else None
        self._queue: list[str] = [] if callable(responses) else list(responses)
        self._qlock = threading.Lock()
        self.prompts: list[Any] = []

    def completion(self, prompt: Any) -> str:
        with self._qlock:
            self.prompts.append(prompt)
            if self._fn is None:
                if not self._queue:
                    raise ClientError("ScriptedClient has no responses left")
                answer = self._queue.pop(0)
        if self._fn is not None:
            answer = self._fn(prompt)
        text = _prompt_text(prompt)
        self._record(len(text.split()), len(str(answer).split()))
        return answer


class OpenAIClient(BaseClient):
    """Any OpenAI-compatible ``/chat/completions`` endpoint, with the standard library.

    ``base_url`` and ``api_key`` default (at construction, not import) to
    ``$OPENAI_BASE_URL`` (else ``https://api.openai.com/v1``) and
    ``$OPENAI_API_KEY``. 429, 5xx and connection errors are retried with
    exponential backoff and jitter (``Retry-After`` honoured, capped); other
    4xx fail at once with :class:`ClientError`.
    """

    def __init__(
        self,
        model_name: str,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        extra_body: Optional[dict[str, Any]] = None,
        default_headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(model_name)
        self.base_url = (
            base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        ).rstrip("/")
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.extra_body = dict(extra_body or {})
        self.default_headers = dict(default_headers or {})

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIClient(model_name={self.model_name!r}, base_url={self.base_url!r})"

    def _messages(self, prompt: Any) -> list[Any]:
        if isinstance(prompt, list):
            return prompt
        if isinstance(prompt, dict) and "role" in prompt:
            return [prompt]
        return [
            {"role": "user", "content": prompt if isinstance(prompt, str) else _prompt_text(prompt)}
        ]

    def completion(self, prompt: Any) -> str:
        body = {"model": self.model_name, "messages": self._messages(prompt), **self.extra_body}
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", **self.default_headers}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = f"{self.base_url}/chat/completions"
        attempt = 0
        while True:
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            retry_after: Optional[float] = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                break
            except urllib.error.HTTPError as exc:
                snippet = exc.read(500).decode("utf-8", "replace") if exc.fp else ""
                if exc.code != 429 and exc.code < 500:
                    raise ClientError(f"{url} answered HTTP {exc.code}: {snippet}") from None
                err = f"HTTP {exc.code}: {snippet}"
                ra = exc.headers.get("Retry-After") if exc.headers else None
                try:
                    retry_after = float(ra) if ra else None
                except ValueError:
                    retry_after = None
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                err = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except ValueError as exc:
                raise ClientError(f"{url} answered with invalid JSON: {exc}") from None
            if attempt >= self.max_retries:
                raise ClientError(f"{url} failed after {attempt + 1} attempts: {err}")
            delay = min(self.max_backoff, self.backoff * (2**attempt)) * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = min(self.max_backoff, max(delay, retry_after))
            log.debug("OpenAIClient: %s; retrying in %.2fs", err, delay)
            time.sleep(delay)
            attempt += 1
        try:
            content = payload["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ClientError(
                f"{url} answered without choices[0].message: {str(payload)[:300]}"
            ) from None
        usage = payload.get("usage") or {}
        self._record(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        return "" if content is None else str(content)
