"""Fixtures for the CLI tests."""

from __future__ import annotations

import os
import shutil

import pytest
from cli_helpers import base_env


@pytest.fixture
def env(image: str) -> dict[str, str]:
    """Environment for commands that need the engine: the test image is the default."""
    return base_env(DOCKERREPL_IMAGE=image)


@pytest.fixture
def docker_cli(pytestconfig: pytest.Config) -> str:
    """The docker executable (no engine needed); skips without one unless docker is required."""
    path = shutil.which("docker")
    if path is None:
        if (
            pytestconfig.getoption("--require-docker")
            or os.environ.get("DOCKERREPL_REQUIRE_DOCKER") == "1"
        ):
            pytest.fail("the docker CLI is required but not on PATH")
        pytest.skip("no docker CLI on PATH")
    return path
