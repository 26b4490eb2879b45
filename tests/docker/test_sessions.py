"""Sessions as values (issue #14): save and resume, fork, on a real engine.

The namespace, contexts, histories and uploaded files travel as the container's own
tar; the host never unpickles any of it (tests/docker/test_security.py). Each test
says which transport it needs: both where files move differently (save, resume, fork).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from dockerrepl import DockerREPL
from dockerrepl.errors import SessionFileError

pytestmark = pytest.mark.timeout(180)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEED = """\
x = [1, 2, 3]
d = {'k': 'v'}
def f(a):
    return a * 2
g = (i for i in range(3))   # dill cannot pickle a generator
open('notes/up.txt', 'w').write('written in a cell')
"""


def _seed(repl: DockerREPL, tmp_path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("uploaded from the host")
    repl.upload(str(src), "notes/in.txt")
    repl.add_context({"doc": "second context"})
    repl.add_history([{"role": "user", "content": "hi"}])
    r = repl.execute_code(SEED)
    assert r.status == "ok", r.stderr


CHECK = (
    "print(x, d, f(21), context, context_1['doc'], history[0]['content'],"
    " open('notes/in.txt').read(), open('notes/up.txt').read(), 'g' in dir())"
)
EXPECTED = (
    "[1, 2, 3] {'k': 'v'} 42 first context second context hi uploaded from the host"
    " written in a cell False"
)


def test_save_and_resume(image, handler, each_transport, tmp_path):
    path = str(tmp_path / "session.drepl")
    kw = {"image": image, "lm_handler_address": handler.address, "transport": each_transport}
    with DockerREPL(context_payload="first context", **kw) as repl:
        _seed(repl, tmp_path)
        assert repl.save(path) == ["g"]
        # the REPL is unchanged: its generator lives on
        assert repl.execute_code("print(next(g))").stdout == "0\n"
    with DockerREPL.resume(path, **kw) as back:
        assert back.lacking == ["g"] and "g" in back.restore_note
        r = back.execute_code(CHECK)
        assert r.status == "ok", r.stderr
        assert r.stdout.strip() == EXPECTED
        assert "not carried over" in r.stderr and "g" in r.stderr  # said once, in the first cell
        assert "not carried over" not in back.execute_code("y = 1").stderr
        assert back.get_context_count() == 2 and back.get_history_count() == 1
        # the resumed REPL checkpoints and restores on its own
        back.execute_code("x.append(4)")
        back.checkpoint()
        subprocess.run(["docker", "kill", back.container_name], capture_output=True, timeout=30)
        r = back.execute_code("print(x)")
        assert r.stdout == "[1, 2, 3, 4]\n", r.stderr


def test_resume_in_a_fresh_process(repl, image, tmp_path):
    repl.execute_code("import collections\ncounts = collections.Counter('abracadabra')")
    path = str(tmp_path / "s.drepl")
    assert repl.save(path) == []
    code = textwrap.dedent(
        f"""
        from dockerrepl import DockerREPL
        with DockerREPL.resume({path!r}, image={image!r}) as r:
            print(r.execute_code("print(counts.most_common(1))").stdout, end="")
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[('a', 5)]\n"


def test_a_damaged_file_is_refused_before_a_container_starts(repl, image, tmp_path):
    repl.execute_code("x = 'y' * 100000")
    path = tmp_path / "s.drepl"
    repl.save(str(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.drepl"
    cut.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x55
    bad = tmp_path / "flipped.drepl"
    bad.write_bytes(bytes(flipped))
    for p, reason in ((cut, "truncated"), (bad, "corrupt"), (tmp_path, "foreign")):
        with pytest.raises((SessionFileError, OSError)) as info:
            DockerREPL.resume(str(p), image=image)
        if isinstance(info.value, SessionFileError):
            assert info.value.reason == reason, info.value


def test_save_is_serialised_with_a_running_cell(repl, tmp_path):
    repl.execute_code("x = 1")

    def long_cell() -> None:
        repl.execute_code("import time\ntime.sleep(1.5)\nx = 2")

    t = threading.Thread(target=long_cell)
    t.start()
    time.sleep(0.3)
    path = str(tmp_path / "s.drepl")
    repl.save(path)  # waits for the cell: never a torn state
    t.join()
    with DockerREPL.resume(path, image=repl.image) as back:
        assert back.execute_code("print(x)").stdout == "2\n"


# --------------------------------------------------------------------------- fork
def test_fork_children_are_independent_and_the_parent_keeps_its_live_objects(
    image, handler, each_transport, tmp_path
):
    kw = {"image": image, "lm_handler_address": handler.address, "transport": each_transport}
    with DockerREPL(context_payload="first context", **kw) as parent:
        _seed(parent, tmp_path)
        kids = parent.fork(3)
        try:
            assert len(kids) == 3 and len({k.container_name for k in kids}) == 3
            for i, kid in enumerate(kids):
                assert kid.lacking == ["g"] and kid.transport == each_transport
                r = kid.execute_code(CHECK)
                assert r.status == "ok" and r.stdout.strip() == EXPECTED, r.stderr
                assert "not carried over (dill cannot pickle them): g" in r.stderr
                kid.execute_code(f"x.append({i})\nopen('notes/up.txt', 'w').write('kid {i}')")
            for i, kid in enumerate(kids):
                r = kid.execute_code("print(x, open('notes/up.txt').read())")
                assert r.stdout == f"[1, 2, 3, {i}] kid {i}\n", r.stderr
            r = parent.execute_code("print(x, next(g), open('notes/up.txt').read())")
            assert r.stdout == "[1, 2, 3] 0 written in a cell\n", r.stderr
            parent.execute_code("x.append('parent')")
            assert kids[0].execute_code("print(x)").stdout == "[1, 2, 3, 0]\n"
        finally:
            for kid in kids:
                kid.cleanup()


def test_fork_carries_host_tools_and_takes_children_from_a_pool(image, handler):
    from dockerrepl import DockerREPLPool, host_tool

    tools = {"shout": host_tool(lambda s: s.upper())}
    with DockerREPL(image=image, lm_handler_address=handler.address, custom_tools=tools) as p:
        p.execute_code("v = shout('abc')")
        kid = p.fork()[0]
        try:
            assert kid.execute_code("print(v, shout('x'))").stdout == "ABC X\n"
        finally:
            kid.cleanup()
        with DockerREPLPool(size=2, image=image) as pool:
            while pool.ready_count < 2:
                time.sleep(0.05)
            kids = p.fork(2, pool=pool)
            try:
                for kid in kids:
                    r = kid.execute_code("print(v, shout('y'), llm_query('q'))")
                    assert r.stdout == "ABC Y echo:q\n", r.stderr
            finally:
                for kid in kids:
                    kid.cleanup()
        with pytest.raises(ValueError):
            p.fork(0)
        with pytest.raises(ValueError):
            p.fork(1, setup_code="x = 1")


def test_fork_is_serialised_with_a_running_cell(repl):
    repl.execute_code("x = 1")
    t = threading.Thread(target=repl.execute_code, args=("import time\ntime.sleep(1.5)\nx = 2",))
    t.start()
    time.sleep(0.3)
    kid = repl.fork()[0]
    t.join()
    try:
        assert kid.execute_code("print(x)").stdout == "2\n"
    finally:
        kid.cleanup()
