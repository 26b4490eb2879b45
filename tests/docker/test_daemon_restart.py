"""The engine restarted under a live REPL (issue 4), on a private dockerd.

Restarting the machine's own daemon is not ours to do, so this test starts a
second ``dockerd`` with private paths (its own data root, exec root, socket,
pidfile, supervised containerd and an empty config file), loads the test image
into it, and points the REPL at it with ``DOCKER_HOST``.

That daemon runs in a network namespace of its own (``ip netns add``, entered
with ``nsenter --net`` so the mounts, /sys/fs/cgroup among them, stay the
host's). A daemon started with ``--bridge=none`` deletes any link called
``docker0`` it can see; in the host's namespace that was the main engine's
bridge, and every later test lost its network. The test checks the host's links
are untouched afterwards. It stops that daemon
under a live REPL, runs a cell while it is down (a typed outcome, no hang),
starts it again, and expects the next cell to run in a new container restored
from the checkpoint in the mount.

Skipped (not failed) where ``dockerd``, ``ip`` or ``nsenter`` is missing, a
network namespace cannot be made, or the private daemon does not answer within
60 s (e.g. without root).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
from docker_helpers import docker, server_version, skip_or_fail

from dockerrepl import DockerREPL
from dockerrepl.errors import ContainerDied, DockerDaemonError, DockerReplError

pytestmark = pytest.mark.timeout(180)

START_WAIT = 60.0


class PrivateDaemon:
    """A dockerd of our own under ``/tmp/d2-*`` (short: unix socket paths are limited)."""

    def __init__(self, driver: str) -> None:
        self.dir = tempfile.mkdtemp(dir="/tmp", prefix="d2-")
        self.host = f"unix://{self.dir}/sock"
        self.driver = driver
        self.proc: subprocess.Popen[bytes] | None = None
        self.netns = "dockerrepl-" + os.path.basename(self.dir)
        self.netns_made = False
        config = os.path.join(self.dir, "config.json")
        with open(config, "w") as f:
            f.write("{}\n")  # not /etc/docker/daemon.json: its data-root is the main engine's

    def make_netns(self) -> bool:
        """Its own network namespace, with loopback up; False when that is not allowed."""
        made = subprocess.run(["ip", "netns", "add", self.netns], capture_output=True, timeout=30)
        if made.returncode != 0:
            return False
        self.netns_made = True
        up = ["ip", "-n", self.netns, "link", "set", "lo", "up"]
        return subprocess.run(up, capture_output=True, timeout=30).returncode == 0

    def argv(self) -> list[str]:
        d = self.dir
        return [
            # nsenter execs dockerd (no fork for a network namespace): proc is the daemon
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            "dockerd",
            f"--config-file={d}/config.json",
            f"--data-root={d}/root",
            f"--exec-root={d}/exec",  # its own containerd socket lives under here
            f"--pidfile={d}/pid",
            f"--host={self.host}",
            "--bridge=none",  # harmless here: only this namespace's links are visible
            "--iptables=false",
            "--ip6tables=false",
            f"--storage-driver={self.driver}",
            "--log-level=warn",
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def start(self) -> bool:
        """Start it and wait until it answers; False when it does not within START_WAIT."""
        log = open(os.path.join(self.dir, "log"), "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log)
        finally:
            log.close()
        end = time.monotonic() + START_WAIT
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                out = server_version(timeout=10, env=self.env())
                if out.returncode == 0 and out.stdout.strip():
                    return True
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.3)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def remove(self) -> None:
        """Unmount what it left under its directory (deepest first), then delete it."""
        with open("/proc/mounts") as f:
            points = [line.split()[1] for line in f]
        for p in sorted((p for p in points if p.startswith(self.dir + "/")), reverse=True):
            subprocess.run(["umount", "-l", p], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.netns_made:
            subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, timeout=30)


def _host_links() -> set[str]:
    """Names of this namespace's network links, without the veths containers come and go with."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    names = {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}
    return {n for n in names if not n.startswith("veth")}


def _main_driver() -> str:
    out = docker("info", "--format", "{{.Driver}}", timeout=30)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "vfs"


@pytest.fixture
def private_daemon(image: str) -> Iterator[PrivateDaemon]:
    for tool in ("dockerd", "ip", "nsenter"):
        if shutil.which(tool) is None:
            skip_or_fail(f"no {tool} on PATH")
    main_env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    links_before = _host_links()
    daemon = PrivateDaemon(_main_driver())
    try:
        if not daemon.make_netns():
            skip_or_fail(f"cannot make a network namespace ({daemon.netns})")
        if not daemon.start():
            daemon.stop()
            daemon.driver = "vfs"
            if not daemon.start():
                skip_or_fail(
                    f"a private dockerd did not start in {START_WAIT:.0f}s: {daemon.log_tail()}"
                )
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE, env=main_env)
        load = subprocess.run(
            ["docker", "load"],
            stdin=save.stdout,
            capture_output=True,
            timeout=120,
            env=daemon.env(),
        )
        assert save.stdout is not None
        save.stdout.close()
        assert save.wait(timeout=60) == 0
        assert load.returncode == 0, load.stderr
        yield daemon
    finally:
        daemon.stop()
        daemon.remove()
    # the main engine's docker0 (and every other host link) is still there
    assert _host_links() >= links_before


def test_daemon_restart_restores_from_the_checkpoint(private_daemon, handler, monkeypatch, image):
    monkeypatch.setenv("DOCKER_HOST", private_daemon.host)
    repl = DockerREPL(
        image=image,
        network="none",
        auto_checkpoint="sync",
        lm_handler_address=handler.address,
        timeout=30,
        start_timeout=30,
    )
    try:
        assert repl.execute_code("x = 41").status == "ok"
        assert repl.execute_code("x += 1").status == "ok"
        first = repl.container_id

        private_daemon.stop()
        t0 = time.monotonic()
        try:
            down: object = repl.execute_code("print(x)")
        except DockerReplError as exc:
            down = exc
        print(f"daemon down: {time.monotonic() - t0:.1f}s -> {down!r}")
        if isinstance(down, DockerReplError):
            # today: ContainerDied (no replacement could start) caused by DockerDaemonError
            assert isinstance(down, ContainerDied)
            assert isinstance(down.__cause__, DockerDaemonError)
            assert "Cannot connect to the Docker daemon" in str(down)  # the cause, named
        else:
            assert down.status != "ok"  # type: ignore[attr-defined]
            assert "daemon" in down.stderr.lower()  # type: ignore[attr-defined]

        assert private_daemon.start(), private_daemon.log_tail()
        r = repl.execute_code("print(x)")
        assert r.status == "ok", r.stderr
        assert r.stdout == "42\n"
        assert repl.container_id != first
        r = repl.execute_code("x += 1\nprint(x)")
        assert (r.status, r.stdout) == ("ok", "43\n")
    finally:
        repl.cleanup()
    left = docker("ps", "-aq", timeout=30)
    assert left.returncode == 0, left.stderr
    assert left.stdout.split() == []
