"""Running one piece of test code in many threads at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def run_threads(fn: Callable[[int], object], n: int, timeout: float) -> list[BaseException]:
    """``fn(0)`` ... ``fn(n - 1)``, each in a thread of its own, all started together.

    Waits up to ``timeout`` seconds for all of them (a thread still running then
    fails the test) and returns what they raised.
    """
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    running = sum(t.is_alive() for t in threads)
    assert running == 0, f"{running} of {n} threads still running after {timeout} s"
    return errors
