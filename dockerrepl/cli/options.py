"""The options ``run`` and ``repl`` share, with their defaults (no library code loaded)."""

from __future__ import annotations

import argparse
import os

from .._docker import Engine
from .._options import (
    DEFAULT_CELL_TIMEOUT,
    DEFAULT_CPUS,
    DEFAULT_IMAGE,
    DEFAULT_MEMORY,
    check_context,
    check_docker_host,
)
from .errors import CliError

__all__ = ["DEFAULT_MODEL", "add_sandbox_options", "default_image", "engine_from"]

DEFAULT_MODEL = "gpt-5-mini"


def default_image() -> str:
    """The image DockerREPL uses when none is given."""
    return os.environ.get("DOCKERREPL_IMAGE") or DEFAULT_IMAGE


def engine_from(args: argparse.Namespace) -> Engine:
    """The engine ``--docker``, ``--docker-host`` and ``--context``/``--docker-context`` name
    (the library's checks; a bad value is a usage error)."""
    try:
        host = check_docker_host("--docker-host", args.docker_host)
        context = check_context("--context", args.docker_context)
        if host is not None and context is not None:
            raise ValueError("--docker-host and --context are mutually exclusive: give one")
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc)) from None
    return Engine(args.docker, host, context)


def add_sandbox_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", help=f"image to run (default: $DOCKERREPL_IMAGE or {DEFAULT_IMAGE})")
    p.add_argument(
        "--context",
        metavar="FILE",
        help="load FILE as `context` (a .json file is parsed; anything else is text)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CELL_TIMEOUT,
        metavar="SECONDS",
        help=f"per-cell time limit (default {DEFAULT_CELL_TIMEOUT:g}; 0 = none)",
    )
    p.add_argument("--network", choices=("bridge", "none"), default="bridge")
    p.add_argument(
        "--transport",
        choices=("auto", "proxy", "channel"),
        default="auto",
        help="how the sandbox reaches this process: auto (default) takes the proxy where it"
        " works here, else the channel (every byte over the docker run -i pipe)",
    )
    p.add_argument(
        "--memory",
        default=DEFAULT_MEMORY,
        help=f"memory limit, swap off (default {DEFAULT_MEMORY}; 0 = none)",
    )
    p.add_argument(
        "--cpus",
        type=float,
        default=DEFAULT_CPUS,
        help=f"CPU limit, e.g. 1.5 (default {DEFAULT_CPUS:g}; 0 = none)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "echo", "openai"),
        default="auto",
        help="who answers llm_query(): openai (needs OPENAI_API_KEY or OPENAI_BASE_URL), "
        "echo (answers 'echo:<prompt>'), auto = openai when configured, else echo",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"model name for the openai backend (default: $DOCKERREPL_MODEL or {DEFAULT_MODEL})",
    )
