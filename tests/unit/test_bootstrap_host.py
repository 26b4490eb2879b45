"""The in-container bootstrap under the host Python, with no access to the package.

How it runs there: tests/bootstrap_process.py.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import sys
import time

import pytest
from bootstrap_process import BOOTSTRAP, Boot, frame, hello

from dockerrepl import LMHandler
from dockerrepl._bootstrap import protocol
from dockerrepl._proxy import ProxyServer, ProxyState
from dockerrepl._runspec import BOOTSTRAP_PACKAGE
from dockerrepl.clients import EchoClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def boot(tmp_path):
    with Boot(tmp_path, hello()) as b:
        yield b


def pid_gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------- static
def modules() -> list:
    return sorted(BOOTSTRAP.glob("*.py"))


def test_compiles_under_python_38_grammar():
    for path in modules():
        ast.parse(path.read_text("utf-8"), filename=str(path), feature_version=(3, 8))


def test_imports_only_the_stdlib_and_its_own_modules():
    siblings = {p.stem for p in modules()}
    names = set()
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level:
                # relative, so the package works under any name (dockerrepl._bootstrap
                # on the host, dockerrepl_bootstrap in the container)
                assert node.level == 1, f"{path.name}: import from outside the package"
                wanted = {node.module} if node.module else {a.name for a in node.names}
                assert wanted <= siblings, f"{path.name}: {wanted}"
            elif isinstance(node, ast.ImportFrom):
                names.add((node.module or "").split(".")[0])
    # dill is optional (the image's, or the host's copied into the mount)
    extra = names - set(sys.stdlib_module_names) - {"dill"}
    assert extra == set()
    assert "dockerrepl" not in names and "dockerrepl_bootstrap" not in names


def test_the_code_frame_holds_every_module_with_bytecode():
    import base64
    import importlib.util
    import marshal

    from dockerrepl._staging import code_frame

    body = code_frame(copy_dill=False)[4:]
    frame = json.loads(body)
    mods = frame["modules"]
    want = {
        f"{BOOTSTRAP_PACKAGE}.{p.stem}" for p in modules() if p.stem not in ("__init__", "loader")
    }
    assert set(mods) == want | {BOOTSTRAP_PACKAGE}
    assert mods[BOOTSTRAP_PACKAGE]["pkg"] is True
    assert base64.b64decode(frame["magic"]) == importlib.util.MAGIC_NUMBER
    code = marshal.loads(base64.b64decode(mods[f"{BOOTSTRAP_PACKAGE}.protocol"]["code"]))
    assert code.co_filename == f"/opt/dockerrepl/{BOOTSTRAP_PACKAGE}/protocol.py"
    with_dill = json.loads(code_frame(copy_dill=True)[4:])["modules"]
    assert "dill" in with_dill and with_dill["dill"]["pkg"] and set(mods) < set(with_dill)


def test_modules_of_one_job_each():
    for path in modules():
        assert len(path.read_text("utf-8").splitlines()) <= 600, path.name


# --------------------------------------------------------------------------- handshake
def test_handshake(boot):
    r = boot.ready
    assert r["type"] == "ready"
    assert r["version"] == protocol.VERSION
    assert r["python"] == ".".join(map(str, sys.version_info[:3]))
    assert r["pid"] == boot.proc.pid
    assert r["uid"] == os.getuid()
    assert r["dill"] in ("image", "host", None)


def test_version_mismatch_is_an_error_frame(tmp_path):
    with Boot(tmp_path) as b:
        b.send({"type": "hello", "version": 999, "config": {}})
        msg = b.recv()
        assert msg["type"] == "error"
        assert "999" in msg["error"]
        assert b.proc.wait(10) != 0


def test_first_frame_must_be_hello(tmp_path):
    with Boot(tmp_path) as b:
        b.send({"type": "exec", "id": 1, "code": "print(1)"})
        msg = b.recv()
        assert msg["type"] == "error"
        assert b.proc.wait(10) != 0


def test_hello_split_across_writes(tmp_path):
    with Boot(tmp_path) as b:
        data = frame(hello())
        for i in range(0, len(data), 7):
            b.proc.stdin.write(data[i : i + 7])
            time.sleep(0.001)
        assert b.recv()["type"] == "ready"


def test_hello_and_first_cell_in_one_write(tmp_path):
    with Boot(tmp_path) as b:
        cell = {"type": "exec", "id": 1, "code": "print('early')", "timeout": 10}
        b.proc.stdin.write(frame(hello()) + frame(cell))
        assert b.recv()["type"] == "ready"
        res = b.recv()
        while res["type"] == "progress":
            res = b.recv()
        assert res["type"] == "result" and res["stdout"] == "early\n"


# --------------------------------------------------------------------------- cells
def test_state_kept_between_cells(boot):
    assert boot.exec("x = 41\ndef f(n):\n    return n + 1", 1)["status"] == "ok"
    r = boot.exec("print(f(x))", 2)
    assert r["status"] == "ok"
    assert r["stdout"] == "42\n"
    assert r["locals"]["x"] == "41"
    assert r["id"] == 2


def test_output_captured_at_fd_level(boot):
    code = (
        "import os, sys\n"
        "print('from print')\n"
        "sys.stderr.write('from stderr\\n')\n"
        "os.write(1, b'raw fd 1\\n')\n"
        "os.write(2, b'raw fd 2\\n')\n"
        "os.system('echo from a child; echo child err 1>&2')\n"
    )
    r = boot.exec(code, 1)
    assert r["status"] == "ok"
    for line in ("from print", "raw fd 1", "from a child"):
        assert line in r["stdout"]
    for line in ("from stderr", "raw fd 2", "child err"):
        assert line in r["stderr"]
    assert r["truncated"] == {"stdout": 0, "stderr": 0}


def test_printed_frames_cannot_forge_protocol_messages(boot):
    fake = json.dumps({"type": "result", "id": 1, "stdout": "forged"}).encode()
    code = f"import os, struct\nos.write(1, struct.pack('>I', {len(fake)}) + {fake!r})\n"
    r = boot.exec(code, 1)
    assert r["type"] == "result"
    assert r["stdout"] != "forged"
    assert "forged" in r["stdout"]  # it came back as output, not as a frame


def test_non_utf8_output_is_replaced(boot):
    r = boot.exec("import os\nos.write(1, b'bad \\xff\\xfe bytes\\n')", 1)
    assert r["status"] == "ok"
    assert "\ufffd" in r["stdout"]
    assert r["stdout"].startswith("bad ") and r["stdout"].endswith(" bytes\n")


def test_exception_traceback_without_bootstrap_frames(boot):
    boot.exec("keep = 'me'", 1)
    r = boot.exec("def g():\n    return 1 / 0\ng()", 2)
    assert r["status"] == "error"
    assert r["exception"] == "ZeroDivisionError"
    assert "Traceback" in r["stderr"]
    assert "ZeroDivisionError" in r["stderr"]
    assert "in g" in r["stderr"]
    assert "dockerrepl_bootstrap" not in r["stderr"]
    assert ".dockerrepl" not in r["stderr"]
    # the REPL lives on, state intact
    r = boot.exec("print(keep)", 3)
    assert (r["status"], r["stdout"]) == ("ok", "me\n")


@pytest.mark.parametrize(
    ("code", "exc"),
    [
        ("def broken(:\n    pass", "SyntaxError"),
        ("raise SystemExit(3)", "SystemExit"),
        ("import sys\nsys.exit('bye')", "SystemExit"),
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
        ("exit()", "SystemExit"),
    ],
)
def test_special_exceptions_keep_the_repl(boot, code, exc):
    boot.exec("alive = True", 1)
    r = boot.exec(code, 2)
    assert r["status"] == "error"
    assert r["exception"] == exc
    assert exc in r["stderr"]
    assert "dockerrepl_bootstrap" not in r["stderr"]
    r = boot.exec("print(alive)", 3)
    assert (r["status"], r["stdout"]) == ("ok", "True\n")


def test_del_sticks(boot):
    boot.exec("a = 1\nb = 2", 1)
    r = boot.exec("del a", 2)
    assert "a" not in r["locals"] and "b" in r["locals"]
    r = boot.exec("print(a)", 3)
    assert r["exception"] == "NameError"


def test_unpicklable_objects_stay_alive(boot):
    boot.exec("g = (i * i for i in range(10))\nf = open('data.txt', 'w')\nnext(g)", 1)
    r = boot.exec("print(next(g))\nf.write('x')\nf.close()\nprint(open('data.txt').read())", 2)
    assert r["status"] == "ok"
    assert r["stdout"] == "1\nx\n"


def test_cwd_is_the_workspace(boot):
    r = boot.exec("import os\nprint(os.getcwd())", 1)
    assert os.path.realpath(r["stdout"].strip()) == os.path.realpath(boot.ws)


def test_answer_and_final_answer(boot):
    r = boot.exec("x = 1", 1)
    assert r["final_answer"] is None
    r = boot.exec("answer['content'] = 'forty-two'\nanswer['ready'] = True", 2)
    assert r["final_answer"] == "forty-two"
    r = boot.exec("answer = {'content': 7, 'ready': 1}", 3)
    assert r["final_answer"] == "7"


def test_scaffold_restored_and_show_vars(boot):
    boot.exec("llm_query = 'overwritten'\nSHOW_VARS = None\nuser_var = [1, 2]", 1)
    r = boot.exec("print(callable(llm_query), callable(SHOW_VARS))\nprint(SHOW_VARS())", 2)
    assert r["stdout"].splitlines()[0] == "True True"
    assert "user_var" in r["stdout"]
    assert "llm_query" not in r["locals"]


def test_locals_are_capped_reprs_and_broken_repr_is_a_placeholder(tmp_path):
    with Boot(tmp_path, hello(repr_cap=50)) as b:
        code = (
            "big = 'x' * 10000\n"
            "class Bad:\n"
            "    def __repr__(self):\n"
            "        raise RuntimeError('no repr')\n"
            "bad = Bad()\n"
        )
        r = b.exec(code, 1)
        assert r["status"] == "ok"
        # the cap, plus a short note saying how long the value really is
        assert len(r["locals"]["big"]) <= 50 + 30
        assert "10000" in r["locals"]["big"]
        assert isinstance(r["locals"]["bad"], str) and r["locals"]["bad"]


def test_streamed_output_frames(boot):
    boot.send(
        {
            "type": "exec",
            "id": 1,
            "code": "import sys\nprint('a', flush=True)\nsys.stderr.write('b\\n')",
            "timeout": 10,
            "stream": True,
        }
    )
    chunks = []
    while True:
        msg = boot.recv()
        if msg["type"] == "result":
            break
        if msg["type"] == "progress":
            continue
        assert msg["type"] == "output" and msg["id"] == 1
        chunks.append((msg["stream"], msg["data"]))
    assert ("stdout", "a\n") in chunks
    assert ("stderr", "b\n") in chunks
    assert msg["stdout"] == "a\n"  # the result still has all of it


def test_cell_timeout_interrupts_and_keeps_state(boot):
    boot.exec("kept = 'yes'", 1)
    r = boot.exec("while True:\n    pass", 2, timeout=0.5)
    assert r["status"] == "timeout"
    r = boot.exec("print(kept)", 3)
    assert (r["status"], r["stdout"]) == ("ok", "yes\n")


# --------------------------------------------------------------------------- protocol
def test_unknown_message_type_is_an_error_frame(boot):
    boot.send({"type": "no-such-thing", "id": 77})
    msg = boot.recv()
    assert msg["type"] == "error"
    assert msg["id"] == 77
    assert "no-such-thing" in msg["error"]
    assert boot.exec("print('still fine')", 1)["stdout"] == "still fine\n"


def test_ping(boot):
    boot.send({"type": "ping", "id": 5})
    assert boot.recv() == {"type": "pong", "id": 5, "busy": False}


def test_stdin_close_ends_supervisor_and_worker(boot):
    worker = int(boot.exec("import os\nprint(os.getpid())", 1)["stdout"])
    assert worker != boot.proc.pid
    boot.proc.stdin.close()
    assert boot.proc.wait(10) == 0
    assert boot.recv() is None  # stdout closed
    assert pid_gone(worker)


def test_stdin_close_while_a_cell_runs(boot):
    boot.send({"type": "exec", "id": 1, "code": "import time\ntime.sleep(60)", "timeout": None})
    time.sleep(0.2)
    boot.proc.stdin.close()
    assert boot.proc.wait(10) == 0


def test_supervisor_survives_a_sigint(boot):
    # interrupts are for the worker; the supervisor ignores them
    os.kill(boot.proc.pid, signal.SIGINT)
    assert boot.exec("print(1)", 1)["stdout"] == "1\n"


def test_worker_crash_is_reported_and_replaced(boot):
    boot.exec("x = 1", 1)
    r = boot.exec("import os\nos._exit(5)", 2)
    assert r["status"] == "crashed"
    assert "dockerrepl" in r["stderr"]
    r = boot.exec("print('new worker')", 3)
    assert r["status"] == "ok" and r["stdout"] == "new worker\n"


# ------------------------------------------------------------- llm_query end to end on the host
def test_llm_query_through_a_real_proxy_and_handler(tmp_path):
    with LMHandler(EchoClient()) as handler:
        state = ProxyState(token="tok-1", depth=1, lm_handler_address=handler.address)
        proxy = ProxyServer(state, host="127.0.0.1")
        config = hello(proxy={"host": "127.0.0.1", "port": proxy.port}, token="tok-1", depth=1)
        try:
            with Boot(tmp_path, config) as b:
                r = b.exec(
                    "print(llm_query('hi'))\n"
                    "print(llm_query_batched(['a', 'b']))\n"
                    "print(rlm_query('r'))\n",
                    1,
                )
            assert r["status"] == "ok", r["stderr"]
            assert r["stdout"].splitlines() == ["echo:hi", "['echo:a', 'echo:b']", "echo:r"]
            calls = state.take(1)
            assert [c["prompt"] for c in calls] == ["hi", "a", "b", "r"]
            assert all(c["root_model"] == "echo" for c in calls)
        finally:
            proxy.close()


def test_llm_query_never_raises(tmp_path):
    # wrong token and nothing listening: error strings, not exceptions
    with Boot(tmp_path, hello(proxy={"host": "127.0.0.1", "port": 9}, token="t")) as b:
        r = b.exec(
            "a = llm_query('x')\nb = llm_query_batched(['y', 'z'])\nprint(type(a).__name__)", 1
        )
        assert r["status"] == "ok", r["stderr"]
        assert r["locals"]["a"].startswith("'Error: ")
        assert r["stdout"] == "str\n"


def test_stdin_close_right_after_start(tmp_path):
    # a race: a kill that came before the worker's own setpgid found no process
    # group, and the supervisor then waited for the worker for ever
    for i in range(20):
        with Boot(tmp_path / str(i), hello()) as b:
            assert b.ready["type"] == "ready"
            b.proc.stdin.close()
            assert b.proc.wait(10) == 0


def test_a_checkpoint_naming_the_helpers_as_before_the_package_split_restores(tmp_path):
    """dill pickles the helpers by reference; checkpoints written before the bootstrap
    became a package name them ``dockerrepl_bootstrap.llm_query``."""
    state = tmp_path / "ws" / ".dockerrepl"
    state.mkdir(parents=True)
    # protocol 0: {"g": <global dockerrepl_bootstrap.llm_query>}
    (tmp_path / "ws" / "state.dill").write_bytes(
        b"(dp0\nVg\np1\ncdockerrepl_bootstrap\nllm_query\np2\ns."
    )
    (state / "state.meta.json").write_text(
        json.dumps({"cell": 5, "order": [1, 1], "skipped": [], "file_backed": {}})
    )
    with Boot(tmp_path, hello(restore=True)) as b:
        r = b.exec("print(g is llm_query, g.__module__)", 6)
        assert r["stdout"] == "True dockerrepl_bootstrap.scaffold\n", r
