"""The threads behind :class:`~dockerrepl.aio.AsyncDockerREPL`, and awaiting them.

One job: run a blocking DockerREPL call in a thread of our own (started for the
call, gone when it ends: never the loop's default executor), hand its outcome to
the event loop, wait for it within bounds while the awaiting task is being
cancelled, and remove a REPL whose start was cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, Optional, TypeVar

from .repl import DockerREPL

__all__ = [
    "CANCEL_MARGIN",
    "CLOSE_WAIT",
    "Tracked",
    "on_loop",
    "outcome",
    "result",
    "retrieve",
    "spawn",
    "stop_building",
    "wait",
]

T = TypeVar("T")

#: Seconds past the REPL's ``grace`` that a cancelled call waits for its cell to end
#: (an interrupt, then the kill of a worker that ignores it and the restore of the
#: last checkpoint). A cell that has not ended by then is waited for by the next call.
CANCEL_MARGIN = 10.0
#: The longest a cancelled start, or :meth:`AsyncDockerREPL.aclose`, waits for the
#: container to be removed (``cleanup()``'s own bounds are 10 s + 30 s).
CLOSE_WAIT = 45.0

# The REPLs being built in this thread (see Tracked): a cancelled start finds its REPL
# here before the constructor returns, and removes it.
_building = threading.local()


class Tracked(DockerREPL):
    """A DockerREPL that makes itself known as its constructor begins (so does one
    :meth:`DockerREPL.resume` builds), so that a cancelled start can remove it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        born: Optional[list[DockerREPL]] = getattr(_building, "born", None)
        if born is not None:
            born.append(self)
        super().__init__(*args, **kwargs)


def spawn(
    fn: Callable[[], T], what: str, threads: set[threading.Thread], born: Optional[list[Any]] = None
) -> concurrent.futures.Future[T]:
    """Run ``fn`` in a new daemon thread; its outcome in the returned future.

    Daemon: a cell left running must not keep the interpreter from exiting; the
    atexit hook (``_exit``) closes the REPL, which ends the call."""
    cf: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        _building.born = born
        try:
            if cf.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as exc:  # to the awaiting task, whatever it is
                    cf.set_exception(exc)
                else:
                    cf.set_result(result)
        finally:
            _building.born = None
            threads.discard(threading.current_thread())

    thread = threading.Thread(target=run, name=f"dockerrepl-async-{what}", daemon=True)
    threads.add(thread)
    thread.start()
    return cf


async def wait(cf: concurrent.futures.Future[Any], timeout: Optional[float]) -> bool:
    """Wait for ``cf`` at most ``timeout`` seconds, through further cancellations of
    this task (a call being cancelled is already stopping; its wait is bounded).
    True if it is done."""
    end = None if timeout is None else time.monotonic() + timeout
    while not cf.done():
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            break
        try:
            fut = asyncio.wrap_future(cf)
            fut.add_done_callback(retrieve)
            await asyncio.wait({fut}, timeout=left)
        except asyncio.CancelledError:
            continue
    return cf.done()


def on_loop(callback: Callable[[str, str], None]) -> Callable[[str, str], None]:
    """``callback``, called on the running loop's thread (in order) from any thread."""
    loop = asyncio.get_running_loop()

    def relay(stream: str, text: str) -> None:
        loop.call_soon_threadsafe(callback, stream, text)

    return relay


async def result(cf: concurrent.futures.Future[T]) -> T:
    """``cf``'s result; cancelled, this task leaves and ``cf`` runs on (its outcome is
    then the caller's to look at, never reported as "never retrieved")."""
    fut = asyncio.wrap_future(cf)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(retrieve)
        raise


def retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def outcome(cf: concurrent.futures.Future[Any]) -> Optional[BaseException]:
    """The exception of a done future whose caller left (retrieved: never "unretrieved")."""
    return None if cf.cancelled() else cf.exception()


async def stop_building(
    cf: concurrent.futures.Future[Any], born: list[DockerREPL], threads: set[threading.Thread]
) -> None:
    """A start (or resume) was cancelled: remove the REPL it is building, or built."""

    def stop() -> None:
        end = time.monotonic() + CLOSE_WAIT
        # the constructor makes its session a moment after it begins
        while not cf.done() and time.monotonic() < end:
            if any(getattr(r, "_session", None) is not None for r in born):
                break
            time.sleep(0.005)
        for r in born:
            if getattr(r, "_session", None) is not None:
                r.cleanup()  # stops the start; the constructor fails with ReplClosed

    await wait(spawn(stop, "cancel-start", threads), CLOSE_WAIT)
    await wait(cf, CLOSE_WAIT)
    if cf.done() and outcome(cf) is None:
        repl = cf.result()
        await wait(spawn(repl.cleanup, "cleanup", threads), CLOSE_WAIT)  # idempotent
