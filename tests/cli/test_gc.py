"""``dockerrepl gc`` with planted orphans, live owners, foreign owners and stale workspaces.

Other engineers' containers run on this engine at the same time, so every real
removal here is narrowed with ``--label dockerrepl.test=<unique>`` (or the
owner label of a REPL this test started), and the workspace sweep is pointed at
a private TMPDIR.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import pytest
from cli_helpers import base_env, cli
from docker_helpers import container_ids, exists, labels, skip_or_fail

from dockerrepl import DockerREPL
from dockerrepl._labels import owner_label, pid_namespace

pytestmark = pytest.mark.timeout(120)

HOST = socket.gethostname()
Plant = Callable[..., str]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _workspace(parent: Path, name: str, age: float) -> Path:
    """A directory with DockerREPL's workspace layout, last modified ``age`` seconds ago."""
    root = parent / f"dockerrepl-{name}"
    (root / "workspace" / ".dockerrepl").mkdir(parents=True)
    (root / "workspace" / "context_0.txt").write_text("x" * 1000)
    (root / "docker-run.log").write_text("")
    t = time.time() - age
    for p in (
        root / "workspace" / ".dockerrepl",
        root / "workspace",
        root / "docker-run.log",
        root,
    ):
        os.utime(p, (t, t))
    return root


@pytest.fixture
def plant(image: str) -> Iterator[tuple[str, Plant]]:
    """Start labelled `sleep` containers like a DockerREPL's; removes them (by id) afterwards."""
    tag = uuid.uuid4().hex[:12]
    created: list[str] = []

    def start(owner: Optional[str], workspace: str = "") -> str:
        argv = ["docker", "run", "-d", "--rm", "--network", "none"]
        argv += ["--label", "dockerrepl.version=test", "--label", f"dockerrepl.test={tag}"]
        if owner is not None:
            argv += ["--label", f"dockerrepl.owner={owner}"]
        if workspace:
            argv += ["--label", f"dockerrepl.workspace={workspace}"]
        argv += ["--entrypoint", "sleep", image, "300"]
        cid = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        created.append(cid.stdout.strip())
        return created[-1]

    try:
        yield tag, start
    finally:
        if created:
            subprocess.run(["docker", "rm", "-f", *created], capture_output=True, timeout=60)


def test_orphans_and_stale_workspaces(plant: tuple[str, Plant], tmp_path: Path) -> None:
    tag, start = plant
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    ws_orphan = _workspace(tmp, "orphan", age=0)  # fresh, but its owner is dead
    ws_stale = _workspace(tmp, "stale", age=3600)
    ws_fresh = _workspace(tmp, "fresh", age=0)
    ws_live = _workspace(tmp, "live", age=3600)
    ws_busy = _workspace(tmp, "busy", age=3600)
    not_ours = tmp / "dockerrepl-notours"  # no workspace layout: never touched
    not_ours.mkdir()
    os.utime(not_ours, (0, 0))

    dead = start(f"{HOST}:{_dead_pid()}:12345", str(ws_orphan))
    reused = start(f"{HOST}:{os.getpid()}:1")  # this pid, another start time: pid reuse
    live = start(owner_label(), str(ws_live))
    foreign = start("some-other-host.invalid:1:1")
    no_owner = start(None)

    env = base_env(TMPDIR=str(tmp))
    with open(ws_busy / "workspace" / "held.txt", "w"):
        dry = cli("gc", "--dry-run", "--label", f"dockerrepl.test={tag}", env=env)
        assert dry.rc == 0, dry.err
        would = [ln for ln in dry.out.splitlines() if ln.startswith("would remove")]
        assert sorted(_listed(would, "container")) == sorted(_names(dead, reused))
        assert sorted(_listed(would, "workspace")) == sorted([str(ws_orphan), str(ws_stale)])
        assert all(exists(c) for c in (dead, reused, live, foreign, no_owner))
        assert ws_stale.exists()

        done = cli("gc", "--label", f"dockerrepl.test={tag}", env=env)
        assert done.rc == 0, done.out + done.err
    assert not exists(dead)
    assert not exists(reused)
    assert all(exists(c) for c in (live, foreign, no_owner))
    assert not ws_orphan.exists()
    assert not ws_stale.exists()
    for kept in (ws_fresh, ws_live, ws_busy, not_ours):
        assert kept.exists(), kept
    assert "Traceback" not in done.out + done.err


def _listed(lines: list[str], kind: str) -> list[str]:
    """The names in ``would remove <kind> <name> ...`` lines."""
    return [ln.split()[3] for ln in lines if ln.split()[2] == kind]


def _names(*cids: str) -> list[str]:
    res = subprocess.run(
        ["docker", "inspect", "--format", "{{.Name}}", *cids],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [n.strip().lstrip("/") for n in res.stdout.splitlines()]


def test_all_asks_first_and_lists_with_dry_run(plant: tuple[str, Plant], tmp_path: Path) -> None:
    tag, start = plant
    ids = [start(owner_label()), start("some-other-host.invalid:1:1")]
    env = base_env(TMPDIR=str(tmp_path))
    narrow = ["--label", f"dockerrepl.test={tag}"]

    refused = cli("gc", "--all", *narrow, env=env)  # stdin is not a terminal and no --yes
    assert refused.rc == 1
    assert "--yes" in refused.err
    assert "Traceback" not in refused.err
    assert all(exists(c) for c in ids)

    dry = cli("gc", "--all", "--dry-run", *narrow, env=env)
    assert dry.rc == 0
    would = [ln for ln in dry.out.splitlines() if ln.startswith("would remove")]
    assert sorted(_listed(would, "container")) == sorted(_names(*ids))
    assert all(exists(c) for c in ids)

    done = cli("gc", "--all", "--yes", *narrow, env=env)
    assert done.rc == 0, done.out + done.err
    assert not any(exists(c) for c in ids)


def test_live_repl_survives(image: str, handler: object, tmp_path: Path) -> None:
    """A real DockerREPL of this process, with an old-looking workspace in the swept dir."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    repl = DockerREPL(
        image=image,
        lm_handler_address=handler.address,  # type: ignore[attr-defined]
        workspace_dir=str(tmp),
        timeout=30,
    )
    try:
        repl.execute_code("x = 1")
        root = Path(repl.temp_dir).parent
        for p in (root, root / "workspace", root / "docker-run.log"):
            os.utime(p, (0, 0))
        done = cli(
            "gc", "--min-age", "0", "--label", f"dockerrepl.owner={owner_label()}",
            env=base_env(TMPDIR=str(tmp)),
        )  # fmt: skip
        assert done.rc == 0, done.out + done.err
        assert repl.container_name in done.out  # considered ...
        assert "would remove" not in done.out
        assert not any(ln.startswith("removed") for ln in done.out.splitlines())  # ... and kept
        assert root.exists()
        assert repl.execute_code("print(x + 1)").stdout == "2\n"
    finally:
        repl.cleanup()


OWNER_IN_A_PID_NAMESPACE = """
import sys
from dockerrepl import DockerREPL
repl = DockerREPL(image=sys.argv[1], network="none", timeout=30)
try:
    assert repl.execute_code("x = 1").status == "ok"
    print(repl.container_name, flush=True)
    sys.stdin.read()  # until the test closes it
finally:
    repl.cleanup()
"""


def test_an_owner_in_another_pid_namespace_is_kept(image: str) -> None:
    """The owner runs in a PID namespace of its own (as inside a container with the docker
    socket mounted): its label holds its pid there, e.g. 1, which on this side is
    another, live, process. Judged by pid and start time alone it looked dead, and
    gc removed a live REPL's container; the dockerrepl.pidns label keeps it."""
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        skip_or_fail(f"cannot make a PID namespace here: {probe.stderr.decode().strip()}")
    owner = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
         OWNER_IN_A_PID_NAMESPACE, image],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=base_env(), text=True,
    )  # fmt: skip
    try:
        assert owner.stdout is not None and owner.stdin is not None
        name = owner.stdout.readline().strip()
        assert name.startswith("dockerrepl-"), owner.stderr.read() if owner.stderr else ""
        got = labels(name)
        assert got["dockerrepl.pidns"] != pid_namespace()
        assert got["dockerrepl.owner"].split(":")[1] in ("1", "2")  # its pid, over there
        done = cli("gc", "--min-age", "0", "--label", f"dockerrepl.owner={got['dockerrepl.owner']}")
        assert done.rc == 0, done.out + done.err
        assert f"kept         container {name}" in done.out
        assert "another PID namespace" in done.out
        assert container_ids(f"name=^{name}$")
    finally:
        if owner.stdin is not None:
            owner.stdin.close()  # the owner cleans up and exits
        try:
            owner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            owner.kill()
            owner.wait(timeout=30)
    assert owner.returncode == 0
    assert not container_ids(f"name=^{name}$")


def test_bad_label_is_a_usage_error() -> None:
    done = cli("gc", "--dry-run", "--label", "novalue", env=base_env())
    assert done.rc == 2
    assert "KEY=VALUE" in done.err


def _nest(top: Path, depth: int) -> None:
    """``depth`` nested directories under ``top`` (deeper than a path can name)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def test_a_deep_or_stuck_workspace_is_reported_and_the_others_still_go(tmp_path: Path) -> None:
    """A cell nests 2,000 directories in a second. shutil.rmtree died of RecursionError
    on them: gc exited 70 on that workspace every time and never reached the others.
    Now the deep one is removed, one that cannot be removed (an immutable file) is
    reported, and the sweep goes on to the rest."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    deep = _workspace(tmp, "a-deep", age=3600)  # sorts first
    _nest(deep / "workspace", 2000)
    stuck = _workspace(tmp, "b-stuck", age=3600)
    held = stuck / "workspace" / "immutable.txt"
    held.write_text("x")
    if subprocess.run(["chattr", "+i", str(held)], capture_output=True).returncode:
        skip_or_fail("chattr +i is not available here (needs root and a filesystem for it)")
    try:
        for p in (deep / "workspace", stuck / "workspace", deep, stuck):
            os.utime(p, (time.time() - 3600,) * 2)
        plain = _workspace(tmp, "c-plain", age=3600)
        done = cli(
            "gc", "--label", f"dockerrepl.test={uuid.uuid4().hex}", env=base_env(TMPDIR=str(tmp))
        )
        assert "Traceback" not in done.out + done.err, done.err
        assert done.rc == 1, done.out + done.err  # a partial failure
        assert not deep.exists()
        assert not plain.exists()
        assert stuck.exists()
        failed = [ln for ln in done.out.splitlines() if ln.startswith("FAILED")]
        assert len(failed) == 1 and str(stuck) in failed[0], done.out
    finally:
        subprocess.run(["chattr", "-i", str(held)], capture_output=True)
