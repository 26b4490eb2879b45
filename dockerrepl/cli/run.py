"""``dockerrepl run``: one sandbox, one cell, output streamed, the exit status from the cell."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from typing import BinaryIO

from .._files import DEFAULT_MAX_FILE, write_new
from .._runspec import MOUNT_POINT
from ..repl import MAX_FILENAME
from ..types import REPLResult
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OOM, EXIT_TIMEOUT, CliError
from .sandbox import Output, Sandbox

__all__ = ["cmd_run", "exit_status"]

log = logging.getLogger(__name__)


def exit_status(res: REPLResult) -> int:
    """The process exit status for a cell's outcome (see docs/cli.md)."""
    if res.status == "ok":
        return 0
    if res.status == "error" and res.exception == "SystemExit":
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("SystemExit:")]
        code = lines[-1][len("SystemExit:") :].strip() if lines else ""
        if not code:
            return 0
        try:
            return int(code) & 0xFF
        except ValueError:
            return EXIT_ERROR  # sys.exit("message") exits 1, as Python does
    return {"timeout": EXIT_TIMEOUT, "interrupted": EXIT_INTERRUPTED, "oom": EXIT_OOM}.get(
        res.status, EXIT_ERROR
    )


#: Where ``--stdin`` puts this process's stdin, relative to the workspace.
STDIN_FILE = ".dockerrepl-stdin"
_CHUNK = 1 << 20


def _argv(args: argparse.Namespace) -> list[str]:
    """The code's ``sys.argv``, as ``python`` would set it for the same command line."""
    rest = [str(a) for a in (args.args or ())]
    if args.code is not None:
        # `python -c CODE a b`: FILE's slot is the first argument
        return ["-c", *([args.file] if args.file is not None else []), *rest]
    return [args.file or "-", *rest]


def _copy_stdin(root: str, limit: int) -> int:
    """Copy all of stdin to ``STDIN_FILE`` in the workspace ``root`` (at most ``limit``
    bytes; mode 0644, the container's user may not be this one); returns the size.

    Written as a new file renamed over the name, never through what is there.
    """
    src = sys.stdin.buffer
    size = 0

    def copy(out: BinaryIO) -> None:
        nonlocal size
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise CliError(
                    f"--stdin: more than {limit} bytes on stdin",
                    "pass large inputs as a file with --context FILE",
                )
            out.write(chunk)

    write_new(root, STDIN_FILE, copy, os.path.dirname(root))
    return size


def _prepare(box: Sandbox, argv: list[str], stdin: bool) -> None:
    """Set the code's ``sys.argv`` (and ``sys.stdin``) in a cell of its own, binding no name."""
    repl = box.repl
    assert repl is not None
    lines = [f"__import__('sys').argv = {argv!r}"]
    if stdin and repl.transport == "channel":
        # no host directory is mounted: spool stdin, then send it over the pipe
        with tempfile.TemporaryDirectory(prefix="dockerrepl-stdin-") as spool:
            _copy_stdin(spool, DEFAULT_MAX_FILE)
            repl.upload(os.path.join(spool, STDIN_FILE), STDIN_FILE)
    elif stdin:
        _copy_stdin(repl.temp_dir, DEFAULT_MAX_FILE)
    if stdin:
        path = f"{MOUNT_POINT}/{STDIN_FILE}"
        lines.append(
            f"__import__('sys').stdin = open({path!r}, encoding='utf-8', errors='surrogateescape')"
        )
    res = repl.execute_code("\n".join(lines))
    if res.status != "ok":
        raise CliError(f"could not set up sys.argv/sys.stdin in the sandbox: {res.stderr.strip()}")


def cmd_run(args: argparse.Namespace) -> int:
    """``dockerrepl run``: one sandbox, one cell, output streamed, exit status from the cell."""
    from_stdin = args.code is None and args.file in (None, "-")
    if args.stdin and from_stdin:
        raise CliError("--stdin needs FILE or -c CODE: without them the code is read from stdin")
    if args.stdin and sys.stdin.isatty():
        raise CliError("--stdin: stdin is a terminal; pipe or redirect the input")
    ours: frozenset[str] = getattr(args, "own_options", frozenset())
    misplaced = [a for a in (args.args or ()) if a.split("=", 1)[0] in ours]
    if misplaced:
        sys.stderr.write(
            f"dockerrepl: note: {' '.join(misplaced)} after FILE went to the code (sys.argv), "
            "as with python; put dockerrepl's options before FILE\n"
        )
    # tracebacks name the code as python would: the script's path, <string>, <stdin>
    if args.code is not None:
        code, filename = args.code, "<string>"
    elif args.file in (None, "-"):
        if sys.stdin.isatty():
            sys.stderr.write("dockerrepl: reading code from the terminal; end it with Ctrl-D\n")
        code, filename = sys.stdin.read(), "<stdin>"
    else:
        filename = args.file if 0 < len(args.file) <= MAX_FILENAME else "<file>"
        try:
            with open(args.file, encoding="utf-8") as f:
                code = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise CliError(f"cannot read {args.file}: {reason}") from None
    box = Sandbox(args, sys.stderr)
    try:
        box.open()
        _prepare(box, _argv(args), args.stdin)
        out = Output(sys.stdout, sys.stderr)
        res = box.run_cell(code, out, filename=filename)
        out.finish(res)
        log.debug("cell finished: status=%s in %.3fs", res.status, res.execution_time)
        if out.broken:
            return EXIT_ERROR
        return exit_status(res)
    finally:
        box.close()
