"""A script that never cleans up still exits, and leaves nothing behind, on every Python.

Issue #10, defect 2: ``DockerREPL.__del__`` ran during the interpreter's teardown
and stopped the proxy with ``Thread.start()``, which waits for ever there on
Python 3.9-3.11 (the process never exited); on 3.12/3.13 it raised, and the
workspace stayed in ``$TMPDIR``. Each supported Python runs every script below
in a child process (all at once, to keep this quick) with ``TMPDIR`` pointing at
a fresh directory. Each must exit promptly; afterwards no container labelled
with its pid may remain (``--rm`` is waited for, bounded) and ``TMPDIR`` is empty.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from docker_helpers import container_ids, interpreter, wait_gone

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]  # setup.cfg: python_requires >= 3.9
#: The longest a child may take from its last statement to its exit.
EXIT_BOUND = 15.0

PRELUDE = """\
import os, sys, time
from dockerrepl import DockerREPL, DockerREPLPool, LMHandler
from dockerrepl._labels import owner_label
from dockerrepl.clients import EchoClient
IMAGE = sys.argv[1]
print("OWNER", owner_label(), flush=True)

def done():
    print("DONE", time.time(), flush=True)
"""

SCRIPTS = {
    # the snippet, as it was reported
    "plain": """
repl = DockerREPL(image=IMAGE)
print(repl.execute_code("print(1+1)").stdout)
done()
""",
    "exception": """
repl = DockerREPL(image=IMAGE)
repl.execute_code("x = 1")
done()
raise RuntimeError("uncaught")
""",
    # Ctrl-C while a cell runs: the KeyboardInterrupt goes through execute_code, uncaught
    "sigint": """
repl = DockerREPL(image=IMAGE)

def started(stream, text):
    done()  # before the marker: the test's SIGINT follows the marker at once
    open(os.environ["MARKER"], "w").close()

repl.execute_code("print('go', flush=True); import time; time.sleep(120)", on_output=started)
""",
    # never closed; one member handed out, its replacement may still be starting at exit
    "pool": """
pool = DockerREPLPool(size=2, image=IMAGE)
repl = pool.acquire()
repl.execute_code("x = 1")
done()
""",
    # an LM Handler never stopped, with a REPL that used it
    "handler": """
handler = LMHandler(EchoClient())
handler.start()
repl = DockerREPL(image=IMAGE, lm_handler_address=handler.address)
assert repl.execute_code("print(llm_query('hi'))").stdout == "echo:hi\\n"
done()
""",
    # without the atexit hook only DockerREPL.__del__, during teardown, is left to clean up
    "teardown": """
import atexit
repl = DockerREPL(image=IMAGE)
repl.execute_code("x = 1")
from dockerrepl import _exit
atexit.unregister(_exit._at_exit)
done()
""",
}


@pytest.fixture(scope="module")
def dill_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory holding only this interpreter's dill (pure Python, 3.8+): on the
    other Pythons' path, so they need nothing installed. Copied as the library copies
    it into an image that lacks it."""
    from dockerrepl._staging import _copy_dill

    where = tmp_path_factory.mktemp("dill")
    _copy_dill(str(where))
    return str(where)


class _Child:
    def __init__(self, python: str, name: str, image: str, base: str, dill_dir: str) -> None:
        self.name = name
        self.tmp = os.path.join(base, name, "tmp")
        self.marker = os.path.join(base, name, "started")
        os.makedirs(self.tmp)
        script = os.path.join(base, name, "script.py")
        with open(script, "w") as f:
            f.write(PRELUDE + SCRIPTS[name])
        path = os.pathsep.join([ROOT, dill_dir])
        env = dict(os.environ, PYTHONPATH=path, TMPDIR=self.tmp, MARKER=self.marker)
        self.proc = subprocess.Popen(
            [python, script, image],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=os.path.join(base, name),
        )
        self.exited_at: float = 0.0
        self.out = self.err = ""


@pytest.mark.parametrize("version", PYTHONS)
def test_a_script_that_never_cleans_up_exits_and_leaves_nothing(image, tmp_path, version, dill_dir):
    python = interpreter(version)
    children = [_Child(python, name, image, str(tmp_path), dill_dir) for name in SCRIPTS]
    by_name = {c.name: c for c in children}
    try:
        # Ctrl-C once the cell is running in the container
        end = time.monotonic() + 90
        while not os.path.exists(by_name["sigint"].marker):
            sigint = by_name["sigint"].proc
            assert sigint.poll() is None, sigint.communicate(timeout=10)
            assert time.monotonic() < end, "the sigint child never started its cell"
            time.sleep(0.05)
        by_name["sigint"].proc.send_signal(signal.SIGINT)
        for child in children:
            try:
                out, err = child.proc.communicate(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                out, err = child.proc.communicate(timeout=30)
                child.err = "(killed: it did not exit)\n"
            child.exited_at = time.time()
            child.out = out.decode("utf-8", "replace")
            child.err += err.decode("utf-8", "replace")
    finally:
        for child in children:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.communicate(timeout=30)

    problems: list[str] = []
    owners = {}
    for child in children:
        lines = dict(ln.split(" ", 1) for ln in child.out.splitlines() if " " in ln)
        owners[child.name] = lines.get("OWNER", "")
        if "DONE" not in lines:
            problems.append(f"{child.name}: did not get as far as its end: {child.err[-2000:]}")
            continue
        took = child.exited_at - float(lines["DONE"])
        if took > EXIT_BOUND:
            problems.append(f"{child.name}: exited {took:.1f}s after its end: {child.err[-2000:]}")
    for child in children:
        left = (
            wait_gone(container_ids(f"label=dockerrepl.owner={owners[child.name]}"), timeout=15)
            if owners[child.name]
            else set()
        )
        if left:
            problems.append(f"{child.name}: containers left: {sorted(left)}")
            for cid in left:
                subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)
        files = os.listdir(child.tmp)
        if files:
            problems.append(f"{child.name}: left in TMPDIR: {files}")
    assert not problems, f"Python {version} ({python}):\n" + "\n".join(problems)
