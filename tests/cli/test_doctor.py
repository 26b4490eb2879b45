"""``dockerrepl doctor`` on this machine, with the offline test image."""

from __future__ import annotations

import pytest
from cli_helpers import cli, containers_of

pytestmark = pytest.mark.timeout(120)

CHECKS = [
    "docker CLI",
    "daemon reachable",
    "permission on the engine socket",
    "engine version",
    "image present or pullable",
    "a container starts",
    "llm_query (transport auto)",
    "dill in the container",
    "network=none: llm_query",
]


def test_doctor_passes_here(env: dict[str, str], image: str) -> None:
    done = cli("doctor", env=env, timeout=110)
    assert done.rc == 0, done.out + done.err
    assert "Traceback" not in done.out + done.err
    lines = done.out.splitlines()
    assert image in lines[0]
    verdicts = [line for line in lines if " ." in line]
    assert [v.split(" .")[0] for v in verdicts] == CHECKS
    assert all(" ok " in v for v in verdicts)
    assert "copied from the host" in verdicts[7]  # the test image has no dill of its own
    # a local rootful engine: auto keeps the proxy path, with the bridge and without
    assert "host.docker.internal" in verdicts[6] and "(transport proxy)" in verdicts[6]
    assert "proxy.sock (transport proxy)" in verdicts[8]
    assert lines[-1] == f"all {len(CHECKS)} checks passed"
    assert containers_of(done.pid) == []


def test_doctor_image_option_wins(env: dict[str, str], image: str) -> None:
    env = dict(env, DOCKERREPL_IMAGE="dockerrepl/no-such-image:missing")
    done = cli("doctor", "--image", image, env=env, timeout=110)
    assert done.rc == 0, done.out
