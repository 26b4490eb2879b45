"""The channel transport on the local engine: what is particular to it (issue #12).

The core REPL contract runs under both transports elsewhere (tests/docker/test_repl.py,
test_remote_engine.py, test_socket_mounted.py, test_rootless.py). Here: what only the
channel has to get right. No bind mount at all; LM calls from code a cell left running
answered between cells; the relay's refusals are the proxy's (token, bad frames, budget);
file errors typed as on a mount; the options that change the container (``user=``,
``read_only``) on a volume; and the volume gone after ``cleanup()``.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from docker_helpers import docker

from dockerrepl import DockerREPL
from dockerrepl.errors import WorkspacePathError

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def chan(image, handler):
    with DockerREPL(
        image=image, lm_handler_address=handler.address, transport="channel", timeout=60
    ) as r:
        assert r.transport == "channel"
        yield r


def volumes_of(r: DockerREPL) -> list[str]:
    name = r._session.workspace.name  # type: ignore[attr-defined]
    out = docker("volume", "ls", "-q", "--filter", f"name={name}")
    return out.stdout.split()


def test_nothing_of_the_host_is_mounted(chan):
    info = json.loads(docker("inspect", chan.container_name).stdout)[0]
    mounts = info["Mounts"]
    assert [(m["Type"], m["Destination"]) for m in mounts] == [("volume", "/workspace")]
    labels = json.loads(docker("volume", "inspect", mounts[0]["Name"]).stdout)[0]["Labels"]
    assert labels["dockerrepl.owner"] == info["Config"]["Labels"]["dockerrepl.owner"]
    assert chan.temp_dir == "" and chan.proxy_port == 0
    # the launcher is short; the bootstrap came over stdin and lives in no file
    assert len(info["Args"][-1]) < 300
    res = chan.execute_code(
        "import os, dockerrepl_bootstrap as b\n"
        "print(b.__file__, os.path.exists(b.__file__), os.path.exists('/opt/dockerrepl'))"
    )
    assert res.stdout == "/opt/dockerrepl/dockerrepl_bootstrap/__init__.py False False\n"


def test_a_thread_left_running_gets_its_answer_between_cells(chan):
    """With the proxy such a call is served at once; the channel's idle reader does the
    same (without it, the call waited for the next request)."""
    r = chan.execute_code(
        "import threading, time\n"
        "got = {}\n"
        "def later():\n"
        "    time.sleep(0.3)\n"
        "    t = time.time()\n"
        "    got['a'] = llm_query('late')\n"
        "    got['took'] = time.time() - t\n"
        "threading.Thread(target=later).start()\n"
    )
    assert r.status == "ok", r.stderr
    time.sleep(2.0)  # no request meanwhile
    res = chan.execute_code("print(got['a'], got['took'] < 1.0)")
    assert res.stdout == "echo:late True\n", res.stdout + res.stderr


def test_relay_refusals_are_the_proxys(chan):
    """A cell can talk to the relay itself: a wrong token, a frame that is not JSON, a
    body over the cap get the proxy's statuses and strings; the REPL goes on."""
    res = chan.execute_code(
        "import json, socket, struct\n"
        "from dockerrepl_bootstrap.namespace import REPL\n"
        "name = REPL.config['proxy']['unix']\n"
        "def ask(raw):\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.connect(name)\n"
        "    s.sendall(struct.pack('>I', len(raw)) + raw)\n"
        "    n = struct.unpack('>I', s.recv(4, socket.MSG_WAITALL))[0]\n"
        "    out = json.loads(s.recv(n, socket.MSG_WAITALL))\n"
        "    s.close()\n"
        "    return out\n"
        "body = json.dumps({'prompt': 'x'})\n"
        "print(ask(json.dumps({'path': '/llm_query', 'body': body, 'cell': 0,"
        " 'token': 'nope'}).encode()))\n"
        "print(ask(b'{not json'))\n"
        "print(ask(json.dumps({'path': '/nope', 'body': '{}', 'cell': 0,"
        " 'token': REPL.config['token']}).encode()))\n"
        "print(ask(json.dumps({'path': '/llm_query', 'body': '[1', 'cell': 0,"
        " 'token': REPL.config['token']}).encode())['status'])\n"
    )
    lines = res.stdout.splitlines()
    assert res.status == "ok", res.stderr
    assert lines[0] == "{'status': 401, 'body': {'error': 'missing or wrong token'}}"
    assert lines[1].startswith("{'status': 400, 'body': {'error': 'bad JSON:")
    assert lines[2] == "{'status': 404, 'body': {'error': \"no such endpoint '/nope'\"}}"
    assert lines[3] == "400"
    assert chan.execute_code("print(llm_query('still'))").stdout == "echo:still\n"


def test_budgets_hold_over_the_channel(image, handler):
    with DockerREPL(
        image=image, lm_handler_address=handler.address, transport="channel", max_llm_calls=2
    ) as r:
        res = r.execute_code("print(llm_query_batched(['a', 'b', 'c']))")
        assert res.status == "ok", res.stderr
        assert "budget exceeded" in res.stdout
        assert len(res.rlm_calls) == 2


def test_file_errors_are_typed_as_on_a_mount(chan, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1000))
    assert chan.upload(str(src), "d/f.bin") == 1000
    chan.execute_code("import os\nos.symlink('/etc/passwd', 'link')\nos.mkfifo('fifo')")
    with pytest.raises(WorkspacePathError, match="symlink"):
        chan.download("link", str(tmp_path / "out"))
    with pytest.raises(WorkspacePathError, match="FIFO"):
        chan.download("fifo", str(tmp_path / "out"))
    with pytest.raises(WorkspacePathError, match="symlink"):
        chan.upload(str(src), "link")
    with pytest.raises(FileNotFoundError):
        chan.download("missing.txt", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="cap"):
        chan.download("d/f.bin", str(tmp_path / "out"), max_bytes=10)
    with pytest.raises(WorkspacePathError):
        chan.upload(str(src), "../escape")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*.part"))
    # a directory planted where a context goes is replaced, as on a mount
    chan.execute_code("os.makedirs('context_0.txt/deep')")
    chan.load_context("replaced")
    assert chan.execute_code("print(context)").stdout == "replaced\n"
    assert chan.execute_code("print(llm_query('ok'))").stdout == "echo:ok\n"


@pytest.mark.parametrize(
    "kwargs", [{"user": "65534:65534"}, {"read_only": True}], ids=["user", "read_only"]
)
def test_hardening_options_on_a_volume(image, handler, kwargs):
    with DockerREPL(
        image=image,
        lm_handler_address=handler.address,
        transport="channel",
        auto_checkpoint="sync",
        **kwargs,
    ) as r:
        r.load_context("ctx")
        res = r.execute_code("import os\nx = 7\nprint(os.getuid(), context, llm_query('u'))")
        uid = "65534" if "user" in kwargs else "0"
        assert res.stdout == f"{uid} ctx echo:u\n", res.stderr
        docker("kill", r.container_name)
        res = r.execute_code("print(x)")
        assert (res.status, res.stdout) == ("ok", "7\n"), res.stderr


def test_cleanup_removes_the_volume(image, handler):
    r = DockerREPL(image=image, lm_handler_address=handler.address, transport="channel")
    assert len(volumes_of(r)) == 1
    name = r._session.workspace.name  # type: ignore[attr-defined]
    r.cleanup()
    assert docker("volume", "ls", "-q", "--filter", f"name={name}").stdout.split() == []
