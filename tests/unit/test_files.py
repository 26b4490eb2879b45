"""upload()/download() on a workspace the container controls (no docker).

The workspace is a temp directory; what a hostile cell could plant there (a
FIFO, a symlink, a directory, a socket, a device node) is planted by the test.
Calls that used to block (a FIFO) run in a thread with a bound, so a
regression fails instead of hanging the suite.
"""

from __future__ import annotations

import os
import stat
import threading

import pytest
from docker_helpers import skip_or_fail

from dockerrepl import _files
from dockerrepl._files import copy_in, copy_out, split_remote
from dockerrepl.errors import WorkspacePathError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    return root


@pytest.fixture
def local(tmp_path):
    p = tmp_path / "local.txt"
    p.write_bytes(b"uploaded bytes\n")
    return p


def bounded(fn, *args):
    """Run fn(*args) in a thread; the outcome, or a failure if it blocks."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    return t, out


def unblock_fifo(path):
    """Open the other end of a FIFO so a thread stuck opening it goes on."""
    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_RDWR):
        try:
            os.close(os.open(path, flags))
        except OSError:
            pass


def check_blocked_call(t, out, fifo):
    if t.is_alive():
        unblock_fifo(fifo)
        t.join(5)
        pytest.fail(f"blocked on the FIFO (then: {out})")


def plant(path, kind, outside):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        os.symlink(outside, path)
    elif kind == "dangling symlink":
        os.symlink(str(outside) + ".missing", path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "socket":
        os.mknod(path, stat.S_IFSOCK | 0o600)
    elif kind == "device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
        except PermissionError:
            skip_or_fail("mknod of a device needs CAP_MKNOD")
    else:  # pragma: no cover
        raise AssertionError(kind)


KINDS = ["fifo", "symlink", "dangling symlink", "directory", "socket", "device"]


def entries(root):
    return sorted(os.listdir(root))


# --------------------------------------------------------------------------- upload
def test_upload_creates_the_file_and_its_directories(ws, local):
    n = copy_in(str(ws), str(local), "sub/dir/data.txt")
    assert n == len(b"uploaded bytes\n")
    assert (ws / "sub" / "dir" / "data.txt").read_bytes() == b"uploaded bytes\n"
    assert entries(ws / "sub" / "dir") == ["data.txt"]  # no temp file left


def test_upload_accepts_the_workspace_prefix(ws, local):
    copy_in(str(ws), str(local), "/workspace/data.txt")
    assert (ws / "data.txt").read_bytes() == b"uploaded bytes\n"


def test_upload_replaces_a_regular_file_keeping_its_mode(ws, local):
    target = ws / "data.txt"
    target.write_bytes(b"old content that is longer than the new one\n")
    os.chmod(target, 0o640)
    other = ws / "other.txt"
    os.link(target, other)  # a hard link the container made to another workspace file
    assert copy_in(str(ws), str(local), "data.txt") == len(b"uploaded bytes\n")
    assert target.read_bytes() == b"uploaded bytes\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    # a new inode: the other name keeps its content
    assert other.read_bytes() == b"old content that is longer than the new one\n"
    assert entries(ws) == ["data.txt", "other.txt"]


@pytest.mark.parametrize("kind", KINDS)
def test_upload_over_a_planted_entry_is_refused_and_left_alone(ws, local, tmp_path, kind):
    outside = tmp_path / "host-file"
    outside.write_bytes(b"host secret")
    target = ws / "data.txt"
    plant(target, kind, outside)
    before = os.lstat(target)
    t, out = bounded(copy_in, str(ws), str(local), "data.txt")
    check_blocked_call(t, out, target)
    assert isinstance(out.get("error"), WorkspacePathError), out
    after = os.lstat(target)
    assert (after.st_ino, stat.S_IFMT(after.st_mode)) == (
        before.st_ino,
        stat.S_IFMT(before.st_mode),
    )
    assert outside.read_bytes() == b"host secret"
    assert entries(ws) == ["data.txt"]  # no temp file left


@pytest.mark.parametrize("kind", ["fifo", "symlink", "socket"])
def test_upload_through_a_planted_parent_is_refused(ws, local, tmp_path, kind):
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    plant(ws / "sub", kind, outside)
    t, out = bounded(copy_in, str(ws), str(local), "sub/data.txt")
    check_blocked_call(t, out, ws / "sub")
    assert isinstance(out.get("error"), WorkspacePathError), out
    assert entries(outside) == []


def test_upload_when_a_fifo_appears_after_the_check(ws, local, monkeypatch):
    """The race: the name was free (or a file) at the check, a FIFO by the write."""
    target = ws / "data.txt"
    os.mkfifo(target)
    monkeypatch.setattr(_files, "_entry_mode", lambda name, dfd: None)
    t, out = bounded(copy_in, str(ws), str(local), "data.txt")
    check_blocked_call(t, out, target)
    assert out.get("value") == len(b"uploaded bytes\n"), out
    # the rename replaced the FIFO's name; the FIFO itself was never opened
    assert stat.S_ISREG(os.lstat(target).st_mode)
    assert target.read_bytes() == b"uploaded bytes\n"


def test_upload_when_a_directory_appears_after_the_check(ws, local, monkeypatch):
    (ws / "data.txt").mkdir()
    (ws / "data.txt" / "keep").write_text("x")
    monkeypatch.setattr(_files, "_entry_mode", lambda name, dfd: None)
    with pytest.raises(WorkspacePathError):
        copy_in(str(ws), str(local), "data.txt")
    assert entries(ws) == ["data.txt"]
    assert (ws / "data.txt" / "keep").read_text() == "x"


def test_upload_size_cap_and_local_checks(ws, local, tmp_path):
    with pytest.raises(ValueError, match="cap"):
        copy_in(str(ws), str(local), "data.txt", max_bytes=3)
    with pytest.raises(ValueError):
        copy_in(str(ws), str(tmp_path), "data.txt")  # a directory is not a file to send
    with pytest.raises(FileNotFoundError):
        copy_in(str(ws), str(tmp_path / "missing"), "data.txt")
    assert entries(ws) == []


# --------------------------------------------------------------------------- download
def test_download_copies_a_regular_file(ws, tmp_path):
    (ws / "sub").mkdir()
    (ws / "sub" / "out.bin").write_bytes(b"\x00result\xff")
    dest = tmp_path / "dest.bin"
    assert copy_out(str(ws), "sub/out.bin", str(dest)) == len(b"\x00result\xff")
    assert dest.read_bytes() == b"\x00result\xff"
    assert not (tmp_path / "dest.bin.part").exists()


def test_download_missing_is_file_not_found(ws, tmp_path):
    with pytest.raises(FileNotFoundError):
        copy_out(str(ws), "nope.txt", str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError):
        copy_out(str(ws), "no/dir.txt", str(tmp_path / "d"))


@pytest.mark.parametrize("kind", KINDS)
def test_download_of_a_planted_entry_is_refused(ws, tmp_path, kind):
    outside = tmp_path / "host-file"
    outside.write_bytes(b"host secret")
    target = ws / "out.txt"
    plant(target, kind, outside)
    dest = tmp_path / "dest.txt"
    t, out = bounded(copy_out, str(ws), "out.txt", str(dest))
    check_blocked_call(t, out, target)
    err = out.get("error")
    if kind == "dangling symlink":
        assert isinstance(err, (WorkspacePathError, FileNotFoundError)), out
    else:
        assert isinstance(err, WorkspacePathError), out
    assert not dest.exists()
    assert not (tmp_path / "dest.txt.part").exists()


def test_download_when_a_fifo_appears_after_the_check(ws, tmp_path, monkeypatch):
    """The race: a regular file at the check, a FIFO at the open (O_NONBLOCK + fstat)."""
    target = ws / "out.txt"
    os.mkfifo(target)
    monkeypatch.setattr(_files, "_entry_mode", lambda name, dfd: stat.S_IFREG | 0o644)
    dest = tmp_path / "dest.txt"
    t, out = bounded(copy_out, str(ws), "out.txt", str(dest))
    check_blocked_call(t, out, target)
    assert isinstance(out.get("error"), WorkspacePathError), out
    assert not dest.exists()


def test_download_size_cap_leaves_nothing_behind(ws, tmp_path):
    (ws / "big.txt").write_bytes(b"x" * 100)
    dest = tmp_path / "dest.txt"
    with pytest.raises(ValueError, match="cap"):
        copy_out(str(ws), "big.txt", str(dest), max_bytes=10)
    assert not dest.exists()
    assert not (tmp_path / "dest.txt.part").exists()


# --------------------------------------------------------------------------- paths
@pytest.mark.parametrize(
    "path", ["", "..", "a/../../b", "/etc/passwd", "/workspace", "/workspace/", ".dockerrepl/x"]
)
def test_paths_that_escape_or_name_no_file(path):
    with pytest.raises(WorkspacePathError):
        split_remote(path)


def test_path_components():
    assert split_remote("/workspace/a/./b//c.txt") == ["a", "b", "c.txt"]
    assert split_remote("a/b") == ["a", "b"]
