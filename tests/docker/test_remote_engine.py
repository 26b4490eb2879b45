"""A REMOTE engine (issue #12): a private dockerd over TCP that does not share our files.

The engine is ``private_engine.remote_engine``: a second dockerd in its own network
namespace, reached at ``tcp://10.213.x.y:2375`` through a veth pair, and in its own
mount namespace, where our temp dirs, this checkout and the main engine's socket do
not exist (the fixture proves that before any test runs). The proxy transport cannot
work there: its bind mounts name our temp dirs, and its proxy binds the engine's bridge
gateway, which is not an address of ours. The channel transport (frames over the
``docker run -i`` pipe, state in a named volume on the engine) must, with the whole
REPL contract: cells keep state, ``llm_query``, contexts, histories, files in and out,
checkpoints, a killed container restored, cell timeouts, labelled volumes that
``cleanup()`` removes and ``dockerrepl gc --docker-host`` sweeps after a dead owner.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from private_engine import RemoteEngine, main_env, remote_engine_fixture  # noqa: F401

import dockerrepl
from dockerrepl import DockerREPL
from dockerrepl._labels import LABEL_OWNER, LABEL_PIDNS, LABEL_VERSION, owner_label, pid_namespace
from dockerrepl.errors import DockerReplError

pytestmark = pytest.mark.timeout(180)

#: ``dockerrepl.owner=<this process>``: what the REPLs of this test process leave labelled.
MINE = f"{LABEL_OWNER}={owner_label()}"


def leftovers(engine: RemoteEngine, label: str = MINE, wait: float = 15.0) -> dict[str, set[str]]:
    """Containers and volumes on ``engine`` with ``label``, once ``--rm`` has had ``wait``
    seconds to finish (it removes an exited container asynchronously)."""
    end = time.monotonic() + wait
    while True:
        left = {"containers": engine.ids("container", f"label={label}")}
        left["volumes"] = engine.ids("volume", f"label={label}")
        if not any(left.values()) or time.monotonic() > end:
            return left
        time.sleep(0.2)


def test_the_private_engine_is_remote(remote_engine, image):
    out = remote_engine.docker("info", "--format", "{{.DockerRootDir}}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "/tmp/engine/root"
    assert not os.path.exists("/tmp/engine/root")  # its files are not ours
    # the fixture checked this before yielding; again here, so a test says so by name
    remote_engine.check_isolation(image)


@pytest.mark.parametrize("network", ["bridge", "none"])
def test_the_proxy_transport_is_refused_with_the_reason(remote_engine, image, handler, network):
    """Forced onto the proxy transport, a remote engine fails at once with a DockerReplError
    that says why, and leaves nothing on the engine."""
    with pytest.raises(DockerReplError) as info:
        DockerREPL(
            image=image,
            lm_handler_address=handler.address,
            docker_host=remote_engine.host,
            network=network,
            transport="proxy",
            start_timeout=30,
        )
    err = info.value
    print(f"{type(err).__name__}: {err}")
    # today: network="bridge" -> ProxyError "cannot bind the LM proxy to <the engine's
    # gateway> ... (is this the docker bridge gateway of a local engine?)"; network="none"
    # -> DockerCommandError "... bind source path does not exist: /tmp/dockerrepl-..."
    text = str(err).lower()
    reasons = ("remote", "channel", "local engine", "bind source path does not exist")
    assert any(w in text for w in reasons), text
    assert leftovers(remote_engine) == {"containers": set(), "volumes": set()}


def test_auto_picks_the_channel_and_keeps_the_whole_contract(
    remote_engine, image, handler, tmp_path
):
    t0 = time.monotonic()
    repl = DockerREPL(
        image=image,
        lm_handler_address=handler.address,
        docker_host=remote_engine.host,
        transport="auto",
        timeout=60,
        start_timeout=60,
    )
    timings = {"open": time.monotonic() - t0}
    try:
        assert repl.transport == "channel"
        # state lives in a labelled named volume on the remote engine, and only there
        open_now = leftovers(remote_engine, wait=0)
        assert len(open_now["volumes"]) == 1, open_now
        assert len(open_now["containers"]) == 1, open_now
        volume = next(iter(open_now["volumes"]))

        # cells keep state; llm_query and llm_query_batched answer, listed in prompt order
        assert repl.execute_code("x = 41").status == "ok"
        r = repl.execute_code(
            "print(x + 1)\nprint(llm_query('hi'))\nprint(llm_query_batched(['a', 'b', 'c']))"
        )
        assert r.status == "ok", r.stderr
        assert r.stdout == "42\necho:hi\n['echo:a', 'echo:b', 'echo:c']\n"
        assert [c.prompt for c in r.rlm_calls] == ["hi", "a", "b", "c"]
        assert [c.response for c in r.rlm_calls] == ["echo:hi", "echo:a", "echo:b", "echo:c"]

        # contexts (10 MB through the pipe) and histories
        t = time.monotonic()
        repl.load_context("x" * 10_000_000)
        timings["10 MB context"] = time.monotonic() - t
        assert repl.add_context({"k": [1, 2]}) == 1
        assert repl.add_history([{"role": "user", "content": "q?"}]) == 0
        r = repl.execute_code(
            "print(len(context), context[:3])\nprint(context_1['k'])\nprint(history[0]['content'])"
        )
        assert (r.status, r.stdout) == ("ok", "10000000 xxx\n[1, 2]\nq?\n"), r.stderr

        # files in and out, byte for byte (binary: every byte value, 5 MB)
        data = os.urandom(5 * 1024 * 1024)
        local = tmp_path / "in.bin"
        local.write_bytes(data)
        t = time.monotonic()
        assert repl.upload(str(local), "dir/f.bin") == len(data)
        timings["5 MB upload"] = time.monotonic() - t
        r = repl.execute_code(
            "import hashlib\nprint(hashlib.sha256(open('/workspace/dir/f.bin', 'rb').read())"
            ".hexdigest())"
        )
        assert (r.status, r.stdout) == ("ok", hashlib.sha256(data).hexdigest() + "\n"), r.stderr
        out = tmp_path / "out.bin"
        t = time.monotonic()
        assert repl.download("dir/f.bin", str(out)) == len(data)
        timings["5 MB download"] = time.monotonic() - t
        assert out.read_bytes() == data

        # a cell timeout interrupts the cell, not the namespace
        t = time.monotonic()
        r = repl.execute_code("y = 'before'\nwhile True: pass", timeout=1)
        timings["timeout cell"] = time.monotonic() - t
        assert r.status == "timeout", (r.status, r.stderr)
        r = repl.execute_code("print(x, y)")
        assert (r.status, r.stdout) == ("ok", "41 before\n"), r.stderr

        # a checkpoint, then the container killed on the engine: the next cell restores it
        assert repl.checkpoint() == []
        first = repl.container_id
        name = repl.container_name
        assert name
        killed = remote_engine.docker("kill", name)
        assert killed.returncode == 0, killed.stderr
        t = time.monotonic()
        r = repl.execute_code("print(x, y, len(context), context_1['k'], history[0]['content'])")
        timings["cell after kill (restore)"] = time.monotonic() - t
        assert (r.status, r.stdout) == ("ok", "41 before 10000000 [1, 2] q?\n"), r.stderr
        assert "restore" in r.stderr, r.stderr
        assert repl.restarts == 1
        assert repl.container_id != first
        # the restored container uses the same volume: the uploaded file is still there
        again = tmp_path / "again.bin"
        assert repl.download("dir/f.bin", str(again)) == len(data)
        assert again.read_bytes() == data
        assert leftovers(remote_engine, wait=0)["volumes"] == {volume}
        r = repl.execute_code("print(llm_query('after'))")
        assert (r.status, r.stdout) == ("ok", "echo:after\n"), r.stderr
    finally:
        t = time.monotonic()
        repl.cleanup()
        timings["cleanup"] = time.monotonic() - t
        print({k: f"{v:.2f}s" for k, v in timings.items()})
    # nothing of ours is left on the remote engine: no container, no volume
    assert leftovers(remote_engine) == {"containers": set(), "volumes": set()}


def test_the_channel_on_request_with_network_none(remote_engine, image, handler):
    """``transport="channel"`` explicitly, with no network at all: llm_query still answers
    (it goes through the pipe), and the volume carries our labels."""
    with DockerREPL(
        image=image,
        lm_handler_address=handler.address,
        docker_host=remote_engine.host,
        transport="channel",
        network="none",
    ) as repl:
        assert repl.transport == "channel"
        r = repl.execute_code("import socket\nprint(llm_query('no net'))")
        assert (r.status, r.stdout) == ("ok", "echo:no net\n"), r.stderr
        (volume,) = leftovers(remote_engine, wait=0)["volumes"]
        out = remote_engine.docker(
            "volume", "inspect", "--format", "{{json .Labels}}", volume, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert f'"{LABEL_OWNER}":"{owner_label()}"' in out.stdout
        assert f'"{LABEL_VERSION}":"{dockerrepl.__version__}"' in out.stdout
    assert leftovers(remote_engine) == {"containers": set(), "volumes": set()}


CHILD = """\
import sys, time
from dockerrepl import DockerREPL
from dockerrepl._labels import owner_label
repl = DockerREPL(image=sys.argv[1], docker_host=sys.argv[2], transport="auto")
assert repl.transport == "channel", repl.transport
assert repl.execute_code("x = 1").status == "ok"
repl.checkpoint()
print("READY", owner_label(), repl._session.workspace.root, flush=True)
time.sleep(600)
"""


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The child's first stdout line, or "" if it says nothing within ``timeout``."""
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


def test_gc_sweeps_what_a_killed_owner_left_on_the_remote_engine(remote_engine, image, tmp_path):
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(dockerrepl.__file__)))
    # the child imports the dockerrepl these tests import
    path = [package_root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**main_env(), "PYTHONPATH": os.pathsep.join(path)}
    with open(tmp_path / "child.err", "w") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, image, remote_engine.host],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            start_new_session=True,
        )
    decoys: list[tuple[str, str]] = []
    try:
        line = _first_line(child, timeout=90)
        assert line.startswith("READY "), (line, (tmp_path / "child.err").read_text()[-2000:])
        owner, host_dir = line.split()[1:3]
        assert os.path.isdir(host_dir)  # the CLI's log: on this host
        theirs = f"{LABEL_OWNER}={owner}"
        assert len(leftovers(remote_engine, theirs, wait=0)["volumes"]) == 1

        # the owner dies without cleaning up; its container sees stdin close and exits
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        end = time.monotonic() + 30
        while time.monotonic() < end and remote_engine.ids(
            "container", f"label={theirs}", "status=running"
        ):
            time.sleep(0.2)
        assert not remote_engine.ids("container", f"label={theirs}", "status=running")
        left = leftovers(remote_engine, theirs, wait=0)
        assert len(left["volumes"]) == 1, left  # the state outlives its owner: gc's job
        (volume,) = left["volumes"]

        # decoys on the MAIN engine with the same dead owner: gc of the remote must not
        # touch them
        labels = ["--label", f"{LABEL_VERSION}=0", "--label", theirs]
        labels += ["--label", f"{LABEL_PIDNS}={pid_namespace()}"]
        made = subprocess.run(
            ["docker", "volume", "create", *labels], capture_output=True, text=True, timeout=60,
            env=main_env(),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        decoys.append(("volume", made.stdout.strip()))
        made = subprocess.run(
            ["docker", "create", *labels, image, "true"], capture_output=True, text=True,
            timeout=60, env=main_env(),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        decoys.append(("container", made.stdout.strip()))

        gc = [sys.executable, "-m", "dockerrepl", "gc", "--docker-host", remote_engine.host]
        gc += ["--min-age", "1e9"]  # other tests' host workspaces are not this test's to sweep
        dry = subprocess.run(
            [*gc, "--dry-run"], capture_output=True, text=True, timeout=120, env=env
        )
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert volume in dry.stdout, dry.stdout
        assert leftovers(remote_engine, theirs, wait=0)["volumes"] == {volume}  # dry: kept

        done = subprocess.run(gc, capture_output=True, text=True, timeout=120, env=env)
        print(done.stdout)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "removed" in done.stdout
        assert leftovers(remote_engine, theirs, wait=0) == {"containers": set(), "volumes": set()}
        # and the dead owner's host dir, named by its volume (no age rule for it)
        assert not os.path.exists(host_dir), done.stdout
        for kind, name in decoys:
            still = subprocess.run(
                ["docker", kind, "inspect", name], capture_output=True, timeout=60, env=main_env()
            )
            assert still.returncode == 0, f"gc --docker-host removed the main engine's {kind}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        for kind, name in reversed(decoys):
            rm = ["docker", "rm", "-f", name] if kind == "container" else ["docker", "volume", "rm"]
            if kind == "volume":
                rm.append(name)
            subprocess.run(rm, capture_output=True, timeout=60, env=main_env())
