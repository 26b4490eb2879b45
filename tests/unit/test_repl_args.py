"""DockerREPL's arguments are checked before anything starts (no engine needed).

The docker executable given does not exist: an argument that slipped through
would reach the start and fail with DockerNotFound instead of the typed error
asserted here. The workspace directory stays empty either way.
"""

from __future__ import annotations

import math

import pytest

from dockerrepl import DockerREPL
from dockerrepl.repl import MAX_TIMEOUT

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"timeout": True}, TypeError),
        ({"timeout": False}, TypeError),
        ({"timeout": "5"}, TypeError),
        ({"timeout": math.nan}, ValueError),
        ({"timeout": 0}, ValueError),
        ({"timeout": -1.0}, ValueError),
        ({"timeout": -math.inf}, ValueError),
        ({"timeout": MAX_TIMEOUT * 10}, ValueError),
        ({"pids_limit": 0}, ValueError),
        ({"pids_limit": -1}, ValueError),
        ({"pids_limit": True}, TypeError),
        ({"pids_limit": 1.5}, TypeError),
        ({"cpus": 0}, ValueError),
        ({"image": 3}, TypeError),
        ({"image": b"python:3.11"}, TypeError),
        ({"image": "--privileged"}, ValueError),
        ({"max_output_bytes": 0}, ValueError),
        ({"max_output_bytes": -5}, ValueError),
        ({"repr_cap": 0}, ValueError),
        ({"grace": -0.1}, ValueError),
        ({"grace": math.nan}, ValueError),
        ({"start_timeout": 0}, ValueError),
        ({"start_timeout": -1}, ValueError),
        ({"start_timeout": math.inf}, ValueError),
        ({"start_timeout": None}, ValueError),
        ({"lm_handler_address": ("x",)}, ValueError),
        ({"lm_handler_address": "127.0.0.1:80"}, TypeError),
        ({"lm_handler_address": ("127.0.0.1", "80")}, TypeError),
        ({"lm_handler_address": ("127.0.0.1", 0)}, ValueError),
        ({"lm_handler_address": ("127.0.0.1", 70000)}, ValueError),
        ({"lm_handler_address": (None, 80)}, TypeError),
        ({"extra_args": "--hostname x"}, TypeError),  # a str, not a list of them
        ({"extra_args": ["--hostname", 5]}, TypeError),
        ({"extra_args": None}, TypeError),
        ({"extra_args": ["-t"]}, ValueError),  # a tty corrupts the framed channel
        ({"extra_args": ["-it"]}, ValueError),
        ({"extra_args": ["--init"]}, ValueError),
        ({"extra_args": ["--detach"]}, ValueError),
        ({"extra_args": ["--entrypoint=sh"]}, ValueError),
        ({"extra_args": ["-e", "OPENAI_API_KEY"]}, ValueError),  # the host's value
        ({"extra_args": ["--env=A=b"]}, ValueError),
        ({"extra_args": ["--env-file", "/etc/environment"]}, ValueError),
        ({"extra_args": ["--memory", "8g"]}, ValueError),  # memory= is the way
        ({"extra_args": ["--network=host"]}, ValueError),
        ({"extra_args": ["-u", "0"]}, ValueError),
        ({"extra_args": ["--privileged"]}, ValueError),
        ({"extra_args": ["--cap-add", "SYS_PTRACE"]}, ValueError),
        ({"extra_args": ["--security-opt=seccomp=unconfined"]}, ValueError),
        ({"extra_args": ["--pid=host"]}, ValueError),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, kwargs, exc):
    ws = tmp_path / "ws"
    ws.mkdir()
    args = {"image": "img", "docker": str(tmp_path / "no-docker"), "workspace_dir": str(ws)}
    with pytest.raises(exc):
        DockerREPL(**{**args, **kwargs})
    assert list(ws.iterdir()) == []


def test_a_missing_workspace_dir_is_named(tmp_path):
    missing = tmp_path / "not-there"
    with pytest.raises(FileNotFoundError) as info:
        DockerREPL(image="img", docker=str(tmp_path / "no-docker"), workspace_dir=str(missing))
    assert "workspace_dir" in str(info.value)
    afile = tmp_path / "a-file"
    afile.write_text("")
    with pytest.raises(FileNotFoundError):
        DockerREPL(image="img", docker=str(tmp_path / "no-docker"), workspace_dir=str(afile))


def test_image_from_the_environment_is_checked_too(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKERREPL_IMAGE", "-v/:/host")
    with pytest.raises(ValueError):
        DockerREPL(docker=str(tmp_path / "no-docker"), workspace_dir=str(tmp_path))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": None},
        {"timeout": math.inf},
        {"timeout": 5},
        {"pids_limit": None},
        {"max_output_bytes": 1e6},
        {"grace": 0},
        # rlm's environment contract, and arguments it passes that we do not know
        {"persistent": True, "depth": 2, "max_concurrent_subcalls": 8, "compaction": False},
        {"some_future_rlm_option": object()},
        {"extra_args": ["--hostname", "sandbox", "--label=team=a", "--device", "/dev/fuse"]},
        {"extra_args": ("--storage-opt", "size=2g")},
        # widening options are the caller's to take on, with the inspect check off
        {"extra_args": ["--cap-add", "SYS_PTRACE"], "verify_security": False},
    ],
)
def test_good_arguments_get_as_far_as_the_start(tmp_path, kwargs):
    from dockerrepl.errors import DockerNotFound

    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(DockerNotFound):
        DockerREPL(
            image="img",
            docker=str(tmp_path / "no-docker"),
            network="none",
            workspace_dir=str(ws),
            **kwargs,
        )
    assert list(ws.iterdir()) == []


def test_unknown_arguments_are_ignored_with_a_warning(tmp_path, caplog):
    """rlm's contract says accept and ignore; a misspelt option is named, not silent."""
    from dockerrepl.errors import DockerNotFound

    with pytest.raises(DockerNotFound):
        DockerREPL(image="img", docker=str(tmp_path / "no-docker"), memroy="1g")
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage() for r in warned] == ["DockerREPL ignores unknown arguments: memroy"]
