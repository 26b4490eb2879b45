"""Every DockerREPL option: its default, its check, and one frozen typed object.

:meth:`ReplOptions.build` takes DockerREPL's keyword arguments (the pool's and
the CLI's too) and returns a :class:`ReplOptions`, or raises ``TypeError``
(wrong type) or ``ValueError`` (impossible value) with a message that names the
option. It runs before anything starts: no docker command, no directory, no
thread (issue #10: ``memory="lots"`` used to come back as docker's usage text,
and a context that is not JSON only after a container had started).

Each ``check_*`` takes the option's name and value and returns the value to use.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Optional, Union

from ._docker import PODMAN_BRIDGE, Engine, is_podman
from ._runspec import DEFAULT_CPUS, MIN_CPUS, MIN_MEMORY, check_extra_args, memory_bytes
from ._tools import ToolSpecs, tool_specs
from .errors import TransportUnavailable

Address = tuple[str, int]

#: The image when none is given and ``$DOCKERREPL_IMAGE`` is unset.
DEFAULT_IMAGE = "python:3.11-slim"
#: Per-cell wall-clock limit in seconds (``None`` disables it).
DEFAULT_CELL_TIMEOUT = 900.0
#: Container memory limit (swap off).
DEFAULT_MEMORY = "2g"
#: Processes + threads in the container.
DEFAULT_PIDS_LIMIT = 512
#: Per-cell cap on each of stdout/stderr, in characters (head and tail kept).
DEFAULT_MAX_OUTPUT = 1_000_000
#: The longest repr kept per variable in ``REPLResult.locals``.
DEFAULT_REPR_CAP = 1000
#: Seconds a cell gets between its interrupt and the kill of its worker.
DEFAULT_GRACE = 2.0
#: Seconds a container may take to become ready.
DEFAULT_START_TIMEOUT = 120.0
#: The longest finite timeout accepted (about 115 days); ``None`` or ``inf`` means no limit.
MAX_TIMEOUT = 1e7

#: Every argument DockerREPL takes, with its default (rlm's environment contract first).
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "image": None,  # then $DOCKERREPL_IMAGE, then DEFAULT_IMAGE (read by build())
        "lm_handler_address": None,
        "context_payload": None,
        "setup_code": None,
        "persistent": False,
        "depth": 1,
        "subcall_fn": None,
        "custom_tools": None,
        "custom_sub_tools": None,
        "compaction": False,
        "max_concurrent_subcalls": 4,
        "timeout": DEFAULT_CELL_TIMEOUT,
        "memory": DEFAULT_MEMORY,
        "cpus": DEFAULT_CPUS,
        "pids_limit": DEFAULT_PIDS_LIMIT,
        "network": "bridge",
        "user": None,
        "read_only": False,
        "workspace_dir": None,
        "docker": "docker",
        "docker_host": None,
        "context": None,
        "transport": "auto",
        "runtime": None,
        "max_output_bytes": DEFAULT_MAX_OUTPUT,
        "repr_cap": DEFAULT_REPR_CAP,
        "max_llm_calls": None,
        "max_llm_tokens": None,
        "auto_checkpoint": True,
        "grace": DEFAULT_GRACE,
        "start_timeout": DEFAULT_START_TIMEOUT,
        "verify_security": True,
        "extra_args": (),
    }
)

#: DockerREPL's ``transport`` values.
TRANSPORTS = ("auto", "proxy", "channel")

__all__ = [
    "DEFAULTS",
    "DEFAULT_CELL_TIMEOUT",
    "DEFAULT_CPUS",
    "DEFAULT_GRACE",
    "DEFAULT_IMAGE",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_MEMORY",
    "DEFAULT_PIDS_LIMIT",
    "DEFAULT_REPR_CAP",
    "DEFAULT_START_TIMEOUT",
    "MAX_TIMEOUT",
    "TRANSPORTS",
    "Address",
    "ReplOptions",
    "check_address",
    "check_context",
    "check_count",
    "check_cpus",
    "check_docker",
    "check_docker_host",
    "check_flag",
    "check_image",
    "check_index",
    "check_limit",
    "check_mapping",
    "check_memory",
    "check_runtime",
    "check_user",
    "check_workspace_dir",
    "encode_payload",
    "unknown_arguments",
]

# docker's image reference grammar (distribution/reference): [domain/]path[:tag][@digest]
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_IMAGE = re.compile(rf"{_NAME}(?::{_TAG})?(?:@{_DIGEST})?")
# --user: name or uid, then optionally :group or :gid
_USER_PART = r"[A-Za-z0-9_][A-Za-z0-9_.$-]*"
_USER = re.compile(rf"{_USER_PART}(?::{_USER_PART})?")
_RUNTIME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# docker_host: scheme://rest, with no whitespace (it is one argv item, never a shell word)
_HOST_URL = re.compile(r"(unix|tcp|ssh|npipe)://[^\s\x00]+")
# a docker context's name (the CLI's own rule: ^[a-zA-Z0-9][a-zA-Z0-9_.+-]+$)
_CONTEXT = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.+-]*")


def _kind(value: Any) -> str:
    return type(value).__name__


def check_image(name: str, value: Any) -> str:
    """An image reference docker can parse (``python:3.11-slim``, ``host:5000/a/b@sha256:...``)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {_kind(value)}")
    if value.startswith("-"):
        # it goes on docker run's command line, where it would be read as an option
        raise ValueError(f"{name} must not start with '-': {value!r}")
    if len(value) > 512 or not _IMAGE.fullmatch(value):
        raise ValueError(
            f"{name} {value!r} is not an image reference docker accepts"
            " ([registry/]name[:tag][@digest]; the name in lower case)"
        )
    return value


def check_memory(name: str, value: Any) -> Optional[str]:
    """Docker's size notation (``"2g"``, ``"512m"``, bytes as an int), at least 6 MiB; or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{name} must be a size such as '2g', or None, not {_kind(value)}")
    text = str(value).strip()
    size = memory_bytes(text)
    if size is None:
        raise ValueError(
            f"{name} must be a size such as '512m' or '2g' (bytes, or k/m/g/t), not {value!r}"
        )
    if size < MIN_MEMORY:
        raise ValueError(f"{name} must be at least 6m (docker's minimum), not {value!r}")
    return text


def check_cpus(name: str, value: Any) -> Optional[float]:
    """A CPU limit of at least 0.01 (docker's minimum), or None for none.

    The upper bound is the engine's CPU count, which only the engine knows:
    past it, the start fails with docker's "Range of CPUs is from 0.01 to N".
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or None, not {_kind(value)}")
    cpus = float(value)
    if not math.isfinite(cpus) or cpus < MIN_CPUS:
        raise ValueError(f"{name} must be at least {MIN_CPUS} (None: no limit), not {value!r}")
    return cpus


def check_user(name: str, value: Any) -> Optional[str]:
    """``uid[:gid]`` or ``name[:group]`` for ``docker run --user``; an int is a uid; or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{name} must be a str such as '65534:65534', not {_kind(value)}")
    text = str(value)
    if not _USER.fullmatch(text):
        raise ValueError(f"{name} must be 'uid[:gid]' or 'name[:group]', not {value!r}")
    return text


def _matching(
    name: str, value: Any, pattern: re.Pattern[str], a_str: str, what: str, limit: int = 2048
) -> Optional[str]:
    """``value`` if it is None or a str that ``pattern`` matches in full (at most ``limit``
    characters); else ``TypeError`` ("must be <a_str>") or ``ValueError`` ("must be <what>")."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {a_str}, not {_kind(value)}")
    if len(value) > limit or not pattern.fullmatch(value):
        raise ValueError(f"{name} must be {what}, not {value!r}")
    return value


def check_runtime(name: str, value: Any) -> Optional[str]:
    """An OCI runtime's name as the engine knows it (``runsc``, ``io.containerd.runc.v2``)."""
    return _matching(name, value, _RUNTIME, "a str or None", "a runtime's name, such as 'runsc'")


def check_docker(name: str, value: Any) -> str:
    """The docker CLI: a name looked up on PATH, or a path. Found (or not) at the first call."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or a path, not {_kind(value)}")
    if not value or "\0" in value:
        raise ValueError(f"{name} must name the docker CLI, not {value!r}")
    return value


def check_docker_host(name: str, value: Any) -> Optional[str]:
    """An engine URL for the CLI's ``--host``: ``unix://``, ``tcp://``, ``ssh://`` or
    ``npipe://`` followed by an address; or None (the CLI's own default)."""
    return _matching(
        name,
        value,
        _HOST_URL,
        "a str such as 'unix:///var/run/docker.sock'",
        "a unix://, tcp://, ssh:// or npipe:// URL",
    )


def check_context(name: str, value: Any) -> Optional[str]:
    """A docker context's name for the CLI's ``--context`` (``default``, ``remote-1``); or None."""
    return _matching(
        name,
        value,
        _CONTEXT,
        "a docker context's name (a str)",
        "a docker context's name such as 'default'",
        limit=256,
    )


def check_workspace_dir(name: str, value: Any) -> Optional[str]:
    """An existing directory this process can create directories in; or None."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or a path, not {_kind(value)}")
    if not os.path.isdir(value):
        raise FileNotFoundError(f"{name} {value!r} does not exist or is not a directory")
    if not os.access(value, os.W_OK | os.X_OK):
        raise PermissionError(f"{name} {value!r} is not writable by this process")
    return value


def check_flag(name: str, value: Any) -> bool:
    """True or False (a truthy string such as "no" is refused, not taken as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def check_mapping(name: str, value: Any) -> dict[str, Any]:
    """A mapping (e.g. of custom tools), copied; None is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict or None, not {_kind(value)}")
    return dict(value)


def encode_payload(name: str, payload: Any) -> tuple[str, str]:
    """``(text, kind)`` for a context or history: a str as is ("text"), a dict or list as
    JSON ("json"). ``TypeError`` for other types and for what JSON cannot hold."""
    if isinstance(payload, str):
        return payload, "text"
    if not isinstance(payload, (dict, list)):
        raise TypeError(f"{name} must be str, dict or list, not {_kind(payload)}")
    try:
        return json.dumps(payload, ensure_ascii=False), "json"
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{name} is not JSON-serialisable: {exc}") from None


def check_number(name: str, value: Any) -> float:
    """``value`` as a float: a real number, not a bool (``True`` is not a duration)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {_kind(value)}")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"{name} must not be NaN")
    return out


def check_limit(name: str, value: Any) -> Optional[float]:
    """A wall-clock limit in seconds: positive, at most MAX_TIMEOUT; ``None`` or ``inf``: none."""
    if value is None:
        return None
    out = check_number(name, value)
    if out == math.inf:
        return None
    if not 0 < out <= MAX_TIMEOUT:
        raise ValueError(
            f"{name} must be > 0 and <= {MAX_TIMEOUT:g} seconds, or None for no limit (got {out!r})"
        )
    return out


def check_count(name: str, value: Any, *, minimum: int = 1, hint: str = "") -> int:
    """A whole number >= ``minimum`` (an integral float such as 1e6 is accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an int, not {_kind(value)}")
    if isinstance(value, numbers.Integral):
        out = int(value)
    elif math.isfinite(float(value)) and float(value).is_integer():
        out = int(float(value))
    else:
        raise TypeError(f"{name} must be a whole number, not {value!r}")
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}{hint}, not {out}")
    return out


def check_address(name: str, value: Any) -> Address:
    """An LM Handler address: ``(host, port)`` with a str host and a port in 1-65535."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a (host, port) tuple, not {_kind(value)}")
    if len(value) != 2:
        raise ValueError(f"{name} must be a (host, port) pair, not {len(value)} items")
    host, port = value
    if not isinstance(host, str) or not host:
        raise TypeError(f"{name}: the host must be a non-empty str, not {host!r}")
    if isinstance(port, bool) or not isinstance(port, numbers.Integral):
        raise TypeError(f"{name}: the port must be an int, not {_kind(port)}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"{name}: the port must be in 1-65535, not {port}")
    return host, int(port)


def check_index(name: str, value: Any, count: int) -> int:
    """A ``context_N`` / ``history_N`` index: the next free one, or one already used."""
    if value is None:
        return count
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, not {_kind(value)}")
    index = int(value)
    if not 0 <= index <= count:
        raise ValueError(
            f"{name} must be between 0 and {count} (replace one or add the next), not {index}"
        )
    return index


def _optional(check: Callable[..., Any], name: str, value: Any, **kwargs: Any) -> Any:
    return None if value is None else check(name, value, **kwargs)


def unknown_arguments(names: Iterable[str]) -> str:
    """``names`` sorted, each with the option it is probably a misspelling of:
    ``"memroy (did you mean 'memory'?)"``."""
    out = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, DEFAULTS, n=1)
        out.append(f"{name} (did you mean {close[0]!r}?)" if close else name)
    return ", ".join(out)


@dataclass(frozen=True)
class ReplOptions:
    """DockerREPL's arguments, checked, with every default filled in: see :meth:`build`."""

    image: str
    lm_handler_address: Optional[Address]
    #: the context as :func:`encode_payload` made it; dropped once loaded (it can be large)
    context: Optional[tuple[str, str]] = field(repr=False)
    setup_code: Optional[str] = field(repr=False)
    # rlm's environment contract
    persistent: bool
    depth: int
    subcall_fn: Optional[Callable[[Any, Optional[str]], Any]]
    custom_tools: dict[str, Any]
    custom_sub_tools: dict[str, Any]
    compaction: bool
    max_concurrent_subcalls: int
    # dockerrepl's own
    timeout: Optional[float]
    memory: Optional[str]
    cpus: Optional[float]
    pids_limit: Optional[int]
    network: str
    user: Optional[str]
    read_only: bool
    workspace_dir: Optional[str]
    docker: str
    docker_host: Optional[str]
    #: DockerREPL's ``context`` argument (``context`` here is the payload, as rlm names it)
    docker_context: Optional[str]
    #: "auto", "proxy" or "channel" (see DockerREPL)
    transport: str
    runtime: Optional[str]
    max_output_bytes: int
    repr_cap: int
    max_llm_calls: Optional[int]
    max_llm_tokens: Optional[int]
    auto_checkpoint: Union[bool, str]
    grace: float
    start_timeout: float
    verify_security: bool
    extra_args: tuple[str, ...]
    #: custom_tools, checked: what crosses into the container, and the host tools
    tools: ToolSpecs = field(repr=False)

    @property
    def engine(self) -> Engine:
        """Where every docker command of this REPL goes (binary and global flags)."""
        return Engine(self.docker, self.docker_host, self.docker_context)

    @classmethod
    def build(cls, **kwargs: Any) -> ReplOptions:
        """Check ``kwargs`` (DockerREPL's arguments) and fill in the defaults.

        Raises ``TypeError`` for a name not in :data:`DEFAULTS` (with the option
        it resembles), then ``TypeError``/``ValueError`` naming the option (a missing
        ``workspace_dir``: ``FileNotFoundError``; one this process cannot write:
        ``PermissionError``). Reads ``$DOCKERREPL_IMAGE`` when no image is given.
        Podman with ``network="bridge"`` and ``transport="proxy"``: :class:`TransportUnavailable`.
        """
        unknown = set(kwargs) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {unknown_arguments(unknown)}")
        a = {**DEFAULTS, **kwargs}
        network = a["network"]
        if not isinstance(network, str):
            raise TypeError(f"network must be a str, not {_kind(network)}")
        if network not in ("bridge", "none"):
            raise ValueError(f"network must be 'bridge' or 'none', not {network!r}")
        timeout = check_limit("timeout", a["timeout"])
        setup_code = a["setup_code"]
        if setup_code is not None and not isinstance(setup_code, str):
            raise TypeError(f"setup_code must be a str, not {_kind(setup_code)}")
        image = _optional(check_image, "image", a["image"]) or check_image(
            "$DOCKERREPL_IMAGE", os.environ.get("DOCKERREPL_IMAGE") or DEFAULT_IMAGE
        )
        memory = check_memory("memory", a["memory"])
        cpus = check_cpus("cpus", a["cpus"])
        pids_limit = _optional(check_count, "pids_limit", a["pids_limit"], hint=" (None: no limit)")
        user = check_user("user", a["user"])
        read_only = check_flag("read_only", a["read_only"])
        runtime = check_runtime("runtime", a["runtime"])
        docker = check_docker("docker", a["docker"])
        docker_host = check_docker_host("docker_host", a["docker_host"])
        docker_context = check_context("context", a["context"])
        if docker_host is not None and docker_context is not None:
            raise ValueError("docker_host and context are mutually exclusive: give one")
        transport = a["transport"]
        if not isinstance(transport, str):
            raise TypeError(f"transport must be a str, not {_kind(transport)}")
        if transport not in TRANSPORTS:
            raise ValueError(
                f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, not {transport!r}"
            )
        if transport == "proxy" and network == "bridge" and is_podman(docker):
            raise TransportUnavailable(PODMAN_BRIDGE)
        verify_security = check_flag("verify_security", a["verify_security"])
        max_output_bytes = check_count("max_output_bytes", a["max_output_bytes"])
        repr_cap = check_count("repr_cap", a["repr_cap"])
        grace = check_number("grace", a["grace"])
        if not 0 <= grace <= MAX_TIMEOUT:
            raise ValueError(f"grace must be >= 0 seconds, not {grace!r}")
        start_timeout = check_limit("start_timeout", a["start_timeout"])
        if start_timeout is None:
            raise ValueError("start_timeout must be a finite number of seconds")
        workspace_dir = check_workspace_dir("workspace_dir", a["workspace_dir"])
        address = _optional(check_address, "lm_handler_address", a["lm_handler_address"])
        budget = " (None: no budget)"
        max_llm_calls = _optional(
            check_count, "max_llm_calls", a["max_llm_calls"], minimum=0, hint=budget
        )
        max_llm_tokens = _optional(
            check_count, "max_llm_tokens", a["max_llm_tokens"], minimum=0, hint=budget
        )
        auto_checkpoint = a["auto_checkpoint"]
        if (
            auto_checkpoint is not True
            and auto_checkpoint is not False
            and (not isinstance(auto_checkpoint, str) or auto_checkpoint != "sync")
        ):
            raise ValueError(
                f"auto_checkpoint must be True, False or 'sync', not {auto_checkpoint!r}"
            )
        # rlm's environment contract
        persistent = check_flag("persistent", a["persistent"])
        compaction = check_flag("compaction", a["compaction"])
        depth = check_count("depth", a["depth"], minimum=0)
        max_concurrent_subcalls = check_count(
            "max_concurrent_subcalls", a["max_concurrent_subcalls"]
        )
        subcall_fn = a["subcall_fn"]
        if subcall_fn is not None and not callable(subcall_fn):
            raise TypeError(f"subcall_fn must be callable or None, not {_kind(subcall_fn)}")
        custom_tools = check_mapping("custom_tools", a["custom_tools"])
        sub_tools = _optional(check_mapping, "custom_sub_tools", a["custom_sub_tools"])
        # encoded now, so that a context JSON cannot hold fails before anything starts
        context = _optional(encode_payload, "context_payload", a["context_payload"])
        tools = tool_specs(custom_tools)
        extra_args = check_extra_args(a["extra_args"], allow_widening=not verify_security)
        return cls(
            image=image,
            lm_handler_address=address,
            context=context,
            setup_code=setup_code,
            persistent=persistent,
            depth=depth,
            subcall_fn=subcall_fn,
            custom_tools=custom_tools,
            custom_sub_tools=dict(custom_tools) if sub_tools is None else sub_tools,
            compaction=compaction,
            max_concurrent_subcalls=max_concurrent_subcalls,
            timeout=timeout,
            memory=memory,
            cpus=cpus,
            pids_limit=pids_limit,
            network=network,
            user=user,
            read_only=read_only,
            workspace_dir=workspace_dir,
            docker=docker,
            docker_host=docker_host,
            docker_context=docker_context,
            transport=transport,
            runtime=runtime,
            max_output_bytes=max_output_bytes,
            repr_cap=repr_cap,
            max_llm_calls=max_llm_calls,
            max_llm_tokens=max_llm_tokens,
            auto_checkpoint=auto_checkpoint,
            grace=grace,
            start_timeout=start_timeout,
            verify_security=verify_security,
            extra_args=extra_args,
            tools=tools,
        )
