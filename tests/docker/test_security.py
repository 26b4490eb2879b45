"""Security on a real engine: hardened defaults, options, the boundary, hostile containers.

The threat model and the list of what is tested where are in docs/security.md.
The two tests at the bottom need no engine (verify() on a tampered inspect dict,
and a grep that the host never unpickles anything).
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import struct
import threading
import time
from pathlib import Path

import pytest
from docker_helpers import docker

from dockerrepl import DockerREPL
from dockerrepl._container import Container, bridge_gateway
from dockerrepl._runspec import ContainerConfig
from dockerrepl.errors import DockerCommandError, DockerReplError, SecurityCheckError

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def inspect(repl: DockerREPL) -> dict:
    return repl._session.container.inspect()  # type: ignore[union-attr]


def run_ok(repl: DockerREPL, code: str) -> str:
    r = repl.execute_code(code)
    assert r.status == "ok", r.stderr
    return r.stdout


# --------------------------------------------------------------------------- defaults
def test_hardened_defaults_visible_in_docker_inspect(repl):
    attrs = inspect(repl)
    hc = attrs["HostConfig"]
    assert hc["CapDrop"] == ["ALL"]
    assert not hc.get("CapAdd")
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert hc["Privileged"] is False
    assert hc["PidsLimit"] == 512
    assert hc["Memory"] == 2 * 1024**3
    assert hc["MemorySwap"] == hc["Memory"]  # swap off
    assert hc["NanoCpus"] == 1_000_000_000  # cpus=1.0 unless the caller says otherwise
    assert hc["AutoRemove"] is True  # --rm: gone when the supervisor exits
    assert not hc.get("Init")  # the supervisor is pid 1: no init holds the host channel
    assert hc["NetworkMode"] == "bridge"
    assert attrs["Config"]["Env"] is not None
    # and from inside: no capabilities, no privilege gain, a seccomp filter
    out = run_ok(
        repl,
        "st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
        "print(st['CapEff'].strip(), st['CapBnd'].strip(), st['NoNewPrivs'].strip(),"
        " st['Seccomp'].strip())",
    )
    cap_eff, cap_bnd, nnp, seccomp = out.split()
    assert int(cap_eff, 16) == 0
    assert int(cap_bnd, 16) == 0
    assert nnp == "1"
    assert seccomp == "2"  # filter mode: the engine's default profile


def test_no_host_environment_in_the_container(image, handler, monkeypatch):
    secret = "sk-dockerrepl-test-secret-123"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("DOCKERREPL_TEST_SECRET", secret)
    with DockerREPL(image=image, lm_handler_address=handler.address, timeout=30) as repl:
        names = run_ok(repl, "import os\nprint(sorted(os.environ))")
        assert "OPENAI_API_KEY" not in names
        assert "DOCKERREPL_TEST_SECRET" not in names
        # not in any process's environment either (init, supervisor, worker)
        out = run_ok(
            repl,
            "import os\nhits = []\n"
            "for p in os.listdir('/proc'):\n"
            "    if p.isdigit():\n"
            "        try:\n"
            "            if b'sk-dockerrepl' in open(f'/proc/{p}/environ', 'rb').read():\n"
            "                hits.append(p)\n"
            "        except OSError:\n"
            "            pass\n"
            "print(hits)",
        )
        assert out == "[]\n"
        assert secret not in str(inspect(repl)["Config"]["Env"])


# --------------------------------------------------------------------------- options
def test_all_options_applied_verified_and_working(image, handler):
    """memory, cpus, pids_limit, network="none", user, read_only together, then verified."""
    with DockerREPL(
        image=image,
        lm_handler_address=handler.address,
        context_payload="the context",
        timeout=30,
        memory="256m",
        cpus=0.5,
        pids_limit=32,
        network="none",
        user="65534:65534",
        read_only=True,
    ) as repl:
        hc = inspect(repl)["HostConfig"]
        assert hc["Memory"] == 256 * 1024**2
        assert hc["MemorySwap"] == hc["Memory"]
        assert hc["NanoCpus"] == 500_000_000
        assert hc["PidsLimit"] == 32
        assert hc["NetworkMode"] == "none"
        assert hc["ReadonlyRootfs"] is True
        assert "/tmp" in hc["Tmpfs"]
        assert inspect(repl)["Config"]["User"] == "65534:65534"
        gw = bridge_gateway()
        code = f"""
import errno, os, socket
print(os.getuid(), os.getgid())
try:
    socket.create_connection(({gw!r}, 80), timeout=3)
    print("egress")
except OSError as e:
    print("no-egress", e.errno)
try:
    socket.getaddrinfo("example.com", 443)
    print("dns")
except OSError:
    print("no-dns")
for p in ("/x", "/etc/x", "/tmp/x", "/workspace/x"):
    try:
        open(p, "w").write("1")
        print("w", p)
    except OSError as e:
        print("ro", p, errno.errorcode[e.errno])
print(llm_query("through the unix socket"))
print(len(context))
kept = 41
"""
        out = run_ok(repl, code).splitlines()
        assert out[0] == "65534 65534"
        assert out[1].startswith("no-egress")
        assert out[2] == "no-dns"
        assert out[3].startswith("ro /x ")
        assert out[4].startswith("ro /etc/x ")
        assert out[5] == "w /tmp/x"
        assert out[6] == "w /workspace/x"
        assert out[7] == "echo:through the unix socket"
        assert out[8] == str(len("the context"))
        # checkpoints work as 65534 (the mount is writable for it), and restore after a crash
        assert repl.checkpoint() == []
        assert os.path.isfile(os.path.join(repl.temp_dir, "state.dill"))
        crash = repl.execute_code("import os\nos._exit(1)")
        assert crash.status == "crashed"
        assert run_ok(repl, "print(kept + 1, llm_query('again'), len(context))") == (
            "42 echo:again 11\n"
        )


def test_network_none_proxy_is_a_unix_socket_outside_the_workspace(image, handler):
    with DockerREPL(
        image=image, lm_handler_address=handler.address, network="none", timeout=30
    ) as repl:
        assert repl.proxy_port == 0
        sock = os.path.join(repl._session.workspace.code_dir, "proxy.sock")
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        assert not os.path.lexists(os.path.join(repl.temp_dir, ".dockerrepl", "proxy.sock"))
        r = repl.execute_code("print(llm_query_batched(['a', 'b']))")
        assert r.stdout == "['echo:a', 'echo:b']\n"
        assert len(r.rlm_calls) == 2
        # read-only from inside: a cell can neither remove nor replace it
        out = run_ok(
            repl,
            "import os\n"
            "try:\n"
            "    os.unlink('/opt/dockerrepl/proxy.sock')\n"
            "except OSError as e:\n"
            "    print(e.errno)",
        )
        assert out == "30\n"  # EROFS


def checkpoint_cell(repl: DockerREPL) -> int | None:
    """The cell of the checkpoint in the (mounted) workspace, read by the test."""
    try:
        with open(os.path.join(repl.temp_dir, ".dockerrepl", "state.meta.json")) as f:
            return json.load(f).get("cell")
    except (OSError, ValueError):
        return None


def test_cleanup_never_follows_a_state_dir_the_cell_swapped_for_a_symlink(image, handler, tmp_path):
    """A cell replaced /workspace/.dockerrepl with a symlink to a host directory. With
    network="none" the proxy's socket lived there, and cleanup() (as root) unlinked
    <that host dir>/proxy.sock; the host also read that dir's state.meta.json (now no
    state file is read on the host at all: a restart's note takes the checkpoint's cell
    from the new supervisor's ready frame, read inside the container)."""
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "proxy.sock").write_text("a host file")
    (host_dir / "state.meta.json").write_text('{"cell": 99}')
    repl = DockerREPL(image=image, lm_handler_address=handler.address, network="none", timeout=30)
    try:
        run_ok(
            repl,
            "import os, shutil\n"
            # the same path inside the container, so the REPL's own state still works
            f"os.makedirs({str(host_dir)!r})\n"
            "shutil.rmtree('/workspace/.dockerrepl')\n"
            f"os.symlink({str(host_dir)!r}, '/workspace/.dockerrepl')\n"
            "open('/workspace/state.dill', 'wb').close()",
        )
        assert os.path.islink(os.path.join(repl.temp_dir, ".dockerrepl"))
    finally:
        repl.cleanup()
    assert (host_dir / "proxy.sock").read_text() == "a host file"
    assert sorted(os.listdir(host_dir)) == ["proxy.sock", "state.meta.json"]
    assert not os.path.exists(os.path.dirname(repl.temp_dir))


def test_read_only_tmpfs_is_size_capped(image, handler):
    with DockerREPL(
        image=image, lm_handler_address=handler.address, read_only=True, timeout=60
    ) as repl:
        r = repl.execute_code(
            "import errno\n"
            "try:\n"
            "    with open('/tmp/big', 'wb') as f:\n"
            "        for _ in range(300):\n"
            "            f.write(b'0' * (1 << 20))\n"
            "    print('wrote 300 MB')\n"
            "except OSError as e:\n"
            "    print(errno.errorcode[e.errno])\n"
        )
        assert r.stdout == "ENOSPC\n"


def test_read_only_tmpfs_is_a_quarter_of_a_small_memory_limit(image, handler):
    """tmpfs pages count against the memory limit: with memory="256m", a 256 MB /tmp
    could take it all, and no worker could start again (the container was wedged for
    about 3 minutes). /tmp is now capped at a quarter of the limit: ENOSPC at 64 MB."""
    with DockerREPL(
        image=image,
        lm_handler_address=handler.address,
        read_only=True,
        memory="256m",
        user="65534:65534",
        timeout=20,
    ) as repl:
        assert "size=64m" in inspect(repl)["HostConfig"]["Tmpfs"]["/tmp"]
        run_ok(repl, "kept = 1")
        r = repl.execute_code(
            "import errno\n"
            "try:\n"
            "    with open('/tmp/big', 'wb') as f:\n"
            "        for _ in range(250):\n"
            "            f.write(b'x' * (1 << 20))\n"
            "except OSError as e:\n"
            "    print(errno.errorcode[e.errno])\n"
        )
        assert (r.status, r.stdout) == ("ok", "ENOSPC\n"), r.stderr
        assert run_ok(repl, "print(kept)") == "1\n"


def test_proxy_on_the_bridge_gateway_and_token_required_from_the_container(repl):
    assert repl.proxy.host == bridge_gateway()
    assert repl.proxy.host not in ("0.0.0.0", "", "::")
    code = f"""
import socket
def status(headers):
    s = socket.create_connection(("host.docker.internal", {repl.proxy_port}), timeout=10)
    body = b'{{"prompt": "x"}}'
    head = b"POST /llm_query HTTP/1.1\\r\\nContent-Length: 16\\r\\n" + headers
    s.sendall(head + b"\\r\\n" + body)
    line = s.makefile("rb").readline()
    s.close()
    return int(line.split()[1])
print(status(b""), status(b"Authorization: Bearer guess\\r\\n"))
"""
    assert run_ok(repl, code) == "401 401\n"


def test_gvisor_runtime_option_is_passed_through(tmp_path):
    cfg = ContainerConfig(image="img", workspace=str(tmp_path), runtime="runsc")
    argv = cfg.run_argv("name", "python3", "L")
    assert argv[argv.index("--runtime") + 1] == "runsc"


# --------------------------------------------------------------------------- hostile container
def test_symlink_planted_in_the_mount_is_not_followed_by_the_host(repl, tmp_path):
    sentinel = tmp_path / "host-file"
    sentinel.write_text("untouched")
    run_ok(repl, f"import os\nos.symlink({str(sentinel)!r}, '/workspace/context_1.txt')")
    assert os.path.islink(os.path.join(repl.temp_dir, "context_1.txt"))
    repl.add_context("the first")  # an index is the next free one or one in use
    repl.add_context("the payload", 1)
    assert sentinel.read_text() == "untouched"
    assert run_ok(repl, "print(context_1)") == "the payload\n"


DEEP = (
    "import os\n"
    "def nest(top, depth):\n"
    "    os.makedirs(top)\n"
    "    os.chdir(top)\n"
    "    for _ in range(depth):\n"
    "        os.mkdir('d')\n"
    "        os.chdir('d')\n"
    "    os.mkdir('locked')\n"
    "    os.chmod('locked', 0)\n"
    "    os.chdir('/workspace')\n"
    "nest('/workspace/deep', 2000)\n"
    "nest('/workspace/context_0.txt', 2000)\n"
)


@pytest.mark.parametrize("user", [None, "65534:65534"], ids=["root", "nobody"])
def test_a_deep_tree_the_cell_made_breaks_neither_load_context_nor_cleanup(image, handler, user):
    """2,000 nested directories (about a second of cell time): shutil.rmtree raised
    RecursionError, so cleanup() left the workspace behind and load_context() failed
    on a planted context_0.txt tree."""
    repl = DockerREPL(image=image, lm_handler_address=handler.address, timeout=60, user=user)
    root = os.path.dirname(repl.temp_dir)
    try:
        run_ok(repl, DEEP)
        repl.load_context("the new context")
        assert run_ok(repl, "print(context, context_0 == context)") == "the new context True\n"
        assert sorted(os.listdir(root)) == ["code", "docker-run.log", "workspace"]
    finally:
        repl.cleanup()
    assert not os.path.lexists(root)


# Four busy-looping daemons that call themselves what snapshot writers are called
# (two by prctl(PR_SET_NAME), two through /proc/self/comm) and tell the supervisor,
# as the worker does at a snapshot's fork, that they are snapshot writers. Then the
# cell ignores the interrupt, so the worker is killed and the sweep runs.
RENAMED_DAEMONS = r"""
import ctypes, os, signal
from dockerrepl_bootstrap import protocol
from dockerrepl_bootstrap.checkpoint import CHECKPOINTER
for i in range(4):
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if i % 2:
            ctypes.CDLL(None).prctl(15, b"drepl-snapshot", 0, 0, 0)
        else:
            with open("/proc/self/comm", "w") as f:
                f.write("drepl-snapshot")
        while True:
            pass
    protocol.send_frame(CHECKPOINTER.ctrl, {"type": "snapshot", "pid": pid})  # as the worker does
signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    pass
"""

COUNT_RENAMED = r"""
import os, time
def renamed():
    found = []
    for p in os.listdir("/proc"):
        try:
            with open("/proc/%s/comm" % p) as f:
                comm = f.read().strip()
            with open("/proc/%s/stat" % p) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if comm == "drepl-snapshot" and state != "Z":
            found.append(p)
    return found
end = time.time() + 3
while renamed() and time.time() < end:
    time.sleep(0.1)
print(len(renamed()), x + 1)
"""


def test_daemons_named_like_snapshot_writers_do_not_survive_a_timeout_kill(image, handler):
    """The sweep spared every process whose comm was drepl-snapshot, a name any process
    can take: four such busy loops outlived the timeout kill until cleanup(). Now it
    spares only what the worker reported at fork, at most two, and kills those once
    the restore has waited for them; the checkpoint still comes back."""
    with DockerREPL(image=image, lm_handler_address=handler.address, timeout=2, grace=0.5) as repl:
        run_ok(repl, "x = 41")
        repl.checkpoint()
        r = repl.execute_code(RENAMED_DAEMONS)
        assert r.status == "timeout", r.stderr
        assert "killed" in r.stderr
        r = repl.execute_code(COUNT_RENAMED, timeout=20)
        assert (r.status, r.stdout) == ("ok", "0 42\n"), r.stderr
        # and snapshots are still taken and restored: a crash brings y back. The
        # background snapshot runs at nice 10: on a busy host it can take seconds
        run_ok(repl, "y = 7")
        cell = repl._session.cell
        end = time.monotonic() + 30
        while (checkpoint_cell(repl) or 0) < cell and time.monotonic() < end:
            time.sleep(0.1)
        assert repl.execute_code("import os\nos._exit(1)").status == "crashed"
        assert run_ok(repl, "print(x, y)") == "41 7\n"


def test_a_snapshot_writer_still_writing_at_a_timeout_kill_is_waited_for(image, handler):
    """The sweep after a timeout kill spares the real snapshot writer (reported at its
    fork), and the restore waits for it: the cell before the runaway one comes back."""
    with DockerREPL(image=image, lm_handler_address=handler.address, timeout=2, grace=0.5) as repl:
        run_ok(
            repl,
            "import time\n"
            "class Slow:\n"
            "    def __reduce__(self):\n"
            "        time.sleep(4)  # in the snapshot writer\n"
            "        return (int, (5,))\n"
            "slow, z = Slow(), 1",
        )
        r = repl.execute_code("import signal\nsignal.signal(2, signal.SIG_IGN)\nwhile True: pass")
        assert r.status == "timeout", r.stderr
        assert "checkpoint taken after cell 1" in r.stderr, r.stderr
        assert run_ok(repl, "print(slow, z)") == "5 1\n"


def inject_later(repl: DockerREPL, data: bytes, delay: float = 0.5) -> threading.Timer:
    """Write ``data`` into the host channel, as a compromised container would.

    Cell code can no longer reach the channel (test_cell_code_cannot_reach_the_host_channel),
    so these tests write into the pipe the host reads, through this process's own
    /proc/self/fd: the bytes arrive exactly as if the supervisor had sent them.
    """
    fileno = repl._session.container.proc.stdout.fileno()  # type: ignore[union-attr]

    def write() -> None:
        fd = os.open(f"/proc/self/fd/{fileno}", os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    timer = threading.Timer(delay, write)
    timer.start()
    return timer


def frame(obj: dict) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x00\x00\x05hello",  # not JSON
        b"\x00\x00\x00\x04null",  # not an object
        b"\xff\xff\xff\xff",  # a 4 GB frame
    ],
    ids=["garbage", "non-object", "huge-prefix"],
)
def test_forged_frames_on_the_host_channel_end_that_container_only(repl, payload):
    """Whatever arrives on the host channel is checked; a violation replaces the container."""
    run_ok(repl, "kept = 'yes'")
    repl.checkpoint()
    timer = inject_later(repl, payload)
    r = repl.execute_code("import time\ntime.sleep(5)\n")
    timer.join()
    assert r.status == "crashed"
    assert "protocol" in r.stderr
    assert repl.restarts == 1
    assert run_ok(repl, "print(kept)") == "yes\n"


def test_forged_result_is_schema_checked_and_bounded(repl):
    """A result that does not come from the supervisor: every field checked, every size capped
    (max_output_bytes, 10000 locals of repr_cap + 64, 16 Mi characters of final_answer)."""
    run_ok(repl, "kept = 'yes'")
    repl.checkpoint()
    forged = {
        "type": "result",
        "id": repl._session.cell + 1,
        "status": "pwned",
        "stdout": "F" * (20 << 20),
        "stderr": 5,
        "exception": "E" * 5000,
        "final_answer": "A" * (17 << 20),
        "locals": {**{f"n{i}": "v" * 5000 for i in range(12000)}, "a": [1], "x" * 2000: "y"},
        "truncated": {"stdout": -5, "stderr": True},
    }
    timer = inject_later(repl, frame(forged))
    r = repl.execute_code("import time\ntime.sleep(3)\n")
    timer.join()
    assert r.status == "crashed"  # not a status the REPL knows
    assert repl._options.max_output_bytes <= len(r.stdout) < repl._options.max_output_bytes + 200
    assert r.stdout.startswith("F") and r.stdout.endswith("F")
    assert r.output_truncated == {"stdout": (20 << 20) - repl._options.max_output_bytes}
    assert r.stderr == ""
    assert len(r.exception) == 200
    assert (16 << 20) <= len(r.final_answer) < (16 << 20) + 200
    assert len(r.locals) == 10_000
    assert "a" not in r.locals and "x" * 2000 not in r.locals
    assert max(len(v) for v in r.locals.values()) <= repl._options.repr_cap + 64
    # the supervisor is still busy with the real cell: the next cell finds it out, and
    # the host, which cannot trust that container any more, replaces it
    nxt = repl.execute_code("print(kept)")
    assert nxt.status == "crashed"
    assert "busy" in nxt.stderr
    assert run_ok(repl, "print(kept)") == "yes\n"


def test_replies_the_cell_code_forges_are_bounded_by_the_supervisor(repl):
    """Cell code can replace the worker's internal operations (the module is in its
    memory). Their replies reach the host only cut to their keys and under 1 MiB; an
    error message is cut to 16 Ki characters. Before this, the supervisor forwarded
    a reply of any size (up to the host's 256 MiB frame cap) for the host to hold."""
    run_ok(repl, "kept = 'yes'")
    run_ok(
        repl,
        "from dockerrepl_bootstrap import worker as b\n"
        "real = b.OPS['checkpoint']\n"
        "b.OPS['checkpoint'] = lambda args: {'skipped': [], 'blob': 'A' * (8 << 20)}\n",
    )
    with pytest.raises(DockerReplError, match=r"over the limit of 1048576"):
        repl.checkpoint()

    def fail(message: str) -> str:
        return f"def boom(args):\n    raise ValueError({message})\nb.OPS['checkpoint'] = boom\n"

    run_ok(repl, fail("'E' * (4 << 20)"))
    with pytest.raises(ValueError) as info:
        repl.checkpoint()
    assert "characters of the error dropped" in str(info.value)
    assert len(str(info.value)) < 20_000

    run_ok(repl, "b.OPS['checkpoint'] = real\ndel b, real, boom")
    assert repl.checkpoint() == []
    assert run_ok(repl, "print(kept)") == "yes\n"


def test_extra_args_reach_docker_run_and_the_defaults_still_hold(image, handler):
    """extra_args go on the command line; the hardening check still runs after start."""
    with DockerREPL(
        image=image,
        lm_handler_address=handler.address,
        extra_args=["--hostname", "sandbox-x", "--label=team=blue"],
    ) as repl:
        attrs = inspect(repl)
        assert attrs["Config"]["Hostname"] == "sandbox-x"
        assert attrs["Config"]["Labels"]["team"] == "blue"
        assert attrs["HostConfig"]["CapDrop"] == ["ALL"]
        assert run_ok(repl, "import socket\nprint(socket.gethostname())") == "sandbox-x\n"


def test_extra_args_the_engine_refuses_are_a_typed_error_naming_the_cause(image, tmp_path):
    """``--storage-opt size=`` caps the writable layer where the storage driver can
    (overlay2 on xfs with pquota, btrfs, zfs, devicemapper); elsewhere the engine's
    refusal comes back as DockerCommandError, quoted, and nothing is left behind."""
    ws = tmp_path / "ws"
    ws.mkdir()
    refused: DockerCommandError | None = None
    try:
        repl = DockerREPL(image=image, workspace_dir=str(ws), extra_args=["--storage-opt=size=1g"])
    except DockerCommandError as exc:
        refused = exc
    if refused is not None:
        assert "--storage-opt is not supported" in str(refused)
        assert list(ws.iterdir()) == []
        return
    with repl:  # an engine that can: the option is applied
        assert inspect(repl)["HostConfig"]["StorageOpt"] == {"size": "1g"}


TAMPER = r"""
import errno, glob, os
tried = {}
# where the bootstrap's modules claim to live: nothing is there (they came over stdin)
for path in ("/opt/dockerrepl/dockerrepl_bootstrap/supervisor.py", "/opt/dockerrepl/evil.py"):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "a").write("\nraise SystemExit('owned')\n")
        tried[path] = "written"
    except OSError as e:
        tried[path] = errno.errorcode[e.errno]
# what a later supervisor could pick up from the writable workspace, had its code been there
forge = "import sys\nsys.stdout.write('FORGED')\n"
for name in ("dockerrepl_bootstrap.py", "json.py", "struct.py", "socket.py", "select.py"):
    open("/workspace/.dockerrepl/" + name, "w").write(forge)
    open("/workspace/" + name, "w").write(forge)
for where in ("/workspace/", "/workspace/.dockerrepl/"):
    os.makedirs(where + "dockerrepl_bootstrap", exist_ok=True)
    for name in ("__init__.py", "main.py", "supervisor.py"):
        open(where + "dockerrepl_bootstrap/" + name, "w").write(forge)
os.makedirs("/workspace/.dockerrepl/lib/dill", exist_ok=True)
open("/workspace/.dockerrepl/lib/dill/__init__.py", "w").write(forge)
print(sorted(tried.items()))
"""


def test_cell_code_cannot_change_what_the_next_container_runs(any_transport_repl):
    """The bootstrap's code comes over stdin at each start and lives in no file. It used
    to live in /workspace/.dockerrepl, which cells can write: after any restart (docker
    kill, a daemon restart, a crash a cell can provoke) the next container ran the
    cell's version as its supervisor, and every later result could be forged. A cell
    may write the files its modules name (the container's own filesystem, gone with
    it) and plant packages in the workspace: none of it runs, on either transport (the
    channel's volume keeps /workspace across containers like the mount; the launcher's
    own ``import struct`` found a planted /workspace/struct.py until it dropped the
    working directory from sys.path)."""
    repl = any_transport_repl
    run_ok(repl, "kept = 'yes'")
    repl.checkpoint()
    out = run_ok(repl, TAMPER)
    assert out == (
        "[('/opt/dockerrepl/dockerrepl_bootstrap/supervisor.py', 'written'),"
        " ('/opt/dockerrepl/evil.py', 'written')]\n"
    )
    first = repl.container_name
    assert docker("kill", first).returncode == 0
    r = repl.execute_code("print(kept)")
    assert (r.status, r.stdout) == ("ok", "yes\n"), r.stderr
    assert repl.container_name != first
    assert "FORGED" not in r.stdout + r.stderr
    code = (
        "import os, dockerrepl_bootstrap.main as b\n"
        "print(b.__file__, os.path.exists('/opt/dockerrepl/evil.py'))"
    )
    # the new container's own filesystem: the planted files went with the old one
    assert run_ok(repl, code) == "/opt/dockerrepl/dockerrepl_bootstrap/main.py False\n"


# --------------------------------------------------------------------------- no engine
def _valid_attrs(cfg: ContainerConfig) -> dict:
    return {
        "HostConfig": {
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "PidsLimit": cfg.pids_limit,
            "Memory": 256 * 1024**2,
            "MemorySwap": 256 * 1024**2,
            "ReadonlyRootfs": True,
            "Tmpfs": {"/tmp": "rw,nosuid,nodev,size=64m"},
            "NetworkMode": "none",
            "NanoCpus": 500_000_000,
        },
        "Config": {"User": "65534:65534"},
    }


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("HostConfig", "CapDrop"), None),
        (("HostConfig", "CapDrop"), ["NET_RAW"]),
        (("HostConfig", "SecurityOpt"), []),
        (("HostConfig", "SecurityOpt"), ["seccomp=unconfined"]),
        (("HostConfig", "PidsLimit"), 0),
        (("HostConfig", "PidsLimit"), -1),
        (("HostConfig", "PidsLimit"), 4096),
        (("HostConfig", "Memory"), 0),
        (("HostConfig", "Memory"), 512 * 1024**2),  # not the limit that was asked for
        (("HostConfig", "NanoCpus"), 0),
        (("HostConfig", "NanoCpus"), 2_000_000_000),
        (("HostConfig", "Tmpfs"), None),
        (("HostConfig", "Tmpfs"), {"/tmp": "rw,size=2g"}),
        (("HostConfig", "MemorySwap"), -1),
        (("HostConfig", "MemorySwap"), 512 * 1024**2),
        (("HostConfig", "ReadonlyRootfs"), False),
        (("HostConfig", "NetworkMode"), "bridge"),
        (("HostConfig", "NetworkMode"), "host"),
        (("Config", "User"), ""),
        (("Config", "User"), "0:0"),
    ],
)
def test_verify_fails_closed_on_a_tampered_inspect(tmp_path, path, value):
    cfg = ContainerConfig(
        image="img",
        workspace=str(tmp_path),
        memory="256m",
        cpus=0.5,
        pids_limit=32,
        network="none",
        user="65534:65534",
        read_only=True,
    )
    c = Container(cfg, str(tmp_path / "log"))
    good = _valid_attrs(cfg)
    c.verify(copy.deepcopy(good))  # the untampered dict passes
    bad = copy.deepcopy(good)
    bad[path[0]][path[1]] = value
    with pytest.raises(SecurityCheckError):
        c.verify(bad)


def test_verify_checks_the_default_cpu_limit(tmp_path):
    cfg = ContainerConfig(image="img", workspace=str(tmp_path))  # the defaults: cpus=1.0
    c = Container(cfg, str(tmp_path / "log"))
    attrs = {
        "HostConfig": {
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "PidsLimit": 512,
            "Memory": 2 * 1024**3,
            "MemorySwap": 2 * 1024**3,
            "NanoCpus": 1_000_000_000,
        },
        "Config": {},
    }
    c.verify(copy.deepcopy(attrs))
    for nano in (0, None, 2_000_000_000):
        attrs["HostConfig"]["NanoCpus"] = nano
        with pytest.raises(SecurityCheckError, match="NanoCpus"):
            c.verify(copy.deepcopy(attrs))


def test_host_never_unpickles_anything_from_the_container():
    """Only the bootstrap (inside the container) loads dill; the host package never does.
    (The host marshals the bootstrap's own bytecode for the container, and loads none.)"""
    pattern = re.compile(
        r"\b(pickle|cPickle|dill|marshal|shelve|_pickle)\.(load|loads|Unpickler)\b"
        r"|\bimport (pickle|shelve)\b|\bfrom (pickle|dill|shelve) import\b"
        r"|\bfrom marshal import .*\bloads?\b"
    )
    hits = []
    for path in (ROOT / "dockerrepl").rglob("*.py"):
        if "_bootstrap" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []


def test_docker_run_argv_never_forwards_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    argv = ContainerConfig(image="img", workspace=str(tmp_path)).run_argv("n", "python3", "L")
    assert not any(a in ("-e", "--env", "--env-file") or a.startswith("--env") for a in argv)
    assert "sk-x" not in " ".join(argv)


# --------------------------------------------------------------------------- the supervisor
REACH_SUPERVISOR = r"""
import ctypes, errno, json, os, signal, struct
libc = ctypes.CDLL(None, use_errno=True)
out = {"ppid": os.getppid()}

def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))

def opened(path, flags):
    os.close(os.open(path, flags))

def ptrace(request):
    if libc.ptrace(request, 1, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "ptrace")
    libc.ptrace(17, 1, 0, 0)  # PTRACE_DETACH

def pidfd_getfd():
    pidfd = libc.syscall(434, 1, 0)  # pidfd_open: the same number on every architecture
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_open")
    if libc.syscall(438, pidfd, 1, 0) < 0:  # pidfd_getfd(pidfd, 1)
        raise OSError(ctypes.get_errno(), "pidfd_getfd")

attempt("fd1-write", lambda: opened("/proc/1/fd/1", os.O_WRONLY))
attempt("fd0-write", lambda: opened("/proc/1/fd/0", os.O_WRONLY))
attempt("fd0-read", lambda: opened("/proc/1/fd/0", os.O_RDONLY))
attempt("mem", lambda: opened("/proc/1/mem", os.O_RDWR))
attempt("environ", lambda: opened("/proc/1/environ", os.O_RDONLY))
attempt("ptrace-attach", lambda: ptrace(16))
attempt("ptrace-seize", lambda: ptrace(0x4206))
attempt("pidfd-getfd", pidfd_getfd)
# the reviewer's reproducer: a result frame for this very cell, written to the channel
body = json.dumps({"type": "result", "id": CELL, "status": "ok", "stdout": "FORGED",
                   "final_answer": "forged answer", "locals": {"pwned": "1"}}).encode()
def forge():
    fd = os.open("/proc/%d/fd/1" % os.getppid(), os.O_WRONLY)
    os.write(fd, struct.pack(">I", len(body)) + body)
attempt("forge", forge)
# pid 1 ignores signals from inside its container that it has no handler for
os.kill(1, signal.SIGSTOP)
os.kill(1, signal.SIGKILL)
print(json.dumps(out))
"""


@pytest.mark.parametrize("user", [None, "65534:65534"], ids=["root", "nobody"])
def test_cell_code_cannot_reach_the_host_channel(image, handler, user):
    """The supervisor is pid 1 and not dumpable: cell code (root or not, no capabilities)
    cannot open its fds, read or write its memory, ptrace it, or stop or kill it."""
    with DockerREPL(image=image, lm_handler_address=handler.address, timeout=30, user=user) as r:
        info = r._session.container.info  # type: ignore[union-attr]
        assert info["pid"] == 1
        assert info["nondumpable"] is True
        assert info["channel_private"] is True
        name = r.container_name
        res = r.execute_code(REACH_SUPERVISOR.replace("CELL", str(r._session.cell + 1)))
        assert res.status == "ok", res.stderr
        out = json.loads(res.stdout)
        assert out.pop("ppid") == 1
        assert out.pop("ptrace-attach") == "EPERM"
        assert out.pop("ptrace-seize") == "EPERM"
        assert out.pop("pidfd-getfd") in ("EPERM", "ENOSYS")  # ENOSYS: a kernel before 5.6
        assert out == dict.fromkeys(
            ["fd1-write", "fd0-write", "fd0-read", "mem", "environ", "forge"], "EACCES"
        )
        assert res.final_answer is None
        assert "pwned" not in res.locals
        # SIGSTOP and SIGKILL were ignored: the same container answers, nothing restarted
        assert run_ok(r, "print('still here')") == "still here\n"
        assert r.container_name == name
        assert r.restarts == 0


def test_worker_holds_no_descriptor_of_the_supervisor(repl):
    """After fork the worker closes everything but its own stdio and control socket."""
    out = run_ok(
        repl,
        "import json, os\n"
        "links = {}\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        links[fd] = os.readlink('/proc/self/fd/' + fd)\n"
        "    except OSError:\n"
        "        pass  # the descriptor listdir used, closed by now\n"
        "print(json.dumps(links))",
    )
    links = {int(fd): link for fd, link in json.loads(out).items()}
    assert links[0] == "/dev/null"
    assert {fd for fd, link in links.items() if link.startswith("pipe:")} == {1, 2}
    assert sum(link.startswith("socket:") for link in links.values()) == 1  # the control socket
    assert all(link.startswith(("pipe:", "socket:", "/dev/null")) for link in links.values())
    if os.geteuid() == 0:
        # and none of them is one of the supervisor's host pipes (seen from the host)
        pid = inspect(repl)["State"]["Pid"]
        host = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)}
        assert all(link.startswith("pipe:") for link in host)
        assert not host & set(links.values())


def test_crash_restore_llm_query_and_orphans_still_work(repl):
    run_ok(repl, "x = 41")
    repl.checkpoint()
    crash = repl.execute_code("import os\nos._exit(3)")
    assert crash.status == "crashed"
    assert "restored" in crash.stderr
    assert run_ok(repl, "print(x + 1, llm_query('hi'))") == "42 echo:hi\n"
    # grandchildren re-parented to pid 1 (the supervisor) are reaped, not left as zombies
    run_ok(
        repl,
        "import os\n"
        "for _ in range(20):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        if os.fork() == 0:\n"
        "            os._exit(0)\n"
        "        os._exit(0)\n"
        "    os.waitpid(pid, 0)\n",
    )
    zombies = run_ok(
        repl,
        "import os, time\n"
        "def zombies():\n"
        "    n = 0\n"
        "    for p in os.listdir('/proc'):\n"
        "        try:\n"
        "            stat = open(f'/proc/{p}/stat').read() if p.isdigit() else ') X'\n"
        "            n += stat.rsplit(')', 1)[1].split()[0] == 'Z'\n"
        "        except OSError:\n"
        "            pass\n"
        "    return n\n"
        "for _ in range(100):\n"
        "    if not zombies():\n"
        "        break\n"
        "    time.sleep(0.05)\n"
        "print(zombies())",
    )
    assert zombies == "0\n"


def test_forged_progress_frames_cannot_hold_the_host_past_a_ceiling(monkeypatch):
    """No engine: a channel that sends nothing but progress frames, 30 s apart on a fake
    clock. The host's deadline moves with them, never past timeout + margin + two restores."""
    import dockerrepl._session as session_mod
    from dockerrepl._options import ReplOptions

    clock = [1000.0]
    deadlines: list[float] = []

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return clock[0]

    class Channel:
        def recv(self, deadline: float) -> dict:
            deadlines.append(deadline)
            if clock[0] >= deadline:
                raise TimeoutError
            if len(deadlines) > 1000:
                raise AssertionError("the deadline kept moving")
            clock[0] += 30.0
            state = "restoring" if len(deadlines) % 2 else "running"
            return {"type": "progress", "id": 7, "state": state}

    monkeypatch.setattr(session_mod, "time", FakeTime)
    options = ReplOptions.build(image="img", grace=2.0, start_timeout=120.0, max_output_bytes=1000)
    session = session_mod.Session(options)  # nothing starts
    session.container = Channel()  # type: ignore[assignment]
    with pytest.raises(TimeoutError):
        session.await_result(7, 10.0, None)
    margin = 2.0 + session_mod.HOST_MARGIN
    assert max(deadlines) <= 1000.0 + 10.0 + margin + 2 * (120.0 + margin)
    assert len(deadlines) > 3  # the frames did move it (a restore bound each time)


def test_an_image_without_ctypes_is_reported_and_still_works(image, handler, caplog):
    # without ctypes the supervisor cannot make itself non-dumpable: the host must say so
    from docker_helpers import derived_image

    tag = derived_image(
        image, "dockerrepl/python-no-ctypes:test-v1", "rm -rf /usr/lib/python3.11/ctypes"
    )
    caplog.set_level("WARNING", logger="dockerrepl.repl")
    with DockerREPL(image=tag, lm_handler_address=handler.address) as repl:
        r = repl.execute_code("import importlib.util\nprint(importlib.util.find_spec('ctypes'))")
        assert r.stdout == "None\n"
        assert repl.execute_code("print(llm_query('x'))").stdout == "echo:x\n"
    assert any("could not make its host channel private" in m for m in caplog.messages)
