"""Fixtures for the CLI tests."""

from __future__ import annotations

import shutil

import pytest
from cli_helpers import base_env
from docker_helpers import skip_or_fail


@pytest.fixture
def env(image: str) -> dict[str, str]:
    """Environment for commands that need the engine: the test image is the default."""
    return base_env(DOCKERREPL_IMAGE=image)


@pytest.fixture
def docker_cli() -> str:
    """The docker executable (no engine needed); skips without one unless docker is required."""
    path = shutil.which("docker")
    if path is None:
        skip_or_fail("no docker CLI on PATH")
    return path
