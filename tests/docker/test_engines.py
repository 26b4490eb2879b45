"""Engine selection per REPL on real engines (issue #12, the part without the channel).

Rootful Docker through an explicit ``docker_host`` and through ``context="default"``
(every docker command the REPL runs carries the flag: the ``dockerrepl._docker`` log
says so), and rootful Podman with ``network="none"``. Podman's default rlimits are
refused on this machine ("error setting rlimit type 7"): ``CONTAINERS_CONF`` points at
a file without them, here in the test set-up only, never in the library.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time

import pytest
from docker_helpers import skip_or_fail

from dockerrepl import DockerREPL
from dockerrepl._labels import owner_label, pid_namespace
from dockerrepl.errors import TransportUnavailable

pytestmark = pytest.mark.timeout(180)

DOCKER_SOCK = "unix:///var/run/docker.sock"


def docker_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dockerrepl._docker"]


def run_contract(r: DockerREPL) -> None:
    """Cells keep state, llm_query answers, a killed container restores."""
    assert r.execute_code("x = 41").status == "ok"
    res = r.execute_code("print(x + 1)\nprint(llm_query('hi'))")
    assert (res.status, res.stdout) == ("ok", "42\necho:hi\n"), res.stderr
    assert [c.response for c in res.rlm_calls] == ["echo:hi"]


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"docker_host": DOCKER_SOCK}, f"--host {DOCKER_SOCK}"),
        ({"context": "default"}, "--context default"),
    ],
    ids=["docker_host", "context"],
)
def test_a_selected_docker_engine_gets_every_command(image, handler, caplog, kwargs, flag):
    caplog.set_level(logging.DEBUG, logger="dockerrepl._docker")
    with DockerREPL(
        image=image, lm_handler_address=handler.address, auto_checkpoint="sync", **kwargs
    ) as r:
        run_contract(r)
        name = r.container_name
        assert name
        subprocess.run(["docker", "kill", name], capture_output=True, timeout=60, check=True)
        after = r.execute_code("print(x)")
        assert (after.status, after.stdout) == ("ok", "41\n")
    lines = docker_lines(caplog)
    # network inspect (the gateway, unless cached), run x2, inspect (verify), rm on close
    assert any(" run -i " in ln for ln in lines)
    assert any(" inspect " in ln for ln in lines)
    for ln in lines:
        assert f" {flag} " in ln, ln


# ---------------------------------------------------------------------- Podman
@pytest.fixture(scope="module")
def podman(image, tmp_path_factory):
    """Rootful Podman with the test image loaded (from docker: no registry here)."""
    if shutil.which("podman") is None:
        skip_or_fail("podman is not installed (scripts/test.sh installs Debian's)")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("CONTAINERS_CONF", str(conf))
    try:
        probe = subprocess.run(
            ["podman", "info", "--format", "{{.Host.Security.Rootless}}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode != 0:
            skip_or_fail(f"podman does not run here: {probe.stderr.strip()[-300:]}")
        if probe.stdout.strip() != "false":
            skip_or_fail("podman is rootless here; this test is for rootful Podman")
        if subprocess.run(["podman", "image", "exists", image], timeout=60).returncode != 0:
            saved = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
            loaded = subprocess.run(
                ["podman", "load"], stdin=saved.stdout, capture_output=True, timeout=600
            )
            saved.wait(60)
            assert loaded.returncode == 0, loaded.stderr
        yield "podman"
    finally:
        mp.undo()


def podman_containers(label: str) -> list[str]:
    out = subprocess.run(
        ["podman", "ps", "-aq", "--no-trunc", "--filter", f"label={label}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_podman_rootful_with_network_none(podman, image, handler):
    owner = f"dockerrepl.owner={owner_label()}"
    t0 = time.perf_counter()
    r = DockerREPL(
        image=image,
        lm_handler_address=handler.address,
        docker=podman,
        network="none",
        auto_checkpoint="sync",
    )
    try:
        opened = time.perf_counter() - t0
        run_contract(r)
        name = r.container_name
        assert name
        # verify() ran at start (verify_security=True); again, explicitly, on what Podman says
        session = r._session
        assert session.container is not None
        attrs = session.container.inspect()
        assert attrs["HostConfig"]["CapDrop"] != ["ALL"]  # Podman lists them one by one
        session.container.verify(attrs)
        caps = session.container.info["caps"]
        assert int(caps["CapEff"], 16) == 0 and int(caps["CapBnd"], 16) == 0
        assert podman_containers(owner) == [attrs["Id"]]
        labels = json.loads(
            subprocess.run(
                ["podman", "inspect", "--format", "{{json .Config.Labels}}", name],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        )
        assert "dockerrepl.version" in labels
        subprocess.run(["podman", "kill", name], capture_output=True, timeout=60, check=True)
        after = r.execute_code("print(x)\nprint(llm_query('again'))")
        assert (after.status, after.stdout) == ("ok", "41\necho:again\n"), after.stderr
        assert "restored" in after.stderr
        assert r.restarts == 1
        print(f"podman: open {opened:.2f}s")
    finally:
        r.cleanup()
    end = time.monotonic() + 30
    while podman_containers(owner) and time.monotonic() < end:
        time.sleep(0.2)
    assert podman_containers(owner) == []


def test_podman_with_the_bridge_proxy_fails_at_once(podman, image, handler):
    t0 = time.monotonic()
    with pytest.raises(TransportUnavailable, match="transport='channel'"):
        DockerREPL(
            image=image, lm_handler_address=handler.address, docker=podman, transport="proxy"
        )
    assert time.monotonic() - t0 < 1


def test_podman_with_the_bridge_takes_the_channel(podman, image, handler):
    """transport="auto" (the default): Podman's bridge gives our proxy no way home, so the
    REPL goes over the channel, network and all."""
    with DockerREPL(
        image=image, lm_handler_address=handler.address, docker=podman, auto_checkpoint="sync"
    ) as r:
        assert r.transport == "channel"
        run_contract(r)
        assert r.execute_code("import socket; print(socket.gethostname() != '')").stdout == "True\n"


def test_gc_sweeps_podman(podman, image):
    tag = f"dockerrepl.test={secrets.token_hex(4)}"
    dead_owner = f"{socket.gethostname()}:999999999:1"  # no such pid
    started = subprocess.run(
        [
            *("podman", "run", "-d", "--label", "dockerrepl.version=0", "--label", tag),
            *("--label", f"dockerrepl.owner={dead_owner}"),
            *("--label", f"dockerrepl.pidns={pid_namespace()}", image, "sleep", "300"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 0, started.stderr
    try:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "dockerrepl", "gc", "--docker", podman),
                *("--label", tag, "--min-age", "1e9"),  # its workspaces: none old enough
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ,
        )
        assert done.returncode == 0, done.stderr
        assert "removed" in done.stdout and "is gone" in done.stdout
        assert podman_containers(tag) == []
    finally:
        subprocess.run(
            ["podman", "rm", "-f", started.stdout.strip()], capture_output=True, timeout=60
        )


def test_doctor_on_podman(podman, image):
    done = subprocess.run(
        [sys.executable, "-m", "dockerrepl", "doctor", "--docker", podman, "--image", image],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "podman runs containers itself" in done.stdout
    # the bridge: auto takes the channel (no bridge of ours); network="none": the socket
    assert "llm_query() answered through the docker run -i pipe (transport channel" in done.stdout
    assert "llm_query() answered through /opt/dockerrepl/proxy.sock" in done.stdout
    assert "checks passed" in done.stdout and "failed" not in done.stdout


@pytest.mark.parametrize(
    "kwargs", [{"read_only": True}, {"user": "65534:65534"}], ids=["read_only", "user"]
)
def test_podman_hardening_options_pass_verify(podman, image, handler, kwargs):
    with DockerREPL(
        image=image, lm_handler_address=handler.address, docker=podman, network="none", **kwargs
    ) as r:
        res = r.execute_code("import os\nprint(os.getuid(), llm_query('x'))")
        assert res.status == "ok", res.stderr
        uid = "65534" if "user" in kwargs else "0"
        assert res.stdout == f"{uid} echo:x\n"
