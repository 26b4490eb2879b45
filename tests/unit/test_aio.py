"""AsyncDockerREPL without an engine: its signature, its checks, its threads.

The behaviour against a real engine (cells, cancellation, fork/save/resume) is in
tests/docker/test_async.py; the bad-argument table is shared with DockerREPL's in
tests/unit/test_repl_args.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading

import pytest

from dockerrepl import AsyncDockerREPL, DockerREPL
from dockerrepl._aiothreads import spawn as _spawn
from dockerrepl._aiothreads import wait as _wait
from dockerrepl.errors import ReplClosed

pytestmark = pytest.mark.timeout(60)


def test_constructor_takes_what_dockerrepl_takes() -> None:
    """The signature is written out (IDEs show it): it must not drift from DockerREPL's."""
    ours = inspect.signature(AsyncDockerREPL.__init__).parameters
    theirs = inspect.signature(DockerREPL.__init__).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name


def test_every_public_method_of_dockerrepl_has_an_async_one() -> None:
    public = {
        n
        for n, v in vars(DockerREPL).items()
        if not n.startswith("_") and (callable(v) or isinstance(v, classmethod))
    }
    public -= {"setup", "cleanup"}  # start() and aclose() here
    missing = {n for n in public if not hasattr(AsyncDockerREPL, n)}
    assert not missing
    for name in public:
        fn = getattr(AsyncDockerREPL, name)
        assert inspect.iscoroutinefunction(fn), f"{name} is not awaitable"
        assert fn.__doc__, f"{name} has no docstring"


def test_unknown_arguments_are_ignored_aloud(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dockerrepl.repl"):
        AsyncDockerREPL(image="img", memroy="1g")
    assert "memroy (did you mean 'memory'?)" in caplog.text


def test_calls_before_start_raise_and_nothing_starts() -> None:
    repl = AsyncDockerREPL(image="img")

    async def main() -> None:
        with pytest.raises(ReplClosed, match="not started"):
            await repl.execute_code("1")
        with pytest.raises(ReplClosed):
            await repl.get_context_count()
        await repl.interrupt()  # a no-op
        assert repl.container_id is None
        assert repl.transport == ""
        await repl.aclose()
        await repl.aclose()  # idempotent
        assert repl.closed
        with pytest.raises(ReplClosed, match="closed"):
            await repl.start()

    before = set(threading.enumerate())
    asyncio.run(main())
    assert set(threading.enumerate()) <= before


def test_on_output_must_be_a_plain_function() -> None:
    repl = AsyncDockerREPL(image="img")

    async def callback(stream: str, text: str) -> None:
        pass

    async def main() -> None:
        with pytest.raises(TypeError, match="on_output"):
            await repl.execute_code("1", on_output=callback)  # type: ignore[arg-type]

    asyncio.run(main())


def test_spawn_runs_in_a_thread_that_is_gone_afterwards() -> None:
    threads: set[threading.Thread] = set()
    seen: list[str] = []

    def work() -> int:
        seen.append(threading.current_thread().name)
        return 7

    async def main() -> int:
        return await asyncio.wrap_future(_spawn(work, "unit", threads))

    assert asyncio.run(main()) == 7
    assert seen == ["dockerrepl-async-unit"]
    for t in list(threads):
        t.join(5)
    assert not threads


def test_spawn_hands_exceptions_to_the_caller() -> None:
    def fail() -> None:
        raise KeyError("x")

    async def main() -> None:
        await asyncio.wrap_future(_spawn(fail, "unit", set()))

    with pytest.raises(KeyError):
        asyncio.run(main())


def test_wait_is_bounded_and_outlasts_a_second_cancel() -> None:
    """A cancelled call's bounded wait goes on through another cancellation
    (a TaskGroup and a timeout may both cancel), then ends."""
    release = threading.Event()
    cf = _spawn(lambda: release.wait(30), "unit", set())

    async def waiter() -> bool:
        return await _wait(cf, 0.5)

    async def main() -> bool:
        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.05)
        task.cancel()  # swallowed: the wait is bounded anyway
        return await task

    assert asyncio.run(main()) is False  # the bound, not the cancel, ended it
    release.set()
    assert cf.result(10) is True
