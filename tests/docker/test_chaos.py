"""Chaos at scale: 32 sessions at once, each hit by random faults (issue 13).

Half the sessions take the proxy transport, half the channel. Each runs a few
rounds; a round is one fault drawn from a seeded RNG (the seed is printed, and
``DOCKERREPL_CHAOS_SEED`` replays it): a cell past its timeout, a cell past the
memory limit (OOM), the worker ending itself (``os._exit``), ``docker kill`` of
the container during a cell, ``interrupt()`` from another thread, or nothing.
After each fault the session's next cell must answer correctly: its stdout
carries its own tag (from its own namespace) and its own ``llm_query`` answer,
and its ``rlm_calls`` hold exactly that call (no output or call crosses sessions).
A few sessions get ``cleanup()`` from another thread during a cell: that call and
every later one raise ``ReplClosed``.

Afterwards nothing of the test is left: no container, no volume, no thread, no
file descriptor (``/proc/self/fd`` and ``threading.enumerate()`` before and
after), and this process's RSS is back within RSS_SLACK of where it was.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable

import pytest
from docker_helpers import docker, our_containers, our_volumes, wait_gone

from dockerrepl import DockerREPL, LMHandler
from dockerrepl.clients import EchoClient
from dockerrepl.errors import ReplClosed

pytestmark = pytest.mark.timeout(300)

SESSIONS = 32
ROUNDS = 3
#: sessions that get cleanup() from another thread in one of their rounds
CLEANED = 4
FAULTS = ("timeout", "oom", "crash", "kill", "interrupt", "none")
#: This process's RSS may stay this much above where it was. Freed memory is not all
#: given back: glibc keeps a malloc arena per thread that ran (the 32 sessions' threads
#: and their proxies' handlers) and CPython keeps its small-object arenas. Measured:
#: +20 MiB after this test; of four batches of 32 sessions in a row, the last three
#: added +1.4, +5.0 and +0.1 MiB (a plateau), where a leak of what a session holds
#: grows with every batch.
RSS_SLACK_MIB = 48


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def settle(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Wait for daemon threads and sockets that end a moment after their owner."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def answer(repl: DockerREPL, i: int, k: int) -> None:
    """The session's next cell answers correctly, with its own tag and its own call."""
    r = repl.execute_code(f"print(TAG, llm_query(TAG + '-{k}'))")
    assert r.status == "ok", (i, k, r.status, r.stderr[-800:])
    assert r.stdout == f"s{i} echo:s{i}-{k}\n", (i, k, r.stdout[-300:], r.stderr[-300:])
    calls = [c.response for c in r.rlm_calls]
    assert calls == [f"echo:s{i}-{k}"], (i, k, calls)


def fault(repl: DockerREPL, kind: str, timers: list[threading.Timer]) -> None:
    """Apply one fault; the cell's own outcome is checked loosely (a fault may land
    early or late under load), the next cell's strictly (see answer)."""

    def later(delay: float, fn: Callable[[], object]) -> None:
        t = threading.Timer(delay, fn)
        t.daemon = True
        timers.append(t)
        t.start()

    if kind == "timeout":
        r = repl.execute_code("while True:\n    pass")
        assert r.status == "timeout", (r.status, r.stderr[-500:])
    elif kind == "oom":
        r = repl.execute_code("blob = bytearray(400 << 20)")
        # "timeout": the kernel reclaiming before it kills can outlast the 2 s limit
        assert r.status in ("oom", "crashed", "timeout"), (r.status, r.stderr[-500:])
    elif kind == "crash":
        r = repl.execute_code("import os\nos._exit(3)")
        assert r.status == "crashed", (r.status, r.stderr[-500:])
    elif kind == "kill":
        name = repl.container_name
        assert name
        later(0.3, lambda: docker("kill", name, timeout=60))
        r = repl.execute_code("import time\ntime.sleep(1.5)")
        # "ok" only if the kill came after the cell (the machine is loaded)
        assert r.status in ("crashed", "ok"), (r.status, r.stderr[-500:])
        timers[-1].join(60)
    elif kind == "interrupt":
        later(0.3, repl.interrupt)
        r = repl.execute_code("import time\ntime.sleep(1.5)")
        # "ok" if the interrupt came while the cell was not yet running (a restore)
        assert r.status in ("interrupted", "ok"), (r.status, r.stderr[-500:])


def session(
    repl: DockerREPL, i: int, rng: random.Random, clean_round: int, errors: list[BaseException]
) -> None:
    timers: list[threading.Timer] = []
    try:
        repl.execute_code(f"TAG = 's{i}'")
        repl.checkpoint()  # the tag survives restores (OOM, crash, kill)
        answer(repl, i, 0)
        for k in range(1, ROUNDS + 1):
            if k == clean_round:
                t = threading.Timer(0.3, repl.cleanup)
                t.daemon = True
                timers.append(t)
                t.start()
                with pytest.raises(ReplClosed):
                    repl.execute_code("import time\ntime.sleep(5)")
                t.join(60)
                with pytest.raises(ReplClosed):
                    repl.execute_code("print(TAG)")
                return
            fault(repl, rng.choice(FAULTS), timers)
            answer(repl, i, k)
    except BaseException as exc:
        errors.append(AssertionError(f"session {i} ({repl.transport}): {exc!r}"))
    finally:
        for t in timers:
            t.join(60)


def open_repl(image: str, handler: LMHandler, i: int) -> DockerREPL:
    return DockerREPL(
        image=image,
        lm_handler_address=handler.address,
        transport=("proxy", "channel")[i % 2],
        timeout=2,
        grace=0.5,
        memory="128m",
        pids_limit=64,
    )


def test_32_sessions_under_random_faults_answer_and_leave_nothing(image, docker_engine):
    seed = int(os.environ.get("DOCKERREPL_CHAOS_SEED") or random.randrange(1 << 32))
    print(f"chaos seed: {seed} (DOCKERREPL_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)

    # warm-up, not measured: lazy caches (the bridge gateway, the image's interpreter),
    # imports and the allocator's first arenas
    with LMHandler(EchoClient()) as h:
        for i in range(2):
            with open_repl(image, h, i) as r:
                answer_warm = r.execute_code("print(llm_query('w'))")
                assert answer_warm.stdout == "echo:w\n", answer_warm.stderr
    threads0 = set(threading.enumerate())
    fds0 = fds()
    rss0 = rss_mib()
    containers0 = our_containers()
    volumes0 = our_volumes()

    start = time.monotonic()
    errors: list[BaseException] = []
    handler = LMHandler(EchoClient())
    handler.start()
    repls: list[DockerREPL] = []
    try:
        opened: dict[int, DockerREPL] = {}

        def opener(idx: list[int]) -> None:
            for i in idx:
                try:
                    opened[i] = open_repl(image, handler, i)
                except BaseException as exc:
                    errors.append(exc)

        openers = [
            threading.Thread(target=opener, args=(list(range(j, SESSIONS, 8)),)) for j in range(8)
        ]
        for t in openers:
            t.start()
        for t in openers:
            t.join(240)
        repls = [opened[i] for i in sorted(opened)]
        assert not errors, errors
        assert len(repls) == SESSIONS
        opened_s = time.monotonic() - start
        cleaned = set(rng.sample(range(SESSIONS), CLEANED))
        plans = [
            (random.Random(rng.randrange(1 << 32)), rng.randint(1, ROUNDS) if i in cleaned else 0)
            for i in range(SESSIONS)
        ]
        workers = [
            threading.Thread(target=session, args=(r, i, *plans[i], errors), name=f"chaos-{i}")
            for i, r in enumerate(repls)
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join(240)
        assert not any(t.is_alive() for t in workers), "a session hung"
        assert not errors, "\n".join(str(e) for e in errors)
        print(
            f"chaos: {SESSIONS} sessions opened in {opened_s:.1f} s; faults and answers in"
            f" {time.monotonic() - start - opened_s:.1f} s"
        )
    finally:
        for r in repls:
            r.cleanup()
        handler.stop()

    assert wait_gone(our_containers() - containers0, timeout=60) == set()
    assert settle(lambda: our_volumes() <= volumes0, 30), our_volumes() - volumes0
    assert settle(lambda: set(threading.enumerate()) <= threads0), [
        t.name for t in set(threading.enumerate()) - threads0
    ]
    assert settle(lambda: fds() <= fds0), {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in fds() - fds0
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    repls.clear()
    grown = rss_mib() - rss0
    print(f"chaos: host RSS {rss0:.1f} MiB before, +{grown:.1f} MiB after")
    assert grown < RSS_SLACK_MIB, f"host RSS grew by {grown:.1f} MiB"
