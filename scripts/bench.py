#!/usr/bin/env python3
"""Benchmark dockerrepl against rlm's DockerREPL, side by side, in one run.

    python scripts/bench.py              # full run (a few minutes); rewrites docs/benchmarks.*
    python scripts/bench.py --quick      # fewer repetitions (about a minute)
    python scripts/bench.py --no-rlm     # dockerrepl only (no ratios)
    python scripts/bench.py --transports # dockerrepl's proxy and channel transports
                                         # side by side only (under 2 minutes)

Benchmark-only dependencies (rlms, matplotlib, dill) live in a virtualenv that
this script creates under .bench/venv and re-executes itself in; they never
become the library's. dockerrepl itself is imported from this checkout.

Both systems get the same machine, the same image (rlm's needs `python`, dill
and requests: dockerrepl/rlm-python:bookworm, built offline when absent), one
shared LM Handler (dockerrepl's LMHandler with an echo client; rlm's proxy
speaks the same wire protocol to it) and the same cells. Every REPL and
container the run starts is removed at the end, also on Ctrl-C or an error.

Outputs: a table on stdout, docs/benchmarks.json (every sample), and
docs/benchmarks.md with docs/benchmarks.png (per-cell latency against state
size), all regenerated from the run (--out-dir to write elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, ".bench")
VENV = os.path.join(BENCH_DIR, "venv")
RLMS_SPEC = "rlms==0.1.3"
BENCH_DEPS = [RLMS_SPEC, "matplotlib", "dill"]
RLM_IMAGE = "dockerrepl/rlm-python:bookworm"
RLM_IMAGE_PACKAGES = "python3-dill,python3-requests,python-is-python3"
OUR_IMAGE = "dockerrepl/python:3.11-bookworm"
MB = 1 << 20
STATE_SIZES_MB = (0, 1, 10, 50, 100)
N_CONCURRENT = 8
TRIVIAL = "x = 1"
GROUPS = ("open", "cells", "state", "mutable", "concurrent", "floors", "pool", "transports")

# (key, label, kind, target). kind: "speedup" = rlm / ours >= target;
# "throughput" = ours / rlm >= target; "flat" = ours at 100 MB / ours empty <= target;
# "absolute" = ours <= target seconds.
TARGETS: list[tuple[str, str, str, float]] = [
    ("trivial_cell", "trivial cell", "speedup", 50),
    ("state_cell_10mb", "trivial cell with 10 MB of state (a loaded context)", "speedup", 100),
    ("state_flat", "ours: cell with 100 MB of context / empty state", "flat", 2),
    ("llm_query", "`llm_query` round trip (in the container)", "speedup", 5),
    ("llm_query_batched_cell", "cell with `llm_query_batched` of 50", "speedup", 3),
    ("load_context_10mb", "`load_context` of 10 MB", "speedup", 5),
    ("open_first_cell", "open a REPL and run its first cell", "speedup", 2),
    ("cleanup", "`cleanup`", "speedup", 1),
    (
        "concurrent_cells_per_s",
        f"{N_CONCURRENT} REPLs used concurrently (cells/s)",
        "throughput",
        1,
    ),
    ("pool_acquire", "warm pool `acquire()`", "absolute", 0.050),
    ("mutable_flat", "ours: cell next to a 100 MB list / empty state", "info_flat", 0),
]


# ----------------------------------------------------------------- virtualenv
def _in_bench_env() -> bool:
    return os.path.realpath(sys.prefix) == os.path.realpath(VENV)


def ensure_venv_and_reexec(argv: list[str]) -> None:
    """Create .bench/venv with the benchmark-only deps, then exec this script in it."""
    py = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, ".bench-deps")
    want = " ".join(BENCH_DEPS)
    have = ""
    if os.path.exists(stamp):
        with open(stamp) as f:
            have = f.read().strip()
    if not os.path.exists(py) or have != want:
        if sys.version_info < (3, 11):
            sys.exit("rlms needs Python 3.11+: run this script with python3.11 or newer")
        print(f"== creating {os.path.relpath(VENV, ROOT)} with {want}", flush=True)
        os.makedirs(BENCH_DIR, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", *BENCH_DEPS], check=True)
        with open(stamp, "w") as f:
            f.write(want + "\n")
    os.execv(py, [py, os.path.abspath(__file__), *argv])


# ------------------------------------------------------------ signal handling
class Interrupts:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, but not
    while a REPL is being created there: rlm's DockerREPL starts its container
    with `docker run -d` before we can know its id, so an interrupt in that
    window is held until the REPL is registered (and so cleaned up)."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        on_main = threading.current_thread() is threading.main_thread()
        if on_main:
            self.depth += 1
        try:
            yield
        finally:
            if on_main:
                self.depth -= 1
                if self.depth == 0 and self.pending:
                    self.pending = False
                    raise KeyboardInterrupt


INTERRUPTS = Interrupts()
STOP = threading.Event()


class Registry:
    """Every REPL the run opened and has not yet cleaned up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[int, tuple[str, Any]] = {}
        self.rlm_container_ids: list[str] = []
        self.extra_container_ids: list[str] = []
        self.pools: list[Any] = []

    def add(self, system: str, repl: Any) -> None:
        with self.lock:
            self.live[id(repl)] = (system, repl)
            cid = getattr(repl, "container_id", None) if system == "rlm" else None
            if cid:
                self.rlm_container_ids.append(str(cid))

    def close(self, repl: Any) -> float:
        t0 = time.perf_counter()
        try:
            repl.cleanup()
        finally:
            with self.lock:
                self.live.pop(id(repl), None)
        return time.perf_counter() - t0

    def close_all(self) -> None:
        with self.lock:
            pools, self.pools = self.pools, []
            live = list(self.live.values())
        for pool in pools:
            with contextlib.suppress(Exception):
                pool.close()
        for _, repl in live:
            try:
                self.close(repl)
            except Exception as exc:
                print(f"warning: cleanup failed: {exc}", file=sys.stderr)


REG = Registry()


def docker_out(*args: str, timeout: float = 60) -> str:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    return res.stdout.strip() if res.returncode == 0 else ""


def sweep_leftovers() -> list[str]:
    """Remove containers this process started that are still there (narrow filters only)."""
    from dockerrepl._labels import owner_label

    left = docker_out("ps", "-aq", "--filter", f"label=dockerrepl.owner={owner_label()}").split()
    for cid in REG.rlm_container_ids + REG.extra_container_ids:
        left += docker_out("ps", "-aq", "--no-trunc", "--filter", f"id={cid}").split()
    for cid in left:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)
    return left


# ------------------------------------------------------------------- systems
class BenchError(RuntimeError):
    pass


class System:
    """How to open one system's REPL; both share execute_code/load_context/cleanup."""

    def __init__(self, name: str, factory: Callable[[], Any], image: str) -> None:
        self.name = name
        self.factory = factory
        self.image = image

    def open(self) -> Any:
        if STOP.is_set():
            raise KeyboardInterrupt
        with INTERRUPTS.deferred():
            repl = self.factory()
            REG.add(self.name, repl)
        return repl


def run_cell(repl: Any, code: str) -> tuple[Any, float]:
    t0 = time.perf_counter()
    res = repl.execute_code(code)
    dt = time.perf_counter() - t0
    if res.stderr:
        raise BenchError(f"cell failed: {code[:60]!r}: {res.stderr.strip()[-500:]}")
    return res, dt


def stats(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    return {
        "median": statistics.median(s),
        "min": s[0],
        "max": s[-1],
        "p90": s[min(len(s) - 1, int(0.9 * len(s)))],
        "n": len(s),
        "samples": [round(x, 7) for x in samples],
    }


def make_context(nbytes: int) -> str:
    line = "The quick brown fox jumps over the lazy dog; RLM context line.\n"
    return (line * (nbytes // len(line) + 1))[:nbytes]


LLM_CELL = """\
import time as _time
_t0 = _time.perf_counter()
for _i in range(20):
    _r = llm_query("ping-%d" % _i)
_dt = _time.perf_counter() - _t0
print(_r, _dt)
"""

BATCH_CELL = """\
import time as _time
_t0 = _time.perf_counter()
_rs = llm_query_batched(["p%d" % _i for _i in range(50)])
_dt = _time.perf_counter() - _t0
print(len(_rs), _rs[0], _rs[-1], _dt)
"""


# ------------------------------------------------------------------ workload
def bench_open_cleanup(systems: list[tuple[System, int]], results: dict[str, Any]) -> None:
    """Open + first cell, then cleanup; the systems take turns, so both see the same load."""
    opens: dict[str, list[float]] = {s.name: [] for s, _ in systems}
    cleanups: dict[str, list[float]] = {s.name: [] for s, _ in systems}
    for i in range(max(n for _, n in systems)):
        for s, n in systems:
            if i >= n:
                continue
            t0 = time.perf_counter()
            repl = s.open()
            run_cell(repl, TRIVIAL)
            opens[s.name].append(time.perf_counter() - t0)
            cleanups[s.name].append(REG.close(repl))
    for s, _ in systems:
        results[s.name]["open_first_cell"] = stats(opens[s.name])
        results[s.name]["cleanup"] = stats(cleanups[s.name])


def bench_cells(sys_: System, c: dict[str, int], out: dict[str, Any]) -> None:
    repl = sys_.open()
    try:
        for _ in range(3):
            run_cell(repl, TRIVIAL)
        out["trivial_cell"] = stats([run_cell(repl, TRIVIAL)[1] for _ in range(c["trivial"])])

        per_call = []
        for _ in range(c["llm"]):
            res, _ = run_cell(repl, LLM_CELL)
            reply, dt = res.stdout.split()
            if reply != "echo:ping-19":
                raise BenchError(f"llm_query answered {reply!r}")
            per_call.append(float(dt) / 20)
        out["llm_query"] = stats(per_call)

        cells, inner = [], []
        for _ in range(c["batch"]):
            res, dt = run_cell(repl, BATCH_CELL)
            n, first, last, t_in = res.stdout.split()
            if (n, first, last) != ("50", "echo:p0", "echo:p49"):
                raise BenchError(f"llm_query_batched answered {res.stdout[:200]!r}")
            cells.append(dt)
            inner.append(float(t_in))
        out["llm_query_batched_cell"] = stats(cells)
        out["llm_query_batched_inner"] = stats(inner)
    finally:
        REG.close(repl)


def bench_state(sys_: System, c: dict[str, int], out: dict[str, Any]) -> None:
    """Trivial cells at growing state; the state is a loaded context (as in an RLM)."""
    repl = sys_.open()
    per_size: dict[str, Any] = {}
    try:
        for size in STATE_SIZES_MB:
            if size:
                payload = make_context(size * MB)
                loads = []
                for _ in range(c["loads"] if size == 10 else 1):
                    t0 = time.perf_counter()
                    repl.load_context(payload)
                    loads.append(time.perf_counter() - t0)
                if size == 10:
                    out["load_context_10mb"] = stats(loads)
                res, _ = run_cell(repl, "print(len(context))")
                if res.stdout.strip() != str(size * MB):
                    raise BenchError(f"context has {res.stdout.strip()} chars, not {size * MB}")
                del payload
            per_size[str(size)] = trivial_cells(
                repl, c["state_cells"] if size <= 10 else c["state_cells_big"]
            )
            print(
                f"   {sys_.name}: context {size:>3} MB: {fmt_s(per_size[str(size)]['median'])}",
                flush=True,
            )
    finally:
        REG.close(repl)
    out["state_cell"] = per_size


def bench_mutable_state(sys_: System, c: dict[str, int], out: dict[str, Any]) -> None:
    """Trivial cells next to state built in a cell: a list of 100-byte strings.

    Unlike a loaded context, a list can change in place, so dockerrepl forks a
    copy-on-write snapshot after every cell (the price of restoring up to the
    last completed cell after a crash); rlm re-loads and re-dumps it every cell.
    """
    repl = sys_.open()
    per_size: dict[str, Any] = {}
    try:
        for size in STATE_SIZES_MB:
            if size:
                run_cell(repl, f"data = ['%099d' % i for i in range({size * MB // 100})]")
            per_size[str(size)] = trivial_cells(
                repl, c["mut_cells"] if size <= 10 else c["mut_cells_big"]
            )
            print(
                f"   {sys_.name}: list  {size:>3} MB: {fmt_s(per_size[str(size)]['median'])}",
                flush=True,
            )
    finally:
        REG.close(repl)
    out["mutable_state_cell"] = per_size


def trivial_cells(repl: Any, n: int) -> dict[str, Any]:
    for _ in range(2):
        run_cell(repl, TRIVIAL)
    return stats([run_cell(repl, TRIVIAL)[1] for _ in range(n)])


def bench_floors(image: str, n: int, out: dict[str, Any]) -> None:
    """What the engine itself costs here: the floors under both systems' numbers."""
    from dockerrepl._labels import owner_label

    probe = "import sys; sys.stdout.write('x'); sys.stdout.flush(); sys.stdin.read()"
    ttfb = []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.Popen(
            ["docker", "run", "-i", "--rm", image, "python3", "-c", probe],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert p.stdout is not None and p.stdin is not None
            p.stdout.read(1)
            ttfb.append(time.perf_counter() - t0)
        finally:
            with contextlib.suppress(OSError):
                p.stdin.close()  # type: ignore[union-attr]
            p.wait(60)
    out["docker_run_first_byte"] = stats(ttfb)

    p = subprocess.Popen(
        ["docker", "run", "-i", "--rm", image, "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    rtt = []
    try:
        assert p.stdout is not None and p.stdin is not None
        msg = b"x" * 100
        for i in range(n * 40 + 10):
            t0 = time.perf_counter()
            p.stdin.write(msg)
            got = b""
            while len(got) < len(msg):
                got += p.stdout.read(len(msg) - len(got))
            if i >= 10:
                rtt.append(time.perf_counter() - t0)
    finally:
        with contextlib.suppress(OSError):
            p.stdin.close()  # type: ignore[union-attr]
        p.wait(60)
    out["pipe_round_trip"] = stats(rtt)

    with INTERRUPTS.deferred():
        cid = docker_out(
            "run",
            "-d",
            "--rm",
            "--label",
            f"dockerrepl.owner={owner_label()}",
            image,
            "sleep",
            "600",
        )
        if not cid:
            raise BenchError("could not start a container for the docker exec floor")
        REG.extra_container_ids.append(cid)
    try:
        execs = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(["docker", "exec", cid, "python", "-c", "pass"], check=True, timeout=60)
            execs.append(time.perf_counter() - t0)
        out["docker_exec_python"] = stats(execs)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)


def bench_concurrent(sys_: System, seconds: float, out: dict[str, Any]) -> None:
    repls: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def opener() -> None:
        try:
            r = sys_.open()
            with lock:
                repls.append(r)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener, daemon=True) for _ in range(N_CONCURRENT)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise BenchError(f"opening {N_CONCURRENT} REPLs failed: {errors[0]!r}")
        for r in repls:
            run_cell(r, TRIVIAL)
        counts = [0] * len(repls)
        barrier = threading.Barrier(len(repls) + 1)
        end = [0.0]

        def worker(i: int, r: Any) -> None:
            barrier.wait()
            try:
                while time.perf_counter() < end[0] and not STOP.is_set():
                    run_cell(r, TRIVIAL)
                    counts[i] += 1
            except BaseException as exc:
                errors.append(exc)

        workers = [
            threading.Thread(target=worker, args=(i, r), daemon=True) for i, r in enumerate(repls)
        ]
        for w in workers:
            w.start()
        end[0] = time.perf_counter() + seconds
        t0 = time.perf_counter()
        barrier.wait()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        if errors:
            raise BenchError(f"a concurrent cell failed: {errors[0]!r}")
        total = sum(counts)
        out["concurrent_cells_per_s"] = {
            "value": total / elapsed,
            "cells": total,
            "seconds": elapsed,
            "per_repl": counts,
        }
    except BaseException:
        STOP.set()  # openers and workers stop early
        raise
    finally:
        for t in threads:
            t.join(timeout=300)
        for r in repls:
            REG.close(r)


def bench_pool(kwargs: dict[str, Any], n: int, out: dict[str, Any]) -> None:
    from dockerrepl import DockerREPLPool

    size = 2
    acquires, first_cells = [], []
    with INTERRUPTS.deferred():
        pool = DockerREPLPool(size=size, **kwargs)
        REG.pools.append(pool)
    try:
        for _ in range(n):
            deadline = time.monotonic() + 120
            while pool.ready_count < size:
                if time.monotonic() > deadline:
                    raise BenchError("the pool did not refill within 120 s")
                time.sleep(0.01)
            t0 = time.perf_counter()
            repl = pool.acquire()
            acquires.append(time.perf_counter() - t0)
            REG.add("dockerrepl", repl)
            first_cells.append(run_cell(repl, TRIVIAL)[1])
            REG.close(repl)
    finally:
        pool.close()
        with contextlib.suppress(ValueError):
            REG.pools.remove(pool)
    out["pool_acquire"] = stats(acquires)
    out["pool_first_cell"] = stats(first_cells)


# ---------------------------------------------------------------- sessions
SESSION_SIZES_MB = (1, 10, 100)
SESSION_FORK_N = 8
SNAPSHOT_TARGET_MB = 200


def _state_cell(mb: int) -> str:
    # many objects, as a real namespace has: 64 KiB byte strings and a dict of floats
    return (
        "import os\n"
        f"blobs = [os.urandom(1 << 16) for _ in range({mb} * 16)]\n"
        "table = {i: i / 7 for i in range(1000)}"
    )


def timed_snapshots(repl: Any, reps: int) -> dict[str, Any]:
    """snapshot(), then a cell that wrecks the namespace, then rollback(); each timed
    on the host, the namespace checked after every rollback."""
    time.sleep(1.0)  # the state cell's background checkpoint, out of the way
    snaps, rolls = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        snap = repl.snapshot()
        snaps.append(time.perf_counter() - t0)
        r = repl.execute_code("n_blobs = len(blobs); del blobs; table.clear()")
        if r.status != "ok":
            raise BenchError(f"the wrecking cell failed: {r.stderr}")
        t0 = time.perf_counter()
        repl.rollback(snap)
        rolls.append(time.perf_counter() - t0)
        r = repl.execute_code("print(len(blobs) == n_blobs if 'n_blobs' in dir() else len(blobs))")
        if r.status != "ok" or r.stdout.strip() in ("", "False", "0"):
            raise BenchError(f"rollback did not bring the state back: {r.stdout!r} {r.stderr!r}")
        repl.discard_snapshot(snap)
    return {"snapshot": stats(snaps), "rollback": stats(rolls)}


def bench_sessions(kwargs: dict[str, Any], quick: bool, out: dict[str, Any]) -> None:
    """save, resume, fork (with and without a warm pool) against the state size."""
    import tempfile

    from dockerrepl import DockerREPL, DockerREPLPool

    reps = 2 if quick else 3
    scratch = tempfile.mkdtemp(prefix="bench-sessions-")
    pool = DockerREPLPool(size=SESSION_FORK_N, **kwargs)
    REG.pools.append(pool)

    def warm() -> None:
        deadline = time.monotonic() + 180
        while pool.ready_count < SESSION_FORK_N:
            if time.monotonic() > deadline:
                raise BenchError("the pool did not refill within 180 s")
            time.sleep(0.02)

    def timed_fork(parent: Any, n: int, use_pool: bool) -> float:
        if use_pool:
            warm()
        t0 = time.perf_counter()
        kids = parent.fork(n, pool=pool) if use_pool else parent.fork(n)
        dt = time.perf_counter() - t0
        for k in kids:
            REG.add("dockerrepl", k)
        r = kids[-1].execute_code("print(len(blobs))")
        if r.stdout.strip() != str(size * 16):
            raise BenchError(f"a forked child lacks the state: {r.stdout!r} {r.stderr!r}")
        for k in kids:
            REG.close(k)
        return dt

    try:
        for size in SESSION_SIZES_MB:
            row: dict[str, Any] = {}
            parent = DockerREPL(**kwargs)
            REG.add("dockerrepl", parent)
            try:
                r = parent.execute_code(_state_cell(size))
                if r.status != "ok":
                    raise BenchError(f"state cell failed: {r.stderr}")
                path = os.path.join(scratch, f"s{size}.drepl")
                saves = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    parent.save(path)
                    saves.append(time.perf_counter() - t0)
                row["save"] = stats(saves)
                row["file_mb"] = os.path.getsize(path) / MB
                resumes = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    back = DockerREPL.resume(path, **kwargs)
                    resumes.append(time.perf_counter() - t0)
                    REG.add("dockerrepl", back)
                    REG.close(back)
                row["resume"] = stats(resumes)
                row["fork1_pool"] = stats([timed_fork(parent, 1, True) for _ in range(reps)])
                row[f"fork{SESSION_FORK_N}_pool"] = stats(
                    [timed_fork(parent, SESSION_FORK_N, True) for _ in range(reps)]
                )
                row.update(timed_snapshots(parent, reps))
                row["fork1_cold"] = stats([timed_fork(parent, 1, False) for _ in range(reps)])
                row[f"fork{SESSION_FORK_N}_cold"] = stats(
                    [timed_fork(parent, SESSION_FORK_N, False) for _ in range(1)]
                )
            finally:
                REG.close(parent)
            out[f"{size}mb"] = row
            print(
                f"  {size} MB: "
                + ", ".join(
                    f"{k} {fmt_s(v['median'])}" for k, v in row.items() if isinstance(v, dict)
                ),
                flush=True,
            )
        # the rollback target is stated for 200 MB: snapshot and rollback only
        parent = DockerREPL(**kwargs)
        REG.add("dockerrepl", parent)
        try:
            r = parent.execute_code(_state_cell(SNAPSHOT_TARGET_MB))
            if r.status != "ok":
                raise BenchError(f"state cell failed: {r.stderr}")
            out[f"{SNAPSHOT_TARGET_MB}mb"] = row = timed_snapshots(parent, reps)
            print(
                f"  {SNAPSHOT_TARGET_MB} MB: "
                + ", ".join(f"{k} {fmt_s(v['median'])}" for k, v in row.items()),
                flush=True,
            )
        finally:
            REG.close(parent)
    finally:
        pool.close()
        with contextlib.suppress(ValueError):
            REG.pools.remove(pool)
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def print_sessions(res: dict[str, Any]) -> list[str]:
    """Print the sessions table; returns its lines (for benchmarks-sessions.md)."""
    cols = [
        "snapshot",
        "rollback",
        "save",
        "resume",
        "fork1_pool",
        f"fork{SESSION_FORK_N}_pool",
        "fork1_cold",
        f"fork{SESSION_FORK_N}_cold",
    ]
    lines = ["| state | file | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for size in (*SESSION_SIZES_MB, SNAPSHOT_TARGET_MB):
        row = res.get(f"{size}mb", {})
        cells = [fmt_s(row[c]["median"]) if c in row else "-" for c in cols]
        file_mb = f"{row['file_mb']:.1f} MB" if "file_mb" in row else "-"
        lines.append(f"| {size} MB | {file_mb} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Targets: {SESSION_FORK_N} ready children of 10 MB <= 1 s, one <= 150 ms (warm pool);"
        f" rollback of {SNAPSHOT_TARGET_MB} MB <= 100 ms. Medians; `file` is the saved file."
    )
    print("\n" + "\n".join(lines))
    return lines


# ---------------------------------------------------------------- transports
TRANSPORTS = ("proxy", "channel")
KILL_CELL_SEED = "x = {i}"
KILL_CELL = "print(x, len(context))"

# (key, label, target kind, target). kind: "ratio" = channel / proxy <= target;
# "channel" = channel <= target seconds; "both" = each transport <= target seconds.
TRANSPORT_ROWS: list[tuple[str, str, Optional[str], float]] = [
    ("open_first_cell", "open a REPL and run its first cell", None, 0),
    ("cleanup", "`cleanup`", None, 0),
    ("trivial_cell", "trivial cell", "ratio", 1.5),
    ("llm_query", "`llm_query` round trip (in the container)", "ratio", 1.5),
    ("llm_query_cell", "cell of 20 `llm_query` calls (host)", "ratio", 1.5),
    ("load_context_10mb", "`load_context` of 10 MB", "channel", 0.2),
    ("restore_after_kill", "next cell after `docker kill` (restore)", "both", 2.0),
]


def transport_counts(quick: bool) -> dict[str, int]:
    if quick:
        return {"opens": 3, "trivial": 100, "block": 20, "llm": 5, "loads": 5, "kills": 3}
    return {"opens": 7, "trivial": 400, "block": 25, "llm": 15, "loads": 9, "kills": 7}


def abab(i: int) -> tuple[str, ...]:
    """Round i's order: proxy first in even rounds, channel first in odd ones."""
    return TRANSPORTS if i % 2 == 0 else TRANSPORTS[::-1]


def bench_transports(kwargs: dict[str, Any], c: dict[str, int], out: dict[str, Any]) -> None:
    """dockerrepl's two transports side by side; every measurement alternates between them
    (round by round, the order swapped each round), so both see the same machine load."""
    from dockerrepl import DockerREPL

    systems = {
        t: System(f"dockerrepl-{t}", lambda t=t: DockerREPL(**kwargs, transport=t), kwargs["image"])
        for t in TRANSPORTS
    }
    res: dict[str, dict[str, list[float]]] = {t: {} for t in TRANSPORTS}

    def add(t: str, key: str, v: float) -> None:
        res[t].setdefault(key, []).append(v)

    for t in TRANSPORTS:  # warm-up, not counted
        r = systems[t].open()
        try:
            if r.transport != t:
                raise BenchError(f"asked for transport {t!r}, got {r.transport!r}")
        finally:
            REG.close(r)
    print("   open + first cell, cleanup", flush=True)
    for i in range(c["opens"]):
        for t in abab(i):
            t0 = time.perf_counter()
            r = systems[t].open()
            run_cell(r, TRIVIAL)
            add(t, "open_first_cell", time.perf_counter() - t0)
            add(t, "cleanup", REG.close(r))

    repls = {t: systems[t].open() for t in TRANSPORTS}
    try:
        for t in TRANSPORTS:
            for _ in range(3):
                run_cell(repls[t], TRIVIAL)
        print("   trivial cells", flush=True)
        for i in range(max(1, c["trivial"] // c["block"])):
            for t in abab(i):
                for _ in range(c["block"]):
                    add(t, "trivial_cell", run_cell(repls[t], TRIVIAL)[1])
        print("   llm_query", flush=True)
        for i in range(c["llm"]):
            for t in abab(i):
                r, dt = run_cell(repls[t], LLM_CELL)
                reply, inner = r.stdout.split()
                if reply != "echo:ping-19":
                    raise BenchError(f"{t}: llm_query answered {reply!r}")
                add(t, "llm_query", float(inner) / 20)
                add(t, "llm_query_cell", dt)
        print("   load_context of 10 MB", flush=True)
        payload = make_context(10 * MB)
        for i in range(c["loads"]):
            for t in abab(i):
                t0 = time.perf_counter()
                repls[t].load_context(payload)
                add(t, "load_context_10mb", time.perf_counter() - t0)
        del payload
        for t in TRANSPORTS:
            got = run_cell(repls[t], "print(len(context))")[0].stdout.strip()
            if got != str(10 * MB):
                raise BenchError(f"{t}: context has {got} chars, not {10 * MB}")
        print("   docker kill, then the next cell (restore)", flush=True)
        for i in range(c["kills"]):
            for t in abab(i):
                r = repls[t]
                run_cell(r, KILL_CELL_SEED.format(i=i))
                r.checkpoint()  # the snapshot is on disk: the restore has all of it to load
                restarts = r.restarts
                name = str(r.container_name)
                killed = subprocess.run(
                    ["docker", "kill", name], capture_output=True, text=True, timeout=60
                )
                if killed.returncode:
                    raise BenchError(f"{t}: docker kill {name}: {killed.stderr.strip()}")
                t0 = time.perf_counter()
                after = r.execute_code(KILL_CELL)
                dt = time.perf_counter() - t0
                want = f"{i} {10 * MB}\n"
                if after.status != "ok" or after.stdout != want or r.restarts != restarts + 1:
                    raise BenchError(
                        f"{t}: after docker kill: {after.status} {after.stdout!r} "
                        f"(want {want!r}), restarts {r.restarts}: {after.stderr.strip()[-300:]}"
                    )
                add(t, "restore_after_kill", dt)
    finally:
        for r in repls.values():
            REG.close(r)
    for t in TRANSPORTS:
        out[t] = {k: stats(v) for k, v in res[t].items()}
    out["order"] = "alternating, round by round; proxy first in even rounds, channel in odd"
    out["counts"] = c


def transport_rows(tr: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, label, kind, target in TRANSPORT_ROWS:
        p, ch = (tr.get(t, {}).get(key) for t in TRANSPORTS)
        pm = None if p is None else float(p["median"])
        cm = None if ch is None else float(ch["median"])
        ratio = cm / pm if pm and cm is not None else None
        met: Optional[bool] = None
        if kind == "ratio" and ratio is not None:
            met = ratio <= target
        elif kind == "channel" and cm is not None:
            met = cm <= target
        elif kind == "both" and pm is not None and cm is not None:
            met = max(pm, cm) <= target
        rows.append(
            {
                "key": key,
                "label": label,
                "kind": kind,
                "target": target,
                "proxy": p,
                "channel": ch,
                "ratio": ratio,
                "met": met,
            }
        )
    return rows


TRANSPORT_HEAD = ["metric", "proxy", "channel", "channel/proxy", "target", "met"]


def transport_cells(row: dict[str, Any]) -> list[str]:
    def show(s: Optional[dict[str, Any]]) -> str:
        if s is None:
            return "-"
        return f"{fmt_s(s['median'])} ({fmt_s(s['min'])}-{fmt_s(s['max'])}, n={s['n']})"

    kind, target = row["kind"], row["target"]
    tgt = {
        None: "-",
        "ratio": f"<= {target:g}x",
        "channel": f"channel <= {fmt_s(target)}",
        "both": f"<= {fmt_s(target)}",
    }[kind]
    met = {True: "yes", False: "**NO**", None: "-"}[row["met"]]
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    return [row["label"], show(row["proxy"]), show(row["channel"]), ratio, tgt, met]


def print_transports(tr: dict[str, Any]) -> None:
    body = [transport_cells(r) for r in transport_rows(tr)]
    widths = [max(len(x[i]) for x in [TRANSPORT_HEAD, *body]) for i in range(len(TRANSPORT_HEAD))]
    line = "  ".join(h.ljust(w) for h, w in zip(TRANSPORT_HEAD, widths))
    print("\ndockerrepl by transport: median (min-max, n); measurements alternate proxy/channel")
    print(line + "\n" + "-" * len(line))
    for b in body:
        print("  ".join(x.ljust(w) for x, w in zip(b, widths)))


# -------------------------------------------------------------------- report
def fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 0.01:
        return f"{s * 1e3:.2f} ms"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}x" if x >= 10 else f"{x:.1f}x"


def median_of(res: dict[str, Any], series: str, size: int) -> Optional[float]:
    v = res.get(series, {}).get(str(size))
    return None if v is None else float(v["median"])


def value(res: dict[str, Any], key: str) -> Optional[float]:
    if key == "state_cell_10mb":
        return median_of(res, "state_cell", 10)
    if key in ("state_flat", "mutable_flat"):
        series = "state_cell" if key == "state_flat" else "mutable_state_cell"
        big, empty = median_of(res, series, 100), median_of(res, series, 0)
        return big / empty if big is not None and empty else None
    v = res.get(key)
    if v is None:
        return None
    return float(v["value"] if "value" in v else v["median"])


def compare(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    ours, rlm = results.get("dockerrepl", {}), results.get("rlm", {})
    rows = []
    for key, label, kind, target in TARGETS:
        o, r = value(ours, key), value(rlm, key)
        ratio: Optional[float] = None
        met: Optional[bool] = None
        if kind == "speedup" and o and r:
            ratio = r / o
            met = ratio >= target
        elif kind == "throughput" and o and r:
            ratio = o / r
            met = ratio >= target
        elif (kind == "flat" and o is not None) or (kind == "absolute" and o is not None):
            met = o <= target
        rows.append(
            {
                "key": key,
                "label": label,
                "kind": kind,
                "target": target,
                "rlm": r,
                "dockerrepl": o,
                "ratio": ratio,
                "met": met,
            }
        )
    return rows


def row_cells(row: dict[str, Any]) -> list[str]:
    kind, target, o, r = row["kind"], row["target"], row["dockerrepl"], row["rlm"]
    met = {True: "yes", False: "**NO**", None: "-"}[row["met"]]
    if kind in ("flat", "info_flat"):
        tgt = f"<= {target:g}x" if kind == "flat" else "none (see below)"
        return [row["label"], "-", "-" if o is None else f"{o:.2f}x", "-", tgt, met]
    if kind == "absolute":
        return [row["label"], "-", fmt_s(o), "-", f"<= {fmt_s(target)}", met]
    if kind == "throughput":
        show = ["-" if v is None else f"{v:,.1f}" for v in (r, o)]
        return [row["label"], *show, fmt_ratio(row["ratio"]), f">= {target:g}x", met]
    tgt = "no slower" if target == 1 else f">= {target:g}x"
    return [row["label"], fmt_s(r), fmt_s(o), fmt_ratio(row["ratio"]), tgt, met]


def state_rows(results: dict[str, Any]) -> list[list[str]]:
    ours, rlm = results.get("dockerrepl", {}), results.get("rlm", {})
    rows = []
    for size in STATE_SIZES_MB:
        row = [f"{size} MB"]
        for series in ("state_cell", "mutable_state_cell"):
            r, o = median_of(rlm, series, size), median_of(ours, series, size)
            row += [fmt_s(r), fmt_s(o), fmt_ratio(r / o if r and o else None)]
        rows.append(row)
    return rows


STATE_HEAD = ["state", "rlm, context", "ours, context", "ratio", "rlm, list", "ours, list", "ratio"]


def print_table(rows: list[dict[str, Any]], results: dict[str, Any]) -> None:
    def show(head: list[str], body: list[list[str]]) -> None:
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
        print("\n" + line + "\n" + "-" * len(line))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths)))

    show(["metric", "rlm", "dockerrepl", "rlm/ours", "target", "met"], [row_cells(r) for r in rows])
    print("\ntrivial cell (median) by state size: a loaded context, and a list built in a cell")
    show(STATE_HEAD, state_rows(results))
    floors = results.get("floors")
    if floors:
        print("\nfloors: " + "; ".join(f"{k} {fmt_s(v['median'])}" for k, v in floors.items()))


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("MemTotal:"):
                mem_kb = int(ln.split()[1])
    fmt = "{{.ServerVersion}}|{{.Driver}}|{{.CgroupVersion}}|{{.CgroupDriver}}"
    dv = [*docker_out("info", "--format", fmt).split("|"), "", "", "", ""]
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "dockerrepl"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if dirty:
            commit += " + uncommitted changes in dockerrepl/"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / (1 << 20), 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "docker": dv[0],
        "storage_driver": dv[1],
        "cgroup": f"v{dv[2]} ({dv[3]})" if dv[2] else "",
        "commit": commit,
    }


def pkg_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def write_plot(path: str, results: dict[str, Any], info: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    systems = {
        "rlm": ("rlm DockerREPL", "#c0392b", "s"),
        "dockerrepl": ("dockerrepl", "#1f77b4", "o"),
    }
    series = {
        "state_cell": ("loaded context", "-", 7),
        "mutable_state_cell": ("list built in a cell", "--", -12),
    }
    for system, (name, color, marker) in systems.items():
        for key, (what, style, dy) in series.items():
            sc = results.get(system, {}).get(key)
            if not sc:
                continue
            xs = [s for s in STATE_SIZES_MB if str(s) in sc]
            ys = [sc[str(s)]["median"] * 1e3 for s in xs]
            ax.plot(
                xs,
                ys,
                linestyle=style,
                marker=marker,
                color=color,
                linewidth=2,
                label=f"{name}: {what}",
                alpha=1.0 if style == "-" else 0.75,
            )
            if key == "state_cell":
                lo = [sc[str(s)]["min"] * 1e3 for s in xs]
                hi = [sc[str(s)]["p90"] * 1e3 for s in xs]
                ax.fill_between(xs, lo, hi, color=color, alpha=0.12, linewidth=0)
            other = results.get(system, {}).get("state_cell", {})
            for x, y in zip(xs, ys):
                if key != "state_cell" and str(x) in other:
                    ref = other[str(x)]["median"] * 1e3
                    if max(y, ref) / min(y, ref) < 1.8:
                        continue  # too close to the context series' label: the table has it
                ax.annotate(
                    fmt_s(y / 1e3),
                    (x, y),
                    textcoords="offset points",
                    xytext=(0, dy),
                    ha="center",
                    fontsize=6.5,
                    color=color,
                )
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_xticks(list(STATE_SIZES_MB))
    ax.set_xticklabels([str(s) for s in STATE_SIZES_MB])
    ax.set_xlabel("state in the REPL (MB)")
    ax.set_ylabel("trivial cell, host wall clock (ms, log scale)")
    ax.set_title("Per-cell latency against state size (median; band: min to p90)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", fontsize=8, bbox_to_anchor=(0.0, 0.55))
    fig.text(
        0.01,
        0.01,
        f"{info['cpu']}, {info['cores']} cores, docker {info['docker']} "
        f"({info['storage_driver']}), {info['date']}",
        fontsize=6,
        color="#555",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def write_doc(path: str, plot_name: str, json_name: str, data: dict[str, Any]) -> None:
    rows, results, info, cfg = data["comparison"], data["results"], data["machine"], data["config"]
    ours, rlm = results.get("dockerrepl", {}), results.get("rlm", {})
    floors = results.get("floors", {})
    c = cfg["counts"]
    L: list[str] = []
    add = L.append

    def med(res: dict[str, Any], key: str) -> Optional[float]:
        v = res.get(key)
        return None if v is None else float(v["median"])

    add("# Benchmarks: dockerrepl vs rlm's DockerREPL")
    add("")
    add("<!-- Generated by scripts/bench.py from one run; do not edit by hand. -->")
    add("")
    add(
        f"One run on {info['date']}: both systems on the same machine, the same image, the same LM "
        "Handler and the same cells."
    )
    add(
        f"Reproduce with `{data['command']}`"
        + (" (a `--quick` run: fewer repetitions)." if cfg["quick"] else ".")
    )
    add(f"Every sample is in [{json_name}]({json_name}). Machine and load are at the end.")
    if not cfg["rlm"]:
        add("")
        add("This run skipped rlm (`--no-rlm`): no ratios.")
    add("")
    add("| metric | rlm DockerREPL | dockerrepl | rlm / dockerrepl | target | met |")
    add("|---|---:|---:|---:|---|---|")
    for r in rows:
        add("| " + " | ".join(row_cells(r)) + " |")
    add("")
    if "llm_query_batched_inner" in ours:
        add(
            f"- `llm_query_batched` of 50, timed inside the container: rlm "
            f"{fmt_s(med(rlm, 'llm_query_batched_inner'))}, dockerrepl "
            f"{fmt_s(med(ours, 'llm_query_batched_inner'))}."
        )
    if "pool_acquire" in ours:
        pa = ours["pool_acquire"]
        add(
            f"- Warm pool: `acquire()` median {fmt_s(pa['median'])}, max {fmt_s(pa['max'])} over "
            f"{pa['n']}; the acquired REPL's first cell {fmt_s(med(ours, 'pool_first_cell'))} "
            "(a replacement member is starting at the same time)."
        )
    cc, rc = ours.get("concurrent_cells_per_s"), rlm.get("concurrent_cells_per_s")
    if cc:
        add(
            f"- {N_CONCURRENT} REPLs, one thread each, trivial cells: dockerrepl {cc['cells']} cells in "
            f"{cc['seconds']:.1f} s ({cc['value']:,.0f}/s)"
            + (
                f"; rlm {rc['cells']} cells in {rc['seconds']:.1f} s ({rc['value']:.1f}/s)."
                if rc
                else "."
            )
        )
    own = ours.get("own_image")
    if own:
        add(
            f"- dockerrepl on its own image `{cfg['our_image']}` (python3 only, no dill, no pip: the "
            f"host's dill is sent with the bootstrap): open + first cell "
            f"{fmt_s(own['open_first_cell']['median'])}, trivial cell {fmt_s(own['trivial_cell']['median'])}."
        )
    if ours.get("transport"):
        add(
            f'- dockerrepl ran with its default `transport="auto"`, which took '
            f"`{ours['transport']}` here; both transports side by side are below."
        )
    add("")
    if data.get("transports"):
        tc = results["transports"]["counts"]
        add("## Transports: proxy and channel")
        add("")
        add(
            'dockerrepl alone, `transport="proxy"` (an HTTP proxy on the docker bridge, a '
            'bind-mounted workspace) against `transport="channel"` (`llm_query`, files and the '
            "bootstrap as frames over the `docker run -i` pipe, a named volume). Every measurement "
            "alternates between the two, round by round, with the order swapped each round. "
            "Median (min-max, n):"
        )
        add("")
        add("| " + " | ".join(TRANSPORT_HEAD) + " |")
        add("|---|---:|---:|---:|---|---|")
        for r in data["transports"]:
            add("| " + " | ".join(transport_cells(r)) + " |")
        add("")
        add(
            f"- open + first cell: {tc['opens']} each, after one warm-up open each; trivial cells in "
            f"blocks of {tc['block']}; `llm_query`: a cell of 20 calls timed inside the container "
            "(per call) and on the host (the cell); `load_context` of a 10 MiB string; restore: "
            "`x = i`, `checkpoint()`, `docker kill`, then the time of the next cell "
            f"(`{KILL_CELL}`: a new container, the checkpoint and the 10 MB context loaded again)."
        )
        add("")
    add("## Per-cell latency against state size")
    add("")
    add(f"![per-cell latency against state size, both systems, log scale]({plot_name})")
    add("")
    add(
        "Trivial cells (`x = 1`, median) in a REPL that holds a loaded context of that size "
        "(`load_context`, what an RLM carries; the target rows above use this series), and in one "
        "that holds a list of 100-byte strings of that size built by a cell:"
    )
    add("")
    add("| " + " | ".join(STATE_HEAD) + " |")
    add("|---:|---:|---:|---:|---:|---:|---:|")
    for row in state_rows(results):
        add("| " + " | ".join(row) + " |")
    add("")
    add("## Where the time goes")
    add("")
    if floors:
        add(
            "The engine's own floors on this machine, measured in the same run: "
            f"`docker run -i --rm` of the image to the first byte from `python3` "
            f"**{fmt_s(med(floors, 'docker_run_first_byte'))}**; a 100-byte round trip through the "
            f"stdin/stdout of a `docker run -i ... cat` **{fmt_s(med(floors, 'pipe_round_trip'))}**; "
            f"`docker exec <container> python -c pass` **{fmt_s(med(floors, 'docker_exec_python'))}**."
        )
        add("")
    add(
        "- **rlm's cell** is a new `docker exec` of a generated script (the last floor above), which "
        "imports requests and dill, `dill.load`s the whole namespace from `/workspace/state.dill`, runs "
        "the cell, `dill.dump`s the whole namespace back, and prints the `repr` of every variable as "
        "JSON: with a context loaded that is `context` and `context_0`, twice its size per cell. So its "
        "cell costs an exec plus work linear in the state."
    )
    add(
        "- **dockerrepl's cell** is one framed message each way over the `docker run -i` pipe (the "
        "round-trip floor above) to a worker that keeps the namespace in memory; `locals` are reprs "
        "capped at 1000 characters, sliced before `repr`. After a cell the worker snapshots the "
        "namespace to `state.dill` in a forked copy-on-write child, so a crash loses nothing up to the "
        "last completed cell. The fork is skipped when nothing that can change in place is in the "
        "namespace (strings, numbers, modules, functions, the `answer` dict), and loaded contexts are "
        "recorded by their file, never pickled again. That is why the context series is flat."
    )
    add(
        "- **A list (or dict, or any mutable object) in the namespace** makes that snapshot fork "
        "happen after every cell. The cell does not wait for the dump, but the next cell waits for "
        "the fork itself (copying the worker's page tables, which grows with its heap) and shares "
        "the two cores with the child that is writing (a child still waiting for its turn exits "
        "by itself once a newer one is on its way). That is the list series: not flat, and still far below rlm. Making it "
        "flat would mean snapshotting less often than every cell, which gives up restoring up to the "
        "last completed cell after a crash; dockerrepl keeps the guarantee. `auto_checkpoint=False` "
        "turns the background snapshots off (then only `checkpoint()` writes one)."
    )
    add(
        "- **Opening**: dockerrepl's open is one hardened `docker run -i` (the first floor above) plus "
        "the bootstrap's start (supervisor, forked worker, handshake) and one `docker inspect` to "
        "check the hardening; rlm's is `docker run -d`, then `docker exec ... pip install` (fails at "
        "once: no pip in the image), `docker exec python -c 'import requests'`, then its first cell, "
        "another exec. The container start itself is the same for both, so this ratio is the one "
        "with the least room."
    )
    add(
        "- **llm_query**: rlm's cell makes a new HTTP connection per call (`requests.post`), and its "
        "proxy a new TCP connection to the LM Handler per call. dockerrepl's container keeps one "
        "HTTP/1.1 connection to its proxy, which keeps one connection to the LM Handler."
    )
    add(
        "- **load_context**: both write the payload to a file in the bind mount. rlm then runs a cell "
        "that reads it (and pays its state dump and two full reprs); dockerrepl's worker reads the "
        "file directly and keeps only its path for checkpoints."
    )
    add(
        "- **cleanup**: rlm runs `docker exec ... rm -rf /workspace/*` and then `docker rm -f`; "
        "dockerrepl sends a shutdown frame, closes stdin and waits until `--rm` has removed the "
        "container."
    )
    add("")
    add("## What is measured")
    add("")
    add(
        f"- **open + first cell**: construct the REPL and run `{TRIVIAL}`; median of {c['opens']} "
        f"(rlm: {c['rlm_opens']}), after one warm-up open per system. **cleanup**: `cleanup()` of "
        "those REPLs. The two systems take turns (one open each, in turn), so both see the same "
        "machine load."
    )
    add(
        f"- **trivial cell**: `execute_code({TRIVIAL!r})`, host wall clock, median of {c['trivial']} "
        f"(rlm: {c['rlm_trivial']}) after 3 warm-up cells."
    )
    add(
        "- **llm_query round trip**: a cell calls `llm_query` 20 times in a row and times the loop "
        "inside the container with `time.perf_counter()`; per call, median over "
        f"{c['llm']} cells (rlm: {c['rlm_llm']})."
    )
    add(
        f"- **llm_query_batched of 50**: the whole cell, host wall clock; median of {c['batch']} "
        f"(rlm: {c['rlm_batch']})."
    )
    add(
        f"- **load_context of 10 MB**: `load_context(s)` with a 10 MiB string; median of {c['loads']} "
        f"(rlm: {c['rlm_loads']})."
    )
    add(
        "- **state**: one REPL per series; `load_context` of 1, 10, 50 and 100 MiB of text (each "
        "replacing the last), or a cell that builds `data = [...]` of that many 100-character "
        f"strings; then trivial cells: median of {c['state_cells']} per size up to 10 MB and "
        f"{c['state_cells_big']} above (rlm: {c['rlm_state_cells']} / {c['rlm_state_cells_big']}; "
        f"list series {c['mut_cells']} / {c['mut_cells_big']}, rlm {c['rlm_mut_cells']} / "
        f"{c['rlm_mut_cells_big']})."
    )
    add(
        f"- **concurrency**: {N_CONCURRENT} REPLs opened at once, then one thread per REPL runs "
        f"trivial cells for {cfg['concurrent_seconds']:g} s (rlm: {cfg['rlm_concurrent_seconds']:g} s), "
        "all in one process; total cells / elapsed time."
    )
    add(
        "- **warm pool**: `DockerREPLPool(size=2, image=..., lm_handler_address=...)`; wait until "
        f"both members are ready, then time `acquire()`; {c['pool']} times."
    )
    add("")
    add("## Fairness")
    add("")
    add(
        f"- One image for both: `{cfg['rlm_image']}`: Debian bookworm's python3 with python3-dill, "
        "python3-requests and python-is-python3, built offline by `scripts/build-image.sh`, since "
        "rlm's DockerREPL needs `python`, dill and requests in the image. dockerrepl needs only "
        "`python3`; its numbers on its own image are listed above."
    )
    add(
        "- One LM Handler for both: dockerrepl's `LMHandler` with `EchoClient` (answers "
        "`echo:<prompt>`). rlm's proxy reaches it with rlm's own client code (one connection per "
        "request), as it would reach rlm's handler; the wire protocol is the same."
    )
    add(
        "- rlm's `setup()` runs `docker exec <id> pip install -q dill requests` in every new "
        "container. This image has no pip, so that exec fails at once and uses no network (dill and "
        "requests are already there); its cost is part of rlm's open time. Containers on this machine "
        "reach the package index only through a TLS-intercepting proxy whose certificate they do not "
        "trust, so on an image with pip the install would fail, slowly: this image is rlm's best case."
    )
    add(
        "- rlm's containers run with no limits and no hardening; dockerrepl's with its defaults "
        "(`--cap-drop ALL`, `no-new-privileges`, pids limit 512, 2 GB of memory with swap off, 1 CPU, "
        "the supervisor as pid 1, a `docker inspect` check of that at start). "
        "Both are measured as shipped."
    )
    add(
        "- Both run in the benchmark's process (`.bench/venv`, created by the script: rlms "
        f"{data['versions'].get('rlms') or '?'}, matplotlib, dill {data['versions'].get('dill') or '?'}); "
        f"dockerrepl {data['versions'].get('dockerrepl')} is imported from this checkout (commit "
        f"{info['commit'] or '?'}). Every REPL and container the run starts is removed at the end, "
        "also on Ctrl-C or an error."
    )
    add("")
    add("## Machine")
    add("")
    add("| | |")
    add("|---|---|")
    la = " / ".join(f"{x:.2f}" for x in data["load_avg_start"])
    le = " / ".join(f"{x:.2f}" for x in data["load_avg_end"])
    for k, v in [
        ("CPU", f"{info['cpu']} ({info['cores']} cores)"),
        ("RAM", f"{info['ram_gib']} GiB"),
        ("kernel", info["kernel"]),
        (
            "docker",
            f"{info['docker']}, storage driver {info['storage_driver']}, cgroup {info['cgroup']}",
        ),
        ("python", info["python"]),
        ("load average (1 / 5 / 15 min)", f"{la} at the start, {le} at the end"),
        ("date", info["date"]),
        ("duration of the run", f"{data['duration_s']:.0f} s"),
        ("command", f"`{data['command']}`"),
    ]:
        add(f"| {k} | {v} |")
    add("")
    with open(path, "w") as f:
        f.write("\n".join(L))


# ---------------------------------------------------------------------- main
def ensure_image(tag: str, packages: Optional[str]) -> None:
    if docker_out("image", "inspect", "--format", "{{.Id}}", tag):
        return
    print(f"== building {tag}", flush=True)
    cmd = [os.path.join(ROOT, "scripts", "build-image.sh"), "--tag", tag]
    if packages:
        cmd += ["--packages", packages]
    subprocess.run(cmd, check=True)


def counts_for(quick: bool) -> dict[str, int]:
    if quick:
        return {
            "opens": 3,
            "trivial": 60,
            "llm": 3,
            "batch": 3,
            "loads": 3,
            "state_cells": 30,
            "state_cells_big": 15,
            "mut_cells": 30,
            "mut_cells_big": 15,
            "floors": 3,
            "pool": 4,
            "rlm_opens": 2,
            "rlm_trivial": 6,
            "rlm_llm": 1,
            "rlm_batch": 1,
            "rlm_loads": 1,
            "rlm_state_cells": 2,
            "rlm_state_cells_big": 1,
            "rlm_mut_cells": 1,
            "rlm_mut_cells_big": 1,
        }
    return {
        "opens": 7,
        "trivial": 400,
        "llm": 7,
        "batch": 7,
        "loads": 7,
        "state_cells": 200,
        "state_cells_big": 100,
        "mut_cells": 200,
        "mut_cells_big": 100,
        "floors": 7,
        "pool": 12,
        "rlm_opens": 7,
        "rlm_trivial": 20,
        "rlm_llm": 3,
        "rlm_batch": 3,
        "rlm_loads": 3,
        "rlm_state_cells": 5,
        "rlm_state_cells_big": 3,
        "rlm_mut_cells": 3,
        "rlm_mut_cells_big": 2,
    }


def rlm_counts(c: dict[str, int]) -> dict[str, int]:
    return {
        k: c[f"rlm_{k}"]
        for k in (
            "opens",
            "trivial",
            "llm",
            "batch",
            "loads",
            "state_cells",
            "state_cells_big",
            "mut_cells",
            "mut_cells_big",
        )
    } | {"pool": 0}


def run_sessions(args: argparse.Namespace) -> int:
    sys.path.insert(0, ROOT)
    INTERRUPTS.install()
    from dockerrepl import LMHandler
    from dockerrepl.clients import EchoClient

    handler = LMHandler(EchoClient())
    handler.start()
    kwargs = {"image": args.our_image, "lm_handler_address": handler.address}
    res: dict[str, Any] = {}
    rc = 0
    started = time.time()
    load = os.getloadavg()
    try:
        print("== dockerrepl: sessions (save, resume, fork)", flush=True)
        bench_sessions(kwargs, args.quick, res)
    except KeyboardInterrupt:
        rc = 130
    except Exception:
        traceback.print_exc()
        rc = 1
    finally:
        STOP.set()
        REG.close_all()
        handler.stop()
        sweep_leftovers()
    if rc:
        return rc
    lines = print_sessions(res)
    out_dir = args.out_dir or BENCH_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "benchmarks-sessions.json")
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    command = "python scripts/bench.py" + "".join(f" {a}" for a in sys.argv[1:])
    m = machine_info()
    with open(os.path.join(out_dir, "benchmarks-sessions.md"), "w") as f:
        f.write(
            "# Sessions as values: snapshot, rollback, save, resume, fork\n\n"
            "<!-- Generated by scripts/bench.py --sessions; do not edit by hand. -->\n\n"
            f"`{command}`, {date}: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB,"
            f" Docker {m['docker']}, commit {m['commit']}, load at the start"
            f" {load[0]:.2f}. Host wall clock, from the call to"
            " a ready REPL (fork: children that answered a cell are counted after it).\n\n"
            + "\n".join(lines)
            + "\n"
        )
    data = {
        "date": date,
        "machine": m,
        "load_at_start": load,
        "results": res,
        "quick": args.quick,
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"\nwrote {os.path.relpath(path)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    ap.add_argument("--no-rlm", action="store_true", help="measure dockerrepl only")
    ap.add_argument(
        "--image", default=RLM_IMAGE, help=f"image for both systems (default {RLM_IMAGE})"
    )
    ap.add_argument(
        "--our-image", default=OUR_IMAGE, help="dockerrepl's own image, also measured briefly"
    )
    ap.add_argument(
        "--out-dir",
        default=None,
        help="where benchmarks.{md,json,png} go (default docs/; with --transports: only "
        "transports.json, in .bench/ unless this is given)",
    )
    ap.add_argument(
        "--no-venv", action="store_true", help="run in this interpreter (needs rlms, matplotlib)"
    )
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(GROUPS))
    ap.add_argument(
        "--transports",
        action="store_true",
        help="only dockerrepl's transports, proxy and channel, side by side (open, trivial cell, "
        "llm_query, load_context of 10 MB, restore after docker kill; alternating between them); "
        "implies --no-rlm --only transports; prints a table and writes transports.json",
    )
    ap.add_argument(
        "--sessions",
        action="store_true",
        help="only sessions as values: snapshot, rollback, save, resume and fork (1 and 8 "
        "children, warm pool and cold) against the state size (1, 10, 100 MB; snapshot and "
        "rollback at 200 MB too); runs in this interpreter, prints a "
        "table and writes benchmarks-sessions.{md,json} (in .bench/ unless --out-dir is given)",
    )
    args = ap.parse_args()
    if args.sessions:
        return run_sessions(args)
    if args.transports:
        if args.only and args.only != "transports":
            ap.error("--transports is --only transports: not with another --only")
        args.only, args.no_rlm = "transports", True
    if not args.no_venv and not _in_bench_env():
        ensure_venv_and_reexec(sys.argv[1:])

    sys.path.insert(0, ROOT)
    os.environ.setdefault("RLM_DOCKER_WORKSPACE_DIR", os.path.join(BENCH_DIR, "rlm_workspace"))
    INTERRUPTS.install()
    import dockerrepl
    from dockerrepl import DockerREPL, LMHandler
    from dockerrepl.clients import EchoClient

    command = "python scripts/bench.py" + "".join(f" {a}" for a in sys.argv[1:])
    load_start = os.getloadavg()
    started = time.time()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    only = set(filter(None, args.only.split(","))) or set(GROUPS)
    if only - set(GROUPS):
        ap.error(f"--only: unknown group(s) {sorted(only - set(GROUPS))}; choose from {GROUPS}")
    c = counts_for(args.quick)
    conc_s, rlm_conc_s = (1.5, 3.0) if args.quick else (4.0, 8.0)
    results: dict[str, dict[str, Any]] = {"dockerrepl": {}}
    versions = {
        "dockerrepl": dockerrepl.__version__,
        "rlms": pkg_version("rlms"),
        "dill": pkg_version("dill"),
        "matplotlib": pkg_version("matplotlib"),
    }
    rc = 0
    handler = LMHandler(EchoClient())
    try:
        ensure_image(args.image, RLM_IMAGE_PACKAGES if args.image == RLM_IMAGE else None)
        ensure_image(args.our_image, None)
        addr = handler.start()
        ours_kwargs = {"image": args.image, "lm_handler_address": addr, "timeout": 300}
        ours = System("dockerrepl", lambda: DockerREPL(**ours_kwargs), args.image)
        systems = [(ours, c)]
        if not args.no_rlm:
            from rlm.environments.docker_repl import DockerREPL as RlmDockerREPL

            os.makedirs(os.environ["RLM_DOCKER_WORKSPACE_DIR"], exist_ok=True)
            rlm = System(
                "rlm", lambda: RlmDockerREPL(image=args.image, lm_handler_address=addr), args.image
            )
            results["rlm"] = {}
            systems.append((rlm, rlm_counts(c)))

        print(f"== load average at start: {' '.join(f'{x:.2f}' for x in load_start)}", flush=True)
        # warm-up: one open per system (image layers, caches); not counted
        for s, _ in systems:
            if only - {"transports", "floors"}:
                r = s.open()
                if s is ours:
                    results["dockerrepl"]["transport"] = getattr(r, "transport", "")
                REG.close(r)
        if "open" in only:
            print("== open + first cell, cleanup (the systems take turns)", flush=True)
            bench_open_cleanup([(s, cs["opens"]) for s, cs in systems], results)
        for s, cs in systems:
            out = results[s.name]
            if "cells" in only:
                print(f"== {s.name}: trivial cells, llm_query, llm_query_batched", flush=True)
                bench_cells(s, cs, out)
            if "state" in only:
                print(f"== {s.name}: load_context and state sizes", flush=True)
                bench_state(s, cs, out)
            if "mutable" in only:
                print(f"== {s.name}: state built in a cell (a list of strings)", flush=True)
                bench_mutable_state(s, cs, out)
            if "concurrent" in only:
                print(f"== {s.name}: {N_CONCURRENT} concurrent REPLs", flush=True)
                bench_concurrent(s, conc_s if s.name == "dockerrepl" else rlm_conc_s, out)
        if "floors" in only:
            print("== the engine's own floors (docker run, pipe, docker exec)", flush=True)
            floors: dict[str, Any] = {}
            bench_floors(args.image, c["floors"], floors)
            results["floors"] = floors
        if "pool" in only:
            print("== dockerrepl: warm pool acquire", flush=True)
            bench_pool(ours_kwargs, c["pool"], results["dockerrepl"])
        if "open" in only and "cells" in only and args.our_image != args.image:
            print(f"== dockerrepl on {args.our_image}", flush=True)
            own_kwargs = dict(ours_kwargs, image=args.our_image)
            own = System("dockerrepl", lambda: DockerREPL(**own_kwargs), args.our_image)
            REG.close(own.open())
            wrap: dict[str, Any] = {"dockerrepl": {}}
            bench_open_cleanup([(own, c["opens"])], wrap)
            sub = wrap["dockerrepl"]
            cells: dict[str, Any] = {}
            r = own.open()
            try:
                for _ in range(3):
                    run_cell(r, TRIVIAL)
                cells["trivial_cell"] = stats(
                    [run_cell(r, TRIVIAL)[1] for _ in range(c["trivial"])]
                )
            finally:
                REG.close(r)
            results["dockerrepl"]["own_image"] = {**sub, **cells}
        if "transports" in only:
            print("== dockerrepl: transports proxy and channel, alternating", flush=True)
            tr: dict[str, Any] = {}
            bench_transports(ours_kwargs, transport_counts(args.quick), tr)
            results["transports"] = tr
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        rc = 130
    except Exception:
        traceback.print_exc()
        rc = 1
    finally:
        STOP.set()
        REG.close_all()
        handler.stop()
        left = sweep_leftovers()
        if left:
            print(f"warning: removed {len(left)} leftover container(s)", file=sys.stderr)
    if rc:
        return rc

    info = machine_info()
    info["date"] = date
    data = {
        "command": command,
        "date": date,
        "duration_s": time.time() - started,
        "load_avg_start": list(load_start),
        "load_avg_end": list(os.getloadavg()),
        "machine": info,
        "versions": versions,
        "config": {
            "quick": args.quick,
            "rlm": not args.no_rlm,
            "rlm_image": args.image,
            "our_image": args.our_image,
            "counts": c,
            "concurrent_seconds": conc_s,
            "rlm_concurrent_seconds": rlm_conc_s,
            "state_sizes_mb": list(STATE_SIZES_MB),
            "lm_handler": "dockerrepl.LMHandler(EchoClient()), shared",
        },
        "results": results,
    }
    if "transports" in results:
        data["transports"] = transport_rows(results["transports"])
    if args.transports:
        print_transports(results["transports"])
        out_dir = args.out_dir or BENCH_DIR
        os.makedirs(out_dir, exist_ok=True)
        json_path = os.path.join(out_dir, "transports.json")
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        print(f"\nwrote {os.path.relpath(json_path)}")
        missed = [r["label"] for r in data["transports"] if r["met"] is False]
        if missed:
            print("targets missed: " + "; ".join(missed))
        return 0
    data["comparison"] = compare(results)
    print_table(data["comparison"], results)
    if "transports" in results:
        print_transports(results["transports"])
    args.out_dir = args.out_dir or os.path.join(ROOT, "docs")
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "benchmarks.json")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    plot_path = os.path.join(args.out_dir, "benchmarks.png")
    write_plot(plot_path, results, info)
    doc_path = os.path.join(args.out_dir, "benchmarks.md")
    write_doc(doc_path, "benchmarks.png", "benchmarks.json", data)
    print(
        f"\nwrote {os.path.relpath(doc_path)}, {os.path.relpath(json_path)}, {os.path.relpath(plot_path)}"
    )
    missed = [r["label"] for r in data["comparison"] if r["met"] is False]
    missed += [
        f"{r['label']} (transports)" for r in data.get("transports", []) if r["met"] is False
    ]
    if missed:
        print("targets missed: " + "; ".join(missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
