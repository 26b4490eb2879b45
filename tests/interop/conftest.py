"""Fixtures for the rlm interop tests: rlm itself, and a scripted OpenAI-compatible server.

Every test here needs the real rlm package (PyPI ``rlms``). Locally the tests
skip without it; in CI (``DOCKERREPL_REQUIRE_DOCKER=1``, set by scripts/test.sh,
which installs rlms) a missing rlm is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

Script = Callable[[list[dict[str, Any]]], str]


def our_containers() -> list[str]:
    """Containers this test process owns (by the owner label), running or not."""
    from dockerrepl._container import owner_label

    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=dockerrepl.owner={owner_label()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.split()


@pytest.fixture(autouse=True)
def _rlm_installed() -> None:
    if os.environ.get("DOCKERREPL_REQUIRE_DOCKER") == "1":
        import rlm  # noqa: F401  (CI installs rlms: a missing rlm must fail loudly)
    else:
        pytest.importorskip("rlm", reason="the interop tests need rlm: pip install rlms")


@pytest.fixture
def no_leftovers(docker_engine: str) -> Iterator[None]:
    """Fail the test if it leaves a container of this process behind."""
    before = set(our_containers())
    yield
    left: set[str] = set()
    for _ in range(50):  # `docker run --rm` removes an exited container asynchronously
        left = set(our_containers()) - before
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"containers left behind: {sorted(left)}"


class FakeOpenAI:
    """An OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 answering from ``script``.

    ``script(messages) -> str`` decides each answer; every request's messages are
    kept in ``requests``. Usage is always reported (rlm's client requires it).
    """

    def __init__(self) -> None:
        self.script: Script = lambda messages: "no script set"
        self.requests: list[list[dict[str, Any]]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                messages = body.get("messages") or []
                with fake.lock:
                    fake.requests.append(messages)
                try:
                    text = fake.script(messages)
                    status, answer = 200, _completion(body.get("model", ""), text, messages)
                except Exception as exc:  # a broken script shows up as an API error
                    status, answer = 500, {"error": {"message": f"script failed: {exc!r}"}}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def backend_kwargs(self, model: str = "gpt-4o-mini") -> dict[str, Any]:
        return {
            "model_name": model,
            "base_url": self.base_url,
            "api_key": "dummy",
            "max_retries": 0,
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _completion(model: str, text: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
    completion_tokens = len(text) // 4 + 1
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


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def dockerrepl_for_rlm() -> Iterator[type]:
    """``use_dockerrepl()`` for one test, undone afterwards."""
    from dockerrepl.integrations.rlm import restore_rlm_docker, use_dockerrepl

    cls = use_dockerrepl()
    try:
        yield cls
    finally:
        restore_rlm_docker()
