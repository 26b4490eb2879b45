"""What runs at interpreter exit starts no thread and closes what is still open (no engine).

Issue #10, defect 2. The end-to-end test, a real container per supported Python,
is ``tests/docker/test_exit.py``.
"""

from __future__ import annotations

import os
import socketserver
import subprocess
import sys
import textwrap
import threading

import pytest

from dockerrepl import _serve

pytestmark = pytest.mark.timeout(30)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        pass


def _closed(server: socketserver.TCPServer) -> bool:
    return server.socket.fileno() == -1  # (a connect could reach whoever took the port since)


def test_stop_serving_without_a_thread_where_none_can_start(monkeypatch):
    """Python 3.12 refuses new threads in atexit callbacks: the loop is stopped from here."""
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = _serve.start_serving(server, "test-serve")

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    _serve.stop_serving(server, thread, timeout=5)
    monkeypatch.undo()
    thread.join(5)
    assert not thread.is_alive()
    assert _closed(server)


def test_stop_serving_during_teardown_only_closes_the_socket(monkeypatch):
    """While finalizing, Thread.start() waits for ever (3.9-3.11): none is started."""
    monkeypatch.setattr(_serve, "_POLL", 0.05)  # so that the test can end its loop quickly
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = _serve.start_serving(server, "test-serve")
    started: list[threading.Thread] = []
    real_start, real_finalizing = threading.Thread.start, sys.is_finalizing
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self))
    monkeypatch.setattr(sys, "is_finalizing", lambda: True)
    _serve.stop_serving(server, thread)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    monkeypatch.setattr(sys, "is_finalizing", real_finalizing)
    assert started == []
    assert _closed(server)
    server.shutdown()  # the test's own clean-up of the loop


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=20,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )


def test_the_hook_closes_what_is_open_in_order_and_only_in_its_own_process():
    out = _run(
        """
        import os, sys
        from dockerrepl import _exit

        class Thing:
            def __init__(self, name): self.name = name
            def _close_at_exit(self, deadline):
                print(self.name, "closed by", "child" if os.getpid() != PARENT else "parent",
                      flush=True)

        PARENT = os.getpid()
        keep = [Thing("repl"), Thing("pool"), Thing("handler")]
        _exit.track(keep[0], 1)
        _exit.track(keep[1], 0)
        _exit.track(keep[2], 2)
        gone = Thing("collected")
        _exit.track(gone, 1)
        del gone  # tracking keeps nothing alive
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # runs the inherited atexit hook: the parent's things are not its own
        os.waitpid(pid, 0)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "pool closed by parent",
        "repl closed by parent",
        "handler closed by parent",
    ]


def test_nothing_starts_once_the_hook_has_begun():
    out = _run(
        """
        import atexit
        from dockerrepl import _exit
        from dockerrepl.errors import ReplClosed

        class Late:
            def _close_at_exit(self, deadline):
                try:
                    _exit.track(Late(), 1)  # e.g. a pool member starting in its thread
                except ReplClosed:
                    print("refused", flush=True)

        keep = Late()
        _exit.track(keep, 1)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"
