"""The host side under stress on a real engine: start deadlines, host-side
exceptions while a cell runs, cleanup() from another thread, a stuck stdin pipe.

Each case ends with a typed outcome, the REPL usable afterwards (or closed on
purpose), and no container left behind.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest
from docker_helpers import docker, our_containers

import dockerrepl._session as session_mod
from dockerrepl import DockerREPL, REPLResult
from dockerrepl.errors import BootstrapError, DockerReplError, ReplClosed

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- start
def test_start_deadline_is_a_bootstrap_error_and_leaves_nothing(image, tmp_path):
    before = our_containers()
    with pytest.raises(BootstrapError) as info:
        DockerREPL(image=image, start_timeout=0.01, workspace_dir=str(tmp_path))
    assert isinstance(info.value, DockerReplError)
    assert "start_timeout" in str(info.value)
    assert our_containers() - before == set()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- arguments
def test_method_arguments_are_checked_and_nothing_half_loads(repl):
    with pytest.raises(TypeError):
        repl.update_handler_address(None)
    with pytest.raises(ValueError):
        repl.update_handler_address(("x",))
    with pytest.raises(TypeError):
        repl.add_context("x", "abc")
    with pytest.raises(TypeError):
        repl.add_context("x", True)
    with pytest.raises(ValueError):
        repl.add_context("x", 10**6)
    with pytest.raises(ValueError):
        repl.add_context("x", -1)
    with pytest.raises(ValueError):
        repl.add_history([], 10**6)
    with pytest.raises(TypeError) as info:
        repl.add_history([object()])
    assert "history" in str(info.value)
    assert "context" not in str(info.value)
    assert repl.get_context_count() == 0
    assert repl.get_history_count() == 0
    # append, then replace: both are allowed
    assert repl.add_context("a") == 0
    assert repl.add_context("b", 1) == 1
    assert repl.add_context("B", 1) == 1
    assert repl.add_history([{"role": "user", "content": "hi"}], 0) == 0
    assert repl.get_context_count() == 2
    r = repl.execute_code("print(context_0, context_1, history_0[0]['content'])")
    assert r.stdout == "a B hi\n"


@pytest.mark.parametrize(("timeout", "exc"), [(True, TypeError), (math.nan, ValueError)])
def test_execute_code_checks_its_timeout_before_sending(repl, timeout, exc):
    with pytest.raises(exc):
        repl.execute_code("x = 1", timeout=timeout)
    r = repl.execute_code("print('next')")
    assert (r.status, r.stdout, r.stderr) == ("ok", "next\n", "")


def test_an_infinite_timeout_means_no_limit(repl):
    r = repl.execute_code("import time; time.sleep(0.2); print('slept')", timeout=math.inf)
    assert (r.status, r.stdout) == ("ok", "slept\n")


# --------------------------------------------------------------------------- stuck stdin
def test_a_big_frame_to_a_paused_container_times_out_and_interrupt_does_not_hang(
    image, handler, monkeypatch
):
    monkeypatch.setattr(session_mod, "HOST_MARGIN", 2.0)
    with DockerREPL(
        image=image, lm_handler_address=handler.address, grace=0.5, auto_checkpoint="sync"
    ) as r:
        assert r.execute_code("keep = 1").status == "ok"
        name = r.container_name
        assert name
        assert docker("pause", name).returncode == 0
        res: dict[str, object] = {}

        def run() -> None:
            # far bigger than the pipe's 64 KiB: the write blocks on a paused reader
            res["r"] = r.execute_code("x = 1\n#" + "a" * 2_000_000, timeout=1)

        cell = threading.Thread(target=run, daemon=True)
        cell.start()
        time.sleep(0.5)  # let the write fill the pipe
        stopper = threading.Thread(target=r.interrupt, daemon=True)
        stopper.start()
        stopper.join(10)
        assert not stopper.is_alive()  # interrupt() gave up instead of waiting on the lock
        cell.join(60)
        assert not cell.is_alive()
        out = res["r"]
        assert isinstance(out, REPLResult)
        assert out.status == "timeout"
        assert "stopped answering" in out.stderr
        assert r.restarts == 1
        assert r.container_name != name
        after = r.execute_code("print(keep)")
        assert (after.status, after.stdout) == ("ok", "1\n")
    assert docker("ps", "-aq", "--filter", f"name=^{name}$").stdout.strip() == ""


# --------------------------------------------------------------------------- host exceptions
def _raise_in_main_thread_after(seconds: float) -> threading.Timer:
    """SIGUSR1 to the main thread after ``seconds``; its handler raises KeyboardInterrupt.

    A real signal (not _thread.interrupt_main): it wakes the host's select(), as
    Ctrl-C in a terminal or Jupyter's interrupt does.
    """
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    timer = threading.Timer(seconds, signal.pthread_kill, (main, signal.SIGUSR1))
    timer.start()
    return timer


@pytest.fixture
def usr1_raises_keyboardinterrupt():
    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.parametrize("ignores_sigint", [False, True], ids=["plain", "cell-ignores-sigint"])
def test_keyboardinterrupt_in_the_host_during_a_cell(
    image, handler, usr1_raises_keyboardinterrupt, ignores_sigint
):
    with DockerREPL(
        image=image, lm_handler_address=handler.address, grace=0.5, auto_checkpoint="sync"
    ) as r:
        assert r.execute_code("keep = 42").status == "ok"
        code = "import time\nstarted = True\n"
        if ignores_sigint:
            code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + code
        timer = _raise_in_main_thread_after(0.5)
        try:
            with pytest.raises(KeyboardInterrupt):
                r.execute_code(code + "time.sleep(30)\nprint('done')", timeout=60)
        finally:
            timer.cancel()
            timer.join()
        # the old cell is stopped and its result read before the next cell is sent
        after = r.execute_code("print(keep)")
        assert (after.status, after.stdout) == ("ok", "42\n")
        assert r.restarts == 0  # the same container, not a replacement
        again = r.execute_code("print(keep + 1)")
        assert (again.status, again.stdout) == ("ok", "43\n")
        if not ignores_sigint:
            # interrupted, not killed: the cell's own changes are there
            assert r.execute_code("print(started)").stdout == "True\n"


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()])
def test_an_on_output_callback_raising_baseexception(repl, exc):
    assert repl.execute_code("keep = [1, 2]").status == "ok"

    def callback(stream: str, data: str) -> None:
        raise exc

    with pytest.raises(type(exc)):
        repl.execute_code(
            "import time\nprint('a', flush=True)\ntime.sleep(30)\nprint('b')", on_output=callback
        )
    after = repl.execute_code("print(keep)")
    assert (after.status, after.stdout, after.stderr) == ("ok", "[1, 2]\n", "")
    assert repl.restarts == 0
    assert repl.checkpoint() == []  # internal calls are in step too


# --------------------------------------------------------------------------- cleanup
def test_cleanup_from_another_thread_stops_the_running_cell(image, handler):
    before = our_containers()
    r = DockerREPL(image=image, lm_handler_address=handler.address)
    try:
        assert r.execute_code("x = 1").status == "ok"
        name, root = r.container_name, os.path.dirname(r.temp_dir)
        res: dict[str, BaseException] = {}

        def run() -> None:
            try:
                r.execute_code("import time\ntime.sleep(300)", timeout=None)
            except BaseException as exc:
                res["exc"] = exc

        cell = threading.Thread(target=run, daemon=True)
        cell.start()
        time.sleep(1)  # the cell is running
        closer = threading.Thread(target=r.cleanup, daemon=True)
        closer.start()
        closer.join(60)
        assert not closer.is_alive()  # it did not wait for the 300 s cell
        cell.join(30)
        assert not cell.is_alive()
        assert isinstance(res.get("exc"), ReplClosed)
        assert r.container_id is None
        assert docker("ps", "-aq", "--filter", f"name=^{name}$").stdout.strip() == ""
        assert not os.path.exists(root)
        with pytest.raises(ReplClosed):
            r.execute_code("print(x)")
        r.cleanup()  # idempotent
    finally:
        r.cleanup()
    assert our_containers() - before == set()


def test_cleanup_from_an_on_output_callback(repl):
    def callback(stream: str, data: str) -> None:
        repl.cleanup()

    with pytest.raises(ReplClosed):
        repl.execute_code(
            "import time\nprint('a', flush=True)\ntime.sleep(300)", on_output=callback
        )
    with pytest.raises(ReplClosed):
        repl.checkpoint()


# --------------------------------------------------------------------------- restore notes
def test_a_container_restart_is_reported_once(image, handler):
    with DockerREPL(image=image, lm_handler_address=handler.address, auto_checkpoint="sync") as r:
        assert r.execute_code("x = 1").status == "ok"
        # killed between cells: the host's note and the cell's output, in one result
        assert docker("kill", str(r.container_name)).returncode == 0
        after = r.execute_code("print(x)")
        assert (after.status, after.stdout) == ("ok", "1\n")
        assert after.stderr.count("dockerrepl:") == 1
        assert "restored" in after.stderr
        # killed during a cell: the note is in that cell's result, and only there
        name = r.container_name
        threading.Timer(1.0, docker, ("kill", str(name))).start()
        crashed = r.execute_code("import time\ntime.sleep(30)")
        assert crashed.status == "crashed"
        assert crashed.stderr.count("restored") == 1
        nxt = r.execute_code("print(x)")
        assert (nxt.status, nxt.stdout, nxt.stderr) == ("ok", "1\n", "")
        assert r.restarts == 2
