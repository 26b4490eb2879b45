"""In-memory snapshots (issue #14): snapshot(), rollback(), discard_snapshot() on a real
engine. A snapshot is a parked fork of the container's worker; these tests check
what a user sees (the namespace comes back, the snapshot stays usable, limits hold,
what is lost says so) and what the container holds (one parked process per kept
snapshot, none after discard).
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from dockerrepl import DockerREPL
from dockerrepl.errors import SnapshotLost

pytestmark = pytest.mark.timeout(180)

PARKED = (
    "import os\n"
    "def _comm(p):\n"
    "    try:\n"
    "        return open('/proc/%s/comm' % p).read().strip()\n"
    "    except OSError:\n"
    "        return ''\n"
    "print(sum(_comm(p) == 'drepl-parked' for p in os.listdir('/proc') if p.isdigit()))"
)


def _parked(repl: DockerREPL) -> int:
    res = repl.execute_code(PARKED)
    assert res.status == "ok", res.stderr
    return int(res.stdout.split()[-1])


def _out(repl: DockerREPL, code: str) -> str:
    res = repl.execute_code(code)
    assert res.status == "ok", res.stderr
    return res.stdout.strip()


def test_rollback_after_mutation_and_del(any_transport_repl):
    repl = any_transport_repl
    repl.execute_code("x = [1, 2, 3]; d = {'k': 'v'}; big = bytearray(5 << 20)")
    snap = repl.snapshot()
    assert snap.cell >= 1
    repl.execute_code("x.append(4); del d; big = None; y = 'new'")
    assert _out(repl, "print(x, 'd' in dir(), 'y' in dir())") == "[1, 2, 3, 4] False True"
    repl.rollback(snap)
    assert _out(repl, "print(x, d, len(big), 'y' in dir())") == "[1, 2, 3] {'k': 'v'} 5242880 False"
    # the snapshot stays usable: wreck the namespace again and go back again
    repl.execute_code("del x")
    repl.rollback(snap)
    assert _out(repl, "print(x)") == "[1, 2, 3]"
    # llm_query still works from a worker made from a snapshot
    assert "ping" in _out(repl, "print(llm_query('ping'))")


def test_rollback_restores_contexts_and_histories(repl):
    repl.add_context("first")
    repl.add_history([{"role": "user", "content": "one"}])
    snap = repl.snapshot()
    repl.add_context("second")
    repl.add_history([{"role": "user", "content": "two"}])
    assert repl.get_context_count() == 2
    repl.rollback(snap)
    assert repl.get_context_count() == 1
    assert repl.get_history_count() == 1
    assert _out(repl, "print(context, 'context_1' in dir(), 'history_1' in dir())") == (
        "first False False"
    )
    # a context added after the rollback takes the next index again
    assert repl.add_context("again") == 1
    assert _out(repl, "print(context_1)") == "again"


def test_rollback_after_worker_crash_and_timeout_kill(repl):
    repl.execute_code("x = 1")
    snap = repl.snapshot()
    res = repl.execute_code("x = 2\nimport os\nos._exit(3)")
    assert res.status == "crashed"
    repl.rollback(snap)
    assert _out(repl, "print(x)") == "1"
    # a cell killed at its timeout: the sweep that follows spares the parked process
    repl.execute_code("x = 3")
    res = repl.execute_code(
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "x = 4\nwhile True:\n    time.sleep(0.05)",
        timeout=0.5,
    )
    assert res.status == "timeout"
    repl.rollback(snap)
    assert _out(repl, "print(x)") == "1"
    # a worker made from a snapshot takes interrupts (its signal mask is the parked
    # process's): a timeout interrupts the cell, the namespace is kept, nothing killed
    res = repl.execute_code("y = 5\nwhile True: pass", timeout=1)
    assert res.status == "timeout" and "KeyboardInterrupt" in res.stderr, res.stderr
    assert _out(repl, "print(x, y)") == "1 5"


def test_checkpoint_after_rollback_is_the_rolled_back_state(image, handler, tmp_path):
    """The worker made from a snapshot takes a new epoch: its checkpoints win over the
    killed worker's, so a container killed after a rollback restores the rolled-back
    namespace (a sync checkpoint would otherwise refuse: "a newer checkpoint is on disk")."""
    with DockerREPL(image=image, lm_handler_address=handler.address) as repl:
        repl.execute_code("x = 'before'")
        snap = repl.snapshot()
        repl.execute_code("x = 'after'; pad = list(range(200000))")
        repl.rollback(snap)
        assert repl.checkpoint() == []
        subprocess.run(["docker", "kill", repl.container_name], check=True, capture_output=True)
        res = repl.execute_code("print(x)")
        assert res.status == "ok", res.stderr
        assert res.stdout.strip() == "before"
        assert repl.restarts == 1
        # the container was replaced: its snapshots went with it, and say so
        with pytest.raises(SnapshotLost, match="replaced"):
            repl.rollback(snap)
        assert _out(repl, "print(x)") == "before"


def test_keep_bound_and_discard(repl):
    repl.execute_code("n = 0")
    snaps = []
    for i in range(3):
        repl.execute_code(f"n = {i}")
        snaps.append(repl.snapshot(keep=2))
    assert _parked(repl) == 2
    with pytest.raises(SnapshotLost, match="gone"):
        repl.rollback(snaps[0])  # dropped: over keep=2
    assert _out(repl, "print(n)") == "2"  # unchanged by the failed rollback
    repl.rollback(snaps[1])
    assert _out(repl, "print(n)") == "1"
    repl.discard_snapshot(snaps[1])
    repl.discard_snapshot(snaps[1])  # idempotent
    with pytest.raises(SnapshotLost):
        repl.rollback(snaps[1])
    repl.discard_snapshot(snaps[2])
    deadline = time.monotonic() + 10
    while _parked(repl) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _parked(repl) == 0


def test_bad_arguments(image, handler, repl):
    with pytest.raises(ValueError, match="keep"):
        repl.snapshot(keep=0)
    with pytest.raises(TypeError, match="keep"):
        repl.snapshot(keep="2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Snapshot"):
        repl.rollback("snap")  # type: ignore[arg-type]
    with DockerREPL(image=image, lm_handler_address=handler.address) as other:
        theirs = other.snapshot()
        with pytest.raises(ValueError, match="another REPL"):
            repl.rollback(theirs)
        with pytest.raises(ValueError, match="another REPL"):
            repl.discard_snapshot(theirs)


def test_rollback_waits_for_a_running_cell(repl):
    """A rollback from another thread while a cell runs is serialised after it, never
    torn: the cell completes, then the namespace is the snapshot's."""
    repl.execute_code("x = 'snap'")
    snap = repl.snapshot()
    started = threading.Event()
    results = []

    def run() -> None:
        started.set()
        results.append(repl.execute_code("import time\ntime.sleep(1.0)\nx = 'cell'\nprint(x)"))

    t = threading.Thread(target=run)
    t.start()
    started.wait()
    time.sleep(0.3)
    repl.rollback(snap)
    t.join(30)
    assert results and results[0].status == "ok" and results[0].stdout.strip() == "cell"
    assert _out(repl, "print(x)") == "snap"


def test_a_cell_cannot_forge_a_parked_snapshot(repl):
    """A "parked" frame from cell code without a descriptor, or naming a process that
    is not the worker's child, keeps nothing; the session still works."""
    code = (
        "import os, socket, struct, json\n"
        "ctrl = [o for o in __import__('gc').get_objects() if isinstance(o, socket.socket)]\n"
        "body = json.dumps({'type': 'parked', 'snap': 999, 'pid': 1}).encode()\n"
        "for s in ctrl:\n"
        "    try:\n"
        "        s.send(struct.pack('>I', len(body)) + body)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(len(ctrl))"
    )
    repl.execute_code(code)
    assert _parked(repl) == 0
    snap = repl.snapshot()
    repl.execute_code("z = 1")
    repl.rollback(snap)
    assert _out(repl, "print('z' in dir())") == "False"
