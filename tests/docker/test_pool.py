"""DockerREPLPool on a real engine: handed out once, never shared, members die with the pool."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from concurrency import run_threads
from docker_helpers import our_containers, wait_gone

from dockerrepl import DockerREPL, DockerREPLPool
from dockerrepl.errors import DockerError, DockerReplError, ReplClosed

pytestmark = pytest.mark.timeout(180)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_ready(pool: DockerREPLPool, n: int, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while pool.ready_count < n:
        assert time.monotonic() < end, "the pool did not fill up in time"
        time.sleep(0.02)


@pytest.fixture
def kwargs(image: str, handler: object) -> dict[str, object]:
    return {"image": image, "lm_handler_address": handler.address, "timeout": 60}  # type: ignore[attr-defined]


def test_each_repl_handed_out_once_with_its_own_state(kwargs):
    pool = DockerREPLPool(size=2, **kwargs)
    got: list[DockerREPL] = []
    try:
        got = [pool.acquire(timeout=120) for _ in range(3)]  # the third is a replacement
        assert all(isinstance(r, DockerREPL) for r in got)
        assert len({id(r) for r in got}) == 3
        assert len({r.container_id for r in got}) == 3
        a, b, _ = got
        assert a.execute_code("secret = 41").status == "ok"
        assert b.execute_code("print('secret' in dir())").stdout == "False\n"
        assert a.execute_code("print(secret + 1)").stdout == "42\n"
        assert b.execute_code("print(llm_query('hi'))").stdout == "echo:hi\n"
        assert a.temp_dir != b.temp_dir
    finally:
        pool.close()
        for r in got:
            r.cleanup()


def test_concurrent_acquires_never_share(kwargs):
    pool = DockerREPLPool(size=2, **kwargs)
    got: list[DockerREPL] = []
    lock = threading.Lock()

    def take(_thread: int) -> None:
        r = pool.acquire(timeout=120)
        with lock:
            got.append(r)

    try:
        assert run_threads(take, 4, timeout=150) == []
        assert len(got) == 4
        assert len({id(r) for r in got}) == 4
        assert len({r.container_id for r in got}) == 4
    finally:
        pool.close()
        for r in got:
            r.cleanup()


def test_close_removes_every_member_and_spares_handed_out_ones(kwargs):
    before = our_containers()
    pool = DockerREPLPool(size=2, **kwargs)
    mine = pool.acquire(timeout=120)
    try:
        wait_ready(pool, 2)
        members = our_containers() - before - {mine.container_id}
        assert len(members) == 2
        pool.close()
        assert wait_gone(members) == set()
        pool.close()  # idempotent
        assert pool.ready_count == 0
        with pytest.raises(ReplClosed):
            pool.acquire(timeout=5)
        # the handed-out REPL is its owner's, not the pool's
        assert mine.execute_code("print(6 * 7)").stdout == "42\n"
    finally:
        pool.close()
        mine.cleanup()
    assert wait_gone(our_containers() - before) == set()


def test_close_while_members_are_still_starting(kwargs):
    before = our_containers()
    with DockerREPLPool(size=3, **kwargs):
        pass  # closed at once: members that finish starting afterwards remove themselves
    assert wait_gone(our_containers() - before) == set()


def test_members_die_with_the_pool_object(kwargs):
    before = our_containers()
    pool = DockerREPLPool(size=2, **kwargs)
    wait_ready(pool, 2)
    members = our_containers() - before
    assert len(members) == 2
    del pool
    gc.collect()
    assert wait_gone(members) == set()


def test_members_die_with_the_process(image, tmp_path):
    """A pool owner killed with SIGKILL: its members' stdin closes and they go away. (Its
    host workspaces stay, for `dockerrepl gc`: here in tmp_path, not the shared /tmp.)"""
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from dockerrepl import DockerREPLPool
        pool = DockerREPLPool(size=2, image=sys.argv[1])
        end = time.monotonic() + 120
        while pool.ready_count < 2 and time.monotonic() < end:
            time.sleep(0.02)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT, TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, image], stdout=subprocess.PIPE, text=True, env=env
    )
    members: set[str] = set()
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        members = our_containers(proc.pid)
        assert len(members) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert wait_gone(members) == set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for cid in wait_gone(members, timeout=0):
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)


def test_a_member_that_died_while_waiting_is_not_handed_out(kwargs):
    before = our_containers()
    pool = DockerREPLPool(size=1, **kwargs)
    got: list[DockerREPL] = []
    try:
        wait_ready(pool, 1)
        (victim,) = our_containers() - before
        subprocess.run(["docker", "kill", victim], capture_output=True, timeout=60, check=True)
        assert wait_gone({victim}) == set()
        time.sleep(0.5)  # the `docker run -i` client exits once its stream closes
        got.append(pool.acquire(timeout=120))
        assert got[0].container_id != victim
        res = got[0].execute_code("print('fine')")
        assert (res.status, res.stdout) == ("ok", "fine\n")
        assert got[0].restarts == 0  # a live member, not a dead one restarted on first use
    finally:
        pool.close()
        for r in got:
            r.cleanup()


def test_a_member_that_cannot_start_fails_acquire_clearly(docker_engine, handler):
    before = our_containers()
    pool = DockerREPLPool(
        size=1, image="dockerrepl/no-such-image:absent", lm_handler_address=handler.address
    )
    try:
        with pytest.raises(DockerReplError) as info:
            pool.acquire(timeout=120)
        assert isinstance(info.value.__cause__, DockerError)
    finally:
        pool.close()
    assert our_containers() - before == set()


@pytest.mark.parametrize(
    ("size", "kwargs", "exc"),
    [
        (0, {}, ValueError),
        (-1, {}, ValueError),
        (True, {}, ValueError),
        ("2", {}, ValueError),
        (1, {"imgae": "python:3.11-slim"}, TypeError),
        (1, {"network": "tcp"}, ValueError),
        (1, {"timeout": -1}, ValueError),
        (1, {"setup_code": 42}, TypeError),
        (1, {"context_payload": 42}, TypeError),
        (1, {"custom_tools": {"llm_query": "def llm_query(): pass"}}, ValueError),
    ],
)
def test_bad_arguments_fail_at_construction(size, kwargs, exc):
    """No engine needed: these fail before any container would start."""
    threads = threading.active_count()
    with pytest.raises(exc):
        DockerREPLPool(size=size, **kwargs)
    assert threading.active_count() == threads  # nothing was started
