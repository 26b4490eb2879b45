"""Checkpoints on disk only ever move forward (issue #10, defect 1).

The bootstrap runs under the host Python (tests/bootstrap_process.py). A snapshot
child that is slow to reach its write must never replace the newer checkpoint a
later child already wrote; a worker or container that restored from the disk must
still be able to write after it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from bootstrap_process import Boot, hello, stage

pytestmark = pytest.mark.timeout(60)

# A `dill` that is slow to import in snapshot children only (the worker imports it
# at once): the first snapshot child of a worker imports dill itself, which is what
# made it reach its write after the second child in the field. Here it is late by
# seconds, so the order is the same on every run.
# A dill that makes the worker's FIRST snapshot child slow to reach its write, both
# ways a child can be late: importing dill itself (imported in the child, as before
# the worker imported dill ahead of its first fork), or being slow before the lock
# (the worker imported it first: os.nice, which a child calls on its way to the
# write, sleeps once, in the first snapshot process that calls it).
SLOW_DILL = textwrap.dedent(
    """
    import importlib, os, sys, time

    def _comm():
        try:
            with open("/proc/self/comm") as f:
                return f.read().strip()
        except OSError:
            return ""

    _here = os.path.dirname(os.path.abspath(__file__))

    def _first_time():
        try:
            os.close(os.open(os.path.join(_here, "slept"), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    if _comm() == "drepl-snapshot" and _first_time():
        time.sleep({delay})
    _nice = os.nice

    def _slow_nice(n):
        if _comm() == "drepl-snapshot" and _first_time():
            time.sleep({delay})
        return _nice(n)

    os.nice = _slow_nice
    _sched = getattr(os, "sched_setscheduler", None)

    def _slow_sched(*args):
        if _comm() == "drepl-snapshot" and _first_time():
            time.sleep({delay})
        return _sched(*args)

    if _sched is not None:
        os.sched_setscheduler = _slow_sched
    _path = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    try:
        del sys.modules["dill"]
        sys.modules["dill"] = importlib.import_module("dill")
    finally:
        sys.path[:] = _path
    """
)


def slow_dill(tmp: Path, delay: float) -> None:
    shim = tmp / "poison"  # on the bootstrap's PYTHONPATH (see Boot)
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "dill.py").write_text(SLOW_DILL.format(delay=delay))


def meta(boot: Boot) -> dict:
    return json.loads((boot.ws / ".dockerrepl" / "state.meta.json").read_text())


def restored_after(crashed: dict) -> int:
    """The cell whose checkpoint the replacement worker restored, from the crash's note
    (the meta file may name a later cell by the time the next cell's result is read:
    a namespace holding a list is snapshotted after every cell)."""
    assert crashed["status"] == "crashed", crashed
    m = re.search(r"checkpoint taken after cell (\d+)", crashed["stderr"])
    assert m, crashed["stderr"]
    return int(m.group(1))


def landed(boot: Boot, cell: int, bound: float = 30.0) -> None:
    """Until the checkpoint on disk names ``cell`` (the worker went idle: its owed
    snapshot was forked and written)."""
    end = time.monotonic() + bound
    while time.monotonic() < end:
        try:
            if meta(boot)["cell"] >= cell:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"the checkpoint after cell {cell} never landed")


def call(boot: Boot, op: str, cid: int) -> dict:
    boot.send({"type": "call", "id": cid, "op": op, "args": {}, "timeout": 30})
    reply = boot.recv()
    while reply["type"] == "progress":  # a long call says it is still running
        reply = boot.recv()
    assert reply["type"] == "reply" and reply["ok"], reply
    return reply


def test_a_late_older_snapshot_does_not_replace_a_newer_one(tmp_path):
    slow_dill(tmp_path, 2.0)
    with Boot(tmp_path, hello(auto_checkpoint=True)) as boot:
        assert boot.exec("x = 1\ny = [1]", 1)["status"] == "ok"  # its snapshot is slow
        assert boot.exec("x = 2\ny.append(2)", 2)["status"] == "ok"  # its snapshot waits
        call(boot, "checkpoint", 100)  # cell 2 written now, while cell 1's is on its way
        # the worker dies; its replacement restores once no snapshot is pending
        assert restored_after(boot.exec("import os\nos._exit(5)", 3)) == 2
        r = boot.exec("print(x, y)", 4)
        assert r["stdout"] == "2 [1, 2]\n", r


def test_a_crash_before_the_owed_snapshot_names_the_cells_it_lacks(tmp_path):
    """Cells back to back behind a running writer owe their snapshot (it is taken
    when the worker idles): a crash before that restores the earlier checkpoint,
    and the note says exactly which cells are not in it."""
    slow_dill(tmp_path, 1.5)
    with Boot(tmp_path, hello(auto_checkpoint=True)) as boot:
        assert boot.exec("x = 1\ny = [1]", 1)["status"] == "ok"  # its writer is slow
        for cell in (2, 3, 4):
            assert boot.exec(f"x = {cell}\ny.append({cell})", cell)["status"] == "ok"
        crashed = boot.exec("import os\nos._exit(5)", 5)
        assert restored_after(crashed) == 1
        assert "changes made by cells 2-4, if any, are not in it" in crashed["stderr"], crashed
        assert boot.exec("print(x, y)", 6)["stdout"] == "1 [1]\n"


def test_an_idle_worker_takes_its_owed_snapshot(tmp_path):
    slow_dill(tmp_path, 1.0)
    with Boot(tmp_path, hello(auto_checkpoint=True)) as boot:
        assert boot.exec("x = 1\ny = [1]", 1)["status"] == "ok"  # its writer is slow
        assert boot.exec("x = 2\ny.append(2)", 2)["status"] == "ok"  # owed
        landed(boot, 2)  # nothing more is sent: the worker is idle
        crashed = boot.exec("import os\nos._exit(5)", 3)
        assert restored_after(crashed) == 2
        assert "are not in it" not in crashed["stderr"], crashed
        assert boot.exec("print(x, y)", 4)["stdout"] == "2 [1, 2]\n"


# The functions themselves, in a process of their own (the bootstrap reads its
# workspace at import time): the order key decides, not who reaches the lock first.
ORDER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from dockerrepl_bootstrap import paths, store

    def meta():
        with open(paths.META_FILE) as f:
            return json.load(f)

    def write(cell, order):
        return store.write_checkpoint({"x": cell}, {}, cell, order)

    out = {}
    store.start_epoch()
    e = store.STORE.epoch
    out["first"] = write(2, [e, 2])
    out["older"] = write(1, [e, 1])  # the slow first child, late
    out["same"] = write(3, [e, 2])
    out["cell_after_older"] = meta()["cell"]
    store.start_epoch()  # a new worker (a restart that restored nothing)
    out["stale_worker"] = write(9, [e, 99])  # the old worker's late snapshot
    out["new_worker"] = write(1, [e + 1, 1])  # a lower cell, but the newer worker
    out["final"] = meta()["cell"]
    out["epochs"] = [e, store.STORE.epoch]
    print(json.dumps(out))
    """
)


def test_the_order_key_decides_under_the_lock(tmp_path):
    (tmp_path / "ws" / ".dockerrepl").mkdir(parents=True)
    code = stage(tmp_path / "code").parent
    out = subprocess.run(
        [sys.executable, "-B", "-c", ORDER_SCRIPT, str(code)],
        env={"PATH": "/usr/bin:/bin", "DOCKERREPL_WORKSPACE": str(tmp_path / "ws")},
        capture_output=True,
        timeout=30,
        check=True,
    )
    r = json.loads(out.stdout)
    assert r["first"] == []
    assert r["older"] is None and r["same"] is None  # nothing written
    assert r["cell_after_older"] == 2
    assert r["stale_worker"] is None
    assert r["new_worker"] == []
    assert r["final"] == 1
    assert r["epochs"][1] == r["epochs"][0] + 1
    assert not list((tmp_path / "ws").glob("state.dill.tmp.*"))


def test_a_restored_worker_writes_over_a_newer_state_it_did_not_restore(tmp_path):
    ws = tmp_path / "ws"
    (ws / ".dockerrepl").mkdir(parents=True)
    # an earlier session's checkpoint in a reused workspace, with a high order key
    (ws / ".dockerrepl" / "state.meta.json").write_text(
        json.dumps({"cell": 50, "order": [40, 7], "skipped": [], "file_backed": {}})
    )
    with Boot(tmp_path, hello(auto_checkpoint="sync")) as boot:
        assert boot.exec("x = 1", 1)["status"] == "ok"
        assert meta(boot)["cell"] == 1
        assert boot.exec("x = 2", 2)["status"] == "ok"
        # the worker dies and its replacement restores cell 2; then cell 3 is written
        assert boot.exec("import os\nos._exit(5)", 3)["status"] == "crashed"
        assert boot.exec("x += 2\nprint(x)", 4)["stdout"] == "4\n"
        m = meta(boot)
        assert m["cell"] == 4 and m["order"][0] > 41


def test_snapshots_behind_a_slow_writer_coalesce(tmp_path):
    with Boot(tmp_path, hello(auto_checkpoint=True)) as boot:
        # pickling `slow` takes a second and is counted: the snapshot of cell 1
        # holds the lock while cells 2-7 end; of their snapshots only the newest
        # needs to write
        code = (
            "import os, time\n"
            "class Slow:\n"
            "    def __reduce__(self):\n"
            "        with open('dumps', 'a') as f:\n"
            "            f.write('.')\n"
            "        time.sleep(1.0)\n"
            "        return (int, (0,))\n"
            "slow = Slow()\n"
            "x = 1\n"
        )
        assert boot.exec(code, 1)["status"] == "ok"
        time.sleep(0.3)  # cell 1's snapshot is dumping
        for cell in range(2, 8):
            assert boot.exec(f"x = {cell}", cell)["status"] == "ok"
        landed(boot, 7)  # once the worker idles, of the newest state
        assert restored_after(boot.exec("import os\nos._exit(5)", 8)) == 7
        assert boot.exec("print(x)", 9)["stdout"] == "7\n"
        assert len((boot.ws / "dumps").read_text()) <= 3  # not one per cell


def test_snapshots_after_a_restore_in_the_same_worker_still_write(tmp_path):
    with Boot(tmp_path, hello(auto_checkpoint=True)) as boot:
        for cell in (1, 2, 3):
            assert boot.exec(f"x = [{cell}]", cell)["status"] == "ok"
        landed(boot, 3)  # the restore below loads the checkpoint on disk
        # a restore in place gives the worker a new epoch; its snapshot children
        # must still see themselves as the newest
        boot.send({"type": "call", "id": 100, "op": "restore", "args": {}, "timeout": 30})
        reply = boot.recv()
        assert reply["type"] == "reply" and reply["ok"], reply
        assert boot.exec("x.append(4)", 4)["status"] == "ok"
        landed(boot, 4)
        assert restored_after(boot.exec("import os\nos._exit(5)", 5)) == 4
        assert boot.exec("print(x)", 6)["stdout"] == "[3, 4]\n"


def test_a_writer_killed_part_way_leaves_what_it_wrote(tmp_path):
    """A snapshot writer killed part way (as the OOM killer does near the memory
    limit) still leaves a checkpoint: the variables it finished (smallest first),
    with metadata and restore notes that name the ones it lacks."""
    code = (
        "import os, signal\n"
        "class K(bytearray):\n"
        "    def __reduce_ex__(self, protocol):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # in the writer, as the OOM killer\n"
        "x = [1, 2]\n"
        "y = {'a': 1}\n"
        "k = K(100000)\n"
    )
    with Boot(tmp_path, hello(auto_checkpoint=True)) as boot:
        assert boot.exec(code, 1)["status"] == "ok"
        landed(boot, 1)
        m = meta(boot)
        assert m["partial"]["lacks"] == ["k"], m
        assert "signal 9" in m["partial"]["why"], m
        r = boot.exec("print(x, y)", 2)
        assert "the checkpoint after cell 1 failed" in r["stderr"], r
        assert "kept without k" in r["stderr"], r
        crashed = boot.exec("import os\nos._exit(5)", 3)
        assert restored_after(crashed) >= 1
        assert "written in part (its writer was killed by signal 9" in crashed["stderr"]
        assert "without: k" in crashed["stderr"], crashed
        r = boot.exec("print(x, y, 'k' in globals())", 4)
        assert r["stdout"] == "[1, 2] {'a': 1} False\n", r


def test_an_older_bootstraps_single_dict_checkpoint_still_restores(tmp_path):
    """state.dill used to be one pickled dict (saved sessions carry such files)."""
    import dill

    state = tmp_path / "ws"
    (state / ".dockerrepl").mkdir(parents=True)
    shared = [1, 2]
    with open(state / "state.dill", "wb") as f:
        dill.dump({"x": shared, "y": shared, "n": 3}, f, recurse=True)
    (state / ".dockerrepl" / "state.meta.json").write_text(
        json.dumps({"cell": 4, "order": [1, 1], "skipped": [], "file_backed": {}})
    )
    with Boot(tmp_path, hello(auto_checkpoint=True)) as boot:
        reply = call(boot, "restore", 100)
        assert reply["value"]["cell"] == 4, reply
        r = boot.exec("print(x, n, x is y)", 5)
        assert r["stdout"] == "[1, 2] 3 True\n", r
        # and what it writes now is the stream, shared objects still shared
        landed(boot, 5)
        r = boot.exec("import os\nos._exit(5)", 6)
        assert restored_after(r) == 5
        assert boot.exec("print(x is y)", 7)["stdout"] == "True\n"
