"""``use_dockerrepl(pool=N)``: rlm's per-completion environments from a warm pool.

Real rlm, real engine: rlm's ``RLM`` against the scripted OpenAI-compatible server
(as in test_rlm_e2e.py), and rlm's own construction call (``get_environment``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from docker_helpers import our_containers, wait_gone

pytestmark = pytest.mark.timeout(240)


def _wait_full(pool: Any, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while pool.ready_count < pool.size:
        assert time.monotonic() < end, f"the pool did not fill: {pool.stats()}"
        time.sleep(0.05)


@pytest.fixture
def pooled(image: str, docker_engine: str) -> Any:
    from dockerrepl.integrations import rlm as integration

    before = our_containers()
    cls = integration.use_dockerrepl({"image": image, "timeout": 60}, pool=2)
    try:
        (pool,) = integration._POOL
        _wait_full(pool)
        yield cls, pool
    finally:
        integration.restore_rlm_docker()
    assert not integration._POOL
    left = wait_gone(our_containers() - before, timeout=15)
    assert not left, f"the pool left containers: {sorted(left)}"


def test_an_rlm_construction_takes_a_warm_member_and_gets_its_arguments(pooled, handler):
    from rlm.environments import get_environment

    cls, pool = pooled
    ids = set()
    for i in range(3):
        _wait_full(pool)
        before = {r.container_name for r, _ in pool._ready}
        env = get_environment(
            "docker",
            {
                "lm_handler_address": handler.address,
                "context_payload": {"n": i},
                "setup_code": "X = 40",
                "depth": 1,
                "max_concurrent_subcalls": 3,
            },
        )
        try:
            assert isinstance(env, cls)
            assert env.container_name in before, "not a pool member: a container was started"
            assert env.lm_handler_address == tuple(handler.address)
            assert env.max_concurrent_subcalls == 3
            res = env.execute_code("print(context['n'], X + 2, llm_query('hi'))")
            assert res.stdout.split()[:2] == [str(i), "42"]
            assert res.rlm_calls, "llm_query did not reach the completion's handler"
            assert type(res).__module__.startswith("rlm.")  # rlm's own REPLResult
            assert env.get_context_count() == 1
            ids.add(env.container_id)
        finally:
            env.cleanup()
    assert len(ids) == 3  # never the same container twice
    _wait_full(pool)  # and replaced


def test_a_failing_setup_code_removes_the_member_and_raises(pooled, handler):
    from rlm.environments import get_environment

    from dockerrepl.errors import SetupCodeError

    _, pool = pooled
    with pytest.raises(SetupCodeError):
        get_environment(
            "docker", {"lm_handler_address": handler.address, "setup_code": "1/0", "depth": 1}
        )
    assert all(s["handed_out"] == 0 for s in pool.stats())


def test_other_container_options_start_their_own_container(pooled, handler, caplog):
    from rlm.environments import get_environment

    cls, pool = pooled
    ready = {r.container_name for r, _ in pool._ready}
    with caplog.at_level(logging.WARNING, logger="dockerrepl"):
        env = get_environment(
            "docker", {"lm_handler_address": handler.address, "memory": "256m", "depth": 1}
        )
    try:
        assert isinstance(env, cls)
        assert env.container_name not in ready
        assert env.execute_code("print(1)").stdout == "1\n"
        assert "memory" in caplog.text
    finally:
        env.cleanup()


def test_rlm_completion_end_to_end_from_the_pool(pooled, fake_openai, image):
    from rlm import RLM

    _, pool = pooled

    def script(messages: list[dict[str, Any]]) -> str:
        if messages[0].get("role") != "system":
            return "sub:" + messages[-1]["content"]
        if "Turn 1/" in str(messages[-1].get("content", "")):
            return "```repl\nr = llm_query(context)\nprint(r)\n```"
        return "```repl\nanswer['content'] = r.upper()\nanswer['ready'] = True\n```"

    fake_openai.answer = script
    rlm = RLM(
        backend="openai",
        backend_kwargs={
            "model_name": "gpt-4o-mini",
            "base_url": fake_openai.url,
            "api_key": "dummy",
            "max_retries": 0,
        },
        environment="docker",
        max_iterations=4,
    )
    handed: list[str] = []
    acquire = pool._acquire

    def counting(*args: Any, **kwargs: Any) -> Any:
        repl = acquire(*args, **kwargs)
        handed.append(repl.container_name)
        return repl

    pool._acquire = counting
    for prompt in ("one", "two"):
        _wait_full(pool)
        assert rlm.completion(prompt).response == f"SUB:{prompt.upper()}"
    assert len(set(handed)) == 2, "rlm's environments did not come from the pool"
    assert all(s["failures"] == 0 for s in pool.stats())


def test_bad_pool_arguments(docker_engine):
    from dockerrepl.integrations import rlm as integration

    for bad in (-1, True, "2"):
        with pytest.raises(ValueError):
            integration.use_dockerrepl(pool=bad)
    try:
        with pytest.raises(ValueError, match="memory"):
            integration.use_dockerrepl({"memory": "lots"}, pool=1)
        assert not integration._POOL  # nothing was started or installed
    finally:
        integration.restore_rlm_docker()
