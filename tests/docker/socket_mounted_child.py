"""Run by test_socket_mounted.py INSIDE an outer container that has the engine's socket
mounted (the user's devcontainer or CI job): not on the host, not under pytest.

The outer container has the host's docker CLI, the project read-only at /src
(``PYTHONPATH=/src``), its own /tmp (the engine does not see it) and its own network
(the host's bridge gateway is not one of its addresses). It checks that this is so,
then opens ``DockerREPL`` with the default transport (and with ``network="none"``):
cells keep state, ``llm_query`` and ``llm_query_batched`` answer, ``docker kill`` of the
REPL's container restores the checkpoint; and ``transport="proxy"`` must fail cleanly.

usage: socket_mounted_child.py IMAGE PROBE_LABEL
Prints one JSON line (the last line of stdout); the test asserts on it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

# TMPDIR is a path of this container only (the test checks the engine's host has none)
os.makedirs(os.environ.get("TMPDIR") or "/tmp", exist_ok=True)

from dockerrepl import DockerREPL, LMHandler  # noqa: E402
from dockerrepl._labels import LABEL_OWNER, LABEL_VERSION, owner_label  # noqa: E402
from dockerrepl.clients import EchoClient  # noqa: E402
from dockerrepl.errors import DockerReplError  # noqa: E402

IMAGE, PROBE_LABEL = sys.argv[1], sys.argv[2]
OWNER = owner_label()
HOST_PREFIX = socket.gethostname() + ":"  # every owner label made in this container


class ReversedEcho(EchoClient):
    """``echo:<prompt>``, slowest for the first prompt of a batch: answers come back
    in the reverse of prompt order, so an order kept by completion time shows."""

    DELAYS = {"a": 0.4, "b": 0.2}

    def completion(self, prompt: Any) -> str:
        time.sleep(self.DELAYS.get(prompt, 0.0) if isinstance(prompt, str) else 0.0)
        return super().completion(prompt)


def trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def docker(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def ours(kind: str) -> list[str]:
    """Our containers (``kind="ps"``) or volumes (``"volume"``) with dockerrepl's labels:
    those whose owner label names a process of this container (any pid)."""
    fmt = '{{.ID}} {{.Label "%s"}}' if kind == "ps" else '{{.Name}} {{.Label "%s"}}'
    argv = ["ps", "-a", "--no-trunc"] if kind == "ps" else ["volume", "ls"]
    out = docker(*argv, "--filter", f"label={LABEL_VERSION}", "--format", fmt % LABEL_OWNER)
    if out.returncode != 0:
        return [f"ERROR {out.stderr.strip()}"]
    return sorted(
        line.split()[0]
        for line in out.stdout.splitlines()
        if line.split()[1:2] and line.split()[1].startswith(HOST_PREFIX)
    )


def settle(timeout: float = 15) -> None:
    """Wait (a while) for our containers and volumes to go: `docker run --rm` removes an
    exited container asynchronously."""
    end = time.monotonic() + timeout
    while (ours("ps") or ours("volume")) and time.monotonic() < end:
        time.sleep(0.2)


def cell(repl: DockerREPL, code: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = repl.execute_code(code)
    return {
        "code": code,
        "status": getattr(r, "status", None),
        "stdout": r.stdout,
        "stderr": r.stderr[-3000:],
        "calls": [[c.prompt, c.response] for c in r.rlm_calls],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def environment() -> dict[str, Any]:
    """What makes this a socket-mounted container, checked rather than assumed."""
    from dockerrepl._container import bridge_gateway

    env: dict[str, Any] = {"owner": OWNER, "python": sys.version.split()[0]}
    v = docker("version", "--format", "{{.Client.Version}} {{.Server.Version}}")
    env["docker_version"] = v.stdout.strip() if v.returncode == 0 else None
    env["docker_error"] = v.stderr.strip()[-500:]
    if v.returncode != 0:
        return env
    gw = env["gateway"] = bridge_gateway()
    s = socket.socket()
    try:
        s.bind((gw, 0))
        env["gateway_bind_error"] = None
    except OSError as exc:
        env["gateway_bind_error"] = str(exc)
    finally:
        s.close()
    # a directory of ours, bind-mounted by name: the engine has no such path
    mine = tempfile.mkdtemp(prefix="seen-by-engine-")
    with open(os.path.join(mine, "marker"), "w") as f:
        f.write("ours")
    probe = docker(
        *("run", "--rm", "--label", PROBE_LABEL, "--network", "none"),
        *("--mount", f"type=bind,src={mine},dst=/m,readonly", IMAGE, "cat", "/m/marker"),
        timeout=60,
    )
    env["tmp_probe"] = {
        "path": mine,
        "rc": probe.returncode,
        "stdout": probe.stdout,
        "stderr": probe.stderr.strip()[-500:],
    }
    return env


def proxy_failure(address: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``transport="proxy"`` here: which error, how fast, what it leaves."""
    out: dict[str, Any] = {"kwargs": kwargs}
    t0 = time.perf_counter()
    try:
        repl = DockerREPL(image=IMAGE, lm_handler_address=address, transport="proxy", **kwargs)
    except DockerReplError as exc:
        out["error"] = type(exc).__name__
        out["mro"] = [k.__name__ for k in type(exc).__mro__]
        out["message"] = str(exc)[-1000:]
    except Exception as exc:  # not ours: the test says so
        out["error"] = type(exc).__name__
        out["mro"] = [k.__name__ for k in type(exc).__mro__]
        out["message"] = trace(exc)[-3000:]
    else:
        out["error"] = None
        out["transport"] = getattr(repl, "transport", None)
        repl.cleanup()
    out["seconds"] = round(time.perf_counter() - t0, 3)
    settle()
    out["containers_after"] = ours("ps")
    out["volumes_after"] = ours("volume")
    return out


def contract(address: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Default transport: state, llm_query, batched order, kill and restore, cleanup."""
    out: dict[str, Any] = {"kwargs": kwargs, "cells": {}}
    t0 = time.perf_counter()
    repl = None
    try:
        repl = DockerREPL(image=IMAGE, lm_handler_address=address, **kwargs)
        out["open_seconds"] = round(time.perf_counter() - t0, 3)
        out["transport"] = getattr(repl, "transport", "<no transport attribute>")
        out["containers_open"] = ours("ps")
        out["volumes_open"] = ours("volume")
        out["first_container"] = repl.container_name
        c = out["cells"]
        c["state"] = cell(repl, "x = 41\nseen = []")
        c["llm"] = cell(repl, "print(x + 1)\nprint(llm_query('hi'))")
        c["batched"] = cell(repl, "r = llm_query_batched(['a', 'b', 'c'])\nprint(r)")
        out["checkpoint_skipped"] = repl.checkpoint()  # the default auto_checkpoint is async
        t1 = time.perf_counter()
        killed = docker("kill", str(repl.container_name))
        out["kill"] = {"rc": killed.returncode, "stderr": killed.stderr.strip()[-500:]}
        c["after_kill"] = cell(repl, "print(x, r)\nprint(llm_query('again'))")
        out["restore_seconds"] = round(time.perf_counter() - t1, 3)
        out["restarts"] = repl.restarts
        out["second_container"] = repl.container_name
    except Exception as exc:
        out["exception"] = trace(exc)[-4000:]
    finally:
        if repl is not None:
            t2 = time.perf_counter()
            try:
                repl.cleanup()
            except Exception as exc:
                out["cleanup_exception"] = trace(exc)[-2000:]
            out["cleanup_seconds"] = round(time.perf_counter() - t2, 3)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    settle()
    out["containers_after"] = ours("ps")
    out["volumes_after"] = ours("volume")
    return out


def main() -> None:
    t0 = time.perf_counter()
    result: dict[str, Any] = {"env": environment()}
    if result["env"]["docker_version"] is None:  # the mounted CLI does not run here
        print(json.dumps(result))
        return
    with LMHandler(ReversedEcho()) as handler:
        result["handler"] = list(handler.address)
        result["proxy"] = [proxy_failure(handler.address, kw) for kw in ({}, {"network": "none"})]
        result["runs"] = [contract(handler.address, kw) for kw in ({}, {"network": "none"})]
    result["seconds"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
