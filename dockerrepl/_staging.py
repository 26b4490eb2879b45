"""What the container runs, put where it can run it: the code directory.

The code directory is a host directory beside the workspace, mounted read-only at
``CODE_MOUNT``: the bootstrap, its bytecode, and the host's dill when the image has
none. Nothing a cell does can change it (issue #4: a bootstrap in the writable
workspace let a cell choose what every later supervisor ran).
"""

from __future__ import annotations

import logging
import os
import shutil

from ._container import CODE_MOUNT

__all__ = ["PROTOCOL_VERSION", "stage_code"]

log = logging.getLogger(__name__)

#: The version of the host <-> bootstrap protocol sent in the hello frame.
PROTOCOL_VERSION = 1

_BOOTSTRAP_SRC = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "_bootstrap", "dockerrepl_bootstrap.py"
)


def stage_code(code_dir: str, *, copy_dill: bool) -> None:
    """Fill ``code_dir`` (existing, empty) with the bootstrap and, when ``copy_dill``,
    the host's pure-Python dill under ``lib/``."""
    shutil.copyfile(_BOOTSTRAP_SRC, os.path.join(code_dir, "dockerrepl_bootstrap.py"))
    _write_bootstrap_pyc(os.path.join(code_dir, "dockerrepl_bootstrap.py"))
    if copy_dill:
        _copy_dill(os.path.join(code_dir, "lib"))


_BOOTSTRAP_PYC: list[bytes] = []  # the bootstrap compiled by this interpreter, once


def _write_bootstrap_pyc(path: str) -> None:
    """Put this interpreter's bytecode for the bootstrap in ``__pycache__`` beside it.

    A container whose Python has the same cache tag (e.g. cpython-311) then
    loads it instead of compiling 68 KB of source at every start (~15 ms of
    each open); any other Python ignores the file. Checked-hash: Python uses it
    only while it matches the source byte for byte, and compiles otherwise.
    """
    import importlib.util
    import py_compile

    try:
        target = importlib.util.cache_from_source(path)
    except NotImplementedError:  # an interpreter without bytecode caching
        return
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if _BOOTSTRAP_PYC:
            with open(target, "wb") as f:
                f.write(_BOOTSTRAP_PYC[0])
            return
        py_compile.compile(
            path,
            cfile=target,
            dfile=f"{CODE_MOUNT}/dockerrepl_bootstrap.py",
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
        )
        with open(target, "rb") as f:
            _BOOTSTRAP_PYC.append(f.read())
    except (OSError, py_compile.PyCompileError) as exc:
        log.debug("no bytecode for the bootstrap: %s", exc)


def _copy_dill(dest: str) -> None:
    """Copy the host's pure-Python dill package into the mount (lib/dill)."""
    import dill

    src = os.path.dirname(os.path.abspath(dill.__file__))
    if os.path.isdir(os.path.join(dest, "dill")):
        return
    shutil.copytree(
        src, os.path.join(dest, "dill"), ignore=shutil.ignore_patterns("__pycache__", "tests")
    )
