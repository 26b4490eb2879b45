"""What the supervisor reports in its ``ready`` frame, read before any cell runs."""

from __future__ import annotations

import json
import os

from . import paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def checkpoint_cell() -> int | None:
    """The cell named in the workspace's checkpoint metadata (None: no checkpoint)."""
    try:
        if not os.path.isfile(paths.STATE_FILE):
            return None
        with open(paths.META_FILE, "rb") as f:
            meta = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    cell = meta.get("cell") if isinstance(meta, dict) else None
    return cell if isinstance(cell, int) and not isinstance(cell, bool) else None


def probe(config: dict[str, Any]) -> dict[str, Any]:
    """transport="auto": does this container see the host's files, and reach its proxy?

    The host wrote a nonce into the workspace it mounted and asks for it back; a
    ``/ping`` to the proxy with the container's token must come back from the host.
    """
    probe = config.get("probe") or {}
    nonce = None
    try:
        with open(os.path.join(paths.STATE_DIR, "probe.nonce"), "rb") as f:
            nonce = f.read(256).decode("ascii", "replace")
    except OSError:
        pass
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
