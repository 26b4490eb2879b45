"""upload()/download() on a workspace the container controls (no docker).

The workspace is a temp directory; what a hostile cell could plant there (a
FIFO, a symlink, a directory, a socket, a device node) is planted by the test.
Calls that used to block (a FIFO) run in a thread with a bound, so a
regression fails instead of hanging the suite.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from bootstrap_process import load_package, stage
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
    monkeypatch.setattr(_files, "entry_mode", lambda name, dfd: None)
    t, out = bounded(copy_in, str(ws), str(local), "data.txt")
    check_blocked_call(t, out, target)
    assert out.get("value") == len(b"uploaded bytes\n"), out
    # the rename replaced the FIFO's name; the FIFO itself was never opened
    assert stat.S_ISREG(os.lstat(target).st_mode)
    assert target.read_bytes() == b"uploaded bytes\n"


def test_upload_when_a_directory_appears_after_the_check(ws, local, monkeypatch):
    (ws / "data.txt").mkdir()
    (ws / "data.txt" / "keep").write_text("x")
    monkeypatch.setattr(_files, "entry_mode", lambda name, dfd: None)
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
    assert not list(tmp_path.glob(".*.part"))  # no partial dest.bin


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
    assert not list(tmp_path.glob(".*.part"))  # no partial dest.txt


def test_download_when_a_fifo_appears_after_the_check(ws, tmp_path, monkeypatch):
    """The race: a regular file at the check, a FIFO at the open (O_NONBLOCK + fstat)."""
    target = ws / "out.txt"
    os.mkfifo(target)
    monkeypatch.setattr(_files, "entry_mode", lambda name, dfd: stat.S_IFREG | 0o644)
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
    assert not list(tmp_path.glob(".*.part"))  # no partial dest.txt


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


# ------------------------------------------------------------------ remove_tree
def _bootstrap_remove_tree():
    return load_package("dockerrepl_bootstrap_tree").files.remove_tree


REMOVERS = {"host": lambda: _files.remove_tree, "bootstrap": _bootstrap_remove_tree}


def _deep_tree(top, depth, outside):
    """``depth`` nested directories under ``top``, each holding a symlink to ``outside``
    (a directory with a file in it), a file at the bottom and a mode-000 directory."""
    os.mkdir(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            os.symlink(str(outside), "link", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(f"/proc/self/fd/{fd}/bottom.txt", "w") as f:
            f.write("x")
        os.mkdir("locked", dir_fd=fd)
        os.mkdir(f"/proc/self/fd/{fd}/locked/inner")
        os.chmod("locked", 0, dir_fd=fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("which", sorted(REMOVERS))
def test_remove_tree_removes_5000_levels_and_follows_no_symlink(tmp_path, which):
    """shutil.rmtree raised RecursionError here (2,000 levels are one second of cell
    time): cleanup(), load_context() and gc all failed on such a tree."""
    remove = REMOVERS[which]()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    top = tmp_path / "tree"
    _deep_tree(str(top), 5000, outside)
    os.symlink(str(outside), str(tmp_path / "toplink"))
    remove(str(top))
    assert not os.path.lexists(top)
    assert (outside / "precious.txt").read_text() == "keep me"
    # a symlink given as the tree itself: the link goes, its target stays
    remove(str(tmp_path / "toplink"))
    assert not os.path.lexists(tmp_path / "toplink")
    assert (outside / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["outside"]


@pytest.mark.parametrize("which", sorted(REMOVERS))
def test_remove_tree_undoes_modes_a_cell_set_as_a_non_root_user(tmp_path, which):
    """As uid 65534 (like root in a container with no capabilities, the owner without
    CAP_DAC_OVERRIDE): directories of mode 000 and 0500 are still removed."""
    if os.geteuid() != 0:
        skip_or_fail("needs root to switch to another user")
    base = tempfile.mkdtemp(prefix="remove-tree-")  # tmp_path's parents are 0700
    os.chown(base, 65534, 65534)
    if which == "host":
        root = os.path.dirname(os.path.dirname(os.path.abspath(_files.__file__)))
        load = f"sys.path.insert(0, {root!r})\nfrom dockerrepl._files import remove_tree\n"
    else:
        code_dir = str(stage(Path(base) / "code").parent)  # as 65534 can read it
        load = f"sys.path.insert(0, {code_dir!r})\n"
        load += "from dockerrepl_bootstrap.files import remove_tree\n"
    code = (
        "import os, sys\n" + load + "os.setgid(65534); os.setuid(65534)\n"
        "top = os.path.join(sys.argv[1], 't')\n"
        "os.makedirs(top + '/a/b/c')\n"
        "open(top + '/a/b/c/f', 'w').close()\n"
        "os.chmod(top + '/a/b/c', 0o500)\n"
        "os.chmod(top + '/a/b', 0)\n"
        "os.chmod(top, 0o500)\n"
        "remove_tree(top)\n"
        "print(os.path.exists(top))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, base], capture_output=True, text=True, timeout=30
        )
        assert out.stdout.strip() == "False", out.stderr
    finally:
        _files.remove_tree(base, ignore_errors=True)


def test_remove_tree_reports_what_it_cannot_remove(tmp_path, monkeypatch):
    top = tmp_path / "t"
    (top / "a").mkdir(parents=True)
    (top / "a" / "f").write_text("x")
    (top / "g").write_text("y")
    real = os.unlink

    def refuse(name, *, dir_fd=None):
        if name == "f":
            raise OSError(16, "busy", name)
        real(name, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(OSError):
        _files.remove_tree(str(top))
    assert sorted(os.listdir(top)) == ["a"]  # everything else went
    _files.remove_tree(str(top), ignore_errors=True)  # and it does not loop
    monkeypatch.undo()
    _files.remove_tree(str(top))
    assert not top.exists()


@pytest.mark.parametrize("planted", ["deep_dir", "symlink", "fifo", "dir_symlink"])
def test_write_new_replaces_what_the_cell_planted(tmp_path, planted):
    ws = tmp_path / "ws"
    ws.mkdir()
    aside = tmp_path / "aside"
    aside.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "host.txt").write_text("host file")
    target = ws / "context_0.txt"
    if planted == "deep_dir":
        _deep_tree(str(target), 2000, outside)
    elif planted == "symlink":
        target.symlink_to(outside / "host.txt")
    elif planted == "dir_symlink":
        target.symlink_to(outside)
    else:
        os.mkfifo(target)

    def write(f):
        f.write(b"new context")

    t, out = bounded(_files.write_new, str(ws), "context_0.txt", write, str(aside))
    assert not t.is_alive() and "error" not in out, out
    assert not target.is_symlink() and target.read_text() == "new context"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert (outside / "host.txt").read_text() == "host file"
    assert sorted(os.listdir(outside)) == ["host.txt"]
    assert os.listdir(aside) == []
    assert sorted(os.listdir(ws)) == ["context_0.txt"]
