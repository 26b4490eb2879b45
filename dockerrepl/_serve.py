"""Start and stop a ``socketserver`` server in a daemon thread, quickly.

``BaseServer.shutdown()`` waits until ``serve_forever`` next looks at its stop
flag, which happens only when the select times out (``poll_interval``) or a
connection arrives. Polling often costs idle wake-ups in every REPL; polling
rarely made ``cleanup()`` take up to half a second. So: a long poll interval,
and on stop, one throw-away connection to wake the loop at once.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from typing import Any

__all__ = ["start_serving", "stop_serving"]

_POLL = 5.0


def start_serving(server: socketserver.BaseServer, name: str) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread; returns the thread."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": _POLL}, name=name, daemon=True
    )
    thread.start()
    return thread


def _poke(server: Any) -> None:
    try:
        with socket.socket(server.address_family, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(server.server_address)
    except OSError:
        pass  # the loop still stops at its next poll


def stop_serving(
    server: socketserver.BaseServer, thread: threading.Thread, timeout: float = 10.0
) -> None:
    """Stop the loop (without waiting for a poll interval), close the socket, join the thread."""
    stopper = threading.Thread(target=server.shutdown, name="dockerrepl-stop", daemon=True)
    stopper.start()
    while stopper.is_alive():
        _poke(server)
        stopper.join(0.05)
        timeout -= 0.05
        if timeout <= 0:
            break
    server.server_close()
    thread.join(timeout=1.0)
