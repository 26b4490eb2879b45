"""The smallest useful dockerrepl program: a REPL in a container, llm_query() to the host.

    python examples/quickstart.py [IMAGE]

Uses the echo client (answers ``echo:<prompt>``) so it needs no API key. With no
registry, build an image first: ``scripts/build-image.sh`` and pass its tag.
"""

from __future__ import annotations

import sys

from dockerrepl import DockerREPL, LMHandler
from dockerrepl.clients import EchoClient


def main() -> int:
    image = sys.argv[1] if len(sys.argv) > 1 else None
    book = "It was the best of times, it was the worst of times. " * 200
    # nested blocks, not one parenthesised `with` (that needs Python 3.10; hosts may run 3.9)
    with LMHandler(EchoClient()) as handler:  # noqa: SIM117
        with DockerREPL(
            image=image,
            lm_handler_address=handler.address,
            context_payload=book,
            setup_code="import re",
        ) as repl:
            r = repl.execute_code(
                "n = len(context)\n"
                "words = len(re.findall(r'\\w+', context))\n"
                "print(llm_query(f'summarise {n} chars, {words} words'))"
            )
            print("stdout:", r.stdout, end="")
            print("locals:", {k: r.locals[k] for k in ("n", "words")})
            print("llm calls:", [c.response for c in r.rlm_calls])
            r = repl.execute_code("answer['content'] = words\nanswer['ready'] = True")
            print("final answer:", r.final_answer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
