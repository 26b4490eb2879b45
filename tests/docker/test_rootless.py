"""Rootless Docker and rootless Podman (issue #12), run by an unprivileged user.

The engines come from ``rootless_engine`` (``scripts/rootless-setup.sh`` prepares the
user; the fixtures start the daemons as that user and stop them by pid). The proxy
transport cannot work with them: its bind mounts name this (root) process's 0700 temp
dir, which the user's engine may not read ("... /tmp/dockerrepl-.../workspace: permission
denied"). The channel transport must, with the contract: cells keep state, ``llm_query``,
a killed container restored, ``cleanup()`` leaving no labelled container or volume; with
``transport="channel"``, and with ``"auto"``, which falls back to it (the refused mount is
``TransportUnavailable`` since 451dec1; before, a ``DockerCommandError``). Rootless Podman
runs two ways: through the user's ``podman system service`` (``docker="podman"``,
``docker_host="unix://..."``) and through a ``setpriv`` wrapper.

cgroup v1 here: rootless engines get no cgroups. Podman drops the limits (``inspect``
says 0), so the Podman REPLs are opened with ``memory=None, cpus=None,
pids_limit=None``, and with the defaults ``verify()`` must refuse. Docker keeps them in
``inspect`` but does not enforce them (``CgroupDriver: none``): an xfail says so.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from rootless_engine import (  # noqa: F401  (the fixtures, by their names)
    RootlessEngine,
    rootless_docker_fixture,
    rootless_podman_fixture,
    rootless_user_fixture,
)

from dockerrepl import DockerREPL
from dockerrepl._labels import LABEL_OWNER, owner_label
from dockerrepl.errors import SecurityCheckError, TransportUnavailable

pytestmark = pytest.mark.timeout(240)

MINE = f"label={LABEL_OWNER}={owner_label()}"
NO_LIMITS = {"memory": None, "cpus": None, "pids_limit": None}


@pytest.fixture(params=["docker", "podman-remote", "podman-setpriv"])
def engine(request: pytest.FixtureRequest) -> RootlessEngine:
    if request.param == "docker":
        e: RootlessEngine = request.getfixturevalue("rootless_docker")
        return e
    return request.getfixturevalue("rootless_podman")[request.param.split("-")[1]]


def options(engine: RootlessEngine) -> dict[str, Any]:
    """What a REPL on ``engine`` needs here (see the module's docstring)."""
    kw: dict[str, Any] = dict(engine.repl_kwargs(), **NO_LIMITS)  # no cgroups here (above)
    if engine.podman:
        kw["network"] = "none"
    return kw


def leftovers(engine: RootlessEngine, wait: float = 15.0) -> dict[str, list[str]]:
    """This process's containers and volumes on ``engine``, once ``--rm`` has had
    ``wait`` seconds (it removes an exited container asynchronously)."""
    end = time.monotonic() + wait
    while True:
        left = {"containers": engine.ids("ps", MINE), "volumes": engine.ids("volume", MINE)}
        if not any(left.values()) or time.monotonic() > end:
            return left
        time.sleep(0.2)


def test_the_engines_are_rootless(rootless_docker, rootless_podman):
    out = rootless_docker.run("info", "--format", "{{json .SecurityOptions}} {{.CgroupDriver}}")
    assert out.returncode == 0, out.stderr
    assert "name=rootless" in out.stdout, out.stdout
    print(f"rootless docker: {out.stdout.strip()}; {rootless_docker.started_in}")
    for name, podman in rootless_podman.items():
        fmt = "{{.Host.Security.Rootless}} {{.Store.GraphDriverName}}"
        out = podman.run("info", "--format", fmt)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == "true", (name, out.stdout)
        print(f"rootless podman ({name}): {out.stdout.strip()}; {podman.started_in}")


def test_the_proxy_transport_fails_cleanly(engine, image, handler):
    """The user's engine cannot mount our 0700 temp dir: TransportUnavailable, nothing left."""
    t0 = time.monotonic()
    with pytest.raises(TransportUnavailable, match="cannot mount") as info:
        DockerREPL(
            image=image,
            lm_handler_address=handler.address,
            transport="proxy",
            start_timeout=30,
            **options(engine),
        )
    took = time.monotonic() - t0
    print(f"{engine.name}: {type(info.value).__name__} after {took:.2f}s: {info.value}")
    assert leftovers(engine) == {"containers": [], "volumes": []}


@pytest.mark.parametrize("transport", ["auto", "channel"])
def test_the_channel_keeps_the_contract(engine, image, handler, transport):
    """Cells keep state, llm_query answers, a killed container is restored from the
    volume, cleanup() leaves no labelled container or volume."""
    t0 = time.monotonic()
    r = DockerREPL(
        image=image,
        lm_handler_address=handler.address,
        transport=transport,
        auto_checkpoint="sync",
        timeout=60,
        start_timeout=60,
        **options(engine),
    )
    timings = {"open": time.monotonic() - t0}
    try:
        assert r.transport == "channel"
        if transport == "auto":  # the proxy path was tried (or known not to work) first
            assert "cannot mount" in r._session.fallback_reason, r._session.fallback_reason
        now = leftovers(engine, wait=0)
        assert len(now["containers"]) == 1 and len(now["volumes"]) == 1, now

        t = time.monotonic()
        assert r.execute_code("x = 41").status == "ok"
        timings["first cell"] = time.monotonic() - t
        t = time.monotonic()
        res = r.execute_code("print(x + 1)\nprint(llm_query('hi'))")
        timings["llm_query cell"] = time.monotonic() - t
        assert (res.status, res.stdout) == ("ok", "42\necho:hi\n"), res.stderr
        assert [c.response for c in res.rlm_calls] == ["echo:hi"]

        name = r.container_name
        assert name
        killed = engine.run("kill", name)
        assert killed.returncode == 0, killed.stderr
        t = time.monotonic()
        after = r.execute_code("print(x)\nprint(llm_query('again'))")
        timings["cell after kill"] = time.monotonic() - t
        assert (after.status, after.stdout) == ("ok", "41\necho:again\n"), after.stderr
        assert "restored" in after.stderr
        assert r.restarts == 1
    finally:
        t = time.monotonic()
        r.cleanup()
        timings["cleanup"] = time.monotonic() - t
    assert leftovers(engine) == {"containers": [], "volumes": []}
    print(f"{engine.name} ({transport}): " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))


def test_rootless_podman_with_limits_fails_closed(rootless_podman, image, handler):
    """cgroup v1: rootless Podman drops --memory/--cpus/--pids-limit; verify() refuses."""
    podman = rootless_podman["remote"]
    with pytest.raises(SecurityCheckError, match=r"memory limit|PidsLimit|NanoCpus"):
        DockerREPL(
            image=image,
            lm_handler_address=handler.address,
            network="none",
            transport="channel",
            start_timeout=60,
            **podman.repl_kwargs(),
        )
    assert leftovers(podman) == {"containers": [], "volumes": []}


def test_rootless_docker_without_cgroups_fails_closed(rootless_docker, image, handler):
    """Rootless Docker on this cgroup v1 host (``CgroupDriver: none``) keeps the limits
    in ``inspect`` but does not apply them (a cell allocated 600 MiB under
    ``memory="128m"``). ``verify()`` checks what the container's own cgroup enforces
    (the bootstrap's report), so it refuses instead of passing; with cgroups it must
    enforce a 64m limit against a 300 MB allocation."""
    driver = rootless_docker.run("info", "--format", "{{.CgroupDriver}}").stdout.strip()
    kwargs = dict(
        image=image,
        lm_handler_address=handler.address,
        memory="64m",
        transport="channel",
        start_timeout=60,
        **rootless_docker.repl_kwargs(),
    )
    if driver == "none":
        with pytest.raises(SecurityCheckError, match="enforces no memory limit"):
            DockerREPL(**kwargs)
        assert leftovers(rootless_docker) == {"containers": [], "volumes": []}
        return
    with DockerREPL(**kwargs) as r:
        res = r.execute_code("b = bytearray(300 * 1024 * 1024)\nprint('allocated')")
    assert res.status != "ok" or "allocated" not in res.stdout, (res.status, res.stdout)
