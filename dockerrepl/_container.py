"""Container lifecycle: the hardened ``docker run -i`` and its framed stdio channel.

A :class:`Container` owns one ``docker run -i --rm`` process. Its stdin and
stdout carry length-prefixed JSON frames to and from the bootstrap supervisor.
Closing stdin is the dead-man switch: the supervisor exits, and ``--rm`` removes
the container, even when the host process was killed with SIGKILL.

What the container is told (mounts, limits, hardening) is in
:mod:`dockerrepl._runspec`; the local-engine assumptions (bind mounts,
``host.docker.internal``) live there, in :mod:`dockerrepl._workspace` and in
:mod:`dockerrepl._session` only.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import os
import secrets
import select
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Optional, Union

from . import _docker
from ._bootstrap import protocol
from ._runspec import ContainerConfig, memory_bytes, tmpfs_size
from ._staging import code_frame, launcher, loader_frame
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
    TransportUnavailable,
)

__all__ = ["Container", "bridge_gateway"]

log = logging.getLogger(__name__)

# Which interpreter name works in an image (python3 or python), learned once per image.
_PYTHON_FOR_IMAGE: dict[tuple[_docker.Engine, str], str] = {}
_GATEWAY_CACHE: dict[tuple[str, ...], str] = {}
_cache_lock = threading.Lock()

# what `docker run` / `podman run` say when a bind mount's source is not on their host
_NO_BIND_SOURCE = (
    "bind source path does not exist",
    'invalid mount config for type "bind"',
    "statfs ",  # podman
)
#: Linux capability sets the bootstrap reports (ready["caps"]); all must be empty.
_CAP_SETS = ("CapEff", "CapPrm", "CapBnd", "CapAmb")


def relay_env() -> Optional[dict[str, str]]:
    """The environment of the long-lived ``docker run -i`` CLI: ours, with ``GOMAXPROCS=1``.

    The CLI only copies two streams; with one Go thread per core it spins looking
    for work after every frame. Measured with 16 busy sessions on 2 cores: the CLI
    took 0.8-1.2 ms of CPU per cell, 0.19-0.31 ms with ``GOMAXPROCS=1``, and the
    aggregate rate rose ~1.5x (docs/benchmarks.md, "Many sessions at once"). The
    price is ~10% on bulk bytes over the pipe (a 10 MB ``load_context`` with the
    channel transport; docs/architecture.md). A ``GOMAXPROCS`` the user set is kept.
    Read per start, never changed in ``os.environ``.
    """
    if "GOMAXPROCS" in os.environ:
        return None  # inherit it, with the rest
    return {**os.environ, "GOMAXPROCS": "1"}


def bridge_gateway(docker: Union[str, _docker.Engine] = "docker") -> str:
    """The host address that ``host-gateway`` maps to: the default bridge's gateway.

    Cached per engine (binary and ``--host``/``--context``; without those, the
    ``DOCKER_HOST`` / ``DOCKER_CONTEXT`` the CLI reads). Podman has no such bridge
    for our proxy: :class:`TransportUnavailable` at once, before any command runs.
    """
    engine = _docker.as_engine(docker)
    if engine.podman:
        raise TransportUnavailable(_docker.PODMAN_BRIDGE)
    key = engine.cache_key()
    with _cache_lock:
        if key in _GATEWAY_CACHE:
            return _GATEWAY_CACHE[key]
    try:
        res = _docker.run(
            ["network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"],
            timeout=20,
            docker=engine,
        )
    except DockerError as exc:
        # Podman behind a `docker` name (podman-docker) has no network called bridge
        if "network not found" in exc.stderr or "unable to find network" in exc.stderr:
            raise TransportUnavailable(_docker.PODMAN_BRIDGE + f" ({exc})") from None
        raise
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


class Container:
    """One running sandbox container and its framed channel.

    Not thread-safe by itself: :class:`dockerrepl.DockerREPL` serialises use.
    """

    def __init__(
        self,
        config: ContainerConfig,
        log_path: str,
        max_frame: int = 256 << 20,
        copy_dill: bool = True,
        on_rpc: Optional[Callable[[dict[str, Any]], None]] = None,
    ) -> None:
        self.config = config
        #: send the host's dill with the code (the image may have none)
        self.copy_dill = copy_dill
        #: where ``rpc`` frames go (the channel transport); None: they are protocol errors
        self.on_rpc = on_rpc
        # held by the thread reading the container's stdout: a send blocked on a full
        # pipe reads too (into the frame buffer) only when it can take this lock
        self._read_lock = threading.Lock()
        # frames read by poll_rpc() that were not rpc: recv() returns them first
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
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
        key = (_docker.as_engine(self.config.docker), self.config.image)
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
                self._release()  # that try's CLI process and log file
                continue
            with _cache_lock:
                _PYTHON_FOR_IMAGE[key] = python
            return ready
        raise BootstrapError(
            f"image {self.config.image!r} has neither `python3` nor `python` on its PATH"
            " (dockerrepl needs Python 3.8+ in the image)"
        ) from last

    def _start_with(self, python: str, hello: dict[str, Any]) -> dict[str, Any]:
        # a new process: nothing of an earlier try's pipes carries over (a code frame cut
        # short by a container without this interpreter left `broken` set)
        self._frames = FrameBuffer(self.max_frame)
        self._pending.clear()
        self.broken = False
        self._stdin_nonblocking = False
        self._log = open(self.log_path, "wb")
        self.proc = _docker.spawn(
            self.config.run_argv(self.name, python, launcher()),
            docker=self.config.docker,
            stderr=self._log,
            env=relay_env(),
        )
        if self.aborted:  # abort() came before there was a process to stop
            self.kill()
            raise ContainerDied("the container was aborted while it started")
        deadline = time.monotonic() + self.config.start_timeout
        try:
            # Pipelined: the code and the hello wait in the pipe while the container starts.
            try:
                self._write(loader_frame() + code_frame(copy_dill=self.copy_dill), deadline)
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
        mounts_host_dirs = self.config.code_dir or not self.config.workspace_volume
        if mounts_host_dirs and any(s in text for s in _NO_BIND_SOURCE):
            # the engine does not have the host directory we asked it to mount: it runs
            # elsewhere (a remote engine, a VM, the host of a socket-mounted container)
            raise TransportUnavailable(
                "the engine cannot mount this host's directories (it runs elsewhere, or"
                " rootless as another user):"
                f" {text.strip()[-300:]}; use transport='channel' (or 'auto')"
            )
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
        self._write(encode_frame(obj), deadline)

    def _write(self, frame: bytes, deadline: Optional[float]) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None:
            raise ContainerDied("the container is not running")
        if self.broken:
            raise ContainerDied("an earlier frame to the container was cut short")
        data = memoryview(frame)
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
                self._wait_writable(fd, None if timeout is None else min(timeout, 3600.0))
        except BaseException as exc:
            if 0 < sent < len(data):
                self.broken = True
            if isinstance(exc, (OSError, ValueError)) and not isinstance(exc, TimeoutError):
                raise ContainerDied(
                    f"the container's stdin is closed ({exc.__class__.__name__})"
                ) from None
            raise

    def _wait_writable(self, fd: int, timeout: Optional[float]) -> None:
        """Wait until stdin takes more, reading stdout meanwhile when no other thread is.

        The supervisor writes its frames blocking: while it writes (an ``rpc`` of the
        channel transport, a cell's output) it reads nothing, and a host that only
        wrote would wait for it as it waits for the host. The bytes read go to the
        frame buffer; the next :meth:`recv` takes the frames.
        """
        proc = self.proc
        out = proc.stdout if proc is not None else None
        if out is None or not self._read_lock.acquire(blocking=False):
            select.select([], [fd], [], timeout)
            return
        try:
            ofd = out.fileno()
            readable, _, _ = select.select([ofd], [fd], [], timeout)
            if readable and not self._read_frames(ofd):
                # the container's output closed: its stdin will not take more either
                raise ContainerDied("the container's output closed (it exited or was killed)")
        finally:
            self._read_lock.release()

    def _read_frames(self, fd: int) -> bool:
        """Read what stdout has and take out every whole frame at once, so what is held
        stays bounded: ``rpc`` ones go to :attr:`on_rpc` (whose bytes in flight are
        capped), the others wait in :attr:`_pending` for :meth:`recv`. False at EOF.
        The caller holds the read lock."""
        data = os.read(fd, 1 << 20)
        if not data:
            return False
        self._frames.feed(data)
        while True:
            frame = self._parse()
            if frame is None:
                return True
            if not self._served(frame):
                self._pending.append(frame)

    def _served(self, frame: dict[str, Any]) -> bool:
        """An ``rpc`` frame handed to :attr:`on_rpc` (True); any other is the caller's."""
        if frame["type"] == "rpc" and self.on_rpc is not None:
            self.on_rpc(frame)
            return True
        return False

    def recv(self, deadline: Optional[float]) -> dict[str, Any]:
        """Read one frame, waiting until ``deadline`` (monotonic); ``TimeoutError`` after it.

        ``rpc`` frames (the channel transport) are handed to :attr:`on_rpc` on the way
        and never returned.
        """
        proc = self.proc
        if proc is None or proc.stdout is None:
            raise ContainerDied("the container is not running")
        fd = proc.stdout.fileno()
        with self._read_lock:
            while True:
                frame = self._pending.popleft() if self._pending else self._parse()
                if frame is not None:
                    if self._served(frame):
                        continue
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

    def poll_rpc(self, timeout: float) -> bool:
        """Between requests (nobody in :meth:`recv`): wait up to ``timeout`` for output
        and hand any ``rpc`` frames to :attr:`on_rpc`; other frames wait for ``recv``.

        So a call made by code a cell left running (a thread) is answered now, as
        the proxy transport answers it, not when the next request comes. Returns
        False once the container's output has closed.
        """
        proc = self.proc
        if proc is None or proc.stdout is None:
            return False
        fd = proc.stdout.fileno()
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        except (OSError, ValueError):
            return False
        if not ready or not self._read_lock.acquire(blocking=False):
            return True
        try:
            if not select.select([fd], [], [], 0)[0]:
                return True  # recv() took it meanwhile
            return self._read_frames(fd)  # at EOF, recv() will say so
        except (OSError, DockerReplError):
            return False
        finally:
            self._read_lock.release()

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
        problems += self._capability_problems(hc)
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
        problems += self._enforced_problems()
        if cfg.network == "none" and hc.get("NetworkMode") != "none":
            problems.append(f"NetworkMode is {hc.get('NetworkMode')!r}, not none")
        if cfg.user and (attrs.get("Config") or {}).get("User") != cfg.user:
            problems.append(f"User is {(attrs.get('Config') or {}).get('User')!r}")
        if problems:
            raise SecurityCheckError("the engine did not apply: " + "; ".join(problems))

    def _enforced_problems(self) -> list[str]:
        """What the container's own cgroup enforces (its ``ready`` report), against what
        was asked: an engine can show limits in ``inspect`` that it does not apply
        (rootless Docker on a host without cgroup delegation: a cell took 600 MiB under
        ``memory="128m"``)."""
        limits = self.info.get("limits")
        if not isinstance(limits, dict):
            return []  # no report (an older bootstrap): inspect is all there is
        cfg, problems = self.config, []
        want_mem = memory_bytes(cfg.memory) if cfg.memory else None
        got = limits.get("memory")
        if want_mem is not None and not (isinstance(got, int) and got <= want_mem):
            problems.append(f"the container's cgroup enforces no memory limit of {cfg.memory}")
        got = limits.get("pids")
        if cfg.pids_limit and not (isinstance(got, int) and got <= int(cfg.pids_limit)):
            problems.append(f"the container's cgroup enforces no pids limit of {cfg.pids_limit}")
        got = limits.get("cpus")
        if cfg.cpus and not (isinstance(got, (int, float)) and got <= float(cfg.cpus) + 1e-6):
            problems.append(f"the container's cgroup enforces no CPU limit of {cfg.cpus}")
        if problems:
            problems.append(
                "(the engine shows limits it does not apply: rootless without cgroup"
                " delegation? pass memory=None, cpus=None, pids_limit=None to run unlimited)"
            )
        return problems

    def _capability_problems(self, hc: dict[str, Any]) -> list[str]:
        """Docker shows ``CapDrop: ["ALL"]``; Podman lists each capability it dropped.

        A list is accepted only with no ``CapAdd`` and the bootstrap's own report
        (``/proc/self/status`` of pid 1, read before any cell ran) showing every
        capability set empty; the report, when there is one, is checked on Docker too.
        """
        problems = []
        drop = [str(c).upper() for c in (hc.get("CapDrop") or [])]
        if hc.get("CapAdd"):
            problems.append(f"CapAdd is {hc.get('CapAdd')!r}, not empty")
        reported = self.info.get("caps")
        if isinstance(reported, dict):
            for name in _CAP_SETS:
                try:
                    value = int(str(reported.get(name)), 16)
                except ValueError:
                    problems.append(f"the container reported no {name}")
                    continue
                if value:
                    problems.append(f"the container's {name} is {reported.get(name)}, not 0")
        if "ALL" in drop or "CAP_ALL" in drop:
            return problems
        if not drop:
            problems.append(f"CapDrop is {hc.get('CapDrop')!r}, not ALL")
        elif not isinstance(reported, dict):
            problems.append(
                f"CapDrop is {hc.get('CapDrop')!r}, not ALL, and the container did not"
                " report its capability sets"
            )
        return problems

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
            if self._drain_until_exit(timeout) is None:
                self.kill(kill_timeout)
        finally:
            self._release()

    def _drain_until_exit(self, timeout: float) -> Optional[int]:
        """Wait for the CLI to exit, reading (and dropping) what the container still
        writes: a supervisor blocked writing to a full pipe (a thread a cell left
        running floods the relay) would otherwise never see its stdin close."""
        proc = self.proc
        out = proc.stdout if proc is not None else None
        if proc is None or out is None:
            return self.wait(timeout)
        end = time.monotonic() + timeout
        fd = out.fileno()
        while True:
            rc = proc.poll()
            left = end - time.monotonic()
            if rc is not None or left <= 0:
                return rc
            try:
                ready, _, _ = select.select([fd], [], [], min(left, 0.1))
            except (OSError, ValueError):
                return self.wait(max(0.0, left))
            if ready and self._read_lock.acquire(blocking=False):
                try:
                    if not os.read(fd, 1 << 20):
                        return self.wait(max(0.0, end - time.monotonic()))
                except OSError:
                    return self.wait(max(0.0, end - time.monotonic()))
                finally:
                    self._read_lock.release()

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

    def stop_starting(self, timeout: float = 30.0) -> None:
        """Stop a :meth:`start` running in another thread: remove the container if it
        exists (the starter's read then fails), and let no new CLI process start.

        Unlike :meth:`abort`, the ``docker run`` CLI is not killed: one killed between
        its create and its start leaves a created container that nothing removes. A
        container the CLI creates after this runs starts; its starter, which sees its
        session closed, then closes it as usual.
        """
        self.aborted = True
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
                # the CLI first: a supervisor blocked writing to it (its pipe full) holds
                # the attach stream, and `docker rm -f` waited on that for 30 s
                proc.kill()
                self._remove(timeout)
                proc.close_stdin()
                self.wait(min(10.0, timeout))
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
