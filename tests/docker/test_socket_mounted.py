"""dockerrepl inside a container that has the engine's socket mounted (issue #12, test 1).

Devcontainers and CI jobs run the user's Python in a container with
``/var/run/docker.sock`` mounted. There the proxy transport cannot work: the docker
bridge gateway is not an address of that container (the proxy cannot bind it) and
the engine does not see the container's temp dirs (bind mounts name paths the engine
does not have). ``DockerREPL()`` with default arguments must still work there (the
channel transport: frames over the ``docker run -i`` pipe, state in a labelled named
volume), and ``transport="proxy"`` must fail at once, with our error, leaving nothing.

The OUTER container (the user's) is the offline rlm image (python3, dill, requests)
with the host's socket and docker CLI mounted, the project read-only at /src, its own
/tmp and its own network (the default bridge). ``socket_mounted_child.py`` runs in it
once for the whole module and prints one JSON line; the tests below read it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import time
from typing import Any

import pytest
from docker_helpers import docker, image_exists, skip_or_fail

from dockerrepl._labels import LABEL_OWNER, LABEL_VERSION

pytestmark = [pytest.mark.timeout(240), pytest.mark.docker]

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUTER_IMAGE = "dockerrepl/rlm-python:bookworm"
SOCKET = "/var/run/docker.sock"
#: the outer container's own label, and the label of the probe container it starts
TEST_LABEL = "dockerrepl-test.socket-mounted"
RUN_TIMEOUT = 180
BATCH = "['echo:a', 'echo:b', 'echo:c']"
PROXY_ERRORS = {"ProxyError", "TransportUnavailable", "BootstrapError"}


def owned_by(kind: str, hostname: str) -> list[str]:
    """Containers (``"ps"``) or volumes (``"volume"``) with dockerrepl's labels whose owner
    is a process of the container with this hostname (seen from the host)."""
    fmt = '{{.ID}} {{.Label "%s"}}' if kind == "ps" else '{{.Name}} {{.Label "%s"}}'
    argv = ["ps", "-a", "--no-trunc"] if kind == "ps" else ["volume", "ls"]
    out = docker(*argv, "--filter", f"label={LABEL_VERSION}", "--format", fmt % LABEL_OWNER)
    assert out.returncode == 0, out.stderr
    found = []
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) > 1 and fields[1].startswith(hostname + ":"):
            found.append(fields[0])
    return sorted(found)


def labelled(kind: str, label: str) -> list[str]:
    argv = ["ps", "-aq", "--no-trunc"] if kind == "ps" else ["volume", "ls", "-q"]
    out = docker(*argv, "--filter", f"label={label}")
    assert out.returncode == 0, out.stderr
    return sorted(out.stdout.split())


def remove(kind: str, names: list[str]) -> None:
    if names:
        argv = ["rm", "-f", "-v"] if kind == "ps" else ["volume", "rm", "-f"]
        docker(*argv, *names)


@pytest.fixture(scope="module")
def outer(image: str) -> dict[str, Any]:
    """Run the driver in the outer container once; its JSON line, plus what the host
    sees afterwards (``result["host"]``), measured before anything is cleaned up."""
    if shutil.which("docker") is None:
        skip_or_fail("no docker CLI on PATH")
    if os.environ.get("DOCKER_HOST", f"unix://{SOCKET}") != f"unix://{SOCKET}" or os.environ.get(
        "DOCKER_CONTEXT"
    ):
        skip_or_fail(f"this test mounts {SOCKET}; DOCKER_HOST/DOCKER_CONTEXT point elsewhere")
    try:
        is_socket = stat.S_ISSOCK(os.stat(SOCKET).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        skip_or_fail(f"no engine socket at {SOCKET} to mount")
    if not image_exists(OUTER_IMAGE):
        skip_or_fail(f"{OUTER_IMAGE} not built (scripts/test.sh builds it)")
    cli = os.path.realpath(shutil.which("docker") or "docker")

    token = secrets.token_hex(4)
    name = f"dr-sockmount-{token}"  # also its hostname: the owner labels made inside
    label = f"{TEST_LABEL}={token}"
    tmpdir = f"/tmp/{name}"  # the outer container's TMPDIR: no such path on the host
    assert not os.path.exists(tmpdir)
    argv = [
        *("docker", "run", "--rm", "--name", name, "--hostname", name, "--label", label),
        *("--network", "bridge"),
        *("-v", f"{SOCKET}:{SOCKET}", "-v", f"{cli}:/usr/local/bin/docker:ro"),
        *("-v", f"{ROOT}:/src:ro", "-w", "/"),
        *("-e", "PYTHONPATH=/src", "-e", "PYTHONDONTWRITEBYTECODE=1", "-e", f"TMPDIR={tmpdir}"),
        *(OUTER_IMAGE, "python3", "/src/tests/docker/socket_mounted_child.py", image, label),
    ]
    t0 = time.monotonic()
    proc = None
    host: dict[str, Any] = {}
    try:
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"the outer container ran past {RUN_TIMEOUT}s: {exc.stderr!r}")
        elapsed = time.monotonic() - t0
        end = time.monotonic() + 15  # --rm removes an exited container asynchronously
        while time.monotonic() < end and (
            labelled("ps", label) or owned_by("ps", name) or owned_by("volume", name)
        ):
            time.sleep(0.2)
        host = {
            "outer_and_probes": labelled("ps", label),
            "containers": owned_by("ps", name),
            "volumes": owned_by("volume", name),
            "tmpdir_on_host": os.path.exists(tmpdir),
        }
    finally:
        # whatever happened: nothing of this run stays on the engine, or on its host
        docker("rm", "-f", name)
        remove("ps", labelled("ps", label) + owned_by("ps", name))
        remove("volume", owned_by("volume", name))
        if os.path.isdir(tmpdir):  # made by the engine for a -v of a path it lacks
            shutil.rmtree(tmpdir, ignore_errors=True)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, (
        f"driver exited {proc.returncode}\nstdout:{proc.stdout[-3000:]}\n"
        f"stderr:{proc.stderr[-5000:]}"
    )
    result = json.loads(lines[-1])
    env = result["env"]
    if env["docker_version"] is None:
        skip_or_fail(
            f"the host's docker CLI ({cli}) does not run in {OUTER_IMAGE}: {env['docker_error']}"
        )
    result["host"] = host
    result["elapsed"] = elapsed
    result["stderr"] = proc.stderr[-5000:]
    print(f"socket-mounted: outer container {elapsed:.1f}s, driver {result['seconds']}s")
    for run in result["runs"]:
        keys = ("open_seconds", "restore_seconds", "cleanup_seconds", "seconds")
        print(f"  {run['kwargs']}: {run.get('transport')}", {k: run.get(k) for k in keys})
    return result


def test_the_outer_container_is_really_socket_mounted(outer):
    env = outer["env"]
    assert env["docker_version"], env
    # the proxy's address on the bridge is not one of this container's
    assert env["gateway_bind_error"] is not None, env
    # and a directory of this container, named in a bind mount, is not the engine's
    probe = env["tmp_probe"]
    assert probe["rc"] != 0 and "ours" not in probe["stdout"], probe


@pytest.mark.parametrize("index", [0, 1], ids=["bridge", "none"])
def test_the_proxy_transport_fails_cleanly(outer, index):
    res = outer["proxy"][index]
    assert res["error"] is not None, f"transport='proxy' opened here: {res}"
    assert "DockerReplError" in res["mro"], res
    if index == 0:  # the bridge: the proxy cannot bind the gateway, before any container
        assert PROXY_ERRORS & set(res["mro"]), res
    assert res["seconds"] < 10, res
    assert res["containers_after"] == [] and res["volumes_after"] == [], res


@pytest.mark.parametrize("index", [0, 1], ids=["bridge", "none"])
def test_default_arguments_work_in_a_socket_mounted_container(outer, index):
    run = outer["runs"][index]
    assert "exception" not in run, run["exception"] + "\n" + outer["stderr"]
    assert run["transport"] == "channel", run
    assert len(run["containers_open"]) == 1, run
    assert run["volumes_open"], f"no labelled state volume while the REPL was open: {run}"
    cells = run["cells"]
    state, llm, batched, after = (cells[k] for k in ("state", "llm", "batched", "after_kill"))
    assert (state["status"], state["stdout"]) == ("ok", ""), state
    assert (llm["status"], llm["stdout"]) == ("ok", "42\necho:hi\n"), llm
    assert llm["calls"] == [["hi", "echo:hi"]], llm
    # the client answers c, b, a (a is slowest): answers and calls stay in prompt order
    assert (batched["status"], batched["stdout"]) == ("ok", BATCH + "\n"), batched
    assert batched["calls"] == [["a", "echo:a"], ["b", "echo:b"], ["c", "echo:c"]], batched
    assert run["checkpoint_skipped"] == [], run
    assert run["kill"]["rc"] == 0, run["kill"]
    assert after["status"] == "ok", after
    assert after["stdout"] == f"41 {BATCH}\necho:again\n", after
    assert after["calls"] == [["again", "echo:again"]], after
    assert "restored" in after["stderr"], after
    assert run["restarts"] == 1, run
    assert "cleanup_exception" not in run, run["cleanup_exception"]
    assert run["containers_after"] == [] and run["volumes_after"] == [], run


def test_nothing_is_left_on_the_engine(outer):
    host = outer["host"]
    assert host["outer_and_probes"] == [], host  # the outer container and its probe
    assert host["containers"] == [], host  # dockerrepl's, owned from inside
    assert host["volumes"] == [], host


def test_nothing_is_made_on_the_engines_host(outer):
    # `docker run -v PATH:...` of a PATH the engine lacks makes it, empty, as root:
    # no transport may name the outer container's temp dirs to the engine
    assert outer["host"]["tmpdir_on_host"] is False, outer["host"]
