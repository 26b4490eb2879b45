"""Security on a real engine: hardened defaults, options, the boundary, hostile containers.

The threat model and the list of what is tested where are in docs/security.md.
The two tests at the bottom need no engine (verify() on a tampered inspect dict,
and a grep that the host never unpickles anything).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest

from dockerrepl import DockerREPL
from dockerrepl._container import Container, ContainerConfig, bridge_gateway
from dockerrepl.errors import SecurityCheckError

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def inspect(repl: DockerREPL) -> dict:
    return repl._container.inspect()  # type: ignore[union-attr]


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
    assert hc["AutoRemove"] is True  # --rm: gone when the supervisor exits
    assert hc["Init"] is True
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


def test_network_none_proxy_is_a_unix_socket_in_the_mount(image, handler):
    with DockerREPL(
        image=image, lm_handler_address=handler.address, network="none", timeout=30
    ) as repl:
        assert repl.proxy_port == 0
        sock = os.path.join(repl.temp_dir, ".dockerrepl", "proxy.sock")
        assert os.path.exists(sock)
        r = repl.execute_code("print(llm_query_batched(['a', 'b']))")
        assert r.stdout == "['echo:a', 'echo:b']\n"
        assert len(r.rlm_calls) == 2


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
    argv = cfg.run_argv("name", "python3")
    assert argv[argv.index("--runtime") + 1] == "runsc"


# --------------------------------------------------------------------------- hostile container
def test_symlink_planted_in_the_mount_is_not_followed_by_the_host(repl, tmp_path):
    sentinel = tmp_path / "host-file"
    sentinel.write_text("untouched")
    run_ok(repl, f"import os\nos.symlink({str(sentinel)!r}, '/workspace/context_1.txt')")
    assert os.path.islink(os.path.join(repl.temp_dir, "context_1.txt"))
    repl.add_context("the payload", 1)
    assert sentinel.read_text() == "untouched"
    assert run_ok(repl, "print(context_1)") == "the payload\n"


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
    """Cell code can write to the supervisor's stdout (/proc/<ppid>/fd/1): the host
    channel. Whatever it writes is checked; a violation replaces the container."""
    run_ok(repl, "kept = 'yes'")
    repl.checkpoint()
    r = repl.execute_code(
        "import os\n"
        "fd = os.open(f'/proc/{os.getppid()}/fd/1', os.O_WRONLY)\n"
        f"os.write(fd, {payload!r})\n"
        "import time\ntime.sleep(5)\n"
    )
    assert r.status == "crashed"
    assert "protocol" in r.stderr
    assert repl.restarts == 1
    assert run_ok(repl, "print(kept)") == "yes\n"


def test_forged_result_is_schema_checked(repl):
    run_ok(repl, "kept = 'yes'")
    repl.checkpoint()
    code = (
        "import json, os, struct\n"
        "body = json.dumps({'type': 'result', 'id': %d, 'status': 'pwned', 'stdout': 5,"
        " 'locals': {'a': [1], 'b': 'str'}, 'truncated': [1, 2]}).encode()\n"
        "fd = os.open(f'/proc/{os.getppid()}/fd/1', os.O_WRONLY)\n"
        "os.write(fd, struct.pack('>I', len(body)) + body)\n"
        "import time\ntime.sleep(2)\n"
    )
    r = repl.execute_code(code % (repl._cell + 1))
    assert r.status == "crashed"  # not a status the REPL knows
    assert r.stdout == ""
    assert r.locals == {"b": "str"}
    assert r.output_truncated == {}
    # the supervisor is still busy with the real cell: the next cell finds it out, and
    # the host, which cannot trust that container any more, replaces it
    nxt = repl.execute_code("print(kept)")
    assert nxt.status == "crashed"
    assert "busy" in nxt.stderr
    assert run_ok(repl, "print(kept)") == "yes\n"


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
            "NetworkMode": "none",
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


def test_host_never_unpickles_anything_from_the_container():
    """Only the bootstrap (inside the container) loads dill; the host package never does."""
    pattern = re.compile(
        r"\b(pickle|cPickle|dill|marshal|shelve|_pickle)\.(load|loads|Unpickler)\b"
        r"|\bimport (pickle|marshal|shelve)\b|\bfrom (pickle|dill|marshal|shelve) import\b"
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
    argv = ContainerConfig(image="img", workspace=str(tmp_path)).run_argv("n", "python3")
    assert not any(a in ("-e", "--env", "--env-file") or a.startswith("--env") for a in argv)
    assert "sk-x" not in " ".join(argv)
