"""A REMOTE engine (issue #12): a private dockerd over TCP that does not share our files.

The engine is ``private_engine.remote_engine`` (its own network and mount namespaces:
see that module). Today's proxy transport cannot work there (its bind mounts name our
temp dirs, its proxy binds the engine's bridge gateway); the channel transport is what
this file is for.
"""

from __future__ import annotations

import pytest
from private_engine import remote_engine_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(180)


def test_the_private_engine_is_remote(remote_engine, image):
    out = remote_engine.docker("info", "--format", "{{.DockerRootDir}}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "/tmp/engine/root"
    # the fixture checked this before yielding; again here, so a test says so by name
    remote_engine.check_isolation(image)
