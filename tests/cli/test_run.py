"""``dockerrepl run`` against the real engine, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from cli_helpers import cli, containers_of
from docker_helpers import labels, skip_or_fail
from fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(90)


def test_c_code_with_llm_query(env: dict[str, str]) -> None:
    done = cli(
        "run", "--backend", "echo", "-c", "x = 6 * 7\nprint(x)\nprint(llm_query('hi'))", env=env
    )
    assert done.rc == 0, done.err
    assert done.out.splitlines() == ["42", "echo:hi"]
    assert done.err == ""
    assert containers_of(done.pid) == []


def test_file_and_stdin(env: dict[str, str], tmp_path: Any) -> None:
    script = tmp_path / "job.py"
    script.write_text("import sys\nprint('from file', sys.version_info[0])\n")
    assert cli("run", "--backend", "echo", str(script), env=env).out == "from file 3\n"
    assert cli("run", "--backend", "echo", "-", env=env, stdin="print('dash')").out == "dash\n"
    assert cli("run", "--backend", "echo", env=env, stdin="print('bare')").out == "bare\n"


def test_arguments_after_file_or_c_are_the_codes_sys_argv(
    env: dict[str, str], tmp_path: Any
) -> None:
    script = tmp_path / "args.py"
    script.write_text("import sys\nprint(__name__, sys.argv)\n")
    # options after FILE belong to the code, as with python
    done = cli("run", "--backend", "echo", str(script), "a b", "--timeout", "5", env=env)
    assert done.rc == 0, done.err
    assert done.out == f"__main__ {[str(script), 'a b', '--timeout', '5']}\n"
    assert "note: --timeout after FILE went to the code" in done.err
    code = "import sys; print(sys.argv)"
    done = cli("run", "--backend", "echo", "-c", code, "x", "-q", env=env)
    assert done.out == "['-c', 'x', '-q']\n", done.err
    assert done.err == ""  # -q is not one of run's own options: no note
    done = cli("run", "--backend", "echo", "-", "q", env=env, stdin=code)
    assert done.out == "['-', 'q']\n", done.err


def test_stdin_is_given_to_the_code_only_with_the_stdin_option(
    env: dict[str, str], tmp_path: Any
) -> None:
    script = tmp_path / "cat.py"
    script.write_text(
        "import sys\nfirst = input()\nrest = sys.stdin.read()\nprint(repr(first), repr(rest))\n"
    )
    data = b"line one\nl\xc3\xa9 two \xff\n"
    run = [sys.executable, "-m", "dockerrepl", "run", "--backend", "echo"]
    done = subprocess.run(
        [*run, "--stdin", str(script)], input=data, capture_output=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    # UTF-8 as text; a byte that is not UTF-8 kept as a surrogate escape, as python does
    assert done.stdout == b"'line one' 'l\xc3\xa9 two \\udcff\\n'\n"
    # without --stdin the code's stdin is empty, and a pipe nobody closes cannot hold it up
    with subprocess.Popen(
        [*run, "-c", "import sys; print(repr(sys.stdin.read()))"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        rc = proc.wait(timeout=60)  # stdin still open: the code must not wait for it
        out = proc.stdout.read()
        proc.stdin.close()
        assert rc == 0, proc.stderr.read() if proc.stderr else ""
        assert out == b"''\n"


def test_context_text_and_json(env: dict[str, str], tmp_path: Any) -> None:
    text = tmp_path / "book.txt"
    text.write_text("hello world\n" * 100)
    done = cli(
        "run", "--backend", "echo", "--context", str(text), "-c", "print(len(context))", env=env
    )
    assert done.out == "1200\n", done.err
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"a": [1, 2, 3]}))
    code = "print(type(context).__name__, sum(context['a']))"
    done = cli("run", "--backend", "echo", "--context", str(data), "-c", code, env=env)
    assert done.out == "dict 6\n", done.err


@pytest.mark.parametrize(
    ("code", "rc", "exception"),
    [
        ("1/0", 1, "ZeroDivisionError"),
        ("raise SystemExit(3)", 3, "SystemExit"),
        ("import sys; sys.exit()", 0, "SystemExit"),
        ("def f(:\n  pass", 1, "SyntaxError"),
    ],
)
def test_exit_status_follows_the_code(
    env: dict[str, str], code: str, rc: int, exception: str
) -> None:
    done = cli("run", "--backend", "echo", "-c", code, env=env)
    assert done.rc == rc
    assert exception in done.err
    assert "dockerrepl_bootstrap" not in done.err
    assert containers_of(done.pid) == []


def test_timeout_exits_124(env: dict[str, str]) -> None:
    done = cli("run", "--backend", "echo", "--timeout", "1", "-c", "while True: pass", env=env)
    assert done.rc == 124
    assert "timeout" in done.err


def test_network_none_and_memory(env: dict[str, str]) -> None:
    code = "import socket\nprint(llm_query('x'))\nprint(len(socket.if_nameindex()))"
    done = cli(
        "run", "--backend", "echo", "--network", "none", "--memory", "256m", "-c", code, env=env
    )
    assert done.rc == 0, done.err
    lines = done.out.splitlines()
    assert lines[0] == "echo:x"
    assert lines[1] == "1"  # only the loopback interface


def test_output_is_streamed_in_order_and_ctrl_c_interrupts(env: dict[str, str]) -> None:
    """Each line arrives while the cell waits for the test: output is live and in order.

    The cell waits for files the test creates in the workspace (found through the
    container's ``dockerrepl.workspace`` label), so the order is not left to timing.
    SIGINT then interrupts it and the exit status is 130.
    """
    code = (
        "import os, sys, time\n"
        "def wait(name):\n"
        "    while not os.path.exists(name):\n"
        "        time.sleep(0.01)\n"
        "print('one', flush=True)\n"
        "wait('go1')\n"
        "print('two', file=sys.stderr, flush=True)\n"
        "wait('go2')\n"
        "print('three', flush=True)\n"
        "time.sleep(60)\n"
        "print('never')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dockerrepl", "run", "--backend", "echo", "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"one\n"
        (name,) = containers_of(proc.pid)
        workspace = os.path.join(labels(name)["dockerrepl.workspace"], "workspace")
        open(os.path.join(workspace, "go1"), "w").close()
        assert proc.stdout.readline() == b"two\n"
        open(os.path.join(workspace, "go2"), "w").close()
        assert proc.stdout.readline() == b"three\n"
        assert proc.poll() is None  # the cell is still running: the lines came live
        proc.send_signal(signal.SIGINT)
        rest = proc.stdout.read().decode()
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "KeyboardInterrupt" in rest
    assert "never" not in rest
    assert containers_of(proc.pid) == []


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(answer=lambda messages: "fake:" + messages[-1]["content"]) as fake:
        yield fake


def test_openai_backend(env: dict[str, str], fake_openai: FakeOpenAI) -> None:
    env = dict(env, OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="sk-test")
    done = cli(
        "run", "--backend", "openai", "--model", "m1", "-c", "print(llm_query('q'))", env=env
    )
    assert done.rc == 0, done.err
    assert done.out == "fake:q\n"
    assert done.err == ""
    assert [(r["path"], r["headers"].get("authorization")) for r in fake_openai.requests] == [
        ("/v1/chat/completions", "Bearer sk-test")
    ]


def test_openai_without_key_falls_back_to_echo_and_says_so(env: dict[str, str]) -> None:
    done = cli("run", "--backend", "openai", "-c", "print(llm_query('q'))", env=env)
    assert done.rc == 0
    assert done.out == "echo:q\n"
    assert "OPENAI_API_KEY" in done.err
    assert "echo" in done.err


def test_verbose_logs_docker_commands_quiet_by_default(env: dict[str, str]) -> None:
    quiet = cli("run", "--backend", "echo", "-c", "pass", env=env)
    assert (quiet.rc, quiet.err) == (0, "")
    loud = cli("-v", "run", "--backend", "echo", "-c", "pass", env=env)
    assert loud.rc == 0
    assert "DEBUG" in loud.err
    assert "docker (spawn): " in loud.err  # the docker run -i command line
    assert "--cap-drop ALL" in loud.err


def test_version_and_console_script() -> None:
    from dockerrepl import __version__

    done = cli("--version")
    assert (done.rc, done.out.strip()) == (0, f"dockerrepl {__version__}")
    script = os.path.join(os.path.dirname(sys.executable), "dockerrepl")
    if not os.path.exists(script):
        skip_or_fail("the package is not pip-installed here (scripts/test.sh installs it)")
    done = cli("--version", argv0=[script])
    assert (done.rc, done.out.strip()) == (0, f"dockerrepl {__version__}")


def test_tracebacks_name_what_the_user_wrote(env: dict[str, str], tmp_path: Any) -> None:
    """`run job.py` says job.py (python's <string> for -c, <stdin> for stdin), never
    <cell-N>: the cell that set sys.argv is not the user's."""
    job = tmp_path / "job.py"
    job.write_text("x = 1\n\ndef f():\n    return 1 / 0\n\nf()\n")
    done = cli("run", "--backend", "echo", str(job), env=env)
    assert done.rc == 1, done.err
    assert f'File "{job}", line 6, in <module>' in done.err, done.err
    assert f'File "{job}", line 4, in f' in done.err
    assert "    return 1 / 0" in done.err  # the line quoted from the user's file
    assert "<cell-" not in done.err
    done = cli("run", "--backend", "echo", "-c", "1/0", env=env)
    assert 'File "<string>", line 1, in <module>' in done.err, done.err
    done = cli("run", "--backend", "echo", env=env, stdin="import sys\n\nsys.exit(1/0)\n")
    assert 'File "<stdin>", line 3, in <module>' in done.err, done.err
    assert "<cell-" not in done.err
