"""``dockerrepl repl`` driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import os
import pty
import re
import select
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import base_env, cli, containers_of
from docker_helpers import labels

from dockerrepl._labels import owner_label

pytestmark = pytest.mark.timeout(120)

PROMPT = rb">>> $"


class Terminal:
    """The master side of a pty whose slave runs ``python -m dockerrepl repl``."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: exec at once
            try:
                os.execvpe(sys.executable, [sys.executable, "-m", "dockerrepl", "repl", *args], env)
            finally:
                os._exit(127)
        self.buf = b""
        self.status: int | None = None

    def expect(self, pattern: bytes, timeout: float = 30) -> bytes:
        """Read until ``pattern`` matches; return everything up to the match's end."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.buf, re.M)
            if m:
                seen, self.buf = self.buf[: m.end()], self.buf[m.end() :]
                return seen
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"{pattern!r} did not appear; the terminal shows {self.buf!r}")
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"EOF before {pattern!r}; the terminal shows {self.buf!r}")
            self.buf += chunk

    def send(self, text: bytes) -> None:
        os.write(self.fd, text)

    def run(self, line: bytes) -> bytes:
        """Type a line and return what was printed before the next prompt (echo removed)."""
        self.send(line + b"\r")
        seen = self.expect(PROMPT)[: -len(b">>> ")]
        return seen.split(b"\r\n", 1)[1] if b"\r\n" in seen else b""

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.read(self.fd, 65536)  # drain, or the child may block on a full pty
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            time.sleep(0.05)
        raise AssertionError("the repl did not exit")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except OSError:
                pass
        os.close(self.fd)


def test_interactive_session(image: str, tmp_path: Path) -> None:
    histfile = tmp_path / "history"
    env = base_env(
        DOCKERREPL_IMAGE=image,
        DOCKERREPL_HISTFILE=str(histfile),
        TERM="dumb",
        HOME=str(tmp_path),
        TMPDIR=str(tmp_path),
    )
    term = Terminal(env, "--backend", "echo")
    try:
        banner = term.expect(PROMPT, timeout=60)
        assert b"Ctrl-D" in banner
        names = containers_of(term.pid)
        assert len(names) == 1
        container = names[0]
        workspace = labels(container)["dockerrepl.workspace"]
        assert os.path.isdir(workspace)

        assert term.run(b"x = 41") == b""
        # a multi-line block: continuation prompts until the empty line
        term.send(b"def f(a):\r")
        term.expect(rb"\.\.\. $")
        term.send(b"    return a + 1\r")
        term.expect(rb"\.\.\. $")
        assert term.run(b"") == b""
        assert term.run(b"f(x)") == b"42\r\n"  # a trailing expression is displayed
        assert term.run(b"print(llm_query('hi'))") == b"echo:hi\r\n"
        assert b"ZeroDivisionError" in term.run(b"1/0")

        # Ctrl-C at the prompt drops the half-typed line
        term.send(b"garbage")
        term.expect(b"garbage")
        term.send(b"\x03")
        # at once, with no further key press (PromptNudge; it used to wait, about 1 run in 6)
        term.expect(PROMPT, timeout=5)
        assert term.run(b"print('clean')") == b"clean\r\n"

        # Ctrl-C while a cell runs interrupts it; the namespace survives
        term.send(b"if True:\r")
        term.expect(rb"\.\.\. $")
        term.send(b"    print('spinning')\r")
        term.expect(rb"\.\.\. $")
        term.send(b"    while True: pass\r")
        term.expect(rb"\.\.\. $")
        term.send(b"\r")
        term.expect(b"spinning\r\n")  # the cell runs: now interrupt it
        term.send(b"\x03")
        assert b"KeyboardInterrupt" in term.expect(PROMPT)
        assert term.run(b"print(x)") == b"41\r\n"
        # readline history: Ctrl-P brings back the previous line
        term.send(b"\x10\r")
        assert term.expect(PROMPT).endswith(b"41\r\n>>> ")

        # gc leaves a live REPL alone, even when asked about exactly its container
        owner = owner_label(term.pid)
        done = cli("gc", "--min-age", "0", "--label", f"dockerrepl.owner={owner}", env=env)
        assert done.rc == 0, done.out + done.err
        assert f"kept         container {container}" in done.out
        dry = cli("gc", "--dry-run", env=env)
        assert container not in dry.out.replace(f"kept         container {container}", "")
        assert containers_of(term.pid) == [container]
        assert term.run(b"print(f(1))") == b"2\r\n"

        # Ctrl-D leaves and removes the container and the workspace
        term.send(b"\x04")
        assert term.wait() == 0
    finally:
        term.close()
    assert containers_of(term.pid) == []
    assert not os.path.exists(workspace)
    assert "x = 41" in histfile.read_text()


def test_piped_stdin_runs_without_prompts(image: str) -> None:
    env = base_env(DOCKERREPL_IMAGE=image)
    done = cli(
        "repl", "--backend", "echo", env=env, stdin="a = 2\nfor i in range(2):\n    a *= 10\n\na\n"
    )
    assert done.rc == 0, done.err
    assert done.out == "200\n"
    assert containers_of(done.pid) == []


def test_a_one_line_expressions_error_is_on_line_1(image: str) -> None:
    env = base_env(DOCKERREPL_IMAGE=image)
    done = cli("repl", "--backend", "echo", env=env, stdin="1/0\n2 + 2\n")
    assert done.rc == 0, done.err
    assert 'File "<stdin>", line 1, in <module>' in done.err, done.err
    assert "<cell-" not in done.err
    assert done.out == "4\n"


def test_save_and_resume_a_session(image: str, tmp_path: Path) -> None:
    env = base_env(DOCKERREPL_IMAGE=image)
    first, second = str(tmp_path / "a.drepl"), str(tmp_path / "b.drepl")
    done = cli(
        "repl", "--backend", "echo", "--save", second, env=env,
        stdin=f"a = 41\n:save {first}\na += 1\n",
    )  # fmt: skip
    assert done.rc == 0, done.err
    assert f"session saved to {first}" in done.err and f"session saved to {second}" in done.err
    for path, want in ((first, "41\n"), (second, "42\n")):
        back = cli("repl", "--backend", "echo", "--resume", path, env=env, stdin="a\n")
        assert back.rc == 0, back.err
        assert back.out == want


def test_snapshot_and_rollback_at_the_prompt(image: str) -> None:
    env = base_env(DOCKERREPL_IMAGE=image)
    stdin = (
        "a = 1\n:rollback\n:snapshot\na = 2\n:snapshot\ndel a\n:rollback 1\na\n"
        ":rollback\na\n:rollback 7\n:rollback x\n:snapshots\na\n"
    )
    done = cli("repl", "--backend", "echo", env=env, stdin=stdin)
    assert done.rc == 0, done.err
    assert done.out == "1\n2\n2\n", done.out
    assert "no snapshot yet" in done.err
    assert "snapshot 1 taken (after cell" in done.err
    assert "rolled back to snapshot 1" in done.err and "rolled back to snapshot 2" in done.err
    assert "no snapshot 7 (1 to 2)" in done.err
    assert "takes a number, not 'x'" in done.err
    assert "unknown command :snapshots" in done.err
    assert containers_of(done.pid) == []
