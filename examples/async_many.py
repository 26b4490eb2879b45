"""Sixteen sandboxes from one asyncio event loop, with AsyncDockerREPL.

    python examples/async_many.py [IMAGE] [SESSIONS] [CELLS]

Starts SESSIONS (default 16) REPLs at once, runs CELLS (default 10) cells in each,
all concurrently (each cell calls ``llm_query`` on the host's echo LM), cancels a
runaway cell with ``asyncio.wait_for`` (the cell is interrupted, the namespace
kept), and closes them all. Prints the times, and the dockerrepl threads alive
before and after. Needs no API key; with no registry, build an image first:
``scripts/build-image.sh`` and pass its tag.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from dockerrepl import AsyncDockerREPL, LMHandler
from dockerrepl.clients import EchoClient


def our_threads() -> int:
    return sum(t.name.startswith("dockerrepl") for t in threading.enumerate())


async def session(repl: AsyncDockerREPL, i: int, cells: int) -> int:
    """Run ``cells`` cells in one REPL; each sees only its own variables and output."""
    await repl.execute_code(f"me = {i}\ntotal = 0")
    for n in range(cells):
        r = await repl.execute_code(f"total += {n}\nprint(me, llm_query('cell {n}'))")
        assert r.stdout == f"{i} echo:cell {n}\n", r
    r = await repl.execute_code("print(total)")
    return int(r.stdout)


async def main(image: str | None, sessions: int, cells: int) -> int:
    with LMHandler(EchoClient()) as handler:
        before = our_threads()
        repls = [
            AsyncDockerREPL(image=image, lm_handler_address=handler.address, timeout=120)
            for _ in range(sessions)
        ]
        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(r.start() for r in repls))
            t1 = time.perf_counter()
            print(f"{sessions} sessions started in {t1 - t0:.2f} s")
            print(f"dockerrepl threads while idle: {our_threads() - before}")

            totals = await asyncio.gather(*(session(r, i, cells) for i, r in enumerate(repls)))
            t2 = time.perf_counter()
            assert totals == [sum(range(cells))] * sessions
            n = sessions * (cells + 2)
            print(f"{n} cells in {t2 - t1:.2f} s: {n / (t2 - t1):.0f} cells/s in all")

            # a runaway cell: the timeout cancels the await, which interrupts the cell
            try:
                await asyncio.wait_for(repls[0].execute_code("while True:\n    pass"), 1.0)
            except asyncio.TimeoutError:
                r = await repls[0].execute_code("print(me, total)")
                print(f"runaway cell cancelled; the session goes on: {r.stdout.strip()}")
        finally:
            t3 = time.perf_counter()
            await asyncio.gather(*(r.aclose() for r in repls))
        print(f"closed in {time.perf_counter() - t3:.2f} s;", end=" ")
        print(f"dockerrepl threads left: {our_threads() - before}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    image = args[0] if args else None
    sessions = int(args[1]) if len(args) > 1 else 16
    cells = int(args[2]) if len(args) > 2 else 10
    raise SystemExit(asyncio.run(main(image, sessions, cells)))
