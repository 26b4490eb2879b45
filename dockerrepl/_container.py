"""Container lifecycle: the hardened ``docker run -i`` and its framed stdio channel.

A :class:`Container` owns one ``docker run -i --rm`` process. Its stdin and
stdout carry length-prefixed JSON frames to and from the bootstrap supervisor.
Closing stdin is the dead-man switch: the supervisor exits, and ``--rm`` removes
the container, even when the host process was killed with SIGKILL.

Local-engine assumptions (bind mounts, ``host.docker.internal``) live here and
in :mod:`dockerrepl.repl` only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import select
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Optional

from . import _docker
from ._bootstrap import protocol
from ._labels import owner_label, pid_namespace, process_start_time
from ._wire import FrameBuffer, decode_body, encode_frame
from .errors import (
    BootstrapError,
    ContainerDied,
    DockerError,
    DockerReplError,
    FrameTooLarge,
    NoSuchImage,
    ProtocolError,
    ProxyError,
    SecurityCheckError,
)

# owner_label, pid_namespace and process_start_time live in _labels; re-exported here
# for the modules that still import them from _container
__all__ = [
    "Container",
    "ContainerConfig",
    "bridge_gateway",
    "owner_label",
    "pid_namespace",
    "process_start_time",
]

log = logging.getLogger(__name__)

#: The bootstrap package's name inside the container (dockerrepl/_bootstrap, staged).
BOOTSTRAP_PACKAGE = "dockerrepl_bootstrap"
MOUNT_POINT = "/workspace"
# The bootstrap's code (and the host's dill, when the image has none), mounted
# read-only from a host directory outside the workspace: cell code can write the
# workspace, and code kept there would run as the next container's supervisor.
CODE_MOUNT = "/opt/dockerrepl"
# With network="none" the LM proxy's unix socket sits in that directory too: the
# host binds and unlinks it in a directory no cell can swap for a symlink.
PROXY_SOCKET = "proxy.sock"


def bootstrap_launcher(code_dir: str = CODE_MOUNT) -> str:
    """The ``python -c`` code that starts the bootstrap staged in ``code_dir``.

    sys.path[0] is the code directory (the workspace, the cwd, is not on the path:
    a cell could put modules there).
    """
    return (
        f"import sys; sys.path[0] = {code_dir!r}; from {BOOTSTRAP_PACKAGE}.main import main; main()"
    )


BOOTSTRAP_LAUNCHER = bootstrap_launcher()
#: The smallest memory limit the engine accepts ("Minimum memory limit allowed is 6MB").
MIN_MEMORY = 6 << 20
#: The default CPU limit of a container (see DockerREPL's ``cpus``).
DEFAULT_CPUS = 1.0
#: The smallest CPU limit the engine accepts (docker's own range starts at 0.01).
MIN_CPUS = 0.01

# Which interpreter name works in an image (python3 or python), learned once per image.
_PYTHON_FOR_IMAGE: dict[tuple[str, str], str] = {}
_GATEWAY_CACHE: dict[tuple[str, str], str] = {}
_cache_lock = threading.Lock()


def bridge_gateway(docker: str = "docker") -> str:
    """The host address that ``host-gateway`` maps to: the default bridge's gateway.

    Cached per docker binary and ``DOCKER_HOST``.
    """
    key = (docker, os.environ.get("DOCKER_HOST", ""))
    with _cache_lock:
        if key in _GATEWAY_CACHE:
            return _GATEWAY_CACHE[key]
    res = _docker.run(
        ["network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"],
        timeout=20,
        docker=docker,
    )
    gateway = ""
    try:
        for cfg in json.loads(res.stdout.strip() or "[]") or []:
            if cfg.get("Gateway"):
                gateway = cfg["Gateway"]
                break
            if cfg.get("Subnet") and ":" not in cfg["Subnet"]:
                # docker gives the bridge the first host address of its subnet
                gateway = str(next(ipaddress.ip_network(cfg["Subnet"], strict=False).hosts()))
                break
    except (ValueError, StopIteration):
        gateway = ""
    if not gateway:
        raise ProxyError(
            "could not determine the docker bridge gateway address"
            " from `docker network inspect bridge`"
        )
    with _cache_lock:
        _GATEWAY_CACHE[key] = gateway
    return gateway


@dataclass
class ContainerConfig:
    """Everything ``docker run`` needs to know (see :class:`dockerrepl.DockerREPL`)."""

    image: str
    workspace: str
    docker: str = "docker"
    memory: Optional[str] = "2g"
    cpus: Optional[float] = DEFAULT_CPUS
    pids_limit: Optional[int] = 512
    network: str = "bridge"
    user: Optional[str] = None
    read_only: bool = False
    runtime: Optional[str] = None
    labels: dict[str, str] = field(default_factory=dict)
    extra_args: Sequence[str] = ()
    #: host directory with the bootstrap, mounted read-only at CODE_MOUNT
    code_dir: str = ""
    start_timeout: float = 120.0
    tmpfs_size: str = "256m"

    def run_argv(self, name: str, python: str) -> list[str]:
        """The ``docker run`` arguments (without the leading ``docker``)."""
        # --sig-proxy=false: a Ctrl-C in the user's terminal reaches the docker CLI (same
        # process group) and must not be forwarded into the container; interrupts are
        # sent deliberately, as frames, by DockerREPL.interrupt()
        # No --init: the bootstrap supervisor is pid 1 and reaps orphans itself. An
        # init process would hold the host channel (its fds 0/1) where cell code can
        # open it through /proc/1/fd; the supervisor makes itself non-dumpable so that
        # /proc/<it>/fd is closed to cell code, and pid 1 ignores signals sent from
        # inside the container that it has no handler for (SIGKILL, SIGSTOP included).
        argv = ["run", "-i", "--rm", "--sig-proxy=false", "--name", name]
        argv += ["--pull", "missing"]
        for k, v in sorted(self.labels.items()):
            argv += ["--label", f"{k}={v}"]
        argv += ["-v", f"{self.workspace}:{MOUNT_POINT}", "-w", MOUNT_POINT]
        if self.code_dir:
            argv += ["-v", f"{self.code_dir}:{CODE_MOUNT}:ro"]
        if self.network == "none":
            argv += ["--network", "none"]
        elif self.network == "bridge":
            argv += ["--network", "bridge", "--add-host", "host.docker.internal:host-gateway"]
        else:
            raise ValueError(f"network must be 'bridge' or 'none', not {self.network!r}")
        argv += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        if self.pids_limit:
            argv += ["--pids-limit", str(int(self.pids_limit))]
        if self.memory:
            # swap off: --memory-swap equal to --memory
            argv += ["--memory", str(self.memory), "--memory-swap", str(self.memory)]
        if self.cpus:
            argv += ["--cpus", cpus_arg(self.cpus)]
        if self.user:
            argv += ["--user", str(self.user)]
        if self.read_only:
            size = tmpfs_size(self.tmpfs_size, self.memory)
            argv += ["--read-only", "--tmpfs", f"/tmp:rw,nosuid,nodev,size={size}"]
        if self.runtime:
            argv += ["--runtime", self.runtime]
        argv += list(self.extra_args)
        argv += ["--entrypoint", python, self.image, "-B", "-c", BOOTSTRAP_LAUNCHER]
        return argv


# docker run options extra_args may not carry. The channel and lifecycle need -i without
# a tty, attached, under our name and entrypoint, removed on exit; the host's
# environment never goes in; limits and hardening have their own arguments.
_CHANNEL_FLAGS = {
    "-t": "a tty would corrupt the framed channel",
    "--tty": "a tty would corrupt the framed channel",
    "-d": "the container must stay attached to its owner",
    "--detach": "the container must stay attached to its owner",
    "-a": "the container must stay attached to its owner",
    "--attach": "the container must stay attached to its owner",
    "--name": "dockerrepl names its containers",
    "--entrypoint": "the bootstrap is the entrypoint",
    "--rm": "already given",
    "-i": "already given",
    "--interactive": "already given",
    "--sig-proxy": "interrupts are sent as frames",
    "--init": "an init process would share the supervisor's host channel",
    "-e": "the host's environment never goes in; set variables with setup_code",
    "--env": "the host's environment never goes in; set variables with setup_code",
    "--env-file": "the host's environment never goes in; set variables with setup_code",
}
_OWN_OPTION = {
    "--network": "network=",
    "--net": "network=",
    "-u": "user=",
    "--user": "user=",
    "--read-only": "read_only=",
    "-m": "memory=",
    "--memory": "memory=",
    "--memory-swap": "memory= (swap is always off)",
    "--cpus": "cpus=",
    "--pids-limit": "pids_limit=",
    "--runtime": "runtime=",
}
# they widen what cell code may do past the documented defaults (docs/security.md)
_WIDENING = {
    "--privileged",
    "--cap-add",
    "--security-opt",
    "--pid",
    "--ipc",
    "--uts",
    "--userns",
    "--cgroupns",
    "--device-cgroup-rule",
}


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
# docker's RAMInBytes: a number, an optional space, a binary unit, then "i" and "b"
# (each optional): "2g", "1.5g", "256mb", "512MiB", "1073741824"
_SIZE = re.compile(r"(\d+(?:\.\d+)?) ?([kmgtp]?)i?b?", re.IGNORECASE)


def memory_bytes(value: Optional[str]) -> Optional[int]:
    """Docker's size notation (``"256m"``, ``"2g"``, ``"1.5g"``, bytes) in bytes, or None.

    None too for what docker would refuse (``"lots"``, ``"1e3g"``, ``"-1g"``) and for 0.
    """
    if value is None:
        return None
    match = _SIZE.fullmatch(str(value).strip())
    if match is None:
        return None
    n = int(float(match.group(1)) * _UNITS[match.group(2).lower()])  # as docker computes it
    return n if n > 0 else None


def cpus_arg(cpus: float) -> str:
    """``--cpus``'s value, exact to the nanocpu that ``docker inspect`` shows (NanoCpus).

    ``str(0.1 + 0.2)`` is "0.30000000000000004", which docker refuses as too precise.
    """
    nano = round(cpus * 1e9)
    whole, frac = divmod(nano, 10**9)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


def tmpfs_size(default: str, memory: Optional[str]) -> str:
    """The read-only mode's ``/tmp`` size: ``default``, but at most a quarter of the
    memory limit. tmpfs pages count against the container's memory: a /tmp as large as
    the limit let a cell fill it until no worker could start again (3 minutes wedged
    with memory="256m" before the host replaced the container)."""
    limit = memory_bytes(memory)
    want = memory_bytes(default) or 256 << 20
    if limit is None:
        return default
    return f"{max(1, min(want, limit // 4) >> 20)}m"


def check_extra_args(extra_args: Any, allow_widening: bool) -> tuple[str, ...]:
    """Validate ``DockerREPL(extra_args=...)``: a sequence of str, no option we own.

    Raises ``TypeError`` for anything but a list/tuple of str and ``ValueError``
    for an option that would break the channel, pass the host's environment, or
    duplicate one of DockerREPL's own arguments. Options that widen the sandbox
    (``--privileged``, ``--cap-add``, ...) are refused unless ``allow_widening``
    (``verify_security=False``).
    """
    if isinstance(extra_args, (str, bytes)) or not isinstance(extra_args, (list, tuple)):
        raise TypeError(f"extra_args must be a list of str, not {type(extra_args).__name__}")
    for arg in extra_args:
        if not isinstance(arg, str):
            raise TypeError(f"extra_args must be a list of str; got {arg!r}")
        if arg.startswith("--"):
            names = [arg.split("=", 1)[0]]
        elif arg.startswith("-") and len(arg) > 1:
            names = ["-" + c for c in arg[1:].split("=", 1)[0]]  # -it is -i and -t
        else:
            names = []
        for name in names:
            if name in _CHANNEL_FLAGS:
                raise ValueError(f"extra_args may not contain {name}: {_CHANNEL_FLAGS[name]}")
            if name in _OWN_OPTION:
                raise ValueError(f"extra_args may not contain {name}: use {_OWN_OPTION[name]}")
            if name in _WIDENING and not allow_widening:
                raise ValueError(
                    f"extra_args may not contain {name}: it widens the sandbox past its"
                    " defaults (pass verify_security=False to take that on yourself)"
                )
    return tuple(extra_args)


class Container:
    """One running sandbox container and its framed channel.

    Not thread-safe by itself: :class:`dockerrepl.DockerREPL` serialises use.
    """

    def __init__(self, config: ContainerConfig, log_path: str, max_frame: int = 256 << 20) -> None:
        self.config = config
        self.log_path = log_path
        self.max_frame = max_frame
        self.name = "dockerrepl-" + secrets.token_hex(6)
        self.proc: Optional[_docker.Process] = None
        self._frames = FrameBuffer(max_frame)
        self._log: Optional[IO[bytes]] = None
        self.info: dict[str, Any] = {}
        self.id: Optional[str] = None
        #: a frame to the container was cut short: the channel is out of step for good
        self.broken = False
        #: abort() was called (from any thread): the container must not start
        self.aborted = False
        self._stdin_nonblocking = False

    # -- start ---------------------------------------------------------------
    def start(self, hello: dict[str, Any]) -> dict[str, Any]:
        """Start the container, send ``hello`` and wait for the bootstrap's ``ready``."""
        key = (self.config.docker, self.config.image)
        with _cache_lock:
            candidates = (
                [_PYTHON_FOR_IMAGE[key]] if key in _PYTHON_FOR_IMAGE else ["python3", "python"]
            )
        last: Optional[BaseException] = None
        for python in candidates:
            try:
                ready = self._start_with(python, hello)
            except _NoInterpreter as exc:
                last = exc
                continue
            with _cache_lock:
                _PYTHON_FOR_IMAGE[key] = python
            return ready
        raise BootstrapError(
            f"image {self.config.image!r} has neither `python3` nor `python` on its PATH"
            " (dockerrepl needs Python 3.8+ in the image)"
        ) from last

    def _start_with(self, python: str, hello: dict[str, Any]) -> dict[str, Any]:
        self._frames = FrameBuffer(self.max_frame)
        self._log = open(self.log_path, "wb")
        self.proc = _docker.spawn(
            self.config.run_argv(self.name, python), docker=self.config.docker, stderr=self._log
        )
        if self.aborted:  # abort() came before there was a process to stop
            self.kill()
            raise ContainerDied("the container was aborted while it started")
        deadline = time.monotonic() + self.config.start_timeout
        try:
            # Pipelined: the hello waits in the pipe while the container starts.
            try:
                self.send(hello, deadline)
            except ContainerDied:
                pass
            ready = self.recv(deadline)
        except ContainerDied:
            self._raise_start_failure(python)
            raise
        except DockerReplError:
            self.kill()
            raise
        except TimeoutError:
            self.kill()
            raise BootstrapError(
                f"the container was not ready within start_timeout={self.config.start_timeout:g}s;"
                f" log tail:\n{self.log_tail()}"
            ) from None
        except BaseException:
            # e.g. KeyboardInterrupt: a half-started container must not outlive the call
            self.kill()
            raise
        if ready.get("type") != "ready":
            self.kill()
            raise BootstrapError(f"bootstrap did not start: {ready.get('error') or ready!r}")
        if ready.get("version") != protocol.VERSION:
            self.kill()
            raise BootstrapError(
                f"bootstrap protocol version {ready.get('version')!r} != host's {protocol.VERSION}"
            )
        self.info = ready
        return ready

    def _raise_start_failure(self, python: str) -> None:
        rc = self.wait(10)
        text = self.log_tail()
        # runc says "executable file not found"; with --init, tini says "exec python3 failed"
        missing = "executable file not found" in text or f"exec {python} failed" in text
        if rc == 127 and missing and python in text:
            raise _NoInterpreter(text)
        if rc == 125 or "Error response from daemon" in text or rc is None:
            err = _docker.classify_error(text, rc if rc is not None else -1, ["docker", "run"])
            if isinstance(err, NoSuchImage):
                err = NoSuchImage(
                    f"image {self.config.image!r} is not present and could not be pulled",
                    err.hint,
                    text,
                    err.returncode,
                )
            raise err
        raise BootstrapError(
            f"container exited with {rc} before the bootstrap was ready; log tail:\n{text}"
        )

    # -- channel -------------------------------------------------------------
    def send(self, obj: Any, deadline: Optional[float] = None) -> None:
        """Write one frame to the container's stdin, waiting until ``deadline`` (monotonic).

        The pipe is non-blocking: a container that stops reading (``docker
        pause``, a stuck supervisor) fills it, and the write gives up at the
        deadline with ``TimeoutError`` instead of hanging. A frame cut short
        by that (or by any exception, e.g. ``KeyboardInterrupt``) leaves the
        channel out of step: :attr:`broken` is set and every later send
        raises :class:`ContainerDied`. Frames up to ``PIPE_BUF`` (4 KiB) are
        written whole or not at all.
        """
        proc = self.proc
        if proc is None or proc.stdin is None:
            raise ContainerDied("the container is not running")
        if self.broken:
            raise ContainerDied("an earlier frame to the container was cut short")
        data = memoryview(encode_frame(obj))
        sent = 0
        try:
            fd = proc.stdin.fileno()
            if not self._stdin_nonblocking:
                os.set_blocking(fd, False)
                self._stdin_nonblocking = True
            while sent < len(data):
                try:
                    sent += os.write(fd, data[sent:])
                    continue
                except BlockingIOError:
                    pass
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    raise TimeoutError(
                        f"the container did not take a {len(data)}-byte frame before the deadline"
                        f" ({sent} bytes written)"
                    )
                select.select([], [fd], [], None if timeout is None else min(timeout, 3600.0))
        except BaseException as exc:
            if 0 < sent < len(data):
                self.broken = True
            if isinstance(exc, (OSError, ValueError)) and not isinstance(exc, TimeoutError):
                raise ContainerDied(
                    f"the container's stdin is closed ({exc.__class__.__name__})"
                ) from None
            raise

    def recv(self, deadline: Optional[float]) -> dict[str, Any]:
        """Read one frame, waiting until ``deadline`` (monotonic); ``TimeoutError`` after it."""
        proc = self.proc
        if proc is None or proc.stdout is None:
            raise ContainerDied("the container is not running")
        fd = proc.stdout.fileno()
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise TimeoutError("no frame from the container before the deadline")
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                continue
            try:
                data = os.read(fd, 1 << 20)
            except OSError as exc:
                raise ContainerDied(f"reading from the container failed: {exc}") from None
            if not data:
                where = " in the middle of a frame" if self._frames.mid_frame() else ""
                raise ContainerDied(
                    f"the container's output closed{where} (it exited or was killed)"
                )
            self._frames.feed(data)

    def _parse(self) -> Optional[dict[str, Any]]:
        try:
            body = self._frames.take()
        except FrameTooLarge as exc:
            self.kill()
            raise FrameTooLarge(f"from the container: {exc}") from None
        if body is None:
            return None
        obj = decode_body(body)
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise ProtocolError("container sent a frame that is not an object with a 'type'")
        return obj

    # -- state ---------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> Optional[int]:
        if self.proc is None:
            return None
        return self.proc.wait(timeout)

    def log_tail(self, limit: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - limit))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def container_id(self, timeout: float = 20) -> str:
        """The engine's id for this container (asked once, then cached)."""
        if self.id is None:
            res = _docker.run(
                ["inspect", "--format", "{{.Id}}", self.name],
                timeout=timeout,
                docker=self.config.docker,
            )
            self.id = res.stdout.strip()
        return self.id

    def inspect(self, timeout: float = 20) -> dict[str, Any]:
        res = _docker.run(["inspect", self.name], timeout=timeout, docker=self.config.docker)
        data = json.loads(res.stdout)
        if not data:
            raise ContainerDied(f"docker inspect {self.name} returned nothing")
        out: dict[str, Any] = data[0]
        self.id = out.get("Id", self.id)
        return out

    def verify(self, attrs: dict[str, Any]) -> None:
        """Fail closed if the engine did not apply the hardening that was asked for."""
        hc = attrs.get("HostConfig") or {}
        problems = []
        caps = [c.upper() for c in (hc.get("CapDrop") or [])]
        if "ALL" not in caps and "CAP_ALL" not in caps:
            problems.append(f"CapDrop is {hc.get('CapDrop')!r}, not ALL")
        if not any("no-new-privileges" in s for s in (hc.get("SecurityOpt") or [])):
            problems.append("no-new-privileges is not set")
        cfg = self.config
        if cfg.pids_limit and (hc.get("PidsLimit") or 0) != int(cfg.pids_limit):
            problems.append(f"PidsLimit is {hc.get('PidsLimit')!r}, not {cfg.pids_limit}")
        want_mem = memory_bytes(cfg.memory) if cfg.memory else None
        if cfg.memory and not hc.get("Memory"):
            problems.append("no memory limit was applied")
        elif want_mem is not None and hc.get("Memory") != want_mem:
            problems.append(f"Memory is {hc.get('Memory')!r}, not {want_mem}")
        if cfg.cpus and hc.get("NanoCpus") != round(float(cfg.cpus) * 1e9):
            problems.append(f"NanoCpus is {hc.get('NanoCpus')!r}, not {cfg.cpus} CPUs")
        if cfg.memory and hc.get("MemorySwap") not in (hc.get("Memory"),):
            problems.append("swap is not off (MemorySwap != Memory)")
        if cfg.read_only and not hc.get("ReadonlyRootfs"):
            problems.append("the root filesystem is not read-only")
        if cfg.read_only:
            tmp = str((hc.get("Tmpfs") or {}).get("/tmp", ""))
            size = tmpfs_size(cfg.tmpfs_size, cfg.memory)
            if f"size={size}" not in tmp.split(","):
                problems.append(f"/tmp is not a tmpfs of {size} (Tmpfs: {hc.get('Tmpfs')!r})")
        if cfg.network == "none" and hc.get("NetworkMode") != "none":
            problems.append(f"NetworkMode is {hc.get('NetworkMode')!r}, not none")
        if cfg.user and (attrs.get("Config") or {}).get("User") != cfg.user:
            problems.append(f"User is {(attrs.get('Config') or {}).get('User')!r}")
        if problems:
            raise SecurityCheckError("the engine did not apply: " + "; ".join(problems))

    # -- stop ----------------------------------------------------------------
    def close(self, timeout: float = 10.0, purge: bool = False, kill_timeout: float = 30.0) -> None:
        """Ask the supervisor to exit, close stdin, and wait; kill if it lingers."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    self.send({"type": "shutdown", "purge": purge}, time.monotonic() + 1.0)
                except (DockerReplError, TimeoutError):
                    pass  # closing stdin below ends the supervisor all the same
            proc.close_stdin()
            if self.wait(timeout) is None:
                self.kill(kill_timeout)
        finally:
            self._release()

    def detach(self, purge: bool = False) -> None:
        """Close the channel now, waiting for nothing and starting no process.

        For the interpreter's teardown: the shutdown frame goes only if the pipe
        takes it at once; either way the supervisor sees EOF and exits, ``--rm``
        removes the container, and the CLI process exits by itself.
        """
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self.send({"type": "shutdown", "purge": purge}, time.monotonic())
        except (DockerReplError, TimeoutError, OSError):
            pass
        finally:
            self._release()

    def abort(self, timeout: float = 30.0) -> None:
        """Stop the container now, from any thread, without waiting for its owner.

        Kills the ``docker run`` CLI (the owner's read sees EOF at once) and
        removes the container (``docker rm -f``). The pipes stay open for the
        thread that uses them; :meth:`close` or :meth:`kill` releases them.
        """
        self.aborted = True
        proc = self.proc
        if proc is None:
            return
        proc.kill()
        self._remove(timeout)

    def _remove(self, timeout: float) -> None:
        try:
            _docker.run(
                ["rm", "-f", self.name], timeout=timeout, docker=self.config.docker, check=False
            )
        except DockerError as exc:
            log.warning("docker rm -f %s failed: %s", self.name, exc)

    def kill(self, timeout: float = 30.0) -> None:
        """Remove the container now (``docker rm -f``) and reap the CLI process."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self._remove(timeout)
                proc.close_stdin()
                if self.wait(min(10.0, timeout)) is None:
                    proc.kill()
                    self.wait(5)
        finally:
            self._release()

    def _release(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.close()
        if self._log is not None:
            self._log.close()
            self._log = None


class _NoInterpreter(BootstrapError):
    """Internal: the tried interpreter name does not exist in the image."""
