#!/usr/bin/env python3
"""What background checkpoints cost a session running cells back to back.

    python scripts/bench_checkpoint.py                        # this tree
    python scripts/bench_checkpoint.py --baseline /tmp/base   # and another tree, same run

For each kind of state (empty; 50 and 200 MB of bytearrays; 200 MB as a dict of
lists of ints) a fresh REPL (auto_checkpoint=True, the default) makes the state in
one cell, then at once runs trivial cells back to back for ``--seconds``. Reported
per row: the median cell latency (``execute_code`` round trip), and the CPU the
container used in that window beyond the worker's and the supervisor's, per second
of wall time (cgroup CPU usage minus the worker's ``os.times()`` and pid 1's
``/proc/1/stat``, read in cells at the window's ends): the snapshot writers (and
a cell's stray processes: none here). 0.10 is a tenth of a core. The
window starts with the state's first snapshot on its way, as a session's does.

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
CPU_CELL = """
import os as _o
def _usage():
    for _p, _k in (("/sys/fs/cgroup/cpu.stat", "usage_usec"),
                   ("/sys/fs/cgroup/cpuacct/cpuacct.usage", None)):
        try:
            with open(_p) as _f:
                if _k is None:
                    return int(_f.read()) / 1e9
                for _l in _f:
                    if _l.startswith(_k + " "):
                        return int(_l.split()[1]) / 1e6
        except OSError:
            pass
    raise OSError("no cgroup CPU usage here")
def _pid1():
    try:
        with open("/proc/1/stat") as _f:
            _x = _f.read().rsplit(")", 1)[1].split()
        return (int(_x[11]) + int(_x[12])) / _o.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
_t = _o.times()
print(_usage(), _t.user + _t.system + _pid1())
"""


def _cpu(repl: Any) -> tuple[float, float]:
    """(the container's CPU seconds, the worker's and the supervisor's)."""
    r = repl.execute_code(CPU_CELL)
    assert r.status == "ok", r.stderr
    total, worker = r.stdout.split()
    return float(total), float(worker)


def measure_state(image: str, make: str, seconds: float) -> dict[str, float]:
    """One row: median trivial-cell latency (s), cells, and writer CPU per wall second."""
    from dockerrepl import DockerREPL

    with DockerREPL(image=image, memory="2g", timeout=300) as repl:
        r = repl.execute_code(make)
        assert r.status == "ok", r.stderr
        total0, worker0 = _cpu(repl)
        lat = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            s = time.perf_counter()
            r = repl.execute_code(TRIVIAL)
            lat.append(time.perf_counter() - s)
            assert r.status == "ok", r.stderr
        total1, worker1 = _cpu(repl)
        wall = time.monotonic() - t0
        return {
            "median_s": statistics.median(lat),
            "p90_s": sorted(lat)[int(0.9 * (len(lat) - 1))],
            "cells": len(lat),
            "wall_s": wall,
            "snapshot_cpu_per_s": ((total1 - total0) - (worker1 - worker0)) / wall,
        }


def measure(
    image: str = "dockerrepl/python:3.11-bookworm",
    seconds: float = 30.0,
    states: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Every row of :data:`STATES` (or those named), measured with this process's
    ``dockerrepl``."""
    return {s: measure_state(image, STATES[s], seconds) for s in (states or list(STATES))}


def _in_tree(tree: str, image: str, seconds: float, state: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--json",
            "--image",
            image,
            "--seconds",
            str(seconds),
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
    p.add_argument("--seconds", type=float, default=30.0, help="of cells, per row")
    p.add_argument("--states", default=",".join(STATES))
    p.add_argument("--baseline", help="another tree to measure in the same run")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON only")
    a = p.parse_args(argv)
    states = [s for s in a.states.split(",") if s]
    if a.json:
        print(json.dumps(measure(a.image, a.seconds, states)))
        return 0
    trees = [("this", HERE)] + ([("baseline", a.baseline)] if a.baseline else [])
    rows: dict[str, dict[str, dict[str, float]]] = {t: {} for t, _ in trees}
    for i, s in enumerate(states):
        order = trees if i % 2 == 0 else trees[::-1]
        for name, tree in order:
            rows[name][s] = _in_tree(tree, a.image, a.seconds, s)
    head = ("tree", "state", "cells", "median ms", "p90 ms", "writer CPU/s")
    print("{:<9} {:<9} {:>6} {:>10} {:>10} {:>13}".format(*head))
    for name, _ in trees:
        for s in states:
            r = rows[name][s]
            med, p90, cpu = r["median_s"] * 1e3, r["p90_s"] * 1e3, r["snapshot_cpu_per_s"]
            n = int(r["cells"])
            print(f"{name:<9} {s:<9} {n:>6} {med:>10.2f} {p90:>10.2f} {cpu:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
