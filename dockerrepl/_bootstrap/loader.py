"""The container's first code: the bootstrap arrives over stdin and is imported from memory.

The host starts every container with a short ``python -c`` program that reads this
module's text from stdin and runs it (``dockerrepl._staging.LAUNCHER``), then writes
one frame before the hello: ``{"type": "code", "modules": {...}, "magic": ...,
"main": ...}`` (see ``dockerrepl._staging.code_frame``); ``main`` names the module
whose ``main()`` runs. Nothing is mounted and nothing is written to disk, so the
same start works on every engine whose ``docker run -i`` works (remote, rootless,
Podman, a container with the engine socket mounted), and no cell can change the
code a later supervisor or worker runs: the worker and the snapshot writers are
forks of the supervisor, which holds the modules in memory.

Each module comes as source and, when the host's Python has the same bytecode magic
number as this one, as marshalled code (no compile at start). The finder is last on
``sys.meta_path``: a dill the image ships itself wins over the host's copy.

This text runs in the ``-c`` program's namespace (``__name__ == "__main__"``), so it
defines everything it needs and imports only the standard library; it must run on
Python 3.8.
"""

import base64
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import marshal
import os
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any, Dict, Optional, Sequence

#: Where the modules claim to live (nothing is there: a traceback's file names say this).
ORIGIN = "/opt/dockerrepl"
#: The largest code frame the loader reads.
MAX_CODE = 64 << 20


def read_exact(n: int) -> bytes:
    """Exactly ``n`` bytes of stdin, unbuffered: what follows is the supervisor's."""
    out = b""
    while len(out) < n:
        chunk = os.read(0, n - len(out))
        if not chunk:
            os._exit(0)  # the host went away before the code came
        out += chunk
    return out


class MemoryFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds and loads the modules of the code frame."""

    def __init__(self, modules: "Dict[str, Any]", magic: bytes) -> None:
        self.modules = modules
        self.use_code = magic == importlib.util.MAGIC_NUMBER

    def find_spec(
        self,
        fullname: str,
        path: "Optional[Sequence[str]]" = None,
        target: "Optional[ModuleType]" = None,
    ) -> "Optional[importlib.machinery.ModuleSpec]":
        entry = self.modules.get(fullname)
        if entry is None:
            return None
        is_pkg = bool(entry.get("pkg"))
        spec = importlib.util.spec_from_loader(fullname, self, is_package=is_pkg)
        if spec is not None:
            spec.origin = self.filename(fullname)
            spec.has_location = True
            if is_pkg:
                spec.submodule_search_locations = [self.filename(fullname).rsplit("/", 1)[0]]
        return spec

    def filename(self, fullname: str) -> str:
        base = ORIGIN + "/" + fullname.replace(".", "/")
        return base + "/__init__.py" if self.modules[fullname].get("pkg") else base + ".py"

    def create_module(self, spec: "importlib.machinery.ModuleSpec") -> None:
        return None  # the default module

    def exec_module(self, module: "ModuleType") -> None:
        name = module.__name__
        entry = self.modules[name]
        module.__file__ = self.filename(name)
        code = None
        if self.use_code and entry.get("code"):
            try:
                code = marshal.loads(base64.b64decode(entry["code"]))
            except (ValueError, TypeError, EOFError):
                code = None
        if code is None:
            code = compile(entry["src"], module.__file__, "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def get_source(self, fullname: str) -> "Optional[str]":
        """For tracebacks (linecache asks the module's loader)."""
        entry = self.modules.get(fullname)
        return None if entry is None else str(entry.get("src", ""))


def install(frame: "Dict[str, Any]") -> MemoryFinder:
    """Put the frame's modules on the import path (last: the image's own come first)."""
    finder = MemoryFinder(frame.get("modules") or {}, base64.b64decode(frame.get("magic") or ""))
    sys.meta_path.append(finder)
    return finder


def boot() -> None:
    """Read the code frame, install it, run the supervisor."""
    (n,) = struct.unpack(">I", read_exact(4))
    if n > MAX_CODE:
        os._exit(3)
    frame = json.loads(read_exact(n).decode("utf-8"))
    if not isinstance(frame, dict) or frame.get("type") != "code":
        os._exit(3)
    install(frame)
    sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]  # not the workspace
    importlib.import_module(str(frame.get("main"))).main()
