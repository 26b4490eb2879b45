"""What the supervisor reports in its ``ready`` frame, read before any cell runs."""

from __future__ import annotations

import json
import os

from . import paths
from .files import read_regular

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def checkpoint_cell() -> int | None:
    """The cell named in the workspace's checkpoint metadata (None: no checkpoint)."""
    if not os.path.isfile(paths.STATE_FILE):
        return None
    try:
        meta = json.loads(read_regular(paths.META_FILE, 1 << 16) or b"null")
    except ValueError:
        return None
    cell = meta.get("cell") if isinstance(meta, dict) else None
    return cell if isinstance(cell, int) and not isinstance(cell, bool) else None


def probe(config: dict[str, Any]) -> dict[str, Any]:
    """transport="auto": does this container see the host's files, and reach its proxy?

    The host wrote a nonce into the workspace it mounted and asks for it back; a
    ``/ping`` to the proxy with the container's token must come back from the host.
    """
    probe = config.get("probe") or {}
    raw = read_regular(os.path.join(paths.STATE_DIR, "probe.nonce"), 256)
    nonce = None if raw is None else raw.decode("ascii", "replace")
    reached = ""
    if nonce == probe.get("nonce"):
        from .client import _ProxyConnection

        conn = _ProxyConnection(config.get("proxy") or {})
        headers = {"Authorization": "Bearer " + str(config.get("token", ""))}
        try:
            status, value = conn.request("/ping", b"{}", headers, float(probe.get("timeout", 2.0)))
            ok = status == 200 and isinstance(value, dict) and value.get("pong") is True
            reached = "ok" if ok else "HTTP %d" % status
        except (OSError, ValueError) as exc:
            reached = "%s: %s" % (type(exc).__name__, exc)
        finally:
            conn.close()
    return {"nonce": nonce, "proxy": reached}


def dill_origin() -> str | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("dill")
    except Exception:
        spec = None
    if spec is None or not spec.origin:
        return None
    # the loader's modules claim to live under CODE_DIR: the host's copy came with the code
    return "host" if spec.origin.startswith(paths.CODE_DIR + "/") else "image"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(256).strip()
    except OSError:
        return None


def _number(text: str | None) -> int | None:
    """A cgroup limit as an int; None for "max", -1 or what is not a number."""
    if text is None or not text.lstrip("-").isdigit():
        return None
    n = int(text)
    return n if n >= 0 else None


def cgroup_limits() -> dict[str, Any]:
    """The memory, pids and CPU limits this container's cgroup enforces (v2 or v1), as
    read from inside: ``verify()`` compares them with what was asked for. An engine that
    shows limits in ``inspect`` without applying them (rootless Docker without cgroups)
    is caught here. ``None``: no limit (or no cgroup file to read)."""
    base = "/sys/fs/cgroup"
    if os.path.exists(base + "/cgroup.controllers"):  # v2
        memory = _number(_read(base + "/memory.max"))
        pids = _number(_read(base + "/pids.max"))
        quota, _, period = (_read(base + "/cpu.max") or "").partition(" ")
    else:
        memory = _number(_read(base + "/memory/memory.limit_in_bytes"))
        if memory is not None and memory >= 1 << 62:  # v1's "unlimited"
            memory = None
        pids = _number(_read(base + "/pids/pids.max"))
        quota = _read(base + "/cpu/cpu.cfs_quota_us") or ""
        period = _read(base + "/cpu/cpu.cfs_period_us") or ""
    q, p = _number(quota), _number(period)
    cpus = q / p if q is not None and p else None
    return {"memory": memory, "pids": pids, "cpus": cpus}
