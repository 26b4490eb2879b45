"""Rootless Docker and rootless Podman for the tests, run by an unprivileged user.

The test process is root; the engines run as ``drrootless`` (``$DOCKERREPL_ROOTLESS_USER``),
a user that ``scripts/rootless-setup.sh`` creates (with its subuid/subgid ranges, its
``/run/user/UID``, ``/dev/net/tun`` usable by it, Podman's storage set to overlay). The
fixtures run that script (idempotent: it does nothing on a prepared machine), start the
daemons as the user, load the test image from the main engine (``docker save | ... load``:
there is no registry here) and stop what they started, by pid, when the session ends.
The main engine is only read from (``docker save``).

* ``rootless_docker``: ``dockerd-rootless.sh`` (Debian's docker.io, rootlesskit,
  slirp4netns) as the user, reached at ``unix:///run/user/UID/docker.sock``:
  ``DockerREPL(docker_host=engine.docker_host)``.
* ``rootless_podman``: two ways for a root process to use the user's Podman, both
  rootless (``podman info``: ``Rootless: true``):

  - ``remote``: ``podman system service`` as the user on a unix socket, and the root
    process's own ``podman --url unix://...`` (``DockerREPL(docker="podman",
    docker_host=...)``; the library spells it ``--url``);
  - ``setpriv``: a wrapper script named ``podman-rootless`` that execs
    ``setpriv --reuid USER ... podman "$@"`` (``DockerREPL(docker=wrapper)``; the
    name starts with ``podman``, which is how the library tells Podman's CLI).
    ``setpriv`` execs (no fork, unlike ``runuser``/``sudo``), so a signal to the pid
    the library started reaches podman itself.

  ``CONTAINERS_CONF`` (``[containers]`` / ``default_ulimits = []``) is set in the
  environment of the user's podman processes only, never in the library's.

On this machine (cgroup v1, no systemd) neither engine has cgroups: rootless Docker
accepts ``--memory``/``--cpus``/``--pids-limit``, shows them in ``inspect`` and does not
enforce them (``docker info``: ``Cgroup Driver: none``); rootless Podman drops them
("Resource limits are not supported and ignored on cgroups V1 rootless systems") and
``inspect`` shows 0. See docs/rootless-notes.md.
"""

from __future__ import annotations

import os
import pwd
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from docker_helpers import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "rootless-setup.sh"
USER = os.environ.get("DOCKERREPL_ROOTLESS_USER", "drrootless")
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
# Debian's docker.io keeps it out of $PATH; Docker's own packages put it in /usr/bin
DOCKERD_ROOTLESS = ("/usr/share/docker.io/contrib/dockerd-rootless.sh", "dockerd-rootless.sh")
LABEL = "label=dockerrepl.version"


@dataclass(frozen=True)
class RootlessEngine:
    """How to reach one rootless engine: the CLI and, if any, its URL."""

    name: str
    docker: str  # DockerREPL(docker=...)
    docker_host: Optional[str] = None  # DockerREPL(docker_host=...)
    started_in: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def podman(self) -> bool:
        return os.path.basename(self.docker).startswith("podman")

    def repl_kwargs(self) -> dict[str, str]:
        kw = {"docker": self.docker}
        if self.docker_host:
            kw["docker_host"] = self.docker_host
        return kw

    def cli(self, *args: str) -> list[str]:
        """The argv of ``ARGS`` on this engine (``--host``/``--url`` as the library does)."""
        flag = ["--url" if self.podman else "--host", self.docker_host] if self.docker_host else []
        return [self.docker, *flag, *args]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cli(*args), capture_output=True, text=True, timeout=timeout, cwd="/"
        )

    def ids(self, kind: str, label: str = LABEL) -> list[str]:
        """Containers (``kind="ps"``) or volumes (``"volume"``) carrying ``label``."""
        if kind == "ps":
            out = self.run("ps", "-aq", "--no-trunc", "--filter", label)
        else:
            out = self.run("volume", "ls", "-q", "--filter", label)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    def remove_ours(self) -> None:
        """Remove dockerrepl's containers and volumes (teardown hygiene only)."""
        for cid in self.ids("ps"):
            self.run("rm", "-f", cid)
        for vol in self.ids("volume"):
            self.run("volume", "rm", "-f", vol)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str

    @property
    def runtime_dir(self) -> str:
        return f"/run/user/{self.uid}"

    @property
    def containers_conf(self) -> str:
        return f"{self.home}/.config/dockerrepl/containers.conf"

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` as the user, in a clean environment, by exec (same pid)."""
        env = {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "XDG_RUNTIME_DIR": self.runtime_dir,
            "PATH": PATH,
            "CONTAINERS_CONF": self.containers_conf,
        }
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in env.items()),
            *cmd,
        ]


def prepare_user() -> User:
    """Run scripts/rootless-setup.sh (root only) and return the user it prepared."""
    if os.geteuid() != 0:
        skip_or_fail("the rootless fixtures run as root (they create a user and start its daemons)")
    t0 = time.monotonic()
    done = subprocess.run(
        ["bash", str(SETUP)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "DOCKERREPL_ROOTLESS_USER": USER},
    )
    if done.returncode != 0:
        skip_or_fail(f"scripts/rootless-setup.sh failed: {(done.stdout + done.stderr)[-800:]}")
    took = time.monotonic() - t0
    if took > 2:
        print(f"rootless-setup.sh: {took:.1f}s")
    pw = pwd.getpwnam(USER)
    return User(USER, pw.pw_uid, pw.pw_gid, pw.pw_dir)


@pytest.fixture(scope="session", name="rootless_user")
def rootless_user_fixture() -> User:
    return prepare_user()


class Daemon:
    """A process started (as the user) in its own session, stopped by its pid."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def wait_ready(self, probe: list[str], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                skip_or_fail(f"{what} exited with {self.proc.returncode}: {self.tail()}")
            done = subprocess.run(probe, capture_output=True, text=True, timeout=30, cwd="/")
            if done.returncode == 0:
                return
            last = done.stderr.strip()[-300:]
            time.sleep(0.25)
        self.stop()
        skip_or_fail(f"{what} did not answer in {timeout:.0f}s ({last}): {self.tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to our pid (rootlesskit and podman pass it on); SIGKILL to the
        process group we started (start_new_session: its id is our pid) if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def load_image(image: str, target: RootlessEngine, load_argv: list[str]) -> float:
    """``docker save IMAGE | LOAD`` unless ``target`` has the image; the seconds it took."""
    if target.run("image", "inspect", image).returncode == 0:
        return 0.0
    t0 = time.monotonic()
    saved = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    loaded = subprocess.run(
        load_argv, stdin=saved.stdout, capture_output=True, text=True, timeout=600, cwd="/"
    )
    assert saved.stdout is not None
    saved.stdout.close()
    saved.wait(60)
    if loaded.returncode != 0 or saved.returncode != 0:
        skip_or_fail(f"loading {image} into {target.name} failed: {loaded.stderr[-500:]}")
    return time.monotonic() - t0


def _dockerd_rootless() -> str:
    for cand in DOCKERD_ROOTLESS:
        if os.path.isabs(cand) and os.access(cand, os.X_OK):
            return cand
        found = subprocess.run(["sh", "-c", f"command -v {cand}"], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.strip()
    skip_or_fail("dockerd-rootless.sh not found (Debian: docker.io's contrib; rootless-setup.sh)")


@pytest.fixture(scope="session", name="rootless_docker")
def rootless_docker_fixture(
    rootless_user: User, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RootlessEngine]:
    """Rootless dockerd as the user, with ``image`` loaded; stopped at the end."""
    u = rootless_user
    host = f"unix://{u.runtime_dir}/docker.sock"
    probe = ["docker", "--host", host, "version", "--format", "{{.Server.Version}}"]
    t0 = time.monotonic()
    daemon: Optional[Daemon] = None
    if subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
        log = tmp_path_factory.mktemp("rootless-docker") / "dockerd.log"
        daemon = Daemon(u.argv(_dockerd_rootless()), log)
        daemon.wait_ready(probe, 90, "rootless dockerd")
    # else: a daemon from elsewhere (a crashed session?) answers: use it, leave it running
    started = time.monotonic() - t0
    engine = RootlessEngine("docker", "docker", host, {"start": started})
    try:
        info = engine.run("info", "--format", "{{json .SecurityOptions}}")
        if "rootless" not in info.stdout:
            skip_or_fail(f"the engine at {host} is not rootless: {info.stdout}{info.stderr}")
        engine.started_in["load"] = load_image(image, engine, engine.cli("load"))
        yield engine
    finally:
        try:
            engine.remove_ours()
        finally:
            if daemon is not None:
                daemon.stop()


WRAPPER = """#!/bin/sh
# podman as {user} (rootless), for a root process: setpriv execs, so this pid is podman's
cd / || exit 125
exec {argv} "$@"
"""


def _pause_pid(u: User) -> Optional[int]:
    """The user's Podman pause process (it holds the user namespace), if it lives."""
    try:
        pid = int(Path(u.runtime_dir, "libpod", "tmp", "pause.pid").read_text().strip())
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError):
        return None
    uid = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("Uid:")), "")
    state = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("State:")), "")
    return pid if uid == str(u.uid) and state != "Z" else None


@pytest.fixture(scope="session", name="rootless_podman")
def rootless_podman_fixture(
    rootless_user: User, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RootlessEngine]]:
    """The user's Podman, two ways: ``{"remote": ..., "setpriv": ...}``."""
    u = rootless_user
    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("rootless-podman")
    wrapper = tmp / "podman-rootless"
    wrapper.write_text(WRAPPER.format(user=u.name, argv=shlex.join(u.argv("podman"))))
    wrapper.chmod(0o755)
    os.chmod(tmp, 0o755)  # the wrapper is run by root; nothing secret in it
    direct = RootlessEngine("setpriv", str(wrapper))
    had_pause = _pause_pid(u) is not None
    sock = f"{u.runtime_dir}/dockerrepl-podman.sock"
    service: Optional[Daemon] = None
    try:
        probe = direct.run("info", "--format", "{{.Host.Security.Rootless}}")
        if probe.returncode != 0 or probe.stdout.strip() != "true":
            skip_or_fail(f"rootless podman does not run: {(probe.stdout + probe.stderr)[-500:]}")
        load = load_image(image, direct, direct.cli("load"))
        if os.path.exists(sock):
            os.unlink(sock)  # a stale one: podman would refuse to listen ("address in use")
        service = Daemon(
            u.argv("podman", "system", "service", "--time=0", f"unix://{sock}"),
            tmp / "service.log",
        )
        remote = RootlessEngine(
            "remote", "podman", f"unix://{sock}", {"start": time.monotonic() - t0, "load": load}
        )
        ready = remote.cli("info", "--format", "{{.Host.Security.Rootless}}")
        service.wait_ready(ready, 60, "podman system service")
        yield {"remote": remote, "setpriv": direct}
    finally:
        try:
            direct.remove_ours()
        finally:
            if service is not None:
                service.stop()
            pause = _pause_pid(u)
            if pause is not None and not had_pause:
                os.kill(pause, signal.SIGTERM)  # started by this session's podman
