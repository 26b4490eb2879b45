"""Helpers for the CLI tests: the real ``python -m dockerrepl`` in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Done:
    """A finished CLI process."""

    rc: int
    out: str
    err: str
    pid: int


def base_env(**extra: str) -> dict[str, str]:
    """The test environment: no API keys, no user history file, the source tree importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DOCKERREPL_"))}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["DOCKERREPL_HISTFILE"] = ""
    env.update(extra)
    return env


def cli(
    *args: str,
    env: Optional[dict[str, str]] = None,
    stdin: Optional[str] = None,
    timeout: float = 60,
    argv0: Sequence[str] = (sys.executable, "-m", "dockerrepl"),
) -> Done:
    """Run ``dockerrepl ARGS`` and wait for it."""
    proc = subprocess.Popen(
        [*argv0, *args],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env if env is not None else base_env(),
        text=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"dockerrepl {args} did not finish in {timeout}s:\n{out}\n{err}")
    return Done(proc.returncode, out, err, proc.pid)


def containers_of(pid: int) -> list[str]:
    """Names of dockerrepl containers (any state) whose owner label names ``pid`` on this host."""
    res = subprocess.run(
        [
            "docker",
            "ps",
            "-a",
            "--filter",
            "label=dockerrepl.version",
            "--format",
            '{{.Names}} {{.Label "dockerrepl.owner"}}',
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    prefix = f"{socket.gethostname()}:{pid}:"
    return [
        line.split()[0]
        for line in res.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].startswith(prefix)
    ]


def assert_clean_failure(done: Done) -> None:
    """A failure that says what went wrong and what to do, without a traceback."""
    assert done.rc != 0
    assert "Traceback" not in done.err + done.out
    assert "dockerrepl: error:" in done.err
    assert "  fix: " in done.err
