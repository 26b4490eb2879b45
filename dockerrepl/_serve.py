"""Start and stop a ``socketserver`` server in a daemon thread, quickly.

``BaseServer.shutdown()`` waits until ``serve_forever`` next looks at its stop
flag, which happens only when the select times out (``poll_interval``) or a
connection arrives. Polling often costs idle wake-ups in every REPL; polling
rarely made ``cleanup()`` take up to half a second. So: a long poll interval,
and on stop, one throw-away connection to wake the loop at once.

Stopping starts no thread where none can start: during the interpreter's
teardown (``sys.is_finalizing()``), where ``Thread.start()`` waits for ever on
Python 3.9-3.11 and the loop's daemon thread can never run again, only the
socket is closed; in an ``atexit`` callback on 3.12, which refuses new threads,
the loop is told to stop from the calling thread.
"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
import time
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
    if sys.is_finalizing():
        server.server_close()
        return
    stopper = threading.Thread(target=server.shutdown, name="dockerrepl-stop", daemon=True)
    try:
        stopper.start()
    except RuntimeError:  # "can't create new thread at interpreter shutdown" (3.12)
        _stop_here(server, thread, timeout)
        return
    while stopper.is_alive():
        _poke(server)
        stopper.join(0.05)
        timeout -= 0.05
        if timeout <= 0:
            break
    server.server_close()
    thread.join(timeout=1.0)


def _stop_here(server: socketserver.BaseServer, thread: threading.Thread, timeout: float) -> None:
    """What ``shutdown()`` does, without a second thread: raise the loop's stop flag,
    wake it, and wait (bounded) for it to end."""
    flag = "_BaseServer__shutdown_request"  # socketserver's own, set first by shutdown()
    if hasattr(server, flag):
        setattr(server, flag, True)
        end = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < end:
            _poke(server)
            thread.join(0.05)
    server.server_close()
