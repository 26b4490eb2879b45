"""Many starts at once, and a pool over several engines, on real engines.

The local engine, and for the multi-engine pool the private "remote" engine of
``private_engine.py`` (a second dockerd over tcp in its own namespaces).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from concurrency import run_threads
from docker_helpers import our_containers, our_volumes, wait_gone
from private_engine import RemoteEngine, remote_engine_fixture  # noqa: F401

from dockerrepl import DockerREPL, DockerREPLPool
from dockerrepl._labels import LABEL_OWNER, owner_label
from dockerrepl._starts import start_limit

pytestmark = pytest.mark.timeout(600)


def test_32_repls_started_at_once_all_work_and_leave_nothing(image, handler):
    before = (our_containers(), our_volumes())
    threads_before = threading.active_count()
    repls: list[Any] = [None] * 32
    answers: list[Any] = [None] * 32

    def one(i: int) -> None:
        repls[i] = r = DockerREPL(image=image, lm_handler_address=handler.address, timeout=120)
        res = r.execute_code(f"print({i} * 2, llm_query('q{i}'))")
        answers[i] = (res.status, res.stdout.split()[0] if res.stdout else "")

    try:
        t0 = time.monotonic()
        errors = run_threads(one, 32, timeout=540)
        print(f"32 REPLs started and answered in {time.monotonic() - t0:.1f}s")
        assert not errors, f"{len(errors)} of 32 failed; the first: {errors[0]!r}"
        assert answers == [("ok", str(i * 2)) for i in range(32)]
        assert len({r.container_name for r in repls}) == 32
    finally:
        for r in repls:
            if r is not None:
                r.cleanup()
    assert not wait_gone(our_containers() - before[0], timeout=30)
    assert our_volumes() - before[1] == set()
    end = time.monotonic() + 10
    while threading.active_count() > threads_before and time.monotonic() < end:
        time.sleep(0.1)
    assert threading.active_count() <= threads_before


def _wait_full(pool: DockerREPLPool, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while pool.ready_count < pool.size or any(s["starting"] for s in pool.stats()):
        assert time.monotonic() < end, f"the pool did not fill: {pool.stats()}"
        time.sleep(0.05)


def _loads(pool: DockerREPLPool) -> list[int]:
    return [s["ready"] + s["starting"] + s["handed_out"] for s in pool.stats()]


def test_a_pool_over_two_engines_places_members_on_the_least_loaded(
    remote_engine: RemoteEngine, image, handler
):
    local = our_containers()
    pool = DockerREPLPool(
        4,
        engines=[{}, {"docker_host": remote_engine.host, "transport": "channel"}],
        image=image,
        lm_handler_address=handler.address,
        timeout=60,
        start_timeout=120,
    )
    mine: list[DockerREPL] = []
    try:
        assert pool.max_starting == min(4, start_limit())
        _wait_full(pool)
        assert [s["ready"] for s in pool.stats()] == [2, 2], pool.stats()
        for i in range(5):
            repl = pool.acquire(timeout=240)
            mine.append(repl)
            res = repl.execute_code(f"print(llm_query('p{i}'))")
            assert res.status == "ok" and res.stdout.strip(), res
            _wait_full(pool)
            a, b = _loads(pool)
            assert abs(a - b) <= 1, pool.stats()  # ready + handed out, spread evenly
        hosts = {r._options.docker_host for r in mine}
        assert hosts == {None, remote_engine.host}, "both engines served REPLs"
        # cleaned-up REPLs no longer count: the next members go where they were
        for r in mine[:3]:
            r.cleanup()
        a, b = _loads(pool)
        assert a + b == 4 + 2
    finally:
        pool.close()
        for r in mine:
            r.cleanup()
    assert not wait_gone(our_containers() - local, timeout=30)
    label = f"label={LABEL_OWNER}={owner_label()}"
    end = time.monotonic() + 15
    while remote_engine.ids("container", label) and time.monotonic() < end:
        time.sleep(0.2)
    assert remote_engine.ids("container", label) == set()
    assert remote_engine.ids("volume", label) == set()


def test_an_engine_that_cannot_start_members_is_backed_off_while_others_serve(image, handler):
    before = our_containers()
    pool = DockerREPLPool(
        2,
        # nothing listens there: every start on it fails (at once: it never answered)
        engines=[{"docker_host": "tcp://127.0.0.1:9"}, {}],
        image=image,
        lm_handler_address=handler.address,
        timeout=60,
    )
    got: list[DockerREPL] = []
    try:
        for _ in range(4):
            repl = pool.acquire(timeout=240)
            got.append(repl)
            assert repl.execute_code("print(6 * 7)").stdout == "42\n"
            assert repl._options.docker_host is None
        dead, live = pool.stats()
        assert dead["failures"] >= 1 and dead["handed_out"] == dead["ready"] == 0
        assert "127.0.0.1:9" in dead["engine"] and dead["last_error"]
        assert live["handed_out"] == 4 and live["failures"] == 0
    finally:
        pool.close()
        for r in got:
            r.cleanup()
    assert not wait_gone(our_containers() - before, timeout=30)
