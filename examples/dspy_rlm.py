"""A dspy.RLM whose code runs in a dockerrepl container (DockerInterpreter).

    python examples/dspy_rlm.py [--image IMAGE] [--pool]

With OPENAI_API_KEY (and optionally OPENAI_BASE_URL, DOCKERREPL_MODEL) it asks a real
model; without, a scripted one (dspy.utils.DummyLM) writes the code, and the sub-LM that
``llm_query`` reaches is a small function. Needs ``pip install 'dockerrepl[dspy]'``; with
no registry, build an image first (``scripts/build-image.sh``) and pass its tag.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import dspy

from dockerrepl import DockerREPLPool
from dockerrepl.integrations.dspy import DockerInterpreter

BOOK = "It was the best of times, it was the worst of times. " * 200


def word_count(word: str) -> int:
    """How often ``word`` occurs in the host's copy of the book (a host tool)."""
    return BOOK.lower().count(word.lower())


def scripted() -> tuple[Any, Any]:
    """A root LM that writes two steps of code, and a sub-LM for llm_query."""
    root = dspy.utils.DummyLM(
        [
            {
                "reasoning": "Count, ask the sub-LM for the mood, check with the host tool.",
                "code": "n = context.count('times')\n"
                "mood = llm_query('One word for the mood of: ' + context[:60])\n"
                "print(n, mood, word_count(word='best'))",
            },
            {"reasoning": "Done.", "code": "SUBMIT(answer=f'{n} times, {mood}')"},
        ]
    )

    def sub_lm(prompt: str, **kwargs: Any) -> list[str]:
        return ["wistful"]

    return root, sub_lm


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default=os.environ.get("DOCKERREPL_IMAGE"))
    ap.add_argument("--pool", action="store_true", help="take warm containers from a pool")
    args = ap.parse_args()
    if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
        model = os.environ.get("DOCKERREPL_MODEL", "gpt-5-mini")
        lm: Any = dspy.LM(f"openai/{model}", api_base=os.environ.get("OPENAI_BASE_URL"))
        sub: Any = None
    else:
        lm, sub = scripted()
    pool = DockerREPLPool(size=1, image=args.image) if args.pool else None
    try:
        if pool is not None:
            factory = DockerInterpreter.factory(pool=pool, timeout=120)
        else:
            factory = DockerInterpreter.factory(image=args.image, timeout=120)
        rlm = dspy.RLM(
            "context, query -> answer",
            max_iters=6,
            sub_lm=sub,
            tools=[word_count],
            interpreter_factory=factory,
        )
        t0 = time.perf_counter()
        with dspy.context(lm=lm):
            pred = rlm(context=BOOK, query="How often does 'times' occur, and what is the mood?")
        print(f"answer: {pred.answer}  ({time.perf_counter() - t0:.2f} s)")
        for step in pred.trajectory:
            print("--- code:\n" + step["code"] + "\n--- output:\n" + str(step["output"]))
    finally:
        if pool is not None:
            pool.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
