"""Shared fixtures.

Docker tests skip locally when no engine answers, but FAIL when
``DOCKERREPL_REQUIRE_DOCKER=1`` (set by scripts/test.sh, so in CI) or with
``--require-docker``. Every test that uses the ``docker_engine`` fixture (or a
fixture built on it) gets the ``docker`` marker automatically.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from docker_helpers import image_exists, our_containers, server_version, skip_or_fail, wait_gone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEST_IMAGE = "dockerrepl/python:3.11-bookworm"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--require-docker", action="store_true", help="fail, not skip, without docker")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        if any(
            n in names
            for n in ("docker_engine", "image", "repl", "handler_repl", "any_transport_repl")
        ):
            item.add_marker(pytest.mark.docker)


def pytest_configure(config: pytest.Config) -> None:
    # one switch for every "missing here" in the suite: docker_helpers.skip_or_fail
    if config.getoption("--require-docker"):
        os.environ["DOCKERREPL_REQUIRE_DOCKER"] = "1"


@pytest.fixture(scope="session")
def docker_engine(pytestconfig: pytest.Config) -> str:
    """Probe the engine once; skip (or fail in CI) without one."""
    try:
        out = server_version(timeout=20)
        ok = out.returncode == 0 and out.stdout.strip()
        reason = out.stderr.strip()[-300:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, reason = False, str(exc)
    if not ok:
        skip_or_fail(f"no docker engine reachable: {reason}")
    return str(out.stdout.strip())


@pytest.fixture(scope="session")
def image(docker_engine: str) -> str:
    """A python3-only image (no dill, no pip): built offline if absent."""
    tag = os.environ.get("DOCKERREPL_TEST_IMAGE", DEFAULT_TEST_IMAGE)
    if not image_exists(tag):
        subprocess.run(
            [os.path.join(ROOT, "scripts", "build-image.sh"), "--tag", tag], check=True, timeout=900
        )
    return tag


@pytest.fixture
def echo_handler() -> Iterator[object]:
    """An LMHandler with the echo client ("echo:<prompt>"), on 127.0.0.1."""
    from dockerrepl import LMHandler
    from dockerrepl.clients import EchoClient

    with LMHandler(EchoClient()) as h:
        yield h


@pytest.fixture
def handler(echo_handler: object) -> object:
    """The LM Handler the REPL fixtures use: the echo one."""
    return echo_handler


@pytest.fixture
def repl(image: str, handler: object) -> Iterator[object]:
    from dockerrepl import DockerREPL

    r = DockerREPL(image=image, lm_handler_address=handler.address, timeout=60)  # type: ignore[attr-defined]
    try:
        yield r
    finally:
        r.cleanup()


#: The transports a local rootful engine offers (``DockerREPL(transport=...)``).
TRANSPORTS = ("proxy", "channel")


@pytest.fixture(params=TRANSPORTS)
def each_transport(request: pytest.FixtureRequest) -> str:
    """Runs the test once per transport: "proxy" (bind mount + HTTP proxy) and
    "channel" (frames over the container's stdio, a named volume)."""
    return str(request.param)


@pytest.fixture
def any_transport_repl(image: str, handler: object, each_transport: str) -> Iterator[object]:
    """The ``repl`` fixture, once per transport; it asserts the transport was the one asked for."""
    from dockerrepl import DockerREPL

    r = DockerREPL(
        image=image,
        lm_handler_address=handler.address,  # type: ignore[attr-defined]
        timeout=60,
        transport=each_transport,
    )
    try:
        assert r.transport == each_transport
        yield r
    finally:
        r.cleanup()


@pytest.fixture
def no_leftovers(docker_engine: str) -> Iterator[None]:
    """Fail the test if it leaves a container of this process behind."""
    before = our_containers()
    yield
    # `docker run --rm` removes an exited container asynchronously
    left = wait_gone(our_containers() - before, timeout=10)
    assert not left, f"containers left behind: {sorted(left)}"
