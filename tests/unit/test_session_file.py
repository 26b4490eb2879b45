"""The saved-session file (DockerREPL.save / resume): its checks, without an engine.

Every way a file can be wrong raises SessionFileError with a ``reason`` and a message
that says what is wrong, before any container starts; the host reads only the zip and
JSON (it never unpickles anything: tests/docker/test_security.py greps for that).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile

import pytest

from dockerrepl import DockerREPL
from dockerrepl._sessions import FORMAT_VERSION, read_session_file, write_session_file
from dockerrepl.errors import SessionFileError

pytestmark = pytest.mark.timeout(20)


def _tar(path: str) -> None:
    with tarfile.open(path, "w") as t:
        data = b"not a pickle the host reads"
        info = tarfile.TarInfo("state.dill")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


@pytest.fixture
def saved(tmp_path):
    tar = str(tmp_path / "w.tar")
    _tar(tar)
    path = str(tmp_path / "s.drepl")
    write_session_file(path, tar, {"state": {"contexts": 1}, "skipped": ["g"], "files": 1})
    return path


def _reason(path, tmp_path, cap=1 << 30):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(SessionFileError) as info:
        read_session_file(str(path), str(out), cap)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    return info.value.reason, str(info.value)


def test_a_good_file_reads_back(saved, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    manifest, tar = read_session_file(saved, str(out), 1 << 30)
    assert manifest["version"] == FORMAT_VERSION and manifest["state"] == {"contexts": 1}
    assert manifest["skipped"] == ["g"] and manifest["dockerrepl"]
    with tarfile.open(tar) as t:
        assert t.getnames() == ["state.dill"]


def test_truncated(saved, tmp_path):
    data = open(saved, "rb").read()
    for cut in (len(data) // 2, len(data) - 10, 5):
        p = tmp_path / f"cut{cut}"
        p.write_bytes(data[:cut])
        reason, msg = _reason(p, tmp_path)
        assert reason == "truncated", msg
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert _reason(empty, tmp_path)[0] == "truncated"


def test_foreign(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    reason, msg = _reason(p, tmp_path)
    assert reason == "foreign" and "not a saved dockerrepl session" in msg
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("readme.txt", "hi")
    assert _reason(z, tmp_path)[0] == "foreign"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("manifest.json", json.dumps({"format": "something-else", "version": 1}))
    assert _reason(z, tmp_path)[0] == "foreign"


def test_corrupt(saved, tmp_path):
    data = bytearray(open(saved, "rb").read())
    i = data.find(b"not a pickle the host reads")
    data[i] ^= 0xFF  # a byte of the workspace changed: the zip's CRC or the sha256 says so
    p = tmp_path / "flipped"
    p.write_bytes(bytes(data))
    reason, msg = _reason(p, tmp_path)
    assert reason == "corrupt", msg
    with zipfile.ZipFile(saved) as z:
        manifest = json.loads(z.read("manifest.json"))
    manifest["workspace"]["sha256"] = "0" * 64
    p2 = tmp_path / "badsum"
    with zipfile.ZipFile(p2, "w") as z, zipfile.ZipFile(saved) as src:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("workspace.tar", src.read("workspace.tar"))
    reason, msg = _reason(p2, tmp_path)
    assert reason == "corrupt" and "sha256" in msg


def test_newer_format_says_so(saved, tmp_path):
    with zipfile.ZipFile(saved) as z:
        manifest = json.loads(z.read("manifest.json"))
        tar = z.read("workspace.tar")
    manifest["version"] = FORMAT_VERSION + 1
    manifest["dockerrepl"] = "9.9.9"
    p = tmp_path / "newer"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr("workspace.tar", tar)
    reason, msg = _reason(p, tmp_path)
    assert reason == "newer"
    assert f"version {FORMAT_VERSION + 1}" in msg and "9.9.9" in msg and "upgrade" in msg


def test_size_cap(saved, tmp_path):
    reason, msg = _reason(saved, tmp_path, cap=100)
    assert reason == "too_large" and "cap" in msg


def test_resume_checks_the_file_before_starting_anything(tmp_path, monkeypatch):
    def no_start(*a, **k):
        raise AssertionError("a container was started for a bad file")

    monkeypatch.setattr(DockerREPL, "__init__", no_start)
    p = tmp_path / "bad"
    p.write_bytes(b"garbage" * 10)
    with pytest.raises(SessionFileError):
        DockerREPL.resume(str(p))
    with pytest.raises(FileNotFoundError):
        DockerREPL.resume(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="context_payload"):
        DockerREPL.resume(str(p), context_payload="x")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("dockerrepl-session-")]
