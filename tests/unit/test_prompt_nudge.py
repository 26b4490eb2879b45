"""``PromptNudge``: a Ctrl-C that readline would only notice at the next key press.

CPython's readline checks for signals only when its ``select()`` on the
terminal fails with ``EINTR``. A SIGINT whose C handler runs anywhere else (in
another thread, or in the main thread just before that ``select()`` starts) is
recorded and then waits for a key. These tests make that happen on purpose: a
helper thread sends SIGINT to itself while the main thread sits at an
``input()`` prompt on a pseudo-terminal. Without the nudge the prompt stays
(the reproduction); with it, ``KeyboardInterrupt`` comes at once.
"""

from __future__ import annotations

import os
import pty
import select
import sys
import time

CHILD = r"""
import os, signal, sys, threading, time
import readline  # noqa: F401  (input() on a tty goes through it)
from dockerrepl.cli.sandbox import PromptNudge

signal.signal(signal.SIGINT, signal.default_int_handler)
nudge = PromptNudge()
if sys.argv[1] == "nudge":
    assert nudge.start()

def late_sigint():
    time.sleep(0.5)  # the main thread is in readline's select() by now
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # handled in this thread

threading.Thread(target=late_sigint, daemon=True).start()
t0 = time.monotonic()
try:
    input("prompt> ")
    print("LINE")
except KeyboardInterrupt:
    print("INTERRUPTED after %.3f s" % (time.monotonic() - t0))
nudge.stop()
print("NUDGE-STOPPED")
"""


def _run_at_a_prompt(mode: str, wait: float) -> str:
    """Run CHILD on a pty; return what it printed within ``wait`` seconds of the prompt."""
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execvpe(
                sys.executable, [sys.executable, "-c", CHILD, mode], {**os.environ, "TERM": "dumb"}
            )
        finally:
            os._exit(127)
    out = b""
    try:
        end = time.monotonic() + 30
        while b"prompt> " not in out and time.monotonic() < end:
            if select.select([fd], [], [], 0.1)[0]:
                out += os.read(fd, 4096)
        assert b"prompt> " in out, out
        end = time.monotonic() + wait
        while time.monotonic() < end and b"NUDGE-STOPPED" not in out:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        return out.decode(errors="replace")
    finally:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)


def test_without_the_nudge_readline_misses_a_sigint_handled_in_another_thread() -> None:
    # The reproduction, pinned on this CPython: if this starts failing, readline
    # learned to notice such signals itself and PromptNudge can go.
    out = _run_at_a_prompt("plain", wait=2.5)
    assert "INTERRUPTED" not in out, out


def test_the_nudge_makes_readline_raise_keyboardinterrupt_at_once() -> None:
    out = _run_at_a_prompt("nudge", wait=10)
    assert "INTERRUPTED after" in out, out
    assert "LINE" not in out
    assert "NUDGE-STOPPED" in out  # stop() put things back without hanging
