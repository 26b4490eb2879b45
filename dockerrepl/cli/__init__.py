"""The ``dockerrepl`` command line: ``doctor``, ``run``, ``repl``, ``gc``.

Every failure is printed as ``dockerrepl: error: <what went wrong>`` and
``  fix: <what to do>``, never as a traceback (``-v`` adds DEBUG logs and, for
unexpected errors, the traceback). Exit statuses are listed in docs/cli.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any, Optional

from .._version import __version__
from ..errors import (
    BootstrapError,
    ContainerDied,
    DockerReplError,
    LMHandlerError,
    ProxyError,
    SecurityCheckError,
)
from .errors import EXIT_SETUP, CliError, Terminated
from .options import add_sandbox_options, engine_from

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)

# What to do about errors that carry no ``hint`` of their own.
_HINTS: list[tuple[type[BaseException], str]] = [
    (
        BootstrapError,
        "check that the image has Python 3.8+ as python3 or python "
        "(`docker run --rm --entrypoint python3 IMAGE -V`); `dockerrepl -v ...` shows the log",
    ),
    (
        ProxyError,
        "the LM proxy binds to the docker bridge gateway: check `docker network inspect bridge`, "
        "or use --network none (llm_query through a unix socket)",
    ),
    (SecurityCheckError, "the engine ignored a hardening option; `dockerrepl doctor` says more"),
    (ContainerDied, "the container exited unexpectedly; `dockerrepl doctor` checks the setup"),
    (LMHandlerError, "another process may hold the port; try again"),
]


def _add_engine_context(parser: argparse.ArgumentParser, flag: str) -> None:
    parser.add_argument(
        flag,
        dest="docker_context",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="the docker context to use: docker --context NAME",
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log DEBUG lines (every docker command) to stderr",
    )
    common.add_argument(
        "--docker",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="the docker CLI to use, e.g. podman (default: docker on PATH)",
    )
    common.add_argument(
        "--docker-host",
        default=argparse.SUPPRESS,
        metavar="URL",
        help="the engine to use (unix://, tcp://, ssh://, npipe://): docker --host URL",
    )
    _add_engine_context(common, "--docker-context")
    p = argparse.ArgumentParser(
        prog="dockerrepl",
        description="Run Python in a Docker sandbox with llm_query() to the host.",
        parents=[common],
    )
    p.add_argument("--version", action="version", version=f"dockerrepl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("doctor", parents=[common], help="check that everything works here")
    d.add_argument(
        "--image", help="image to check (default: $DOCKERREPL_IMAGE or python:3.11-slim)"
    )
    _add_engine_context(d, "--context")  # run/repl: --context is the payload FILE

    r = sub.add_parser(
        "run",
        parents=[common],
        help="run a file or -c CODE in a fresh sandbox",
        description="Run code in a fresh sandbox; output is streamed as it is printed. "
        "Exit status: 0 ok, 1 the code raised, N for SystemExit(N), 124 timeout, "
        "125 the sandbox could not be set up, 130 interrupted, 137 out of memory.",
    )
    r.add_argument("file", nargs="?", metavar="FILE", help="Python file ('-' or none: stdin)")
    r.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="ARG",
        help="arguments for the code: its sys.argv[1:] (everything after FILE, as python does)",
    )
    r.add_argument("-c", dest="code", metavar="CODE", help="code to run")
    r.add_argument(
        "--stdin",
        action="store_true",
        help="read this process's stdin to its end and give it to the code as sys.stdin "
        "(default: the code's stdin is empty)",
    )
    add_sandbox_options(r)
    # so that `run job.py --timeout 5` can say where its --timeout went
    r.set_defaults(own_options=frozenset(o for a in r._actions for o in a.option_strings))

    i = sub.add_parser("repl", parents=[common], help="an interactive prompt in a sandbox")
    add_sandbox_options(i)
    i.add_argument(
        "--resume", metavar="FILE", help="start from a session saved by --save, :save or save()"
    )
    i.add_argument(
        "--save", metavar="FILE", help="save the session to FILE on exit (also: `:save FILE`)"
    )

    g = sub.add_parser(
        "gc",
        parents=[common],
        help="remove containers and workspaces left behind by dead processes",
        description="Remove dockerrepl containers whose owner process (label dockerrepl.owner="
        "<host>:<pid>:<start>) is gone from this host, and DockerREPL workspaces under the "
        "temp dir that no container or process uses. Live owners, other hosts' containers and "
        "containers without an owner are kept unless --all.",
    )
    g.add_argument("--dry-run", "-n", action="store_true", help="only say what would be removed")
    _add_engine_context(g, "--context")  # run/repl: --context is the payload FILE
    g.add_argument(
        "--all", action="store_true", help="remove every dockerrepl container, live ones too"
    )
    g.add_argument("--yes", "-y", action="store_true", help="do not ask before --all")
    g.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only consider containers that also carry this label (repeatable)",
    )
    g.add_argument(
        "--workspace-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also look for stale workspaces here (DockerREPL's workspace_dir; repeatable)",
    )
    g.add_argument(
        "--min-age",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="keep unclaimed workspaces younger than this (default 300)",
    )
    return p


class _QuietFormatter(logging.Formatter):
    """One line per record, no tracebacks (the default, non-verbose mode)."""

    def format(self, record: logging.LogRecord) -> str:
        return "dockerrepl: " + record.getMessage().removeprefix("dockerrepl: ")

    def formatException(self, ei: Any) -> str:
        return ""


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger("dockerrepl")
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s.%(msecs)03d %(name)s %(levelname)s: %(message)s", "%H:%M:%S"
            )
        )
        root.setLevel(logging.DEBUG)
    else:
        handler.setFormatter(_QuietFormatter())
        handler.setLevel(logging.WARNING)
        root.setLevel(logging.WARNING)
    root.addHandler(handler)
    root.propagate = False


def _hint_for(exc: BaseException) -> str:
    hint = getattr(exc, "hint", "")
    if isinstance(hint, str) and hint:
        # the library's hint names the keyword argument; here it is an option
        return hint.replace("pass docker=/path/to/docker", "pass --docker /path/to/docker")
    for cls, text in _HINTS:
        if isinstance(exc, cls):
            return text
    return ""


def report_error(exc: BaseException, err: Any = None) -> None:
    """Print ``error:`` and ``fix:`` lines for ``exc`` (no traceback)."""
    err = err or sys.stderr
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    err.write(f"dockerrepl: error: {message}\n")
    hint = _hint_for(exc)
    if hint:
        err.write(f"  fix: {hint}\n")
    err.flush()


def _on_signal(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    args.docker = getattr(args, "docker", None) or "docker"
    args.docker_host = getattr(args, "docker_host", None)
    args.docker_context = getattr(args, "docker_context", None)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    _setup_logging(args.verbose)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    log.debug(
        "dockerrepl %s, python %s, argv %s",
        __version__,
        sys.version.split()[0],
        sys.argv[1:] if argv is None else argv,
    )
    try:
        args.engine = engine_from(args)
        if args.command == "run":
            from .run import cmd_run

            return cmd_run(args)
        if args.command == "repl":
            from .repl import cmd_repl

            return cmd_repl(args)
        if args.command == "doctor":
            from .doctor import cmd_doctor

            return cmd_doctor(args)
        from .gc import cmd_gc

        return cmd_gc(args)
    except CliError as exc:
        report_error(exc)
        return exc.code
    except DockerReplError as exc:
        report_error(exc)
        if args.verbose:
            log.debug("details", exc_info=True)
        return EXIT_SETUP
    except KeyboardInterrupt:
        sys.stderr.write("\ndockerrepl: interrupted\n")
        return 130
    except Terminated as exc:
        return 128 + exc.signum
    except BrokenPipeError:
        # stdout went away (`... | head`): stop quietly, as a well-behaved filter does
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as exc:  # a bug: say so in one line unless -v asks for the traceback
        report_error(
            CliError(
                f"unexpected {type(exc).__name__}: {exc}",
                "this is a bug in dockerrepl; run again with -v for the traceback and report it",
            )
        )
        if args.verbose:
            log.debug("traceback", exc_info=True)
        return 70
