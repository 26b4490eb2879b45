#!/usr/bin/env python3
"""Benchmark dockerrepl against rlm's DockerREPL, side by side, in one run.

    python scripts/bench.py              # full run (a few minutes); rewrites docs/benchmarks.*
    python scripts/bench.py --quick      # fewer repetitions (about a minute)
    python scripts/bench.py --no-rlm     # dockerrepl only (no ratios)

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

# (key, label, kind, target). kind: "speedup" = rlm / ours >= target;
# "throughput" = ours / rlm >= target; "flat" = ours at 100 MB / ours empty <= target;
# "absolute" = ours <= target seconds.
TARGETS: list[tuple[str, str, str, float]] = [
    ("trivial_cell", "trivial cell", "speedup", 50),
    ("state_cell_10mb", "trivial cell with 10 MB of state", "speedup", 100),
    ("state_flat", "ours: cell with 100 MB of state / empty state", "flat", 2),
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
    from dockerrepl._container import owner_label

    left = docker_out("ps", "-aq", "--filter", f"label=dockerrepl.owner={owner_label()}").split()
    for cid in REG.rlm_container_ids:
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
def bench_open_cleanup(sys_: System, n: int, out: dict[str, Any]) -> None:
    opens, cleanups = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        repl = sys_.open()
        run_cell(repl, TRIVIAL)
        opens.append(time.perf_counter() - t0)
        cleanups.append(REG.close(repl))
    out["open_first_cell"] = stats(opens)
    out["cleanup"] = stats(cleanups)


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
            for _ in range(2):
                run_cell(repl, TRIVIAL)
            n = c["state_cells"] if size <= 10 else c["state_cells_big"]
            per_size[str(size)] = stats([run_cell(repl, TRIVIAL)[1] for _ in range(n)])
            print(
                f"   {sys_.name}: state {size:>3} MB: {fmt_s(per_size[str(size)]['median'])}",
                flush=True,
            )
    finally:
        REG.close(repl)
    out["state_cell"] = per_size


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


# -------------------------------------------------------------------- report
def fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms" if s < 0.01 else f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def value(res: dict[str, Any], key: str) -> Optional[float]:
    if key == "state_cell_10mb":
        v = res.get("state_cell", {}).get("10")
        return None if v is None else float(v["median"])
    if key == "state_flat":
        sc = res.get("state_cell", {})
        if "100" in sc and "0" in sc:
            return float(sc["100"]["median"]) / float(sc["0"]["median"])
        return None
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
        elif kind == "flat" and o is not None:
            ratio = o
            met = o <= target
        elif kind == "absolute" and o is not None:
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
    kind, target = row["kind"], row["target"]

    def show(v: Optional[float]) -> str:
        if v is None:
            return "-"
        if kind == "throughput":
            return f"{v:.1f}"
        if kind == "flat":
            return f"{v:.2f}x"
        return fmt_s(v)

    ratio = (
        "-"
        if row["ratio"] is None
        else (
            f"{row['ratio']:.2f}x"
            if kind == "flat"
            else f"{row['ratio']:,.0f}x"
            if row["ratio"] >= 10
            else f"{row['ratio']:.1f}x"
        )
    )
    if kind == "flat":
        tgt = f"<= {target:g}x"
        r_show, o_show, ratio = "-", show(row["dockerrepl"]), "-"
    elif kind == "absolute":
        tgt = f"<= {fmt_s(target)}"
        r_show, o_show = "-", show(row["dockerrepl"])
    elif kind == "speedup" and target == 1:
        tgt = "no slower"
        r_show, o_show = show(row["rlm"]), show(row["dockerrepl"])
    else:
        tgt = f">= {target:g}x"
        r_show, o_show = show(row["rlm"]), show(row["dockerrepl"])
    met = {True: "yes", False: "**NO**", None: "-"}[row["met"]]
    return [row["label"], r_show, o_show, ratio, tgt, met]


def print_table(rows: list[dict[str, Any]], results: dict[str, Any]) -> None:
    head = ["metric", "rlm", "dockerrepl", "ratio", "target", "met"]
    body = [row_cells(r) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print("\n" + line + "\n" + "-" * len(line))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths)))
    print("\nper-cell latency by state size (median):")
    for size in STATE_SIZES_MB:
        o = results.get("dockerrepl", {}).get("state_cell", {}).get(str(size))
        r = results.get("rlm", {}).get("state_cell", {}).get(str(size))
        ratio = f"{r['median'] / o['median']:,.0f}x" if o and r else "-"
        print(
            f"  {size:>3} MB   rlm {fmt_s(r and r['median']):>10}   dockerrepl "
            f"{fmt_s(o and o['median']):>10}   {ratio}"
        )


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

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)
    styles = {
        "rlm": ("rlm DockerREPL (rlms)", "#c0392b", "s"),
        "dockerrepl": ("dockerrepl", "#1f77b4", "o"),
    }
    for system, (label, color, marker) in styles.items():
        sc = results.get(system, {}).get("state_cell")
        if not sc:
            continue
        xs = [s for s in STATE_SIZES_MB if str(s) in sc]
        ys = [sc[str(s)]["median"] * 1e3 for s in xs]
        lo = [sc[str(s)]["min"] * 1e3 for s in xs]
        hi = [sc[str(s)]["p90"] * 1e3 for s in xs]
        ax.plot(xs, ys, marker=marker, color=color, label=label, linewidth=2)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
        for x, y in zip(xs, ys):
            ax.annotate(
                fmt_s(y / 1e3),
                (x, y),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=7,
                color=color,
            )
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_xticks(list(STATE_SIZES_MB))
    ax.set_xticklabels([str(s) for s in STATE_SIZES_MB])
    ax.set_xlabel("state in the REPL (MB of loaded context)")
    ax.set_ylabel("trivial cell, host wall clock (ms, log scale)")
    ax.set_title("Per-cell latency against state size (median; band: min to p90)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center right")
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
    L: list[str] = []
    add = L.append
    add("# Benchmarks: dockerrepl vs rlm's DockerREPL")
    add("")
    add("<!-- Generated by scripts/bench.py from one run; do not edit by hand. -->")
    add("")
    add(f"One run, {info['date']}, both systems on the same machine, image, LM Handler and cells.")
    add(
        f"Reproduce with `{data['command']}`"
        + (" (a `--quick` run: fewer repetitions)." if cfg["quick"] else ".")
    )
    add(f"Raw samples: [{json_name}]({json_name}).")
    add("")
    add("| metric | rlm DockerREPL | dockerrepl | rlm / dockerrepl | target | met |")
    add("|---|---:|---:|---:|---|---|")
    for r in rows:
        add("| " + " | ".join(row_cells(r)) + " |")
    add("")
    ours = results.get("dockerrepl", {})
    extra = []
    if "llm_query_batched_inner" in ours:
        rlm_in = results.get("rlm", {}).get("llm_query_batched_inner")
        extra.append(
            f"`llm_query_batched` of 50 timed inside the container: rlm "
            f"{fmt_s(rlm_in and rlm_in['median'])}, dockerrepl {fmt_s(ours['llm_query_batched_inner']['median'])}."
        )
    if "pool_acquire" in ours:
        pa, pf = ours["pool_acquire"], ours.get("pool_first_cell")
        extra.append(
            f"Warm pool: `acquire()` median {fmt_s(pa['median'])}, max {fmt_s(pa['max'])} over {pa['n']}; "
            f"the acquired REPL's first cell {fmt_s(pf and pf['median'])}."
        )
    cc = ours.get("concurrent_cells_per_s")
    if cc:
        rc = results.get("rlm", {}).get("concurrent_cells_per_s")
        extra.append(
            f"{N_CONCURRENT} REPLs, one thread each, trivial cells for {cc['seconds']:.1f} s: dockerrepl "
            f"{cc['cells']} cells ({cc['value']:.0f}/s)"
            + (
                f", rlm {rc['cells']} cells in {rc['seconds']:.1f} s ({rc['value']:.1f}/s)."
                if rc
                else "."
            )
        )
    own = ours.get("own_image")
    if own:
        extra.append(
            f"dockerrepl on its own image `{cfg['our_image']}` (python3 only, no dill: the host's dill "
            f"is copied into the mount): open + first cell {fmt_s(own['open_first_cell']['median'])}, "
            f"trivial cell {fmt_s(own['trivial_cell']['median'])}."
        )
    for e in extra:
        add(f"- {e}")
    add("")
    add("## Per-cell latency against state size")
    add("")
    add(f"![per-cell latency against state size]({plot_name})")
    add("")
    add("| state | rlm DockerREPL | dockerrepl | rlm / dockerrepl |")
    add("|---:|---:|---:|---:|")
    for size in STATE_SIZES_MB:
        o = ours.get("state_cell", {}).get(str(size))
        r = results.get("rlm", {}).get("state_cell", {}).get(str(size))
        ratio = f"{r['median'] / o['median']:,.0f}x" if o and r else "-"
        add(f"| {size} MB | {fmt_s(r and r['median'])} | {fmt_s(o and o['median'])} | {ratio} |")
    add("")
    add("## What is measured")
    add("")
    c = cfg["counts"]
    add(
        f"- **open + first cell**: construct the REPL and run `{TRIVIAL}`; median of {c['opens']} (rlm: "
        f"{c['rlm_opens']}). **cleanup**: `cleanup()` of those REPLs."
    )
    add(
        f"- **trivial cell**: `execute_code({TRIVIAL!r})`, host wall clock, median of {c['trivial']} "
        f"(rlm: {c['rlm_trivial']}) after 3 warm-up cells."
    )
    add(
        "- **llm_query round trip**: one cell calls `llm_query` 20 times in a row and times the loop "
        f"inside the container with `time.perf_counter()`; per call, median over {c['llm']} cells "
        f"(rlm: {c['rlm_llm']})."
    )
    add(
        f"- **llm_query_batched of 50**: the whole cell, host wall clock; median of {c['batch']} "
        f"(rlm: {c['rlm_batch']})."
    )
    add(
        f"- **load_context of 10 MB**: `load_context(str)` of a 10 MiB string; median of {c['loads']} "
        f"(rlm: {c['rlm_loads']})."
    )
    add(
        "- **state**: in one REPL, `load_context` of 1, 10, 50 and 100 MiB of text (each replacing "
        f"the last), then trivial cells; median of {c['state_cells']} cells per size up to 10 MB and "
        f"{c['state_cells_big']} above (rlm: {c['rlm_state_cells']} / {c['rlm_state_cells_big']}). "
        "Loaded context is the state an RLM carries."
    )
    add(
        f"- **concurrency**: {N_CONCURRENT} REPLs opened at once, then one thread per REPL runs trivial "
        f"cells for {cfg['concurrent_seconds']:g} s (rlm: {cfg['rlm_concurrent_seconds']:g} s); total "
        "cells / elapsed time."
    )
    add(
        f"- **warm pool**: `DockerREPLPool(size=2, image=..., lm_handler_address=...)`; wait until both "
        f"members are ready, time `acquire()`; {c['pool']} times."
    )
    add("")
    add("## Fairness")
    add("")
    add(
        f"- Same image for both: `{cfg['rlm_image']}` (Debian bookworm's python3 with "
        "python3-dill, python3-requests and python-is-python3, built offline by "
        "`scripts/build-image.sh`), since rlm's DockerREPL needs `python`, dill and requests in the "
        f"image. dockerrepl needs only `python3`; its numbers on its own image `{cfg['our_image']}` "
        "are listed above."
    )
    add(
        "- One LM Handler for both: dockerrepl's `LMHandler` with `EchoClient` (answers `echo:<prompt>`). "
        "rlm's proxy forwards to it with rlm's own client code (one TCP connection per request), "
        "exactly as it would to rlm's handler; the wire protocol is the same."
    )
    add(
        "- rlm's `setup()` runs `docker exec <id> pip install -q dill requests` in every new container. "
        "The image has no pip, so that exec fails at once (the packages are already there) and no "
        "network is used; the cost of that failed exec is part of rlm's open time. Containers here "
        "reach the package index only through a TLS-intercepting proxy they do not trust, so on an "
        "image with pip the install would fail more slowly; this image gives rlm its best case."
    )
    add(
        "- rlm's containers run without limits or hardening; dockerrepl's run with its defaults "
        "(`--cap-drop ALL`, `no-new-privileges`, pids limit 512, 2 GB memory with swap off, a "
        "`docker inspect` check of that hardening at start). Both times include all of that."
    )
    add(
        f"- rlm version: rlms {data['versions'].get('rlms') or '?'}; dockerrepl {data['versions'].get('dockerrepl')} "
        f"(commit {info['commit'] or '?'})."
    )
    add("")
    add("## Where the time goes")
    add("")
    add(
        "- rlm runs each cell as a new `docker exec` of a generated script: a new process in the "
        "container, which `dill.load`s the whole namespace, runs the cell, `dill.dump`s the whole "
        "namespace back to `/workspace/state.dill`, and prints the `repr` of every variable as JSON "
        "(with a context loaded that is `context` and `context_0`, twice its size per cell). Its cost is "
        "one `docker exec` (the floor of its trivial cell) plus work linear in the state size."
    )
    add(
        "- dockerrepl keeps one process per container (`docker run -i`), and a cell is one framed "
        "message each way over that pipe to a worker that keeps the namespace in memory. `locals` are "
        "reprs capped at 1000 characters (sliced before `repr`). Checkpoints are taken after a cell "
        "in a forked copy-on-write child, skipped when nothing mutable can have changed; loaded "
        "context files are recorded by path instead of being pickled again."
    )
    add(
        "- `llm_query`: rlm's cell opens a new HTTP connection per call (`requests.post`), and its "
        "proxy opens a new TCP connection to the LM Handler per call. dockerrepl's container keeps one "
        "HTTP/1.1 connection to its proxy, which keeps one connection to the LM Handler."
    )
    add(
        "- `load_context`: both write the payload to a file in the bind mount. rlm then runs a cell "
        "that reads it (and pays its state dump and reprs); dockerrepl's worker reads the file directly."
    )
    add("")
    add("## Machine")
    add("")
    add("| | |")
    add("|---|---|")
    rows_m = [
        ("CPU", f"{info['cpu']} ({info['cores']} cores)"),
        ("RAM", f"{info['ram_gib']} GiB"),
        ("kernel", info["kernel"]),
        (
            "docker",
            f"{info['docker']}, storage driver {info['storage_driver']}, cgroup {info['cgroup']}",
        ),
        ("python (benchmark)", info["python"]),
        (
            "load average at start",
            " / ".join(f"{x:.2f}" for x in data["load_avg_start"]) + " (1 / 5 / 15 min)",
        ),
        ("load average at end", " / ".join(f"{x:.2f}" for x in data["load_avg_end"])),
        ("date (UTC)", info["date"]),
        ("duration", f"{data['duration_s']:.0f} s"),
        ("command", f"`{data['command']}`"),
    ]
    for k, v in rows_m:
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
            "pool": 4,
            "rlm_opens": 2,
            "rlm_trivial": 6,
            "rlm_llm": 1,
            "rlm_batch": 1,
            "rlm_loads": 1,
            "rlm_state_cells": 2,
            "rlm_state_cells_big": 1,
        }
    return {
        "opens": 7,
        "trivial": 400,
        "llm": 7,
        "batch": 7,
        "loads": 7,
        "state_cells": 200,
        "state_cells_big": 100,
        "pool": 12,
        "rlm_opens": 3,
        "rlm_trivial": 20,
        "rlm_llm": 3,
        "rlm_batch": 3,
        "rlm_loads": 3,
        "rlm_state_cells": 5,
        "rlm_state_cells_big": 3,
    }


def rlm_counts(c: dict[str, int]) -> dict[str, int]:
    return {
        k: c[f"rlm_{k}"]
        for k in ("opens", "trivial", "llm", "batch", "loads", "state_cells", "state_cells_big")
    } | {"pool": 0}


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
        "--out-dir", default=os.path.join(ROOT, "docs"), help="where benchmarks.{md,json,png} go"
    )
    ap.add_argument(
        "--no-venv", action="store_true", help="run in this interpreter (needs rlms, matplotlib)"
    )
    ap.add_argument(
        "--only", default="", help="comma-separated subset: open,cells,state,concurrent,pool"
    )
    args = ap.parse_args()
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
    only = set(filter(None, args.only.split(","))) or {
        "open",
        "cells",
        "state",
        "concurrent",
        "pool",
    }
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
            REG.close(s.open())
        for s, cs in systems:
            out = results[s.name]
            if "open" in only:
                print(f"== {s.name}: open + first cell, cleanup", flush=True)
                bench_open_cleanup(s, cs["opens"], out)
            if "cells" in only:
                print(f"== {s.name}: trivial cells, llm_query, llm_query_batched", flush=True)
                bench_cells(s, cs, out)
            if "state" in only:
                print(f"== {s.name}: load_context and state sizes", flush=True)
                bench_state(s, cs, out)
            if "concurrent" in only:
                print(f"== {s.name}: {N_CONCURRENT} concurrent REPLs", flush=True)
                bench_concurrent(s, conc_s if s.name == "dockerrepl" else rlm_conc_s, out)
        if "pool" in only:
            print("== dockerrepl: warm pool acquire", flush=True)
            bench_pool(ours_kwargs, c["pool"], results["dockerrepl"])
        if "open" in only and "cells" in only and args.our_image != args.image:
            print(f"== dockerrepl on {args.our_image}", flush=True)
            own_kwargs = dict(ours_kwargs, image=args.our_image)
            own = System("dockerrepl", lambda: DockerREPL(**own_kwargs), args.our_image)
            REG.close(own.open())
            sub: dict[str, Any] = {}
            bench_open_cleanup(own, c["opens"], sub)
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
    data["comparison"] = compare(results)
    print_table(data["comparison"], results)
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
    if missed:
        print("targets missed: " + "; ".join(missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
