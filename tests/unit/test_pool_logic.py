"""DockerREPLPool's own logic (refill bound, placement, backoff), with members that are
stand-ins: a DockerREPL subclass whose construction starts nothing. The real-engine
behaviour is in tests/docker/test_pool.py and test_starts_many.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from dockerrepl import pool as pool_mod
from dockerrepl.errors import DockerDaemonError, DockerReplError
from dockerrepl.pool import DockerREPLPool
from dockerrepl.repl import DockerREPL

pytestmark = pytest.mark.timeout(60)


class _Stub(DockerREPL):
    """Starts nothing: takes ``delay`` seconds, fails on hosts in ``failing``."""

    delay: ClassVar[float] = 0.05
    failing: ClassVar[set[Any]] = set()
    active: ClassVar[int] = 0
    most: ClassVar[int] = 0
    built: ClassVar[list[Any]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, **kwargs: Any) -> None:
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.most = max(cls.most, cls.active)
        try:
            time.sleep(cls.delay)
            host = kwargs.get("docker_host")
            if host in cls.failing:
                raise DockerDaemonError(f"cannot connect to {host}")
        finally:
            with cls.lock:
                cls.active -= 1
        self.host = host
        self._options = SimpleNamespace(auto_checkpoint=False, docker_host=host)
        alive = SimpleNamespace(alive=lambda: True)
        self._session = SimpleNamespace(closed=False, container=alive)
        with cls.lock:
            cls.built.append(self)

    def cleanup(self) -> None:
        self._session.closed = True

    def __del__(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    _Stub.delay, _Stub.failing, _Stub.active, _Stub.most, _Stub.built = 0.05, set(), 0, 0, []
    monkeypatch.setattr(pool_mod, "ENGINE_BACKOFF_BASE", 0.2)


def _wait(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_refill_is_bounded_by_max_starting_and_its_threads_exit():
    threads = threading.active_count()
    pool = DockerREPLPool(12, max_starting=3, repl_class=_Stub)
    try:
        _wait(lambda: pool.ready_count == 12)
        assert _Stub.most == 3
        got = [pool.acquire(timeout=10) for _ in range(10)]
        assert len({id(r) for r in got}) == 10
        _wait(lambda: pool.ready_count == 12)
        assert _Stub.most == 3
        _wait(lambda: threading.active_count() == threads)  # starters exit when full
    finally:
        pool.close()


def test_members_go_to_the_least_loaded_engine():
    pool = DockerREPLPool(4, engines=[{}, {"docker_host": "tcp://b:1"}], repl_class=_Stub)
    try:
        _wait(lambda: pool.ready_count == 4)
        assert [s["ready"] for s in pool.stats()] == [2, 2]
        held = [pool.acquire(timeout=10) for _ in range(4)]
        _wait(lambda: pool.ready_count == 4)
        loads = [s["ready"] + s["handed_out"] for s in pool.stats()]
        assert loads == [4, 4]
        for r in held:
            if r.host is None:
                r.cleanup()  # cleaned up: no longer counted
        assert [s["handed_out"] for s in pool.stats()] == [0, 2]
    finally:
        pool.close()


def test_a_failing_engine_is_backed_off_and_acquire_still_serves():
    _Stub.failing = {"tcp://dead:1"}
    pool = DockerREPLPool(2, engines=[{"docker_host": "tcp://dead:1"}, {}], repl_class=_Stub)
    try:
        got = [pool.acquire(timeout=10) for _ in range(6)]
        assert all(r.host is None for r in got)
        dead, live = pool.stats()
        assert dead["failures"] >= 1 and "dead:1" in dead["last_error"]
        assert live["failures"] == 0 and live["handed_out"] == 6
        # backed off: far fewer tries on the dead engine than members started
        assert dead["failures"] <= 4
    finally:
        pool.close()


def test_acquire_raises_once_every_engine_fails_naming_each():
    _Stub.failing = {"tcp://a:1", "tcp://b:1"}
    pool = DockerREPLPool(
        1, engines=[{"docker_host": "tcp://a:1"}, {"docker_host": "tcp://b:1"}], repl_class=_Stub
    )
    try:
        with pytest.raises(DockerReplError) as info:
            pool.acquire(timeout=20)
        assert isinstance(info.value.__cause__, DockerDaemonError)
        assert "tcp://a:1" in str(info.value) and "tcp://b:1" in str(info.value)
        _Stub.failing = set()  # the engines come back: the pool recovers
        assert pool.acquire(timeout=20) is not None
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"engines": []}, ValueError),
        ({"engines": {"docker_host": "tcp://a:1"}}, TypeError),
        ({"engines": ["tcp://a:1"]}, TypeError),
        ({"engines": [{"docker_hots": "tcp://a:1"}]}, TypeError),
        ({"engines": [{"docker_host": "http://a"}]}, ValueError),
        ({"max_starting": 0}, ValueError),
        ({"repl_class": dict}, TypeError),
    ],
)
def test_bad_pool_arguments_fail_before_anything_starts(kwargs, exc):
    threads = threading.active_count()
    with pytest.raises(exc):
        DockerREPLPool(1, **kwargs)
    assert threading.active_count() == threads
