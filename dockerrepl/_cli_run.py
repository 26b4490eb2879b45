"""``dockerrepl run``: one sandbox, one cell, output streamed, the exit status from the cell."""

from __future__ import annotations

import argparse
import logging
import sys

from ._cli_sandbox import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OOM,
    EXIT_TIMEOUT,
    CliError,
    Output,
    Sandbox,
)
from .types import REPLResult

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


def cmd_run(args: argparse.Namespace) -> int:
    """``dockerrepl run``: one sandbox, one cell, output streamed, exit status from the cell."""
    if args.code is not None and args.file is not None:
        raise CliError("give either FILE or -c CODE, not both")
    if args.code is not None:
        code = args.code
    elif args.file in (None, "-"):
        if sys.stdin.isatty():
            sys.stderr.write("dockerrepl: reading code from the terminal; end it with Ctrl-D\n")
        code = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                code = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise CliError(f"cannot read {args.file}: {reason}") from None
    box = Sandbox(args, sys.stderr)
    try:
        box.open()
        out = Output(sys.stdout, sys.stderr)
        res = box.run_cell(code, out)
        out.finish(res)
        log.debug("cell finished: status=%s in %.3fs", res.status, res.execution_time)
        if out.broken:
            return EXIT_ERROR
        return exit_status(res)
    finally:
        box.close()
