"""The in-container bootstrap run under the host Python, with no access to the package.

:class:`Boot` starts it exactly as a container does: ``python -B -c <the loader>``,
then the code frame (``_staging.code_frame``) and the hello on stdin.
``DOCKERREPL_WORKSPACE`` points it at ``<tmp>/ws`` instead of ``/workspace``, and a
poisoned ``dockerrepl`` package on PYTHONPATH makes any import of ours fail loudly.
:func:`stage` copies the package to a directory under its container name, for tests
that import it in a subprocess.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Optional

from dockerrepl._bootstrap import protocol
from dockerrepl._runspec import BOOTSTRAP_PACKAGE
from dockerrepl._staging import code_frame, launcher, loader_frame

#: The bootstrap package's source directory (staged under the name BOOTSTRAP_PACKAGE).
BOOTSTRAP = Path(__file__).resolve().parents[1] / "dockerrepl" / "_bootstrap"
HEADER = struct.Struct(">I")


def stage(code_dir: Path) -> Path:
    """The bootstrap's modules copied to ``code_dir/BOOTSTRAP_PACKAGE`` (made); that dir."""
    pkg = code_dir / BOOTSTRAP_PACKAGE
    pkg.mkdir(parents=True)
    for module in BOOTSTRAP.glob("*.py"):
        shutil.copyfile(module, pkg / module.name)
    return pkg


def load_package(name: str) -> types.ModuleType:
    """A fresh copy of the bootstrap package and all its modules, imported under
    ``name`` in this process (its modules hold the worker's state: each copy has its
    own)."""
    spec = importlib.util.spec_from_file_location(
        name, BOOTSTRAP / "__init__.py", submodule_search_locations=[str(BOOTSTRAP)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package  # for its relative imports
    spec.loader.exec_module(package)
    for module in sorted(BOOTSTRAP.glob("*.py")):
        if module.stem != "__init__":
            importlib.import_module(f"{name}.{module.stem}")
    return package


def run_argv(python: str = sys.executable) -> list[str]:
    """``python`` started the way the container starts its own (the code follows on stdin)."""
    return [python, "-B", "-c", launcher()]


def frame(obj: object) -> bytes:
    """``obj`` as one frame of the host <-> bootstrap channel."""
    body = json.dumps(obj).encode()
    return HEADER.pack(len(body)) + body


def hello(**config: Any) -> dict[str, Any]:
    """The host's first frame; ``config`` overrides the defaults."""
    base = {
        "proxy": {"host": "127.0.0.1", "port": 9},
        "token": "t",
        "auto_checkpoint": False,
        "grace": 0.5,
    }
    base.update(config)
    return {"type": "hello", "version": protocol.VERSION, "config": base}


class Boot:
    """A bootstrap process and the host's end of its framed stdin/stdout channel.

    With ``hello`` it is sent at once and the answer kept in ``ready``. ``stderr``
    is where the process's stderr goes (a pipe, read by ``stderr()`` after it exited).
    ``python`` runs it (the host's by default); ``copy_dill`` sends the host's dill
    with the code, as for an image without one.
    """

    def __init__(
        self,
        tmp: Path,
        hello: Optional[dict[str, Any]] = None,
        stderr: int = subprocess.PIPE,
        python: str = sys.executable,
        copy_dill: bool = False,
    ) -> None:
        self.ws = tmp / "ws"
        (self.ws / ".dockerrepl").mkdir(parents=True, exist_ok=True)  # may hold state
        poison = tmp / "poison" / "dockerrepl"
        poison.mkdir(parents=True, exist_ok=True)
        (poison / "__init__.py").write_text(
            "raise ImportError('the bootstrap must not import dockerrepl')\n"
        )
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DOCKERREPL_WORKSPACE": str(self.ws),
            "PYTHONPATH": str(tmp / "poison"),
            "LANG": "C.UTF-8",
        }
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            run_argv(python),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=str(tmp),
            bufsize=0,
        )
        self.buf = bytearray()
        self.ready: Optional[dict[str, Any]] = None
        assert self.proc.stdin is not None
        self.proc.stdin.write(loader_frame() + code_frame(copy_dill=copy_dill))
        if hello is not None:
            self.send(hello)
            self.ready = self.recv()

    def send(self, obj: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(frame(obj))

    def recv(self, timeout: float = 30.0) -> Any:
        """The next frame, or None when the bootstrap closed its stdout."""
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            if len(self.buf) >= 4:
                (n,) = HEADER.unpack_from(self.buf)
                if len(self.buf) >= 4 + n:
                    body = bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    return json.loads(body)
            left = end - time.monotonic()
            assert left > 0, "no frame from the bootstrap in time"
            r, _, _ = select.select([fd], [], [], left)
            if r:
                data = os.read(fd, 1 << 16)
                if not data:
                    return None
                self.buf += data

    def exec(self, code: str, cell: int, timeout: Optional[float] = 20, **extra: Any) -> Any:
        self.send({"type": "exec", "id": cell, "code": code, "timeout": timeout, **extra})
        while True:
            msg = self.recv()
            assert msg is not None, self.stderr()
            if msg.get("type") == "result" and msg.get("id") == cell:
                return msg
            # informational frames about this request may come first
            assert msg.get("type") in ("output", "progress") and msg.get("id") == cell, msg

    def stderr(self) -> str:
        if self.proc.stderr is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()

    def __enter__(self) -> Boot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
