"""Host and bootstrap agree on the wire contract (issue #11).

The contract (version, frame header and caps, reserved names, result statuses) is
written once, in ``dockerrepl/_bootstrap/protocol.py``; the host imports it and the
container runs the staged copy. These tests fail if the two sides can disagree:
the staged copy, run by another interpreter, must hold the host's values; the
bootstrap must answer the host's hello with that version; and no module on either
side may keep a literal copy of a contract value.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bootstrap_process import BOOTSTRAP, Boot, hello, stage
from docker_helpers import interpreter

from dockerrepl import _proxy, _results, _runspec, _staging, _tools, _wire, repl
from dockerrepl._bootstrap import protocol

pytestmark = pytest.mark.timeout(60)

PKG = Path(__file__).resolve().parents[2] / "dockerrepl"
# The oldest Python the bootstrap supports (images run whatever they have).
OLDEST = "3.8"


# The contract's values as JSON carries them; run here and by other interpreters.
CONTRACT = """
def contract(protocol):
    out = {}
    for name in protocol.__all__:
        value = getattr(protocol, name)
        if isinstance(value, (frozenset, set)):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif name == "HEADER":
            value = value.format
        elif callable(value):
            continue
        out[name] = value
    return out
"""
_defs: dict[str, Any] = {}
exec(CONTRACT, _defs)
contract = _defs["contract"]

# Run by another interpreter from the staged code dir: the contract as it sees it.
DUMP = (
    CONTRACT
    + """
import json, sys
sys.path[0] = sys.argv[1]
from dockerrepl_bootstrap import protocol
import dockerrepl_bootstrap.main  # every module imports on this Python
print(json.dumps({"python": sys.version_info[:2], "contract": contract(protocol)}))
"""
)


@pytest.mark.parametrize("version", [OLDEST, "host"])
def test_the_staged_bootstrap_holds_the_hosts_contract(tmp_path, version):
    python = sys.executable if version == "host" else interpreter(version)
    code = stage(tmp_path / "code").parent
    out = subprocess.run(
        [python, "-B", "-c", DUMP, str(code)],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    if version != "host":
        assert seen["python"] == [int(n) for n in version.split(".")]
    assert seen["contract"] == json.loads(json.dumps(contract(protocol)))


def test_the_host_takes_every_contract_value_from_protocol():
    assert repl.RESERVED_NAMES is _tools.RESERVED_NAMES is protocol.RESERVED_NAMES
    assert repl.RESULT_STATUSES is _results.RESULT_STATUSES is protocol.RESULT_STATUSES
    assert _results._MAX_LOCALS is protocol.MAX_LOCALS
    assert _results._MAX_NAME is protocol.MAX_NAME
    assert _results._FINAL_ANSWER_CAP is protocol.FINAL_ANSWER_CAP
    assert _results._REPR_SLACK is protocol.REPR_SLACK
    assert _results._TEXT_SLACK is protocol.TEXT_SLACK
    assert _proxy.MAX_CONNECTIONS is protocol.PROXY_CONNECTIONS
    assert _staging.PROTOCOL_VERSION is protocol.VERSION
    assert _wire.HEADER is protocol.HEADER
    # the proxy serves as many connections per session as the client pools
    assert protocol.PROXY_CONNECTIONS == _proxy.MAX_CONNECTIONS
    assert set(protocol.SCAFFOLD_FUNCS) < protocol.RESERVED_NAMES
    assert protocol.WORKER_STATUSES < protocol.RESULT_STATUSES


def test_the_bootstrap_answers_the_hosts_hello_with_the_same_version(tmp_path):
    with Boot(tmp_path, hello()) as boot:
        assert boot.ready is not None
        assert boot.ready["type"] == "ready"
        assert boot.ready["version"] == protocol.VERSION == _staging.PROTOCOL_VERSION


def test_a_hello_of_another_version_is_refused(tmp_path):
    with Boot(tmp_path) as boot:
        boot.send({**hello(), "version": protocol.VERSION + 1})
        msg = boot.recv()
        assert msg["type"] == "error" and "protocol mismatch" in msg["error"]
        assert boot.proc.wait(10) != 0


def test_the_oldest_python_runs_a_session_with_a_restore(tmp_path):
    """Handshake, cells, a crash and the restore from a checkpoint, on 3.8 (dill from
    ``lib/``, as for an image without one)."""
    python = interpreter(OLDEST)
    with Boot(tmp_path, hello(auto_checkpoint="sync"), python=python, copy_dill=True) as boot:
        assert boot.ready is not None and boot.ready["python"].startswith(OLDEST + ".")
        assert boot.ready["dill"] == "host"
        r = boot.exec("x = [1]\ndef f():\n    return llm_query\nprint(SHOW_VARS())", 1)
        assert r["status"] == "ok", r
        assert "'x': 'list'" in r["stdout"]
        r = boot.exec("import os\nos._exit(5)", 2)
        assert r["status"] == "crashed" and "restored" in r["stderr"], r
        r = boot.exec("print(x, f() is llm_query)", 3)
        assert (r["status"], r["stdout"]) == ("ok", "[1] True\n"), r


# --------------------------------------------------------------------------- no copies
# The contract's names, and the names host modules gave their copies before.
_COPY_NAMES = {name for name in protocol.__all__ if name.isupper()} | {
    "PROTOCOL_VERSION",
    "RESERVED",
    "HIDDEN_LOCALS",
}


def _literal(node: ast.expr) -> bool:
    """A value written out (a number, string, set or tuple of them, a Struct of one)
    rather than taken from protocol."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return all(_literal(n) for n in ast.iter_child_nodes(node) if isinstance(n, ast.expr))
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_literal(e) for e in node.elts)
    if isinstance(node, ast.Call):  # frozenset({...}), struct.Struct(">I")
        return bool(node.args) and all(_literal(a) for a in node.args)
    return False


def test_no_module_keeps_a_literal_copy_of_a_contract_value():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path in (BOOTSTRAP / "protocol.py", BOOTSTRAP / "loader.py"):
            continue  # the loader runs before any module: it reads one header itself
        tree = ast.parse(path.read_text("utf-8"))
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                name = target.id.lstrip("_") if isinstance(target, ast.Name) else ""
                if name in _COPY_NAMES and _literal(node.value):
                    offenders.append(f"{path.relative_to(PKG)}:{node.lineno} {name}")
        for node in ast.walk(tree):
            # the frame header's format, outside protocol
            if isinstance(node, ast.Constant) and node.value == protocol.HEADER.format:
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno} {node.value!r}")
    assert offenders == []


def test_the_container_runs_what_the_code_frame_holds():
    """The launcher is the loader; it runs the ``main`` the frame names, in the package
    under the name the frame gives it."""
    from dockerrepl._staging import code_frame, launcher

    frame = json.loads(code_frame(copy_dill=False)[4:])
    assert frame["main"] == f"{_runspec.BOOTSTRAP_PACKAGE}.main"
    assert frame["main"] in frame["modules"]
    from dockerrepl._staging import loader_frame

    assert len(launcher()) < 300  # ps and docker inspect show it
    text = loader_frame()[4:].decode("utf-8")
    assert protocol.HEADER.unpack(loader_frame()[:4]) == (len(loader_frame()) - 4,)
    assert text == (BOOTSTRAP / "loader.py").read_text("utf-8") + "\nboot()\n"
