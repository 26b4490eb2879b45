"""The docker CLI from the tests: which containers exist, whose they are, which images."""

from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from types import ModuleType
from typing import NoReturn, Optional

import pytest


def required() -> bool:
    """True in CI (``DOCKERREPL_REQUIRE_DOCKER=1``, set by scripts/test.sh, or pytest's
    ``--require-docker``): then nothing the tests need may be missing."""
    return os.environ.get("DOCKERREPL_REQUIRE_DOCKER") == "1"


def skip_or_fail(reason: str) -> NoReturn:
    """The one way a test leaves early for want of something in its environment: a
    skip locally, a failure when the environment is required (so CI never skips)."""
    if required():
        pytest.fail(f"required here, but: {reason}", pytrace=False)
    pytest.skip(reason)


def import_or_skip(name: str, why: str) -> ModuleType:
    """``importlib.import_module(name)``, or ``skip_or_fail(why)`` when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(f"{why} ({exc})")


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``docker ARGS``, whatever its exit status."""
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def server_version(
    timeout: float, env: Optional[dict[str, str]] = None
) -> subprocess.CompletedProcess[str]:
    """``docker version --format {{.Server.Version}}`` (of the daemon ``env`` points at)."""
    return subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def container_ids(*filters: str) -> set[str]:
    """Full ids of the containers, in any state, that match every ``--filter``."""
    argv = ["ps", "-aq", "--no-trunc"]
    for f in filters:
        argv += ["--filter", f]
    out = docker(*argv, timeout=30)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def our_containers(pid: Optional[int] = None) -> set[str]:
    """Containers owned (by the owner label) by this test process, or by process ``pid``."""
    from dockerrepl._labels import owner_label

    return container_ids(f"label=dockerrepl.owner={owner_label(pid)}")


def our_volumes(pid: Optional[int] = None) -> set[str]:
    """Named volumes (the channel transport's workspaces) owned by this test process, or by
    process ``pid``."""
    from dockerrepl._labels import owner_label

    out = docker("volume", "ls", "-q", "--filter", f"label=dockerrepl.owner={owner_label(pid)}")
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def exists(cid: str) -> bool:
    """Whether the container with this id (or id prefix) exists, in any state."""
    return bool(container_ids(f"id={cid}"))


def wait_gone(cids: Iterable[str], timeout: float = 30.0) -> set[str]:
    """Wait until none of ``cids`` exists; returns those still there."""
    end = time.monotonic() + timeout
    left = set(cids)
    while left and time.monotonic() < end:
        left = {c for c in left if exists(c)}
        if left:
            time.sleep(0.2)
    return left


def labels(container: str) -> dict[str, str]:
    """The labels of a container (by id or name)."""
    out = docker("inspect", "--format", "{{json .Config.Labels}}", container, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout) or {})


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, timeout=30).returncode == 0


def derived_image(base: str, tag: str, run: str) -> str:
    """``tag``: ``base`` plus one ``RUN`` step, built (offline, from the local base) once."""
    if not image_exists(tag):
        subprocess.run(
            ["docker", "build", "-q", "-t", tag, "-"],
            input=f"FROM {base}\nRUN {run}\n".encode(),
            check=True,
            timeout=300,
            capture_output=True,
        )
    return tag


def interpreter(version: str) -> str:
    """A python<version> (pyenv's, or the system's)."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", "python")))
    candidates = [*found, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    skip_or_fail(f"no Python {version} here (pyenv or /usr/bin)")
