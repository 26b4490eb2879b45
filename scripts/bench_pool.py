#!/usr/bin/env python3
"""How long rlm's construction of an environment takes, with and without a warm pool.

    python scripts/bench_pool.py                 # 20 of each (about a minute)
    python scripts/bench_pool.py -n 40 --pool 4  # more samples, a bigger pool

rlm builds one ``DockerREPL(**environment_kwargs)`` per completion (with its LM
handler's address and the prompt as ``context_payload``). Timed here is exactly
that call, through rlm's own ``rlm.environments.get_environment("docker", ...)``
with dockerrepl installed by ``use_dockerrepl()``:

* ``unpooled``: ``use_dockerrepl(defaults)``: each construction starts a container;
* ``pooled``: ``use_dockerrepl(defaults, pool=N)``: each takes a warm member and
  gets its completion's arguments (handler address, context, setup code). Between
  two constructions (untimed) the pool refills, as it does while a completion runs.

Needs rlm (PyPI ``rlms``) and the image (default ``dockerrepl/python:3.11-bookworm``,
built by scripts/build-image.sh). :func:`measure` returns the numbers (seconds)
for ``scripts/bench.py --scale``; :func:`main` prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's dockerrepl

IMAGE = "dockerrepl/python:3.11-bookworm"
#: What each completion's construction gets (rlm passes these; the context is the prompt).
CONTEXT = "What is the capital of France? " * 20
SETUP = "import json, re"


def _summary(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    return {
        "n": len(s),
        "median": statistics.median(s),
        "p90": s[min(len(s) - 1, int(0.9 * len(s)))],
        "min": s[0],
        "max": s[-1],
        "samples": s,
    }


def _construct(address: tuple[str, int], i: int) -> tuple[Any, float]:
    from rlm.environments import get_environment

    kwargs = {
        "lm_handler_address": address,
        "context_payload": f"{CONTEXT} #{i}",
        "setup_code": SETUP,
        "depth": 1,
        "max_concurrent_subcalls": 4,
    }
    t0 = time.perf_counter()
    env = get_environment("docker", kwargs)
    return env, time.perf_counter() - t0


def _check(env: Any, i: int) -> None:
    # the construction is only done when the REPL has what the completion gave it
    res = env.execute_code("print(context[-3:], json.__name__)")
    if res.stdout.split() != [f"#{i}"[-3:], "json"] and not res.stdout.startswith(f"#{i}"):
        raise RuntimeError(f"environment {i} is not set up: {res.stdout!r} {res.stderr!r}")


def _run(n: int, pool: int, defaults: dict[str, Any], address: tuple[str, int]) -> list[float]:
    from dockerrepl.integrations import rlm as integration

    integration.use_dockerrepl(defaults, pool=pool)
    samples = []
    try:
        warm = integration._POOL[0] if pool else None
        for i in range(n):
            if warm is not None:
                _wait_full(warm)
            env, took = _construct(address, i)
            try:
                _check(env, i)
            finally:
                env.cleanup()
            samples.append(took)
    finally:
        integration.restore_rlm_docker()
    return samples


def _wait_full(pool: Any, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while pool.ready_count < pool.size:
        if time.monotonic() > end:
            raise TimeoutError(f"the pool did not refill: {pool.stats()}")
        time.sleep(0.01)


def measure(
    n: int = 20, pool: int = 2, image: Optional[str] = None, **defaults: Any
) -> dict[str, Any]:
    """Median (and p90, min, max, samples) seconds of rlm's environment construction,
    ``n`` times unpooled and ``n`` times from a warm pool of ``pool``; ``defaults`` go
    to ``use_dockerrepl`` (e.g. ``timeout=60``)."""
    from dockerrepl import LMHandler
    from dockerrepl.clients import EchoClient

    defaults = {"image": image or os.environ.get("DOCKERREPL_IMAGE") or IMAGE, **defaults}
    with LMHandler(EchoClient()) as handler:
        address = handler.address
        unpooled = _summary(_run(n, 0, defaults, address))
        pooled = _summary(_run(n, pool, defaults, address))
    return {
        "n": n,
        "pool": pool,
        "image": defaults["image"],
        "unpooled": unpooled,
        "pooled": pooled,
        "speedup_median": unpooled["median"] / pooled["median"],
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20, help="constructions of each kind (default 20)")
    ap.add_argument("--pool", type=int, default=2, help="pool size (default 2)")
    ap.add_argument("--image", default=None, help=f"image (default {IMAGE})")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args(argv)
    res = measure(args.n, args.pool, args.image)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"rlm environment construction, {res['n']} each, image {res['image']}:")
    for kind in ("unpooled", "pooled"):
        r = res[kind]
        print(
            f"  {kind:9} median {r['median'] * 1000:8.1f} ms   p90 {r['p90'] * 1000:8.1f} ms"
            f"   min {r['min'] * 1000:7.1f} ms   max {r['max'] * 1000:8.1f} ms"
        )
    print(f"  pooled is {res['speedup_median']:.0f}x faster (median), pool={res['pool']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
