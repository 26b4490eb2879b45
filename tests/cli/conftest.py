"""Fixtures for the CLI tests."""

from __future__ import annotations

import pytest
from cli_helpers import base_env


@pytest.fixture
def env(image: str) -> dict[str, str]:
    """Environment for commands that need the engine: the test image is the default."""
    return base_env(DOCKERREPL_IMAGE=image)
