"""Sessions as values, the host's side: the saved-session file, and moving a workspace
from one REPL to another (save, resume, fork).

A REPL's state travels as one tar of its ``/workspace`` (the checkpoint ``state.dill``
with its metadata, contexts, histories, uploaded files) that the container packs
(``export``) and another container unpacks and restores (``import``); the host
treats it as opaque bytes and never unpickles anything. What only the host knows
(how many contexts and histories, the compaction history, the tools) goes beside
it, as JSON.

The file :meth:`DockerREPL.save` writes is a zip (stored, not compressed) of two
entries: ``manifest.json`` (format name and version, dockerrepl's version, the
host state above, the tar's size and sha256) and ``workspace.tar``. Reading one
checks, before anything starts: the size cap, that it is a zip at all (else
``foreign``), that it is whole (``truncated``), the manifest's format and version
(``foreign``, ``newer``), the tar's size and digest (``corrupt``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from typing import TYPE_CHECKING, Any, BinaryIO

from ._bootstrap import protocol
from ._files import write_local
from ._version import __version__
from .errors import SessionFileError

if TYPE_CHECKING:
    from .repl import DockerREPL

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_SESSION_BYTES",
    "export_workspace",
    "host_state",
    "import_workspace",
    "read_session_file",
    "write_session_file",
]

FORMAT = "dockerrepl-session"
#: The saved-session format this dockerrepl writes, and the newest it reads.
FORMAT_VERSION = 1
#: Default cap on a saved session (the file, and the workspace in it).
MAX_SESSION_BYTES = 4 << 30
#: The longest manifest read.
MAX_MANIFEST = 16 << 20
_MANIFEST = "manifest.json"
_TAR = "workspace.tar"
_ZIP_MAGIC = b"PK\x03\x04"
# the export and import calls: packing or restoring 1 GB takes a while
_CALL_TIMEOUT = 600.0


def host_state(repl: DockerREPL) -> dict[str, Any]:
    """What the host knows of a REPL and a checkpoint does not hold."""
    session = repl._session
    specs = session.options.tools.specs
    return {
        "contexts": repl.get_context_count(),
        "histories": repl.get_history_count(),
        "compaction": bool(repl.compaction),
        "compaction_history": list(session.compaction_history),
        "tools": {k: v for k, v in specs.items() if v.get("kind") != "host"},
        "host_tools": sorted(k for k, v in specs.items() if v.get("kind") == "host"),
        "cell": session.last_completed,
    }


def export_workspace(repl: DockerREPL, dest: str, max_bytes: int) -> dict[str, Any]:
    """Checkpoint ``repl`` now and copy its workspace, as a tar, to the host file ``dest``.

    Holds the session for the whole of it: a cell another thread runs waits (or is
    waited for), so the tar is the namespace as of the last completed cell."""
    session = repl._session
    with session.held():
        value = session.call(
            "export", {"cell": session.last_completed, "max_bytes": max_bytes}, _CALL_TIMEOUT
        )
        try:
            session.workspace.download(protocol.EXPORT_NAME, dest, max_bytes)
        finally:
            try:
                session.call("drop_export", {})
            except Exception:
                pass
        info = dict(value) if isinstance(value, dict) else {}
        info["state"] = host_state(repl)
    skipped = info.get("skipped")
    info["skipped"] = [str(k) for k in skipped] if isinstance(skipped, list) else []
    return info


def import_workspace(repl: DockerREPL, tar_path: str, state: dict[str, Any]) -> dict[str, Any]:
    """Make a fresh ``repl`` the one ``tar_path`` and ``state`` describe; returns the
    container's reply (its ``note`` says what was restored, ``skipped`` what was not)."""
    session = repl._session
    size = os.path.getsize(tar_path)
    with session.held():
        session.workspace.upload(tar_path, protocol.IMPORT_NAME, max(size, 1))
        value = session.call("import", {"max_bytes": MAX_SESSION_BYTES}, _CALL_TIMEOUT)
    reply = dict(value) if isinstance(value, dict) else {}
    repl._context_count = max(repl._context_count, _count(state.get("contexts")))
    repl._history_count = max(repl._history_count, _count(state.get("histories")))
    history = state.get("compaction_history")
    if repl.compaction and isinstance(history, list) and history:
        session.compaction_history[:] = history
        session.call("compaction", {"history": session.compaction_history})
    tools = state.get("tools")
    known = session.options.tools.specs
    if isinstance(tools, dict):
        # code and data tools the REPL was not given again: sent as the saved specs
        missing = {
            k: v
            for k, v in tools.items()
            if isinstance(k, str) and k not in known and isinstance(v, dict)
        }
        if missing:
            session.call("define_tools", {"tools": missing})
            known.update(missing)
    lacking = [
        str(k) for k in state.get("host_tools") or () if isinstance(k, str) and k not in known
    ]
    skipped = reply.get("skipped")
    reply["skipped"] = [str(k) for k in skipped] if isinstance(skipped, list) else []
    reply["host_tools_missing"] = lacking
    return reply


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# --------------------------------------------------------------------------- the file
def write_session_file(path: str, tar_path: str, info: dict[str, Any]) -> int:
    """Write the saved-session zip at ``path`` (atomically); returns its size."""
    digest = hashlib.sha256()
    with open(tar_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dockerrepl": __version__,
        "created": time.time(),
        "state": info.get("state", {}),
        "skipped": info.get("skipped", []),
        "workspace": {
            "entry": _TAR,
            "bytes": os.path.getsize(tar_path),
            "sha256": digest.hexdigest(),
            "files": info.get("files"),
        },
    }

    def fill(f: BinaryIO) -> int:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            z.writestr(_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            z.write(tar_path, _TAR)
        return f.tell()

    return write_local(path, fill)


def read_session_file(path: str, dest_dir: str, max_bytes: int) -> tuple[dict[str, Any], str]:
    """Check the saved-session file ``path`` and copy its workspace tar into
    ``dest_dir``; returns (manifest, tar path). Raises :class:`SessionFileError`."""

    def bad(reason: str, what: str) -> SessionFileError:
        return SessionFileError(f"{path}: {what}", reason, path)

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise bad("foreign", f"cannot be read ({exc})") from None
    if size > max_bytes:
        raise bad("too_large", f"is {size} bytes, over the {max_bytes}-byte cap of a saved session")
    if head != _ZIP_MAGIC:
        if size == 0:
            raise bad("truncated", "is empty: not a saved dockerrepl session")
        raise bad("foreign", "is not a saved dockerrepl session (not a zip file)")
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise bad(
            "truncated", f"is cut short or damaged: its zip directory is missing ({exc})"
        ) from None
    with z:
        try:
            info = z.getinfo(_MANIFEST)
        except KeyError:
            raise bad(
                "foreign", f"is a zip file without {_MANIFEST}: not a saved dockerrepl session"
            ) from None
        if info.file_size > MAX_MANIFEST:
            raise bad("corrupt", f"its manifest is {info.file_size} bytes, over {MAX_MANIFEST}")
        try:
            manifest = json.loads(z.read(_MANIFEST).decode("utf-8"))
        except (zipfile.BadZipFile, ValueError, UnicodeDecodeError) as exc:
            raise bad("corrupt", f"its manifest cannot be read ({exc})") from None
        except EOFError:
            raise bad("truncated", "is cut short inside its manifest") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise bad("foreign", f"its manifest is not a {FORMAT} manifest")
        version = manifest.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise bad("corrupt", f"its format version {version!r} is not a version")
        if version > FORMAT_VERSION:
            raise bad(
                "newer",
                f"was written in format version {version} (by dockerrepl "
                f"{manifest.get('dockerrepl', '?')}); this dockerrepl {__version__} reads "
                f"versions up to {FORMAT_VERSION}: upgrade dockerrepl to resume it",
            )
        ws = manifest.get("workspace")
        if not isinstance(ws, dict) or not isinstance(manifest.get("state"), dict):
            raise bad("corrupt", "its manifest lacks the workspace or the state")
        want_size, want_sha = ws.get("bytes"), ws.get("sha256")
        try:
            tinfo = z.getinfo(_TAR)
        except KeyError:
            raise bad("corrupt", f"has no {_TAR} entry") from None
        if tinfo.file_size != want_size or tinfo.file_size > max_bytes:
            raise bad(
                "corrupt",
                f"its {_TAR} is {tinfo.file_size} bytes; the manifest says {want_size!r}",
            )
        tar_path = os.path.join(dest_dir, _TAR)
        digest = hashlib.sha256()
        try:
            with z.open(tinfo) as src, open(tar_path, "wb") as out:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
        except zipfile.BadZipFile as exc:
            raise bad("corrupt", f"its {_TAR} is damaged ({exc})") from None
        except EOFError:
            raise bad("truncated", f"is cut short inside {_TAR}") from None
        if digest.hexdigest() != want_sha:
            raise bad("corrupt", f"its {_TAR} does not match the manifest's sha256")
    return manifest, tar_path


def scratch_dir(parent: str | None = None) -> str:
    return tempfile.mkdtemp(prefix="dockerrepl-session-", dir=parent)


def remove_scratch(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
