"""A private ``dockerd`` that behaves like a REMOTE engine (issue #12), for the tests.

What makes an engine "remote" for dockerrepl is twofold: the client reaches it over
the network, and the engine does not share the client's filesystem (a bind mount of
one of our temp dirs names a path the engine does not have). This module starts a
second ``dockerd`` with both properties, on this machine, without touching the main
engine:

- its own **network namespace** (``ip netns add``), joined to the host by a veth pair
  on a free ``/30`` in 10.213.0.0/16 (the host has its first address, the daemon its second);
  the daemon listens on ``tcp://<its address>:2375`` only (plain TCP: a private link on
  this machine, ``--tls=false`` so 20.10 does not stall its start by ~15 s to warn);
- its own **mount namespace** (``unshare --mount --propagation private``) in which a
  fresh tmpfs covers ``/tmp`` (and ``$TMPDIR``), ``/var/tmp``, ``/run``, ``/home``,
  ``/root``, ``/var/lib/docker``, this checkout and the running Python's prefix: a
  ``/tmp/dockerrepl-XXXX`` made by the test process does not exist on its side
  (:meth:`RemoteEngine.check_isolation` proves it before any test runs), and the main
  engine's socket, state and containerd are out of its reach;
- its data root, exec root (its own supervised containerd), pidfile and config file
  live in that private ``/tmp`` tmpfs, so they vanish with its mount namespace when
  its last process exits: nothing of it is ever on the host's disk;
- its own default bridge: ``--bip 10.214.N.1/24`` makes a ``docker0`` *inside* its
  network namespace (the host's ``docker0`` is not visible there), with iptables
  rules in that namespace's own tables; its containers' cgroups sit under
  ``/<ctrl>/dockerrepl-remote-<tag>`` (``--cgroup-parent``), not the main engine's
  ``docker`` group.

The test image is copied in with ``docker save | docker -H tcp://... load``.

Teardown stops the daemon by its pid (SIGTERM, then SIGKILL), then SIGKILLs by pid
whatever of it is left: processes in its mount namespace (its containerd and shims)
and in its containers' cgroups; removes those cgroups, the veth pair and the network
namespace, and asserts the host's links (``docker0`` with its addresses), the main
engine (same daemon ID) and the host's iptables rules (none names our subnets or
links) are as they were.

Needs root, ``dockerd``, ``ip``, ``nsenter``, ``unshare``, ``mount`` and ``iptables``;
without them the fixture is a skip locally and a failure in CI
(``docker_helpers.skip_or_fail``).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Optional

import pytest
from docker_helpers import skip_or_fail

__all__ = ["RemoteEngine", "remote_engine_fixture"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT = 2375
START_WAIT = 60.0  # the daemon answers within this, or the fixture gives up
STOP_WAIT = 30.0  # SIGTERM, then SIGKILL after this
LINK_POOL = ipaddress.ip_network("10.213.0.0/16")  # the host <-> daemon /30s
BRIDGE_POOL = ipaddress.ip_network("10.214.0.0/16")  # the daemon's docker0 /24s
TOOLS = ("dockerd", "ip", "nsenter", "unshare", "mount", "iptables")


def _run(
    argv: list[str], timeout: float = 30, env: Optional[dict[str, str]] = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def main_env() -> dict[str, str]:
    """The environment that points the docker CLI at the main engine (as the suite does)."""
    return {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "DOCKER_CONTEXT")}


def host_links() -> dict[str, list[str]]:
    """This namespace's links (containers' veths left out) and each one's addresses."""
    out = _run(["ip", "-o", "addr", "show"])
    assert out.returncode == 0, out.stderr
    links = _run(["ip", "-o", "link", "show"])
    assert links.returncode == 0, links.stderr
    found: dict[str, list[str]] = {}
    for line in links.stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if not name.startswith("veth"):
            found[name] = []
    for line in out.stdout.splitlines():
        parts = line.split()
        name = parts[1].split("@")[0]
        if name in found and parts[2] in ("inet", "inet6") and not parts[3].startswith("fe80:"):
            found[name].append(parts[3])
    return {k: sorted(v) for k, v in found.items()}


def main_links() -> set[str]:
    """The main engine's default bridge (docker0) and the links of the host's default routes:
    what this fixture must leave alone (other links come and go with other tests' engines)."""
    names = {"docker0"}
    out = _run(
        ["docker", "network", "inspect", "bridge", "--format",
         '{{index .Options "com.docker.network.bridge.name"}}'],
        env=main_env(),
    )  # fmt: skip
    if out.returncode == 0 and out.stdout.strip():
        names.add(out.stdout.strip())
    for line in _run(["ip", "route", "show", "default"]).stdout.splitlines():
        words = line.split()
        if "dev" in words:
            names.add(words[words.index("dev") + 1])
    return names


def host_prefixes() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix this host has an address or a route in (the default route aside)."""
    nets = []
    for argv in (["ip", "-o", "-4", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        out = _run(argv)
        assert out.returncode == 0, out.stderr
        for line in out.stdout.splitlines():
            for word in line.split():
                if word[:1].isdigit() and "." in word:
                    try:
                        nets.append(ipaddress.ip_network(word, strict=False))
                    except ValueError:
                        pass
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network) and n.prefixlen > 0]


def pick_subnets() -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]:
    """A free /30 for the link and a free /24 for the daemon's bridge, chosen at random."""
    used = host_prefixes()
    for _ in range(200):
        k = secrets.randbelow(LINK_POOL.num_addresses // 4)
        link = ipaddress.ip_network(f"{LINK_POOL.network_address + 4 * k}/30")
        bridge = ipaddress.ip_network(f"{BRIDGE_POOL.network_address + 256 * (k % 256)}/24")
        if not any(link.overlaps(n) or bridge.overlaps(n) for n in used):
            return link, bridge  # type: ignore[return-value]
    raise RuntimeError(f"no free /30 in {LINK_POOL} or /24 in {BRIDGE_POOL}")


def host_firewall() -> str:
    """The host's iptables rules (filter and nat), as ``iptables -S`` prints them."""
    return "".join(_run(["iptables", *t, "-S"]).stdout for t in ((), ("-t", "nat")))


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (even by SIGKILL), so
    a killed pytest does not leave the daemon running (it survives nsenter, unshare, sh
    and dockerd's exec: none of them is set-uid or has file capabilities)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _mnt_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


class RemoteEngine:
    """One private dockerd in its own network and mount namespaces (see the module doc)."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.netns = f"dockerrepl-remote-{self.tag}"
        self.veth_host = f"drr{self.tag}h"  # 10 characters: links are limited to 15
        self.veth_ns = f"drr{self.tag}n"
        self.cgroup_parent = f"dockerrepl-remote-{self.tag}"
        self.link, self.bridge = pick_subnets()
        hosts = list(self.link.hosts())
        self.host_addr, self.addr = str(hosts[0]), str(hosts[1])
        self.bip = f"{next(self.bridge.hosts())}/{self.bridge.prefixlen}"
        self.host = f"tcp://{self.addr}:{PORT}"
        self.env = {**main_env(), "DOCKER_HOST": self.host}
        # host side: only its log (the daemon's own files are in its private /tmp)
        self.log_dir = tempfile.mkdtemp(prefix="remote-engine-")
        self.log_path = os.path.join(self.log_dir, "dockerd.log")
        self.proc: Optional[subprocess.Popen[bytes]] = None
        # its mount namespaces, "mnt:[inode]" (one per start), to find what is left of it
        self.mnt_namespaces: set[str] = set()
        self.netns_made = self.veth_made = False
        self.driver = ""
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ the CLI
    def docker(
        self, *args: str, timeout: float = 60, input: Optional[str] = None
    ) -> subprocess.CompletedProcess[str]:
        """``docker -H <this engine> ARGS``, whatever its exit status."""
        return subprocess.run(
            ["docker", "-H", self.host, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=self.env,
        )

    def ids(self, kind: str, *filters: str) -> set[str]:
        """Ids (containers: any state) or names (volumes) on this engine matching ``filters``."""
        argv = ["ps", "-aq", "--no-trunc"] if kind == "container" else ["volume", "ls", "-q"]
        for f in filters:
            argv += ["--filter", f]
        out = self.docker(*argv, timeout=30)
        assert out.returncode == 0, out.stderr
        return set(out.stdout.split())

    # ------------------------------------------------------------------ network
    def make_network(self) -> Optional[str]:
        """The namespace and the veth pair; an error message when that is not allowed."""
        steps = [
            ["ip", "netns", "add", self.netns],
            # both ends made here, the daemon's end straight into its namespace
            ["ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns,
             "netns", self.netns],
            ["ip", "addr", "add", f"{self.host_addr}/30", "dev", self.veth_host],
            ["ip", "link", "set", self.veth_host, "up"],
            ["ip", "-n", self.netns, "addr", "add", f"{self.addr}/30", "dev", self.veth_ns],
            ["ip", "-n", self.netns, "link", "set", self.veth_ns, "up"],
            ["ip", "-n", self.netns, "link", "set", "lo", "up"],
        ]  # fmt: skip
        for i, argv in enumerate(steps):
            out = _run(argv)
            if out.returncode != 0:
                return f"`{' '.join(argv)}` failed: {out.stderr.strip()}"
            self.netns_made = True
            self.veth_made = self.veth_made or i == 1
        return None

    # ------------------------------------------------------------------ daemon
    def hidden_dirs(self) -> list[str]:
        """Host directories a fresh tmpfs covers on the daemon's side (outermost only)."""
        import dockerrepl

        candidates = [
            "/tmp",
            tempfile.gettempdir(),
            "/var/tmp",
            "/run",
            "/home",
            "/root",
            "/var/lib/docker",
            ROOT,
            os.path.dirname(os.path.dirname(os.path.abspath(dockerrepl.__file__))),
            sys.prefix,
        ]
        keep = ("/", "/usr", "/usr/local", "/etc", "/var", "/opt", "/bin", "/sbin", "/lib")
        dockerd = os.path.realpath(shutil.which("dockerd") or "/usr/sbin/dockerd")
        found: list[str] = []
        for c in candidates:
            p = os.path.realpath(c)
            if p in keep or not os.path.isdir(p) or dockerd.startswith(p + "/"):
                continue
            if not any(p == f or p.startswith(f + "/") for f in found):
                found = [f for f in found if not f.startswith(p + "/")] + [p]
        # /tmp first: the daemon's own files go there (nothing else is mounted under it)
        return sorted(found, key=lambda p: (p != "/tmp", p))

    def script(self) -> str:
        """What runs in the new mount namespace: the tmpfs mounts, then ``exec dockerd``."""
        state = "/tmp/engine"
        lines = ["set -e"]
        for d in self.hidden_dirs():
            opts = "mode=1777,size=16g" if d == "/tmp" else "mode=755,size=64m"
            lines.append(f"mount -t tmpfs -o {opts} {self.netns} {shlex.quote(d)}")
        lines += [
            f"mkdir -p {state}/root {state}/exec",
            f"printf '{{}}\\n' > {state}/config.json",  # not /etc/docker/daemon.json
            "exec "
            + shlex.join(
                [
                    "dockerd",
                    f"--config-file={state}/config.json",
                    f"--data-root={state}/root",
                    f"--exec-root={state}/exec",  # its own supervised containerd lives here
                    f"--pidfile={state}/pid",
                    f"--host={self.host}",
                    "--tls=false",
                    f"--bip={self.bip}",
                    "--iptables=true",  # the rules land in its own namespace's tables
                    "--ip6tables=false",
                    f"--cgroup-parent=/{self.cgroup_parent}",
                    f"--storage-driver={self.driver}",
                    "--shutdown-timeout=3",
                    "--log-level=warn",
                ]
            ),
        ]
        return "\n".join(lines)

    def start(self, driver: str) -> bool:
        """Start it and wait until it answers; False when it does not within START_WAIT."""
        self.driver = driver
        argv = [
            # nsenter and unshare exec (no fork: neither enters a PID namespace), and so does
            # sh: self.proc is dockerd itself
            *("nsenter", f"--net=/run/netns/{self.netns}"),
            *("unshare", "--mount", "--propagation", "private", "--"),
            *("sh", "-c", self.script()),
        ]
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"--- {driver}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd="/",
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        end = t0 + START_WAIT
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                out = self.docker("version", "--format", "{{.Server.Version}}", timeout=10)
                if out.returncode == 0 and out.stdout.strip():
                    assert self.note_mnt_ns(self.proc.pid), "dockerd runs in our mount namespace"
                    self.timings["start"] = time.monotonic() - t0
                    return True
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.2)
        return False

    def load(self, image: str) -> None:
        """``docker save IMAGE`` from the main engine into this one."""
        t0 = time.monotonic()
        save = subprocess.Popen(
            ["docker", "save", image], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=main_env(),
        )  # fmt: skip
        try:
            load = subprocess.run(
                ["docker", "-H", self.host, "load"],
                stdin=save.stdout,
                capture_output=True,
                timeout=300,
                env=self.env,
            )
        finally:
            assert save.stdout is not None
            save.stdout.close()
            saved = save.wait(timeout=60)
        assert saved == 0, f"docker save {image} failed"
        assert load.returncode == 0, load.stderr
        self.timings[f"load {image}"] = time.monotonic() - t0

    def check_isolation(self, image: str) -> None:
        """Our temp dirs, this checkout and the main engine's socket do not exist on its side."""
        t0 = time.monotonic()
        quick = self.docker("run", "--rm", "-i", image, "python3", "-c", "print(1)", input="")
        assert (quick.returncode, quick.stdout) == (0, "1\n"), quick.stderr
        made = tempfile.mkdtemp(prefix="remote-engine-probe-")
        try:
            with open(os.path.join(made, "secret"), "w") as f:
                f.write("host only\n")
            import dockerrepl

            package = os.path.dirname(os.path.abspath(dockerrepl.__file__))
            for src in (made, package, "/var/run/docker.sock"):
                # --mount does not create a missing source: the engine says so
                out = self.docker(
                    "run", "--rm", "--mount", f"type=bind,src={src},dst=/x", image, "true"
                )
                assert out.returncode != 0, f"{src} is visible to the 'remote' engine"
                assert "bind source path does not exist" in out.stderr, out.stderr
            # -v creates it, empty, on the engine's side; ours keeps its file
            out = self.docker("run", "--rm", "-v", f"{made}:/x", image, "ls", "-A", "/x")
            assert (out.returncode, out.stdout) == (0, ""), (out.stdout, out.stderr)
            assert os.listdir(made) == ["secret"]
        finally:
            shutil.rmtree(made, ignore_errors=True)
        self.timings["isolation check"] = time.monotonic() - t0

    def note_mnt_ns(self, pid: int) -> bool:
        """Remember ``pid``'s mount namespace if it is not ours (True if so)."""
        ns = _mnt_ns(pid)
        if ns and ns != _mnt_ns(os.getpid()):
            self.mnt_namespaces.add(ns)
            return True
        return False

    def log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        """SIGTERM the daemon (it stops its containers), SIGKILL it after STOP_WAIT."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        t0 = time.monotonic()
        if proc.poll() is None:
            self.note_mnt_ns(proc.pid)  # (still nsenter, in ours, if it is stopped at once)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        self.timings["stop"] = time.monotonic() - t0

    def leftover_pids(self) -> set[int]:
        """Processes that are this daemon's: in its mount namespace or its containers' cgroups."""
        pids: set[int] = set()
        ours = self.mnt_namespaces - {_mnt_ns(os.getpid()), ""}  # never the host's
        if ours:
            for entry in os.listdir("/proc"):
                if entry.isdigit() and _mnt_ns(int(entry)) in ours:
                    pids.add(int(entry))
        for d in self.cgroup_dirs():
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids.update(int(x) for x in f.read().split())
            except OSError:
                pass
        pids.discard(os.getpid())
        return pids

    def cgroup_dirs(self) -> list[str]:
        """Every cgroup directory under our ``--cgroup-parent``, deepest first."""
        found = []
        try:
            controllers = os.listdir("/sys/fs/cgroup")
        except OSError:
            return []
        for ctrl in controllers:
            top = os.path.join("/sys/fs/cgroup", ctrl, self.cgroup_parent)
            if os.path.isdir(top):
                for dirpath, _dirs, _files in os.walk(top):
                    found.append(dirpath)
        return sorted(found, key=len, reverse=True)

    def remove(self) -> list[str]:
        """Kill what is left of it (by pid), remove its cgroups, links, namespace, log dir.

        Returns what could not be cleaned (empty when all went).
        """
        problems = []
        end = time.monotonic() + 15
        left = self.leftover_pids()
        while left and time.monotonic() < end:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
            left = self.leftover_pids()
        if left:
            problems.append(f"processes of the private engine still alive: {sorted(left)}")
        for d in self.cgroup_dirs():
            for _ in range(50):  # a cgroup is busy for a moment after its last process
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        problems += [f"cgroup left: {d}" for d in self.cgroup_dirs()]
        if self.veth_made:
            # deleting one end deletes both; `ip netns delete` alone lets the host's end
            # linger until the kernel gets round to the namespace
            _run(["ip", "link", "delete", self.veth_host])
        if self.netns_made:
            out = _run(["ip", "netns", "delete", self.netns])
            if out.returncode != 0:
                problems.append(f"ip netns delete {self.netns}: {out.stderr.strip()}")
        end = time.monotonic() + 15
        while self.veth_host in host_links() and time.monotonic() < end:
            time.sleep(0.2)
        if self.veth_host in host_links():
            problems.append(f"link {self.veth_host} is still there")
        with open("/proc/self/mounts") as f:
            mounts = f.read()
        if self.netns in mounts:  # the name our tmpfs mounts carry as their source
            problems.append(f"a mount of the private engine is visible on the host: {mounts}")
        shutil.rmtree(self.log_dir, ignore_errors=True)
        return problems


@pytest.fixture(scope="session", name="remote_engine")
def remote_engine_fixture(image: str) -> Iterator[RemoteEngine]:
    """A private dockerd that is 'remote' (own network and mount namespaces), the image loaded.

    Session-scoped: started once (a few seconds), stopped and removed at the end, which
    then checks the host's links, iptables rules and main engine are as they were.
    """
    if os.geteuid() != 0:
        skip_or_fail("a private dockerd in its own namespaces needs root")
    for tool in TOOLS:
        if shutil.which(tool) is None:
            skip_or_fail(f"no {tool} on PATH")
    main_id = _run(["docker", "info", "--format", "{{.ID}}"], env=main_env()).stdout.strip()
    watched = main_links()
    links_before = {k: v for k, v in host_links().items() if k in watched}
    engine = RemoteEngine()
    try:
        why = engine.make_network()
        if why:
            skip_or_fail(f"cannot make a network namespace with a veth pair: {why}")
        if not engine.start("overlay2"):  # overlay2 on the private tmpfs works on 6.x
            engine.stop()
            if not engine.start("vfs"):
                skip_or_fail(
                    f"a private dockerd did not answer at {engine.host} within "
                    f"{START_WAIT:.0f}s: {engine.log_tail()}"
                )
        engine.load(image)
        engine.check_isolation(image)
        yield engine
    finally:
        firewall = host_firewall()
        engine.stop()
        problems = engine.remove()
        print(f"private engine {engine.host} ({engine.driver}): {engine.timings}")
    assert not problems, problems
    # the main engine's bridge (docker0) and the host's uplinks are as they were, addresses too
    after = host_links()
    assert {k: after.get(k) for k in links_before} == links_before
    # the host's iptables rules never named our subnets or links (checked while it ran)
    for needle in (str(engine.link), str(engine.bridge), engine.addr, engine.veth_host):
        assert needle not in firewall, f"host iptables rule mentions {needle}:\n{firewall}"
    # the main engine still answers, and is the same daemon
    assert _run(["docker", "info", "--format", "{{.ID}}"], env=main_env()).stdout.strip() == main_id
