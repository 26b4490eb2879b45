"""Time one dspy.RLM forward pass on each code interpreter: dockerrepl's DockerInterpreter
(cold: a container started per forward pass, as DSPy's factory contract has it; and with a
warm DockerREPLPool), DSPy's default PythonInterpreter (Deno + Pyodide: ``pip install deno``)
and its LocalInterpreter (a subprocess; 3.4+).

The same program on each: RLM("context, query -> answer") with a host tool, a root LM and
a sub LM served by the project's fake OpenAI-compatible server on 127.0.0.1 (real HTTP,
scripted answers), two iterations: explore (len, llm_query, the tool), then SUBMIT.

    python scripts/bench_dspy.py [--runs 5] [--image IMAGE]

Needs dspy (and deno for the default interpreter). Not run by the tests (timings vary).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import dspy  # noqa: E402
from fake_openai import FakeOpenAI  # noqa: E402

from dockerrepl import DockerREPLPool  # noqa: E402
from dockerrepl.integrations.dspy import DockerInterpreter  # noqa: E402

CONTEXT = "It was the best of times, it was the worst of times. " * 200


def action(reasoning: str, code: str) -> str:
    return (
        f"[[ ## reasoning ## ]]\n{reasoning}\n\n[[ ## code ## ]]\n```python\n{code}\n```\n\n"
        "[[ ## completed ## ]]"
    )


def root_model(messages: Any) -> str:
    if "mood:" in str(messages[-1].get("content", "")):  # the second iteration
        return action("done", "SUBMIT(answer=f'{n} {mood} {fact}')")
    return action(
        "explore",
        "n = context.count('times')\nmood = llm_query('mood: ' + context[:40])\n"
        "fact = lookup(key='a')\nprint('mood:', n, mood, fact)",
    )


def lookup(key: str) -> str:
    """Look a key up."""
    return {"a": "apple"}.get(key, "?")


def forward(factory: Callable[[], Any], lm: Any, sub: Any) -> float:
    rlm = dspy.RLM(
        "context, query -> answer",
        max_iters=4,
        sub_lm=sub,
        tools=[lookup],
        interpreter_factory=factory,
    )
    t0 = time.perf_counter()
    with dspy.context(lm=lm):
        pred = rlm(context=CONTEXT, query="mood?")
    took = time.perf_counter() - t0
    assert pred.answer.startswith("400 "), pred.answer
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--image", default=os.environ.get("DOCKERREPL_IMAGE", "dockerrepl/python:3.11-bookworm")
    )
    args = ap.parse_args()
    print(f"dspy {dspy.__version__}, python {sys.version.split()[0]}, {args.runs} runs each")
    rows: list[tuple[str, list[float]]] = []
    # nested, not one parenthesised `with` (Python 3.10+; hosts may run 3.9)
    with FakeOpenAI(answer=root_model, tokens=None) as rs:  # noqa: SIM117
        with FakeOpenAI(answer=lambda m: "cheerful", tokens=None) as ss:
            lm = dspy.LM("openai/root", api_base=rs.url, api_key="x", cache=False)
            sub = dspy.LM("openai/sub", api_base=ss.url, api_key="x", cache=False)
            candidates: list[tuple[str, Callable[[], Any]]] = [
                (
                    "DockerInterpreter, cold",
                    DockerInterpreter.factory(image=args.image, timeout=60),
                ),
            ]
            pool = DockerREPLPool(size=2, image=args.image)
            candidates.append(
                ("DockerInterpreter, pool", DockerInterpreter.factory(pool=pool, timeout=60))
            )
            local = getattr(dspy, "LocalInterpreter", None)
            if local is None:
                from dspy.primitives import local_interpreter

                local = getattr(local_interpreter, "LocalInterpreter", None)
            if local is not None:
                candidates.append(("LocalInterpreter (subprocess)", local))
            candidates.append(("PythonInterpreter (Deno/Pyodide)", dspy.PythonInterpreter))
            try:
                forward(candidates[0][1], lm, sub)  # warm-up: imports, litellm, the image
                for name, factory in candidates:
                    times: list[float] = []
                    for _ in range(args.runs):
                        if "pool" in name:  # the pool refills in the background between passes
                            end = time.monotonic() + 30
                            while pool.ready_count < 1 and time.monotonic() < end:
                                time.sleep(0.02)
                        try:
                            times.append(forward(factory, lm, sub))
                        except Exception as exc:
                            print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
                            break
                    if times:
                        rows.append((name, times))
            finally:
                pool.close()
    print()
    print("| interpreter | median | min | max |")
    print("|---|---|---|---|")
    for name, times in rows:
        print(
            f"| {name} | {statistics.median(times) * 1000:.0f} ms | {min(times) * 1000:.0f} ms "
            f"| {max(times) * 1000:.0f} ms |"
        )


if __name__ == "__main__":
    main()
