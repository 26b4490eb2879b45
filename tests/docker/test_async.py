"""AsyncDockerREPL against the real engine: many sessions on one loop, cancellation,
serialised calls, threads, and the sessions-as-values API through ``await``.

Plain pytest functions that run ``asyncio.run`` (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from docker_helpers import our_containers, our_volumes, wait_gone

from dockerrepl import AsyncDockerREPL, REPLResult
from dockerrepl.errors import DockerReplError, ReplClosed

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def ours(before: set[threading.Thread]) -> list[str]:
    """Names of the dockerrepl threads alive now that were not alive ``before``."""
    return sorted(
        t.name for t in threading.enumerate() if t not in before and t.name.startswith("dockerrepl")
    )


def cell_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "dockerrepl-async-cell")


async def cell_threads_gone() -> bool:
    """Whether the cell threads have exited (each ends a moment after its outcome)."""
    for _ in range(500):
        if cell_threads() == 0:
            return True
        await asyncio.sleep(0.01)
    return False


def options(image: str, handler: Any, **extra: Any) -> dict[str, Any]:
    return {"image": image, "lm_handler_address": handler.address, "timeout": 300, **extra}


def test_sixteen_sessions_on_one_loop(image: str, handler: Any, no_leftovers: None) -> None:
    """16 sessions started and run together from one loop: each sees only its own
    variables, output and LM calls, and their cells run at the same time."""
    n = 16
    before = set(threading.enumerate())

    async def main() -> list[tuple[int, REPLResult, REPLResult, str]]:
        repls = [AsyncDockerREPL(**options(image, handler)) for _ in range(n)]
        try:
            await asyncio.gather(*(r.start() for r in repls))

            async def one(i: int, r: AsyncDockerREPL) -> tuple[int, REPLResult, REPLResult, str]:
                a = await r.execute_code(f"me = {i}\nimport time\ntime.sleep(1.5)\nprint('hi', me)")
                b = await r.execute_code(f"print(me, llm_query('from {i}'))")
                return i, a, b, str(r.container_id)

            peak = 0

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, cell_threads())
                    await asyncio.sleep(0.01)

            sampler = asyncio.ensure_future(sample())
            try:
                out = await asyncio.gather(*(one(i, r) for i, r in enumerate(repls)))
            finally:
                sampler.cancel()
            # every session's sleeping cell was in flight at once: nothing serialised them
            assert peak == n
            return out
        finally:
            await asyncio.gather(*(r.aclose() for r in repls))

    results = run(main())
    for i, a, b, _ in results:
        assert (a.status, a.stdout) == ("ok", f"hi {i}\n")
        assert (b.status, b.stdout) == ("ok", f"{i} echo:from {i}\n")
        assert [c.prompt for c in b.rlm_calls] == [f"from {i}"]
    assert len({cid for *_, cid in results}) == n
    assert ours(before) == []


@pytest.mark.parametrize(
    "body", ["while True:\n    pass", "import time\ntime.sleep(600)"], ids=["busy", "sleep"]
)
def test_cancelling_a_cell_interrupts_it_and_keeps_state(
    image: str, handler: Any, each_transport: str, body: str, no_leftovers: None
) -> None:
    before = set(threading.enumerate())

    async def main() -> REPLResult:
        async with AsyncDockerREPL(**options(image, handler, transport=each_transport)) as r:
            assert r.transport == each_transport
            await r.execute_code("x = 41")
            running = asyncio.Event()
            task = asyncio.ensure_future(
                r.execute_code(
                    "started = True\nprint('running', flush=True)\n" + body,
                    on_output=lambda stream, text: running.set(),
                )
            )
            await asyncio.wait_for(running.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert r._pending == []  # the cell ended (interrupted), nothing left running
            assert await cell_threads_gone()
            return await r.execute_code("print(x + 1, started)")

    res = run(main())
    assert (res.status, res.stdout) == ("ok", "42 True\n")
    assert ours(before) == []


def test_cancelling_at_any_moment_leaves_the_session_in_step(
    image: str, handler: Any, no_leftovers: None
) -> None:
    """Cancelled before, while and just after its cell is sent: the interrupt can
    reach the container before the cell (kept for it by the worker; one the
    supervisor drops, before the cell reached it, is sent again): every time the
    cell ends within the bound, nothing is lost, and the next one runs."""

    async def main() -> list[str]:
        out = []
        async with AsyncDockerREPL(**options(image, handler, grace=0.5)) as r:
            await r.execute_code("k = 0")
            for delay in (0.0, 0.001, 0.003, 0.01, 0.03, 0.1):
                task = asyncio.ensure_future(r.execute_code("k += 1\nwhile True:\n    pass"))
                await asyncio.sleep(delay)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert r._pending == []
                # the namespace is kept: an interrupt that overtook its cell (the
                # container got it before the cell) is kept for it, not dropped
                res = await r.execute_code("print(k >= 0)")
                out.append(res.stdout)
        return out

    assert run(main()) == ["True\n"] * 6


def test_wait_for_timeout_and_a_failing_sibling_interrupt_the_cell(
    image: str, handler: Any, no_leftovers: None
) -> None:
    async def main() -> REPLResult:
        async with AsyncDockerREPL(**options(image, handler)) as r:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(
                    r.execute_code("n = 1\nimport time\ntime.sleep(600)"), timeout=1.0
                )
            assert r._pending == []

            # what a TaskGroup does when one task fails: the others are cancelled
            async def fail() -> None:
                await asyncio.sleep(1.0)
                raise KeyError("sibling")

            cell = asyncio.ensure_future(r.execute_code("n += 1\nwhile True:\n    pass"))
            sibling = asyncio.ensure_future(fail())
            done, _ = await asyncio.wait({cell, sibling}, return_when=asyncio.FIRST_EXCEPTION)
            assert sibling in done and isinstance(sibling.exception(), KeyError)
            cell.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cell
            return await r.execute_code("print(n)")

    res = run(main())
    assert (res.status, res.stdout) == ("ok", "2\n")


@pytest.mark.parametrize("transport", ["auto", "channel"])
def test_cancelling_a_start_leaves_no_container(
    image: str, handler: Any, transport: str, no_leftovers: None
) -> None:
    containers, volumes = our_containers(), our_volumes()
    before = set(threading.enumerate())

    async def main() -> int:
        cancelled = 0
        for delay in (0.0, 0.05, 0.2, 0.5, 1.0, 2.0):
            r = AsyncDockerREPL(**options(image, handler, transport=transport))
            task = asyncio.ensure_future(r.start())
            await asyncio.sleep(delay)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancelled += 1
                assert r.container_id is None
            await r.aclose()  # started after all (the cancel came late): removed here
        return cancelled

    assert run(main()) >= 3
    assert wait_gone(our_containers() - containers, timeout=10) == set()
    assert our_volumes() - volumes == set()
    assert ours(before) == []
    if transport == "auto":
        # a cancelled start is not mistaken for an engine where the proxy cannot work

        async def again() -> str:
            async with AsyncDockerREPL(**options(image, handler)) as r:
                return r.transport

        assert run(again()) == "proxy"


def test_calls_on_one_session_are_serialised(image: str, handler: Any, no_leftovers: None) -> None:
    """Eight calls made at once run one after the other, in the order made: one
    thread at a time (not eight blocked on the session's lock), output on the loop."""
    loop_thread: list[threading.Thread] = []
    seen: list[tuple[str, bool]] = []

    async def main() -> REPLResult:
        async with AsyncDockerREPL(**options(image, handler)) as r:
            await r.execute_code("order = []")
            peak = 0

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, cell_threads())
                    await asyncio.sleep(0.005)

            def on_output(stream: str, text: str) -> None:
                seen.append((text, threading.current_thread() is loop_thread[0]))

            loop_thread.append(threading.current_thread())
            sampler = asyncio.ensure_future(sample())
            try:
                await asyncio.gather(
                    *(
                        r.execute_code(
                            f"import time\ntime.sleep(0.1)\norder.append({i})\nprint({i})",
                            on_output=on_output,
                        )
                        for i in range(8)
                    )
                )
            finally:
                sampler.cancel()
            assert peak == 1
            return await r.execute_code("print(order)")

    res = run(main())
    assert res.stdout == f"{list(range(8))}\n"
    assert "".join(text for text, _ in seen) == "".join(f"{i}\n" for i in range(8))
    assert all(on_loop for _, on_loop in seen)


def test_aclose_ends_a_running_call_and_leaves_no_thread(
    image: str, handler: Any, no_leftovers: None
) -> None:
    before = set(threading.enumerate())

    async def main() -> None:
        r = await AsyncDockerREPL.open(**options(image, handler))
        await r.set_variables({"a": 1})
        task = asyncio.ensure_future(r.execute_code("import time\ntime.sleep(600)"))
        await asyncio.sleep(0.5)
        await r.aclose()
        with pytest.raises(ReplClosed):
            await task
        assert ours(before) == []  # at once: aclose() waited for its threads
        await r.aclose()  # idempotent
        with pytest.raises(ReplClosed):
            await r.execute_code("1")

    run(main())
    assert ours(before) == []


def test_bad_arguments_raise_before_any_container(docker_engine: str) -> None:
    containers = our_containers()
    with pytest.raises(ValueError, match="memory"):
        AsyncDockerREPL(memory="lots")
    with pytest.raises(TypeError, match="timeout"):
        AsyncDockerREPL(timeout=True)
    assert our_containers() == containers


def test_context_files_snapshot_fork_save_resume(
    image: str, handler: Any, tmp_path: Path, no_leftovers: None
) -> None:
    src = tmp_path / "in.txt"
    src.write_text("payload")

    async def main() -> None:
        async with AsyncDockerREPL(**options(image, handler, context_payload="ctx")) as r:
            assert await r.add_context({"k": 1}) == 1
            assert await r.get_context_count() == 2
            assert await r.add_history([{"role": "user", "content": "hi"}]) == 0
            assert await r.get_history_count() == 1
            await r.set_variables({"v": [1, 2]})
            await r.define_tools({"TWO": 2})
            assert await r.upload(str(src), "in.txt") == 7
            await r.execute_code("x = [1, 2]\nopen('out.txt', 'w').write(context + str(TWO))")
            assert await r.download("out.txt", str(tmp_path / "out.txt")) == 4
            assert (tmp_path / "out.txt").read_text() == "ctx2"
            assert await r.checkpoint() == []

            snap = await r.snapshot()
            await r.execute_code("x.append(3)")
            await r.rollback(snap)
            assert (await r.execute_code("print(x)")).stdout == "[1, 2]\n"
            await r.discard_snapshot(snap)

            kids = await r.fork(2)
            try:
                assert all(isinstance(k, AsyncDockerREPL) for k in kids)
                outs = await asyncio.gather(
                    *(
                        k.execute_code(f"x.append({i})\nprint(x, context_1)")
                        for i, k in enumerate(kids)
                    )
                )
                assert [o.stdout for o in outs] == ["[1, 2, 0] {'k': 1}\n", "[1, 2, 1] {'k': 1}\n"]
            finally:
                await asyncio.gather(*(k.aclose() for k in kids))
            assert (await r.execute_code("print(x)")).stdout == "[1, 2]\n"

            path = tmp_path / "session.drs"
            assert await r.save(path) == []
        resumed = await AsyncDockerREPL.resume(path, **options(image, handler))
        try:
            res = await resumed.execute_code("print(x, v, open('in.txt').read())")
            assert res.stdout == "[1, 2] [1, 2] payload\n"
        finally:
            await resumed.aclose()

    run(main())


def test_the_example_runs(image: str, no_leftovers: None) -> None:
    """examples/async_many.py, as a user runs it (16 sessions)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DOCKERREPL_"))}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "async_many.py"), image],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "16 sessions started" in r.stdout
    assert "192 cells in" in r.stdout
    assert "the session goes on: 0 45" in r.stdout
    assert "dockerrepl threads left: 0" in r.stdout


# --- below the async layer: what cancellation relies on, through DockerREPL itself


def test_an_interrupt_that_overtakes_its_cell_is_kept_for_it(
    image: str, handler: Any, no_leftovers: None
) -> None:
    """``interrupt()`` at once after the cell is sent: the worker may get the SIGINT
    before it reads the cell. It interrupts that cell (it used to be dropped as late:
    the cell ran until killed, and the namespace fell back to the last checkpoint)."""
    from dockerrepl import DockerREPL

    repl = DockerREPL(**options(image, handler, grace=0.5))
    session = repl._session
    sent = threading.Event()
    send = session.send

    def send_and_tell(obj: dict[str, Any], deadline: Any = None) -> None:
        send(obj, deadline)
        if obj.get("type") == "exec":
            sent.set()

    session.send = send_and_tell  # type: ignore[method-assign]
    try:
        repl.execute_code("k = 0")
        sent.clear()
        for _ in range(10):
            out: list[REPLResult] = []

            def cell(out: list[REPLResult] = out) -> None:
                out.append(repl.execute_code("k += 1\nwhile True:\n    pass"))

            t = threading.Thread(target=cell)
            t.start()
            assert sent.wait(30)
            repl.interrupt()  # right after the cell's frame went to the container
            t.join(30)
            assert not t.is_alive()
            assert out[0].status == "interrupted"
            assert "worker was killed" not in out[0].stderr
            res = repl.execute_code("print(k >= 0)")
            assert res.stdout == "True\n", res.stderr
            sent.clear()
    finally:
        repl.cleanup()


def test_cleanup_from_another_thread_while_the_constructor_starts(
    image: str, handler: Any, no_leftovers: None
) -> None:
    """cleanup() of a DockerREPL whose constructor runs in another thread stops that
    start and removes everything it made, whenever it comes."""
    from dockerrepl._aiothreads import Tracked  # a DockerREPL that is known before __init__ returns

    containers, volumes = our_containers(), our_volumes()
    for delay in (0.0, 0.1, 0.3, 0.6, 1.0):
        for transport in ("proxy", "channel"):
            born: list[Any] = []
            odd: list[BaseException] = []

            def build(
                t: str = transport, born: list[Any] = born, odd: list[BaseException] = odd
            ) -> None:
                from dockerrepl import _aiothreads

                _aiothreads._building.born = born
                try:
                    Tracked(**options(image, handler, transport=t))
                except DockerReplError:
                    pass  # ReplClosed, or the start failing as its container went
                except BaseException as exc:
                    odd.append(exc)

            th = threading.Thread(target=build)
            th.start()
            threading.Event().wait(delay)
            while not born or getattr(born[0], "_session", None) is None:
                threading.Event().wait(0.001)
            born[0].cleanup()
            th.join(60)
            assert not th.is_alive()
            born[0].cleanup()  # it may have finished first: then this removes it
            assert odd == []
    assert wait_gone(our_containers() - containers, timeout=10) == set()
    assert our_volumes() - volumes == set()
