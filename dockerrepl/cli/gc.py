"""``dockerrepl gc``: remove what dead DockerREPL owners left behind.

Containers: every DockerREPL container carries ``dockerrepl.version`` and
``dockerrepl.owner=<hostname>:<pid>:<start>`` (``<start>`` is field 22 of
``/proc/<pid>/stat``), and ``dockerrepl.pidns`` (the owner's PID namespace).
One is an orphan when the owner is on this host, in this PID namespace, and the
pid is gone, a zombie, or now belongs to a process with another start time.
Owners on other hosts or in other PID namespaces, owners that cannot be checked,
and containers without an owner label are kept (``--all`` removes them, after
asking).

Volumes: the channel transport keeps ``/workspace`` in a named volume carrying the
same labels. One is removed when its owner is dead (as for containers; ``--all``:
any), once no container uses it.

Workspaces: DockerREPL's ``dockerrepl-*`` directories under the temp dir (or
``workspace_dir``). One is stale only when it has the workspace layout, belongs
to this user, no container names it in ``dockerrepl.workspace``, no process has
a file or its cwd in it, and it was not modified for ``--min-age`` seconds (the
workspace of an orphan removed in the same run skips the age rule).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from .. import _docker
from .._docker import Engine
from .._files import remove_tree, tree_size
from .._labels import (
    LABEL_OWNER,
    LABEL_PIDNS,
    LABEL_VERSION,
    LABEL_WORKSPACE,
    pid_namespace,
    proc_stat,
)
from ..errors import DockerReplError, NoSuchContainer
from .errors import CliError

__all__ = [
    "Found",
    "cmd_gc",
    "list_containers",
    "list_volumes",
    "looks_like_workspace",
    "owner_status",
    "paths_in_use",
    "stale_workspaces",
    "sweep_volumes",
]

PREFIX = "dockerrepl-"
CLAIMED = "a container still uses it"
_FIELDS = ["{{json .ID}}", "{{json .Names}}", "{{json .State}}", "{{json .RunningFor}}"]
_FIELDS += ['{{json (.Label "' + k + '")}}' for k in (LABEL_OWNER, LABEL_WORKSPACE, LABEL_PIDNS)]
_FORMAT = "[" + ",".join(_FIELDS) + "]"  # one JSON row per container, as Found takes it
# Podman's ps has no .Label method; its .Labels is a map (docker's is a string)
_PODMAN_FIELDS = _FIELDS[:4] + [
    '{{json (index .Labels "' + k + '")}}' for k in (LABEL_OWNER, LABEL_WORKSPACE, LABEL_PIDNS)
]
_PODMAN_FORMAT = "[" + ",".join(_PODMAN_FIELDS) + "]"


@dataclass
class Found:
    """One dockerrepl container as ``docker ps`` lists it."""

    id: str
    name: str
    state: str
    running_for: str
    owner: str
    workspace: str
    pidns: str = ""  # the owner's PID namespace (containers from before 0.1.0 have none)


def list_containers(docker: Union[str, Engine], labels: Sequence[str] = ()) -> list[Found]:
    """Every container with ``dockerrepl.version`` (and all of ``labels``), any state."""
    argv = ["ps", "-a", "--no-trunc", "--filter", f"label={LABEL_VERSION}"]
    for label in labels:
        argv += ["--filter", f"label={label}"]
    fmt = _PODMAN_FORMAT if _docker.as_engine(docker).podman else _FORMAT
    res = _docker.run([*argv, "--format", fmt], timeout=60, docker=docker)
    found = []
    for line in res.stdout.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, list) and len(row) == 7:
            found.append(Found(*(str(x or "") for x in row)))
    return found


def list_volumes(docker: Union[str, Engine], labels: Sequence[str] = ()) -> list[Found]:
    """Every volume with ``dockerrepl.version`` (and all of ``labels``), as :class:`Found`
    rows (``id`` and ``name`` are the volume's name, ``state`` is ``volume``)."""
    argv = ["volume", "ls", "-q", "--filter", f"label={LABEL_VERSION}"]
    for label in labels:
        argv += ["--filter", f"label={label}"]
    names = _docker.run(argv, timeout=60, docker=docker).stdout.split()
    if not names:
        return []
    res = _docker.run(["volume", "inspect", *names], timeout=60, docker=docker, check=False)
    try:
        rows = json.loads(res.stdout or "[]")
    except ValueError:
        rows = []
    found = []
    for row in rows if isinstance(rows, list) else []:
        labels_of = (row.get("Labels") or {}) if isinstance(row, dict) else {}
        name = str(row.get("Name", "")) if isinstance(row, dict) else ""
        if name and isinstance(labels_of, dict):
            owner, pidns = labels_of.get(LABEL_OWNER, ""), labels_of.get(LABEL_PIDNS, "")
            ws = str(labels_of.get(LABEL_WORKSPACE, ""))
            found.append(Found(name, name, "volume", "", str(owner), ws, str(pidns)))
    return found


def sweep_volumes(
    docker: Engine, args: argparse.Namespace, hostname: str, my_pidns: str, verb: str
) -> tuple[int, int, int, list[str]]:
    """Remove the volumes of dead owners (``--all``: every one); ``(removed, kept, failed,
    the host dirs of the dead owners' removed volumes)``."""
    out = sys.stdout
    removed = kept = failures = 0
    released: list[str] = []
    for v in list_volumes(docker, args.label):
        verdict, reason = owner_status(v.owner, hostname, v.pidns, my_pidns)
        if verdict != "dead" and not args.all:
            kept += 1
            out.write(f"{'kept':<12} volume {v.name}: {reason}\n")
            continue
        if not args.dry_run:
            try:
                _docker.run(["volume", "rm", v.name], timeout=60, docker=docker)
            except DockerReplError as exc:
                failures += 1
                out.write(f"{'FAILED':<12} volume {v.name}: {getattr(exc, 'message', exc)}\n")
                continue
        removed += 1
        if verdict == "dead" and v.workspace:
            released.append(v.workspace)
        out.write(f"{verb:<12} volume {v.name}: {reason}\n")
    return removed, kept, failures, released


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it is someone else's
    fields = proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))


def owner_status(
    owner: str, hostname: Optional[str] = None, pidns: str = "", my_pidns: Optional[str] = None
) -> tuple[str, str]:
    """``(verdict, reason)``: verdict is ``live``, ``dead``, ``foreign`` or ``unknown``.

    ``pidns`` is the container's ``dockerrepl.pidns`` label; an owner in another PID
    namespace than ours (``my_pidns``) is foreign: its pid cannot be checked here.
    """
    hostname = socket.gethostname() if hostname is None else hostname
    my_pidns = pid_namespace() if my_pidns is None else my_pidns
    if not owner:
        return "unknown", "no owner label (--all removes it)"
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return "unknown", f"owner label {owner!r} is not host:pid:start"
    host, pid_text, start = parts
    if host != hostname:
        return "foreign", f"owned by a process on host {host!r}"
    if pidns and my_pidns and pidns != my_pidns:
        return "foreign", f"owned by a process in another PID namespace (pid:[{pidns}])"
    pid = int(pid_text)
    if not _pid_alive(pid):
        return "dead", f"owner pid {pid} is gone"
    fields = proc_stat(pid)
    now = fields[19] if fields and len(fields) > 19 else ""
    if start not in ("", "0") and now and now != start:
        return "dead", f"pid {pid} is now another process (started at {now}, not {start})"
    return "live", f"owner pid {pid} is alive"


def looks_like_workspace(path: str) -> bool:
    """A real directory named ``dockerrepl-*`` with DockerREPL's layout (no symlinks): a
    mounted workspace (``workspace/``), or the host dir of a volume workspace (the
    channel transport: only the CLI's ``docker-run.log``)."""
    if not os.path.basename(path.rstrip("/")).startswith(PREFIX) or not os.path.isabs(path):
        return False
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            return False
        ws = os.path.join(path, "workspace")
        log_file = os.path.join(path, "docker-run.log")
        if not os.path.lexists(ws):
            # a volume workspace's host dir holds the CLI's log and nothing else
            return (
                os.listdir(path) == ["docker-run.log"]
                and os.path.isfile(log_file)
                and not os.path.islink(log_file)
            )
        if os.path.islink(ws) or not os.path.isdir(ws):
            return False
    except OSError:
        return False
    return os.path.isdir(os.path.join(ws, ".dockerrepl")) or os.path.isfile(log_file)


def paths_in_use(roots: Iterable[str]) -> set[str]:
    """Which of ``roots`` hold a process's open file or cwd (as far as /proc lets us see)."""
    roots = {os.path.realpath(r) for r in roots}
    busy: set[str] = set()
    if not roots:
        return busy
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return busy
    for pid in pids:
        links = []
        for extra in ("cwd", "root"):
            links.append(f"/proc/{pid}/{extra}")
        try:
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            pass
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            for root in roots:
                if target == root or target.startswith(root + "/"):
                    busy.add(root)
    return busy


def _newest_mtime(path: str) -> float:
    newest = 0.0
    for p in (path, "docker-run.log", "workspace", "workspace/.dockerrepl"):
        try:
            newest = max(newest, os.lstat(os.path.join(path, p)).st_mtime)
        except OSError:
            pass
    return newest


def _size(path: str) -> int:
    # no os.walk: it recurses (RecursionError in a tree a cell nested 2,000 deep)
    return tree_size(path)


def stale_workspaces(
    scan_dirs: Iterable[str],
    claimed: set[str],
    min_age: float,
    released: Iterable[str] = (),
    now: Optional[float] = None,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(stale, kept)`` lists of ``(path, reason)``.

    ``claimed``: workspaces named by existing containers; ``released``: those of
    orphans removed in this run (no age rule for them).
    """
    now = time.time() if now is None else now
    released = {os.path.realpath(p) for p in released if looks_like_workspace(p)}
    candidates = set(released)
    for d in scan_dirs:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(PREFIX) and looks_like_workspace(e.path):
                candidates.add(os.path.realpath(e.path))
    claimed = {os.path.realpath(p) for p in claimed}
    busy = paths_in_use(candidates - claimed)
    me = os.geteuid()
    stale, kept = [], []
    for path in sorted(candidates):
        age = now - _newest_mtime(path)
        if path in claimed:
            kept.append((path, CLAIMED))
        elif path in busy:
            kept.append((path, "a running process has files open in it"))
        elif me != 0 and os.lstat(path).st_uid != me:
            kept.append((path, "it belongs to another user"))
        elif path not in released and age < min_age:
            kept.append((path, f"modified {age:.0f}s ago (--min-age {min_age:g})"))
        else:
            stale.append((path, "no container or process uses it"))
    return stale, kept


def _confirm(n: int, live: int) -> bool:
    if not sys.stdin.isatty():
        raise CliError(
            f"--all would remove {n} container(s), {live} of them in use; "
            "refusing to do that without --yes when stdin is not a terminal",
            "add --yes (or use --dry-run to see the list)",
            code=1,
        )
    sys.stderr.write(f"remove {n} dockerrepl container(s), {live} in use by live processes? [y/N] ")
    sys.stderr.flush()
    try:
        return input().strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_gc(args: argparse.Namespace) -> int:
    docker: Engine = args.engine
    out = sys.stdout
    verb = "would remove" if args.dry_run else "removed"
    hostname = socket.gethostname()
    my_pidns = pid_namespace()
    for label in args.label:
        if "=" not in label or label.startswith("="):
            raise CliError(f"--label wants KEY=VALUE, not {label!r}")
    considered = list_containers(docker, args.label)
    claims = list_containers(docker) if args.label else considered
    plan: list[tuple[Found, str, str]] = []
    live = 0
    for c in considered:
        verdict, reason = owner_status(c.owner, hostname, c.pidns, my_pidns)
        live += verdict == "live"
        if verdict == "dead" or args.all:
            plan.append((c, verdict, reason))
        else:
            out.write(f"{'kept':<12} container {c.name} ({c.id[:12]}): {reason}\n")
    if args.all and plan and not args.dry_run and not args.yes and not _confirm(len(plan), live):
        out.write("nothing removed\n")
        return 1
    failures = 0
    removed: list[Found] = []
    released: list[str] = []
    for c, verdict, reason in plan:
        if not args.dry_run:
            try:
                _docker.run(["rm", "-f", c.id], timeout=60, docker=docker)
            except NoSuchContainer:
                pass  # went away on its own meanwhile
            except DockerReplError as exc:
                failures += 1
                out.write(f"{'FAILED':<12} container {c.name}: {getattr(exc, 'message', exc)}\n")
                continue
        removed.append(c)
        if verdict == "dead" and c.workspace:
            released.append(c.workspace)
        out.write(f"{verb:<12} container {c.name} ({c.id[:12]}, {c.state}): {reason}\n")
    vols, vols_kept, vol_failures, vol_dirs = sweep_volumes(docker, args, hostname, my_pidns, verb)
    failures += vol_failures
    released += vol_dirs
    gone = {c.id for c in removed}
    claimed = {c.workspace for c in claims if c.workspace and c.id not in gone}
    scan = [tempfile.gettempdir(), *args.workspace_dir]
    stale, kept = stale_workspaces(scan, claimed, args.min_age, released)
    for path, reason in kept:
        if args.verbose or reason != CLAIMED:
            out.write(f"{'kept':<12} workspace {path}: {reason}\n")
    freed = swept = 0
    for path, reason in stale:
        size = _size(path)
        if not args.dry_run:
            # one workspace that cannot be removed is reported, and the others still are
            why = ""
            try:
                remove_tree(path)
            except OSError as exc:
                why = f": {exc}"
            except Exception as exc:  # never let one workspace stop the sweep
                why = f": {type(exc).__name__}: {exc}"
            if why or os.path.lexists(path):
                failures += 1
                out.write(
                    f"{'FAILED':<12} workspace {path}: could not remove everything in it{why}\n"
                )
                out.write(
                    "          fix: the container's root user wrote files there: "
                    f"`sudo rm -rf {path}`\n"
                )
                continue
        freed += size
        swept += 1
        out.write(f"{verb:<12} workspace {path} ({size / 1e6:.1f} MB): {reason}\n")
    out.write(
        f"{'gc (dry run)' if args.dry_run else 'gc'}: {verb} {len(removed)} container(s), "
        f"{vols} volume(s) and {swept} workspace(s), {freed / 1e6:.1f} MB; "
        f"kept {len(considered) - len(removed)} container(s) and {vols_kept} volume(s)\n"
    )
    return 1 if failures else 0
