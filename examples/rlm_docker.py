"""rlm's ``RLM(environment="docker")`` running on dockerrepl: one line to switch.

    pip install rlms
    OPENAI_API_KEY=sk-... python examples/rlm_docker.py [IMAGE]
    python examples/rlm_docker.py --offline [IMAGE]     # no key: a scripted model on 127.0.0.1

IMAGE (or ``$DOCKERREPL_IMAGE``) defaults to the seed's ``python:3.11-slim``.
Without a registry, build one offline (``scripts/build-image.sh``) and pass
``dockerrepl/python:3.11-bookworm``. ``OPENAI_BASE_URL`` points rlm's openai
backend at any OpenAI-compatible server. ``--rlm-docker`` runs the same thing on
rlm's own DockerREPL instead, for comparison (it needs an image with pip, or
with dill and requests, e.g. ``dockerrepl/rlm-python:bookworm``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 50
QUESTION = "How many times does the word 'times' occur, and what is the mood of the text?"


def main(argv: list[str]) -> int:
    offline = "--offline" in argv
    theirs = "--rlm-docker" in argv
    args = [a for a in argv if not a.startswith("--")]
    image = args[0] if args else os.environ.get("DOCKERREPL_IMAGE", "python:3.11-slim")

    if not offline and not os.environ.get("OPENAI_API_KEY"):
        print(
            "rlm's openai backend needs an API key: set OPENAI_API_KEY (and OPENAI_BASE_URL "
            "for another OpenAI-compatible server), or run with --offline for a scripted model.",
            file=sys.stderr,
        )
        return 2
    try:
        from dockerrepl.errors import DockerReplError
        from dockerrepl.integrations.rlm import use_dockerrepl

        if not theirs:
            use_dockerrepl()  # the one line: RLM(environment="docker") now runs on dockerrepl
        from rlm import RLM
    except ImportError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2

    backend_kwargs: dict[str, Any] = {"model_name": "gpt-5-mini"}
    server = None
    if offline:
        server = _scripted_model()
        port = server.server_address[1]
        backend_kwargs.update(base_url=f"http://127.0.0.1:{port}/v1", api_key="offline")

    rlm = RLM(
        backend="openai",
        backend_kwargs=backend_kwargs,
        environment="docker",
        environment_kwargs={"image": image},
        max_iterations=6,
    )
    start = time.perf_counter()
    try:
        result = rlm.completion(TEXT, root_prompt=QUESTION)
    except DockerReplError as exc:  # no engine, no image, ...: the message says what to do
        print(f"dockerrepl: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.shutdown()
    elapsed = time.perf_counter() - start
    print("answer:", result.response)
    usage = result.usage_summary.to_dict()["model_usage_summaries"]
    print(f"environment: {'rlm' if theirs else 'dockerrepl'}; {elapsed:.2f} s; usage: {usage}")
    return 0


def _scripted_model() -> ThreadingHTTPServer:
    """A stand-in for an OpenAI-compatible server: plays the root model in two turns."""

    def answer(messages: list[dict[str, Any]]) -> str:
        last = str(messages[-1].get("content", ""))
        if messages[0].get("role") != "system":  # an llm_query() from the REPL
            return "calm and reflective" if "mood" in last else "ok"
        if re.search(r"Turn 1/", last):
            return (
                "I will count in Python and ask a sub-LM about the mood.\n```repl\n"
                "import re\n"
                "count = len(re.findall(r'\\btimes\\b', context))\n"
                "mood = llm_query('In three words, the mood of: ' + context[:500])\n"
                "print(count, mood)\n```"
            )
        return (
            "Done.\n```repl\n"
            "answer['content'] = f\"'times' occurs {count} times; the mood is {mood}.\"\n"
            "answer['ready'] = True\n```"
        )

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = answer(body["messages"])
            data = json.dumps(
                {
                    "id": "offline",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", ""),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
