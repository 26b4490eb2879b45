"""What the container runs, and how it gets there: the launcher and the code frame.

Every container starts as ``python -B -c LAUNCHER``: a few lines that read one
length-prefixed program from stdin and run it, the loader (``_bootstrap/loader.py``,
so ``ps`` and ``docker inspect`` show a short command line). The loader then reads one
**code frame** from stdin before the hello:
the bootstrap package (and the host's pure-Python dill, when the image has none), as
source plus this interpreter's bytecode. The loader imports it from memory. No
mount, no file: the start is the same on a local engine, a remote one, rootless or
Podman, and nothing a cell writes can change what a later supervisor runs (issue #4:
a bootstrap kept in the writable workspace let a cell choose it).

The frame is built once per process (and per ``copy_dill``) and reused.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import marshal
import os
import threading

from ._bootstrap import loader, protocol
from ._runspec import BOOTSTRAP_PACKAGE

__all__ = ["LAUNCHER", "PROTOCOL_VERSION", "code_frame", "launcher", "loader_frame"]

log = logging.getLogger(__name__)

#: The version of the host <-> bootstrap protocol sent in the hello frame.
PROTOCOL_VERSION = protocol.VERSION

#: The bootstrap package's source directory (sent as ``BOOTSTRAP_PACKAGE``).
_BOOTSTRAP_DIR = os.path.dirname(os.path.abspath(protocol.__file__))

_FRAMES: dict[bool, bytes] = {}
_LOADER: list[bytes] = []
_lock = threading.Lock()

#: The ``python -c`` program every container starts with: read the loader's source
#: (4-byte length, then the text) from stdin, unbuffered, and run it. First of all it
#: drops ``-c``'s sys.path[0], the working directory: that is /workspace, where a cell
#: can plant a ``struct.py`` that the next container's launcher would import.
LAUNCHER = (
    "import sys\n"
    "if sys.path and sys.path[0] in ('','.'):del sys.path[0]\n"
    "import os,struct\n"
    "def r(n):\n"
    " b=b''\n"
    " while len(b)<n:\n"
    "  c=os.read(0,n-len(b))\n"
    "  if not c:os._exit(0)\n"
    "  b+=c\n"
    " return b\n"
    "exec(compile(r(struct.unpack('>I',r(4))[0]),'<dockerrepl-loader>','exec'))\n"
)


def launcher() -> str:
    """The ``python -c`` program every container starts with (see :data:`LAUNCHER`)."""
    return LAUNCHER


def loader_frame() -> bytes:
    """What the launcher reads first: the loader's source, then ``boot()``, length-prefixed."""
    with _lock:
        if not _LOADER:
            with open(loader.__file__, encoding="utf-8") as f:
                text = (f.read() + "\nboot()\n").encode("utf-8")
            _LOADER.append(protocol.HEADER.pack(len(text)) + text)
        return _LOADER[0]


def code_frame(*, copy_dill: bool) -> bytes:
    """The encoded code frame (header included): the bootstrap, and dill when ``copy_dill``."""
    with _lock:
        cached = _FRAMES.get(copy_dill)
        if cached is None:
            modules = _package(BOOTSTRAP_PACKAGE, _BOOTSTRAP_DIR, skip=frozenset({"loader.py"}))
            if copy_dill:
                modules.update(_dill_modules())
            frame = {
                "type": "code",
                "main": BOOTSTRAP_PACKAGE + ".main",
                "magic": base64.b64encode(importlib.util.MAGIC_NUMBER).decode("ascii"),
                "modules": modules,
            }
            cached = _FRAMES[copy_dill] = protocol.encode(frame)
        return cached


Modules = dict[str, dict[str, object]]


def _package(name: str, directory: str, skip: frozenset[str] = frozenset()) -> Modules:
    """``{module name: {"src", "pkg", "code"}}`` for a pure-Python package and its subpackages."""
    out: Modules = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "tests"))
        rel = os.path.relpath(dirpath, directory)
        prefix = name if rel == "." else name + "." + rel.replace(os.sep, ".")
        if "__init__.py" not in filenames:
            dirnames[:] = []
            continue
        for fn in sorted(filenames):
            if not fn.endswith(".py") or (fn in skip and rel == "."):
                continue
            is_pkg = fn == "__init__.py"
            modname = prefix if is_pkg else prefix + "." + fn[:-3]
            with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                src = f.read()
            out[modname] = {"src": src, "pkg": is_pkg, "code": _bytecode(modname, src, is_pkg)}
    return out


def _bytecode(modname: str, src: str, is_pkg: bool) -> str:
    """This interpreter's code object for the module, marshalled (base64); "" if it
    does not compile here (the container compiles the source itself)."""
    filename = loader.ORIGIN + "/" + modname.replace(".", "/")
    filename += "/__init__.py" if is_pkg else ".py"
    try:
        code = compile(src, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:  # e.g. a dill for a newer Python than this one
        log.debug("no bytecode for %s: %s", modname, exc)
        return ""
    return base64.b64encode(marshal.dumps(code)).decode("ascii")


def _dill_modules() -> Modules:
    """The host's pure-Python dill package, as code-frame modules."""
    import dill

    return _package("dill", os.path.dirname(os.path.abspath(dill.__file__)))


def _copy_dill(dest: str) -> None:
    """Copy the host's dill package to ``dest/dill`` (for other Pythons in tests and tools)."""
    import shutil

    import dill

    src = os.path.dirname(os.path.abspath(dill.__file__))
    if os.path.isdir(os.path.join(dest, "dill")):
        return
    shutil.copytree(
        src, os.path.join(dest, "dill"), ignore=shutil.ignore_patterns("__pycache__", "tests")
    )


def frame_size(*, copy_dill: bool) -> int:
    """Bytes of the code frame (doctor and the benchmarks say it)."""
    return len(code_frame(copy_dill=copy_dill))
