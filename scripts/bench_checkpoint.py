#!/usr/bin/env python3
"""What background checkpoints cost a session running cells back to back.

    python scripts/bench_checkpoint.py                        # this tree
    python scripts/bench_checkpoint.py --baseline /tmp/base   # and another tree, same run

For each kind of state (empty; 50 and 200 MB of bytearrays; 200 MB as a dict of
lists of ints) a fresh REPL (auto_checkpoint=True, the default) makes the state in
one cell, lets its first checkpoint settle, then runs ``--cells`` trivial cells
back to back. Reported per row: the median cell latency (``execute_code`` round
trip), and the CPU the worker's snapshot writers used during the series per
second of wall time (``os.times()`` children time of the worker, read in a cell
after the series settled; the worker reaps its writers, nothing else is its
child here), so 0.10 is a tenth of a core.

``measure()`` returns the numbers (``scripts/bench.py`` calls it); ``--baseline
DIR`` also runs this script with ``DIR`` first on ``sys.path`` (a checkout of
another commit, e.g. ``git archive main dockerrepl | tar -x -C DIR``) and prints
both, alternating trees per row so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> the cell that makes the state
STATES: dict[str, str] = {
    "empty": "n = 0",
    "bytes50": "big = [bytearray(1 << 20) for _ in range(50)]",
    "bytes200": "big = [bytearray(1 << 20) for _ in range(200)]",
    "dict200": "d = {i: list(range(i * 1000, i * 1000 + 1000)) for i in range(5500)}",
}
TRIVIAL = "n = 1"
CPU_CELL = "import os as _o\n_t = _o.times()\nprint(_t.children_user + _t.children_system)"


def _settle(repl: Any, bound: float = 120.0) -> None:
    """Until the checkpoint names the last cell and no writer is pending."""
    import fcntl

    state = os.path.join(repl.temp_dir, ".dockerrepl")
    end = time.monotonic() + bound
    while time.monotonic() < end:
        try:
            with open(os.path.join(state, "state.meta.json")) as f:
                if json.load(f)["cell"] >= repl._session.cell:
                    break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    fd = os.open(os.path.join(state, "checkpoint.pending"), os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        while time.monotonic() < end:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.01)
    finally:
        os.close(fd)


def _children_cpu(repl: Any) -> float:
    r = repl.execute_code(CPU_CELL)
    assert r.status == "ok", r.stderr
    return float(r.stdout.strip())


def measure_state(image: str, make: str, cells: int) -> dict[str, float]:
    """One row: median trivial-cell latency (s) and snapshot CPU per wall second."""
    from dockerrepl import DockerREPL

    with DockerREPL(image=image, memory="2g", timeout=300) as repl:
        r = repl.execute_code(make)
        assert r.status == "ok", r.stderr
        _settle(repl)
        cpu0 = _children_cpu(repl)
        lat = []
        t0 = time.monotonic()
        for _ in range(cells):
            s = time.perf_counter()
            r = repl.execute_code(TRIVIAL)
            lat.append(time.perf_counter() - s)
            assert r.status == "ok", r.stderr
        wall = time.monotonic() - t0
        _settle(repl)
        time.sleep(0.05)
        cpu = _children_cpu(repl) - cpu0
        return {
            "median_s": statistics.median(lat),
            "p90_s": sorted(lat)[int(0.9 * (len(lat) - 1))],
            "wall_s": wall,
            "snapshot_cpu_per_s": cpu / wall,
        }


def measure(
    image: str = "dockerrepl/python:3.11-bookworm",
    cells: int = 300,
    states: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Every row of :data:`STATES` (or those named), measured with this process's
    ``dockerrepl``."""
    return {s: measure_state(image, STATES[s], cells) for s in (states or list(STATES))}


def _in_tree(tree: str, image: str, cells: int, state: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--json",
            "--image",
            image,
            "--cells",
            str(cells),
            "--states",
            state,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    row: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])[state]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", default="dockerrepl/python:3.11-bookworm")
    p.add_argument("--cells", type=int, default=300)
    p.add_argument("--states", default=",".join(STATES))
    p.add_argument("--baseline", help="another tree to measure in the same run")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON only")
    a = p.parse_args(argv)
    states = [s for s in a.states.split(",") if s]
    if a.json:
        print(json.dumps(measure(a.image, a.cells, states)))
        return 0
    trees = [("this", HERE)] + ([("baseline", a.baseline)] if a.baseline else [])
    rows: dict[str, dict[str, dict[str, float]]] = {t: {} for t, _ in trees}
    for i, s in enumerate(states):
        order = trees if i % 2 == 0 else trees[::-1]
        for name, tree in order:
            rows[name][s] = _in_tree(tree, a.image, a.cells, s)
    print(f"{'tree':<9} {'state':<9} {'median ms':>10} {'p90 ms':>10} {'snap CPU/s':>14}")
    for name, _ in trees:
        for s in states:
            r = rows[name][s]
            med, p90, cpu = r["median_s"] * 1e3, r["p90_s"] * 1e3, r["snapshot_cpu_per_s"]
            print(f"{name:<9} {s:<9} {med:>10.2f} {p90:>10.2f} {cpu:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
