"""The labels every DockerREPL container carries, and who owns it.

``gc`` finds containers by ``dockerrepl.version`` and judges them by the owner
label: ``<hostname>:<pid>:<start>``, where ``<start>`` is field 22 of
``/proc/<pid>/stat`` (a reused pid has another start time), and the owner's PID
namespace (a pid means something only inside its namespace).
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from ._version import __version__

__all__ = [
    "LABEL_OWNER",
    "LABEL_PIDNS",
    "LABEL_VERSION",
    "LABEL_WORKSPACE",
    "owner_label",
    "pid_namespace",
    "probe_labels",
    "proc_stat",
    "process_start_time",
    "repl_labels",
]

LABEL_VERSION = "dockerrepl.version"
LABEL_OWNER = "dockerrepl.owner"
LABEL_PIDNS = "dockerrepl.pidns"
LABEL_WORKSPACE = "dockerrepl.workspace"


def proc_stat(pid: int) -> Optional[list[str]]:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first), or None when there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    return data.rsplit(")", 1)[-1].split()


def process_start_time(pid: int) -> str:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks since boot); "0" if unknown."""
    fields = proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else "0"


def pid_namespace(pid: Optional[int] = None) -> str:
    """The inode of the PID namespace of ``pid`` (default: this process); "" if unknown.

    A pid means something only inside its namespace: ``gc`` run on the host must
    not judge the owner of a container started from inside another container
    (same hostname with ``--network host``, a docker socket mounted in).
    """
    try:
        link = os.readlink(f"/proc/{'self' if pid is None else pid}/ns/pid")
    except OSError:
        return ""
    inode = link.rsplit("[", 1)[-1].rstrip("]")
    return inode if inode.isdigit() else ""


def owner_label(pid: Optional[int] = None) -> str:
    """``<hostname>:<pid>:<start>`` for the owner process (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{process_start_time(pid)}"


def repl_labels(workspace: str) -> dict[str, str]:
    """A REPL container's labels: the version, its owner (this process) and its workspace."""
    return {
        LABEL_VERSION: __version__,
        LABEL_OWNER: owner_label(),
        LABEL_PIDNS: pid_namespace(),
        LABEL_WORKSPACE: workspace,
    }


def probe_labels() -> dict[str, str]:
    """A short-lived probe container's labels (``doctor``): enough for ``gc`` to judge it."""
    return {LABEL_VERSION: __version__, LABEL_OWNER: owner_label()}
