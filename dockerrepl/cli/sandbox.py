"""What ``run`` and ``repl`` share: an LM Handler + DockerREPL pair driven from a terminal.

A cell runs in a helper thread while the main thread waits, so Ctrl-C (SIGINT)
and SIGTERM land in the main thread at a safe place: they become
:meth:`DockerREPL.interrupt` (the cell gets ``KeyboardInterrupt``, state kept),
never an exception in the middle of the framed channel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Optional, Protocol, Union

from .. import _docker
from .._docker import Engine
from .._files import remove_tree
from .._options import check_image
from ..clients import EchoClient, OpenAIClient
from ..errors import DockerReplError, DockerTimeout, NoSuchImage
from ..lm_handler import LMHandler
from ..repl import DockerREPL
from ..types import REPLResult
from .errors import EXIT_INTERRUPTED, EXIT_SETUP, CliError, Terminated
from .options import DEFAULT_MODEL, default_image

__all__ = [
    "BUILD_HINT",
    "Output",
    "PromptNudge",
    "Sandbox",
    "check_image_name",
    "ensure_image",
    "make_client",
    "read_context",
]

log = logging.getLogger(__name__)

PULL_TIMEOUT = 900.0
BUILD_HINT = (
    "no registry is reachable? Build an image offline with scripts/build-image.sh "
    "(in the dockerrepl source tree), then pass --image dockerrepl/python:3.11-bookworm "
    "or export DOCKERREPL_IMAGE=dockerrepl/python:3.11-bookworm"
)


class TextSink(Protocol):
    """Where progress and notes go (a text stream, or anything with write/flush)."""

    def write(self, s: str, /) -> int: ...

    def flush(self) -> None: ...


def make_client(backend: str, model: Optional[str], err: TextSink) -> tuple[Any, str]:
    """The LM client for ``--backend``; says on ``err`` when it falls back to echo."""
    if backend in ("auto", "openai"):
        if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
            name = model or os.environ.get("DOCKERREPL_MODEL") or DEFAULT_MODEL
            client = OpenAIClient(model_name=name)
            return client, f"openai ({name} at {client.base_url})"
        err.write(
            "dockerrepl: no OPENAI_API_KEY (or OPENAI_BASE_URL) is set: llm_query() answers "
            "with the echo backend ('echo:<prompt>'); pass --backend echo to hide this note\n"
        )
    return EchoClient(), "echo"


def read_context(path: str) -> Union[str, dict[str, Any], list[Any]]:
    """The ``--context`` file as a str, or parsed when it is a ``.json`` file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise CliError(f"cannot read the context file {path}: {exc.strerror or exc}") from None
    if path.lower().endswith(".json"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise CliError(
                f"{path} is not valid JSON: {exc}",
                "fix the file, or give it another extension to load it as text",
            ) from None
        if isinstance(value, (dict, list, str)):
            return value
        return text
    return text


def check_image_name(image: str) -> None:
    """Raise :class:`CliError` (exit 125) when ``image`` is not an image reference:
    said about the name, before docker tries a registry and answers about that."""
    try:
        check_image("--image", image)
    except (TypeError, ValueError) as exc:
        raise CliError(
            str(exc),
            "an image reference is [registry/]name[:tag][@digest], the name in lower case,"
            " e.g. python:3.11-slim or dockerrepl/python:3.11-bookworm",
            EXIT_SETUP,
        ) from None


def ensure_image(
    image: str, docker: Union[str, Engine], err: TextSink, pull_timeout: float = PULL_TIMEOUT
) -> str:
    """Make sure ``image`` is present: ``"present"``, or pull it with progress: ``"pulled"``.

    Raises :class:`NoSuchImage` (with what to do offline) when it cannot be pulled,
    and :class:`CliError` for a name that is not an image reference at all (before
    any docker call: docker would try a registry and answer about that).
    """
    check_image_name(image)
    try:
        _docker.run(["image", "inspect", "--format", "{{.Id}}", image], timeout=30, docker=docker)
        return "present"
    except NoSuchImage:
        pass
    err.write(f"dockerrepl: image {image} is not here; pulling it (up to {pull_timeout:g}s)\n")
    err.flush()
    rc, tail = _pull(image, docker, err, pull_timeout)
    if rc != 0:
        first = (tail.strip().splitlines() or [""])[-1]
        raise NoSuchImage(
            f"image {image!r} is not present and could not be pulled: {first}", BUILD_HINT, tail, rc
        )
    return "pulled"


def _pull(image: str, docker: Union[str, Engine], err: TextSink, timeout: float) -> tuple[int, str]:
    """``docker pull`` with its progress lines copied to ``err``; returns (rc, output tail)."""

    def show(line: str) -> None:
        err.write("  " + line + "\n")
        err.flush()

    try:
        res = _docker.stream(
            ["pull", image], timeout=timeout, on_line=show, docker=docker, check=False
        )
    except DockerTimeout as exc:
        raise DockerTimeout(
            exc.message,
            "check the network / registry, or build the image offline (scripts/build-image.sh)",
        ) from None
    return res.returncode, res.stdout[-2000:] + res.stderr[-2000:]


def _remainder(full: str, streamed: str) -> str:
    """What of a result's text was not streamed (e.g. notes added by the host)."""
    if not streamed:
        return full
    i = full.find(streamed)
    if i < 0:
        return ""  # truncated by the output cap: everything was shown live
    return full[:i] + full[i + len(streamed) :]


_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def quiet_thread() -> None:
    """Block the terminal signals in the calling (non-main) thread.

    CPython's readline waits in ``select()`` in the main thread and checks for
    signals only when that call is interrupted; a Ctrl-C the kernel hands to
    another thread would go unnoticed until the next key press. Threads (and
    the docker CLI processes) started from a quiet thread inherit its mask, so
    the signals always reach the main thread.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _no_op(signum: int, frame: Any) -> None:
    """The nudge signal's handler: a Python-level handler, so the signal interrupts
    ``select()`` with ``EINTR`` (``SIG_IGN`` would not) and then does nothing."""


class PromptNudge:
    """Re-interrupt the main thread shortly after each terminal signal.

    CPython's readline waits for a key in ``select()`` and checks for signals
    only when that call fails with ``EINTR``. A Ctrl-C that arrives after the
    prompt or an echoed key was written, but before ``select()`` starts again,
    is recorded and then waits for the next key press (seen about 1 in 6 runs
    of ``tests/cli/test_repl_pty.py``). The signal module's wakeup fd tells a
    quiet helper thread that a signal came; it then sends the main thread a
    harmless signal a few times over the next quarter second, and the first
    one that lands in ``select()`` makes readline run the pending handler.
    A nudge that arrives when nothing is pending does nothing.
    """

    DELAYS = (0.01, 0.05, 0.25)  # seconds between nudges, after each signal

    def __init__(self) -> None:
        self._pair: Optional[tuple[socket.socket, socket.socket]] = None
        self._saved_fd = -1
        self._saved_handler: Any = None
        self._thread: Optional[threading.Thread] = None
        self._stopped = threading.Event()
        # a real-time signal nobody else uses where there is one; SIGUSR2 elsewhere
        rtmin = getattr(signal, "SIGRTMIN", None)
        self.signum = int(rtmin) + 3 if rtmin is not None else int(signal.SIGUSR2)

    def start(self) -> bool:
        """Install it (main thread only); False where the platform cannot."""
        main = threading.main_thread()
        if threading.current_thread() is not main or not hasattr(signal, "pthread_kill"):
            return False
        r, w = socket.socketpair()
        w.setblocking(False)  # set_wakeup_fd requires it; a full buffer just drops bytes
        self._pair = (r, w)
        self._saved_handler = signal.signal(self.signum, _no_op)
        self._saved_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        ident = main.ident
        assert ident is not None

        def watch() -> None:
            quiet_thread()
            while not self._stopped.is_set():
                try:
                    got = r.recv(64)
                except OSError:
                    return
                if not got:
                    return
                if not any(b in _SIGNALS for b in got):
                    continue  # e.g. our own nudges come back through the wakeup fd
                for delay in self.DELAYS:
                    if self._stopped.wait(delay):
                        return
                    try:
                        signal.pthread_kill(ident, self.signum)
                    except (OSError, ValueError):
                        return

        self._thread = threading.Thread(target=watch, name="dockerrepl-nudge", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Put back the wakeup fd and the signal handler; end the helper thread."""
        if self._pair is None:
            return
        self._stopped.set()
        signal.set_wakeup_fd(self._saved_fd)
        r, w = self._pair
        self._pair = None
        w.close()  # the helper's recv() sees EOF
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        r.close()
        signal.signal(self.signum, self._saved_handler)


def in_quiet_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a quiet thread; the main thread waits, interruptible.

    A Ctrl-C or SIGTERM meanwhile is held until ``fn`` is done (it is bounded
    by its own timeouts), then raised here.
    """
    box: dict[str, BaseException] = {}
    done = threading.Event()

    def target() -> None:
        quiet_thread()
        try:
            fn()
        except BaseException as exc:
            box["exc"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name="dockerrepl-start", daemon=True).start()
    pending: Optional[BaseException] = None
    while not done.is_set():
        try:
            done.wait(0.1)
        except (KeyboardInterrupt, Terminated) as exc:
            pending = pending or exc
    if "exc" in box:
        raise box["exc"]
    if pending is not None:
        raise pending


class Output:
    """Writes streamed chunks to the terminal at once; remembers what it wrote."""

    def __init__(self, out: IO[str], err: IO[str]) -> None:
        self.streams = {"stdout": out, "stderr": err}
        self.seen = {"stdout": [], "stderr": []}  # type: dict[str, list[str]]
        self.broken = False
        self.on_broken: Optional[Callable[[], None]] = None

    def reset(self) -> None:
        self.seen = {"stdout": [], "stderr": []}

    def __call__(self, stream: str, text: str) -> None:
        self.seen.setdefault(stream, []).append(text)
        if self.broken:
            return
        f = self.streams.get(stream, self.streams["stderr"])
        try:
            f.write(text)
            f.flush()
        except (BrokenPipeError, ValueError):
            self.broken = True  # e.g. `dockerrepl run ... | head -1`: stop the cell
            if self.on_broken is not None:
                self.on_broken()

    def finish(self, res: REPLResult) -> None:
        """Print whatever the result holds that was not streamed."""
        for name, full in (("stdout", res.stdout), ("stderr", res.stderr)):
            rest = _remainder(full, "".join(self.seen.get(name, [])))
            if rest:
                self(name, rest if rest.endswith("\n") else rest + "\n")


class Sandbox:
    """One LM Handler and one DockerREPL, set up from the command-line options."""

    def __init__(self, args: argparse.Namespace, err: IO[str]) -> None:
        self.args = args
        self.err = err
        self.image = args.image or default_image()
        self.docker: Engine = args.engine
        self.handler: Optional[LMHandler] = None
        self.repl: Optional[DockerREPL] = None
        self.backend = ""

    def open(self) -> DockerREPL:
        a = self.args
        context = read_context(a.context) if a.context else None
        if a.timeout is not None and a.timeout < 0:
            raise CliError("--timeout must be >= 0 (0 means no limit)")
        _docker.resolve_docker(self.docker.binary)
        ensure_image(self.image, self.docker, self.err)
        client, self.backend = make_client(a.backend, a.model, self.err)
        memory = None if str(a.memory).lower() in ("0", "none", "") else str(a.memory)
        log.debug("starting a sandbox on %s (backend %s)", self.image, self.backend)
        t0 = time.perf_counter()

        def start() -> None:
            self.handler = LMHandler(client)
            self.handler.start()
            options = {
                "image": self.image,
                "lm_handler_address": self.handler.address,
                "timeout": a.timeout or None,
                "memory": memory,
                "cpus": a.cpus or None,
                "network": a.network,
                "transport": a.transport,
                "docker": self.docker.binary,
                "docker_host": self.docker.host,
                "context": self.docker.context,
            }
            resume = getattr(a, "resume", None)
            if resume:
                if context is not None:
                    raise CliError("--resume brings its own context: --context cannot be given")
                self.repl = DockerREPL.resume(resume, **options)
            else:
                self.repl = DockerREPL(context_payload=context, **options)

        in_quiet_thread(start)
        assert self.repl is not None
        log.debug(
            "sandbox %s up in %.3fs (workspace %s)",
            self.repl.container_name,
            time.perf_counter() - t0,
            self.repl.temp_dir,
        )
        return self.repl

    def run_cell(
        self, code: str, out: Output, filename: Optional[str] = None, display: bool = False
    ) -> REPLResult:
        """Run ``code``, streaming to ``out`` (``filename``, ``display``: as
        :meth:`DockerREPL.execute_code`'s).

        While it runs, Ctrl-C interrupts the cell (a third press abandons the
        sandbox) and SIGTERM/SIGHUP interrupt it and then raise
        :class:`Terminated`. The handlers only start a thread that sends the
        interrupt: nothing is raised inside the framed channel.
        """
        repl = self.repl
        assert repl is not None
        presses = 0
        terminated = 0

        def interrupt() -> None:
            threading.Thread(
                target=repl.interrupt, name="dockerrepl-interrupt", daemon=True
            ).start()

        def on_sigint(signum: int, frame: Any) -> None:
            nonlocal presses
            presses += 1
            if presses >= 3:
                threading.Thread(target=self.abandon, args=(EXIT_INTERRUPTED,), daemon=True).start()
            else:
                interrupt()

        def on_term(signum: int, frame: Any) -> None:
            nonlocal terminated
            terminated = signum
            interrupt()

        out.on_broken = interrupt
        saved: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            saved[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                saved[sig] = signal.signal(sig, on_term)
        try:
            res = repl.execute_code(code, on_output=out, filename=filename, display=display)
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)
        if terminated:
            raise Terminated(terminated)
        return res

    def abandon(self, code: int) -> None:
        """Last resort when a cell does not stop: remove the container and exit now."""
        quiet_thread()
        repl = self.repl
        try:
            self.err.write("\ndockerrepl: abandoning the sandbox\n")
            self.err.flush()
        except (OSError, ValueError, RuntimeError):
            pass
        if repl is not None:
            name = repl.container_name
            if name:
                try:
                    _docker.run(["rm", "-f", name], timeout=15, docker=self.docker, check=False)
                except DockerReplError:
                    pass
            if repl.temp_dir:
                remove_tree(os.path.dirname(repl.temp_dir), ignore_errors=True)
            elif repl.transport == "channel":
                repl._session.workspace.remove()  # the volume (its container is gone)
        os._exit(code)

    def close(self) -> None:
        """Remove the container and the workspace, stop the handler. Idempotent."""
        t0 = time.perf_counter()
        try:
            if self.repl is not None:
                self.repl.cleanup()
                log.debug("sandbox removed in %.3fs", time.perf_counter() - t0)
        finally:
            if self.handler is not None:
                self.handler.stop()
