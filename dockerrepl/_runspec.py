"""What ``docker run`` is told: mounts, limits, hardening flags, and the argv.

:class:`ContainerConfig` turns a REPL's checked options into the hardened
``docker run -i --rm`` command line; :func:`check_extra_args` decides which extra
``docker run`` options a user may add. Nothing here runs a process
(:mod:`dockerrepl._container` does).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from ._docker import Engine

__all__ = [
    "BOOTSTRAP_PACKAGE",
    "CODE_MOUNT",
    "DEFAULT_CPUS",
    "MIN_CPUS",
    "MIN_MEMORY",
    "MOUNT_POINT",
    "PROXY_SOCKET",
    "ContainerConfig",
    "check_extra_args",
    "cpus_arg",
    "memory_bytes",
    "tmpfs_size",
]

#: The bootstrap package's name inside the container (dockerrepl/_bootstrap, sent as code).
BOOTSTRAP_PACKAGE = "dockerrepl_bootstrap"
MOUNT_POINT = "/workspace"
# With the proxy transport and network="none" the LM proxy's unix socket is in a host
# directory mounted read-only here: the host binds and unlinks it in a directory no
# cell can swap for a symlink. (The code itself comes over stdin: see _staging.)
CODE_MOUNT = "/opt/dockerrepl"
PROXY_SOCKET = "proxy.sock"

#: The smallest memory limit the engine accepts ("Minimum memory limit allowed is 6MB").
MIN_MEMORY = 6 << 20
#: The default CPU limit of a container (see DockerREPL's ``cpus``).
DEFAULT_CPUS = 1.0
#: The smallest CPU limit the engine accepts (docker's own range starts at 0.01).
MIN_CPUS = 0.01


def mount_arg(**fields: str) -> str:
    """A ``--mount`` value; a field holding a comma or a quote is CSV-quoted (as the CLI
    parses it), so a ``workspace_dir`` with a comma in it still names one path."""
    out = []
    for key, value in fields.items():
        field = f"{key}={value}"
        if "," in field or '"' in field:
            field = '"' + field.replace('"', '""') + '"'
        out.append(field)
    return ",".join(out)


@dataclass
class ContainerConfig:
    """Everything ``docker run`` needs to know (see :class:`dockerrepl.DockerREPL`)."""

    image: str
    #: what is mounted at /workspace: a host directory, or (``workspace_volume``) a volume
    workspace: str
    #: ``workspace`` names a volume of the engine's (the channel transport), not a host path
    workspace_volume: bool = False
    #: the CLI binary, or an Engine (binary + --host/--context) to run it against
    docker: Union[str, Engine] = "docker"
    memory: Optional[str] = "2g"
    cpus: Optional[float] = DEFAULT_CPUS
    pids_limit: Optional[int] = 512
    network: str = "bridge"
    user: Optional[str] = None
    read_only: bool = False
    runtime: Optional[str] = None
    labels: dict[str, str] = field(default_factory=dict)
    extra_args: Sequence[str] = ()
    #: host directory mounted read-only at CODE_MOUNT (the proxy's socket), or ""
    code_dir: str = ""
    #: map host.docker.internal to the bridge gateway (the proxy transport's way home)
    host_gateway: bool = True
    start_timeout: float = 120.0
    tmpfs_size: str = "256m"

    def run_argv(self, name: str, python: str, launcher: str) -> list[str]:
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
        # --mount, not -v: a host path the engine does not have is an error (the
        # transport check sees it), not an empty directory made on the engine's host
        if self.workspace_volume:
            argv += ["--mount", mount_arg(type="volume", src=self.workspace, dst=MOUNT_POINT)]
        else:
            argv += ["--mount", mount_arg(type="bind", src=self.workspace, dst=MOUNT_POINT)]
        argv += ["-w", MOUNT_POINT]
        if self.code_dir:
            argv += [
                "--mount",
                mount_arg(type="bind", src=self.code_dir, dst=CODE_MOUNT) + ",readonly",
            ]
        if self.network == "none":
            argv += ["--network", "none"]
        elif self.network == "bridge":
            argv += ["--network", "bridge"]
            if self.host_gateway:
                argv += ["--add-host", "host.docker.internal:host-gateway"]
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
        # the code follows on stdin (see _staging): -c is the loader only
        argv += ["--entrypoint", python, self.image, "-B", "-c", launcher]
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
