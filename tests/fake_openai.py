"""A fake OpenAI-compatible ``POST /v1/chat/completions`` server on 127.0.0.1.

One server for every test that needs a model behind real HTTP: the OpenAIClient
unit tests, rlm's own openai backend (tests/interop) and scripts/demo.sh.

* ``answer(messages) -> str`` writes each reply's text (an exception in it
  comes back as a 500, so a broken answer shows up as an API error);
* ``replies`` is a list of raw ``(status, headers, body)`` answered first, in
  order (``body`` as bytes is sent as is: for invalid JSON);
* ``tokens`` is the usage reported with each answer: ``(prompt, completion)``,
  or None for an estimate from the text (about four characters a token);
* ``holding = True`` makes every request wait until ``close()`` (client timeouts).

Every request is kept in ``requests`` as ``{"path", "headers", "body"}``, the
header names in lower case.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

Messages = list[dict[str, Any]]
Answer = Callable[[Messages], str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that timed out is gone when a held reply is finally written; that
        # is what the timeout tests want, not a traceback on the run's stderr
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class FakeOpenAI:
    def __init__(
        self,
        answer: Answer = lambda messages: "fake answer",
        tokens: Optional[tuple[int, int]] = (7, 3),
    ) -> None:
        self.answer = answer
        self.tokens = tokens
        self.replies: list[tuple[int, dict[str, str], object]] = []
        self.requests: list[dict[str, Any]] = []
        self.holding = False
        self.hold = threading.Event()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": headers, "body": body})
                if fake.holding:
                    fake.hold.wait(10)
                status, extra, answer = fake._reply(body)
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _reply(self, body: Any) -> tuple[int, dict[str, str], object]:
        with self.lock:
            if self.replies:
                return self.replies.pop(0)
        messages = body.get("messages") or []
        try:
            text = self.answer(messages)
        except Exception as exc:
            return 500, {}, {"error": {"message": f"script failed: {exc!r}"}}
        if self.tokens is None:
            prompt = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
            tokens = (prompt, len(text) // 4 + 1)
        else:
            tokens = self.tokens
        return 200, {}, self.completion(text, *tokens, model=body.get("model", ""))

    @property
    def messages(self) -> list[Messages]:
        """Each request's ``messages``, in order."""
        with self.lock:
            return [r["body"].get("messages") or [] for r in self.requests]

    @staticmethod
    def completion(
        text: Optional[str], prompt_tokens: int = 7, completion_tokens: int = 3, model: str = ""
    ) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
