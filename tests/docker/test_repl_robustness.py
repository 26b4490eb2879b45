"""The host side under stress on a real engine: start deadlines, host-side
exceptions while a cell runs, cleanup() from another thread, a stuck stdin pipe.

Each case ends with a typed outcome, the REPL usable afterwards (or closed on
purpose), and no container left behind.
"""

from __future__ import annotations

import subprocess

import pytest

from dockerrepl import DockerREPL
from dockerrepl._container import owner_label
from dockerrepl.errors import BootstrapError, DockerReplError

pytestmark = pytest.mark.timeout(120)


def docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)


def our_containers() -> set[str]:
    """Containers this test process owns (by the owner label)."""
    out = docker("ps", "-aq", "--filter", f"label=dockerrepl.owner={owner_label()}")
    return set(out.stdout.split())


# --------------------------------------------------------------------------- start
def test_start_deadline_is_a_bootstrap_error_and_leaves_nothing(image, tmp_path):
    before = our_containers()
    with pytest.raises(BootstrapError) as info:
        DockerREPL(image=image, start_timeout=0.01, workspace_dir=str(tmp_path))
    assert isinstance(info.value, DockerReplError)
    assert "start_timeout" in str(info.value)
    assert our_containers() - before == set()
    assert list(tmp_path.iterdir()) == []
