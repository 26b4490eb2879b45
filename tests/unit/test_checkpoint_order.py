"""Checkpoints on disk only ever move forward (issue #10, defect 1).

The bootstrap runs under the host Python (tests/bootstrap_process.py). A snapshot
child that is slow to reach its write must never replace the newer checkpoint a
later child already wrote; a worker or container that restored from the disk must
still be able to write after it.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from bootstrap_process import Boot, hello

pytestmark = pytest.mark.timeout(60)

# A `dill` that is slow to import in snapshot children only (the worker imports it
# at once): the first snapshot child of a worker imports dill itself, which is what
# made it reach its write after the second child in the field. Here it is late by
# seconds, so the order is the same on every run.
SLOW_DILL = textwrap.dedent(
    """
    import importlib, os, sys, time

    def _comm():
        try:
            with open("/proc/self/comm") as f:
                return f.read().strip()
        except OSError:
            return ""

    if _comm() == "drepl-snapshot":
        time.sleep({delay})
    _here = os.path.dirname(os.path.abspath(__file__))
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


def test_a_late_older_snapshot_does_not_replace_a_newer_one(tmp_path):
    slow_dill(tmp_path, 2.0)
    with Boot(tmp_path, hello(auto_checkpoint=True)) as boot:
        assert boot.exec("x = 1\ny = [1]", 1)["status"] == "ok"  # its snapshot is slow
        assert boot.exec("x = 2\ny.append(2)", 2)["status"] == "ok"  # its snapshot is not
        # the worker dies; its replacement restores once no snapshot is pending
        assert boot.exec("import os\nos._exit(5)", 3)["status"] == "crashed"
        r = boot.exec("print(x, y)", 4)
        assert r["stdout"] == "2 [1, 2]\n", r
        assert meta(boot)["cell"] == 2
