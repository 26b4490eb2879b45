"""``dockerrepl repl``: an interactive prompt into a sandbox.

Input is read like Python's own REPL: ``codeop`` decides when a statement is
complete (a compound statement ends with an empty line), the value of a
trailing expression is shown with ``sys.displayhook`` inside the container,
readline gives line editing, history and name completion. Ctrl-C at the prompt
drops the line; while a cell runs it interrupts the cell (state kept); Ctrl-D
leaves and removes the container.
"""

from __future__ import annotations

import argparse
import builtins
import codeop
import keyword
import logging
import os
import signal
import sys
import warnings
from typing import Any, Optional

from .._version import __version__
from ..repl import RESERVED_NAMES
from .sandbox import Output, PromptNudge, Sandbox

__all__ = ["cmd_repl", "is_complete"]

log = logging.getLogger(__name__)

HISTORY_LENGTH = 1000
_EXIT_WORDS = frozenset({"exit", "quit", "exit()", "quit()"})


def is_complete(source: str) -> bool:
    """True when ``source`` is ready to run (or is broken beyond more input)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return codeop.compile_command(source, "<stdin>", "single") is not None
        except (SyntaxError, ValueError, OverflowError):
            pass
        # "single" refuses several statements (a pasted block): try it as a module
        try:
            return codeop.compile_command(source, "<stdin>", "exec") is not None
        except (SyntaxError, ValueError, OverflowError):
            return True  # let the container's Python report the error


class _Completer:
    """Completes Python keywords, builtins, the REPL's names and the user's variables."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self._matches: list[str] = []

    def __call__(self, text: str, state: int) -> Optional[str]:
        if state == 0:
            pool = self.names | set(keyword.kwlist) | set(dir(builtins)) | set(RESERVED_NAMES)
            self._matches = sorted(n for n in pool if n.startswith(text) and "." not in text)
        return self._matches[state] if state < len(self._matches) else None


def _history_path() -> Optional[str]:
    env = os.environ.get("DOCKERREPL_HISTFILE")
    if env is not None:
        return env or None
    home = os.path.expanduser("~")
    return None if home == "~" else os.path.join(home, ".dockerrepl_history")


def _setup_readline(completer: _Completer) -> Optional[Any]:
    try:
        import readline
    except ImportError:  # e.g. a Python built without it: plain input() still works
        return None
    readline.set_history_length(HISTORY_LENGTH)
    path = _history_path()
    if path:
        try:
            readline.read_history_file(path)
        except OSError:
            pass
    readline.set_completer(completer)
    readline.set_completer_delims(" \t\n`~!@#$%^&*()-=+[{]}\\|;:'\",<>/?")
    readline.parse_and_bind("tab: complete")
    return readline


def _save_history(readline: Optional[Any]) -> None:
    path = _history_path()
    if readline is None or not path:
        return
    try:
        readline.write_history_file(path)
        os.chmod(path, 0o600)
    except OSError as exc:
        log.debug("could not save the history to %s: %s", path, exc)


def _save(repl: Any, path: Optional[str]) -> None:
    """``:save FILE`` and ``--save FILE``: the session to one file (see DockerREPL.save)."""
    if not path:
        sys.stderr.write("dockerrepl: :save needs a file name (`:save FILE`)\n")
        return
    try:
        lacking = repl.save(path)
    except Exception as exc:
        sys.stderr.write(f"dockerrepl: the session was not saved to {path}: {exc}\n")
        return
    extra = f" (not saved, dill cannot pickle them: {', '.join(lacking)})" if lacking else ""
    sys.stderr.write(f"dockerrepl: session saved to {path}{extra}\n")
    sys.stderr.flush()


def _command(repl: Any, line: str, save_to: Optional[str], snaps: list[Any]) -> None:
    """The prompt's own commands: ``:save [FILE]``, ``:snapshot``, ``:rollback [N]``."""
    word, _, rest = line.partition(" ")
    rest = rest.strip()
    if word == ":save":
        _save(repl, rest or save_to)
        return
    try:
        if word == ":snapshot":
            snaps.append(repl.snapshot())
            snaps[:] = snaps[-8:]  # the REPL keeps 8: the older ones are gone
            sys.stderr.write(
                f"dockerrepl: snapshot {len(snaps)} taken (after cell {snaps[-1].cell});"
                f" `:rollback` goes back to the last one, `:rollback N` to snapshot N\n"
            )
        elif word == ":rollback":
            if not snaps:
                sys.stderr.write("dockerrepl: no snapshot yet (take one with `:snapshot`)\n")
                return
            n = int(rest) if rest else len(snaps)
            if not 1 <= n <= len(snaps):
                sys.stderr.write(f"dockerrepl: no snapshot {n} (1 to {len(snaps)})\n")
                return
            repl.rollback(snaps[n - 1])
            sys.stderr.write(f"dockerrepl: rolled back to snapshot {n}\n")
        else:
            sys.stderr.write(f"dockerrepl: unknown command {word} (:save, :snapshot, :rollback)\n")
    except ValueError:
        sys.stderr.write(f"dockerrepl: `:rollback N` takes a number, not {rest!r}\n")
    except Exception as exc:
        sys.stderr.write(f"dockerrepl: {word[1:]} failed: {exc}\n")
    sys.stderr.flush()


def cmd_repl(args: argparse.Namespace) -> int:
    """``dockerrepl repl``: read cells from the terminal and run them in one sandbox."""
    interactive = sys.stdin.isatty()
    if interactive:
        # a shell starts background jobs with SIGINT ignored, and Python keeps it so;
        # at an interactive prompt Ctrl-C must work
        signal.signal(signal.SIGINT, signal.default_int_handler)
    box = Sandbox(args, sys.stderr)
    completer = _Completer()
    readline = _setup_readline(completer) if interactive else None
    nudge = PromptNudge()
    if readline is not None:
        nudge.start()
    try:
        repl = box.open()
        probe = repl.execute_code(
            "import sys as _s\nprint('%d.%d.%d' % _s.version_info[:3])\ndel _s"
        )
        if interactive:
            sys.stderr.write(
                f"dockerrepl {__version__}: Python {probe.stdout.strip() or '?'} in {box.image} "
                f"(container {repl.container_name}), llm_query() -> {box.backend}\n"
                "Ctrl-C interrupts a running cell (state is kept); Ctrl-D exits and removes "
                "the container.\n"
            )
            sys.stderr.flush()
        out = Output(sys.stdout, sys.stderr)
        buf: list[str] = []
        snaps: list[Any] = []  # :snapshot's, oldest first
        while True:
            prompt = ("... " if buf else ">>> ") if interactive else ""
            try:
                line = input(prompt)
            except EOFError:
                if interactive:
                    sys.stdout.write("\n")
                elif buf:  # piped input ended inside a block: run it, as python does
                    out.reset()
                    out.finish(box.run_cell("\n".join(buf), out, "<stdin>", display=True))
                return 0
            except KeyboardInterrupt:
                sys.stdout.write("\nKeyboardInterrupt\n")
                sys.stdout.flush()
                buf = []
                continue
            if not buf and line.strip() in _EXIT_WORDS:
                return 0
            if not buf and line.strip().startswith((":save", ":snapshot", ":rollback")):
                _command(repl, line.strip(), args.save, snaps)
                continue
            buf.append(line)
            source = "\n".join(buf)
            if not is_complete(source):
                continue
            buf = []
            if not source.strip():
                continue
            try:
                out.reset()
                res = box.run_cell(source, out, "<stdin>", display=True)
                out.finish(res)
                completer.names = set(res.locals)
            except KeyboardInterrupt:
                # Ctrl-C just before or after the cell (run_cell handles it during)
                sys.stdout.write("\nKeyboardInterrupt\n")
                sys.stdout.flush()
            if out.broken:
                return 1
    finally:
        if getattr(args, "save", None) and box.repl is not None and not box.repl._session.closed:
            _save(box.repl, args.save)
        nudge.stop()
        if readline is not None:
            _save_history(readline)
        box.close()
