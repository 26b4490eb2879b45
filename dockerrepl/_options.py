"""Checks for DockerREPL's options that docker would otherwise be first to refuse.

Each takes the option's name and value and returns the value to use, or raises
``TypeError`` (wrong type) or ``ValueError`` (impossible value) with a message
that names both. They run before anything starts: no docker command, no
directory, no thread (issue #10: ``memory="lots"`` used to come back as
docker's usage text, and a context that is not JSON only after a container had
started).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from typing import Any, Optional

from ._container import DEFAULT_CPUS, MIN_CPUS, MIN_MEMORY, memory_bytes

#: The image when none is given and ``$DOCKERREPL_IMAGE`` is unset.
DEFAULT_IMAGE = "python:3.11-slim"
#: Per-cell wall-clock limit in seconds (``None`` disables it).
DEFAULT_CELL_TIMEOUT = 900.0
#: Container memory limit (swap off).
DEFAULT_MEMORY = "2g"
#: Processes + threads in the container.
DEFAULT_PIDS_LIMIT = 512

__all__ = [
    "DEFAULT_CELL_TIMEOUT",
    "DEFAULT_CPUS",
    "DEFAULT_IMAGE",
    "DEFAULT_MEMORY",
    "DEFAULT_PIDS_LIMIT",
    "check_cpus",
    "check_docker",
    "check_flag",
    "check_image",
    "check_mapping",
    "check_memory",
    "check_runtime",
    "check_user",
    "check_workspace_dir",
    "encode_payload",
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


def check_runtime(name: str, value: Any) -> Optional[str]:
    """An OCI runtime's name as the engine knows it (``runsc``, ``io.containerd.runc.v2``)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, not {_kind(value)}")
    if not _RUNTIME.fullmatch(value):
        raise ValueError(f"{name} must be a runtime's name, such as 'runsc', not {value!r}")
    return value


def check_docker(name: str, value: Any) -> str:
    """The docker CLI: a name looked up on PATH, or a path. Found (or not) at the first call."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or a path, not {_kind(value)}")
    if not value or "\0" in value:
        raise ValueError(f"{name} must name the docker CLI, not {value!r}")
    return value


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
