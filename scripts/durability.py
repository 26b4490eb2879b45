#!/usr/bin/env python3
"""How long after a cell its background checkpoint is on disk (auto_checkpoint=True).

    python scripts/durability.py                       # empty, 10 MB and 100 MB of state
    python scripts/durability.py --sizes 0,10 --cells 50 --image python:3.11-slim

For each state size a fresh REPL runs a first cell that makes the state (its
snapshot is a worker's first: its writer imports dill itself), then ``--cells``
cells that each change one small variable, so every one of them forks a snapshot
of the whole namespace. After each cell the host polls ``state.meta.json`` in the
mount every millisecond until it names that cell; the window is from the moment
``execute_code`` returned to the moment the file named the cell. A container
killed inside the window restores the previous checkpoint (and says so). The next
cell starts only after its predecessor's checkpoint landed, so no snapshot is
coalesced away. Prints p50 / p99 / max per size, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dockerrepl import DockerREPL


def landed(meta_path: str, cell: int, timeout: float = 120.0) -> float:
    """Wait until the checkpoint on disk is the one after ``cell``; returns when."""
    end = time.monotonic() + timeout
    while True:
        try:
            with open(meta_path) as f:
                if json.load(f).get("cell", -1) >= cell:
                    return time.monotonic()
        except (OSError, ValueError):
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"the checkpoint after cell {cell} never landed")
        time.sleep(0.001)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def measure(image: str, mb: int, cells: int) -> tuple[float, list[float]]:
    with DockerREPL(image=image, memory="2g", timeout=120) as repl:
        meta = os.path.join(repl.temp_dir, ".dockerrepl", "state.meta.json")
        make = f"blob = bytearray({mb} << 20)\nn = 0" if mb else "n = 0"
        r = repl.execute_code(make)
        assert r.status == "ok", r.stderr
        done = time.monotonic()
        first = landed(meta, repl._session.cell) - done
        windows = []
        for _ in range(cells):
            r = repl.execute_code("n += 1")
            assert r.status == "ok", r.stderr
            done = time.monotonic()
            windows.append(landed(meta, repl._session.cell) - done)
        return first, windows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--image",
        default=os.environ.get("DOCKERREPL_TEST_IMAGE", "dockerrepl/python:3.11-bookworm"),
    )
    ap.add_argument("--sizes", default="0,10,100", help="state sizes in MB, comma-separated")
    ap.add_argument("--cells", type=int, default=100, help="cells per size")
    args = ap.parse_args()
    print(f"{'state':>8} {'first':>8} {'p50':>8} {'p99':>8} {'max':>8}  (ms, {args.cells} cells)")
    for mb in (int(s) for s in args.sizes.split(",")):
        first, w = measure(args.image, mb, args.cells)
        ms = [x * 1000 for x in w]
        print(
            f"{mb:>6}MB {first * 1000:8.1f} {pct(ms, 50):8.1f} {pct(ms, 99):8.1f} {max(ms):8.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
