"""Fixtures for the interop tests: rlm itself, and a scripted OpenAI-compatible server.

Every rlm test here needs the real rlm package (PyPI ``rlms``). Locally the tests
skip without it; in CI (``DOCKERREPL_REQUIRE_DOCKER=1``, set by scripts/test.sh,
which installs rlms) a missing rlm is a failure, not a skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from docker_helpers import import_or_skip
from fake_openai import FakeOpenAI


@pytest.fixture(autouse=True)
def _rlm_installed(request: pytest.FixtureRequest) -> None:
    # the rlm tests' (test_dspy.py and test_smolagents.py need their own host packages)
    if request.module.__name__.rpartition(".")[2].startswith("test_rlm"):
        import_or_skip("rlm", "the interop tests need rlm: pip install rlms")


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """The model behind rlm's openai backend: a test sets ``answer``.

    Usage is always reported (rlm's client requires it), estimated from the text.
    """
    with FakeOpenAI(answer=lambda messages: "no answer set", tokens=None) as server:
        yield server


@pytest.fixture
def dockerrepl_for_rlm() -> Iterator[type]:
    """``use_dockerrepl()`` for one test, undone afterwards."""
    from dockerrepl.integrations.rlm import restore_rlm_docker, use_dockerrepl

    cls = use_dockerrepl()
    try:
        yield cls
    finally:
        restore_rlm_docker()
