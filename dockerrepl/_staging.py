"""What the container runs, put where it can run it: the code directory.

The code directory is a host directory beside the workspace, mounted read-only at
``CODE_MOUNT``: the bootstrap package, its bytecode, and the host's dill when the
image has none. Nothing a cell does can change it (issue #4: a bootstrap in the writable
workspace let a cell choose what every later supervisor ran).
"""

from __future__ import annotations

import logging
import os
import shutil

from ._bootstrap import protocol
from ._runspec import BOOTSTRAP_PACKAGE, CODE_MOUNT

__all__ = ["PROTOCOL_VERSION", "stage_code"]

log = logging.getLogger(__name__)

#: The version of the host <-> bootstrap protocol sent in the hello frame.
PROTOCOL_VERSION = protocol.VERSION

#: The bootstrap package, staged as ``<code_dir>/BOOTSTRAP_PACKAGE/``.
_BOOTSTRAP_DIR = os.path.dirname(os.path.abspath(protocol.__file__))


def stage_code(code_dir: str, *, copy_dill: bool) -> None:
    """Fill ``code_dir`` (existing, empty) with the bootstrap package and, when
    ``copy_dill``, the host's pure-Python dill under ``lib/``."""
    dest = os.path.join(code_dir, BOOTSTRAP_PACKAGE)
    os.mkdir(dest)
    for name in _bootstrap_modules():
        shutil.copyfile(os.path.join(_BOOTSTRAP_DIR, name), os.path.join(dest, name))
        _write_pyc(dest, name)
    if copy_dill:
        _copy_dill(os.path.join(code_dir, "lib"))


def _bootstrap_modules() -> list[str]:
    return sorted(n for n in os.listdir(_BOOTSTRAP_DIR) if n.endswith(".py"))


# the bootstrap's modules compiled by this interpreter, once: name -> pyc bytes
_BOOTSTRAP_PYC: dict[str, bytes] = {}


def _write_pyc(package_dir: str, name: str) -> None:
    """Put this interpreter's bytecode for one staged module in ``__pycache__`` beside it.

    A container whose Python has the same cache tag (e.g. cpython-311) then
    loads it instead of compiling the bootstrap's ~100 KB of source at every start
    (~15 ms of each open); any other Python ignores the file. Checked-hash: Python
    uses it only while it matches the source byte for byte, and compiles otherwise.
    """
    import importlib.util
    import py_compile

    path = os.path.join(package_dir, name)
    try:
        target = importlib.util.cache_from_source(path)
    except NotImplementedError:  # an interpreter without bytecode caching
        return
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        cached = _BOOTSTRAP_PYC.get(name)
        if cached is not None:
            with open(target, "wb") as f:
                f.write(cached)
            return
        py_compile.compile(
            path,
            cfile=target,
            dfile=f"{CODE_MOUNT}/{BOOTSTRAP_PACKAGE}/{name}",
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
        )
        with open(target, "rb") as f:
            _BOOTSTRAP_PYC[name] = f.read()
    except (OSError, py_compile.PyCompileError) as exc:
        log.debug("no bytecode for the bootstrap's %s: %s", name, exc)


def _copy_dill(dest: str) -> None:
    """Copy the host's pure-Python dill package into the mount (lib/dill)."""
    import dill

    src = os.path.dirname(os.path.abspath(dill.__file__))
    if os.path.isdir(os.path.join(dest, "dill")):
        return
    shutil.copytree(
        src, os.path.join(dest, "dill"), ignore=shutil.ignore_patterns("__pycache__", "tests")
    )
