"""The docker CLI choke point, against a fake `docker` executable (no engine needed)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from dockerrepl import _docker
from dockerrepl._container import ContainerConfig, owner_label, process_start_time
from dockerrepl.errors import (
    DockerCommandError,
    DockerDaemonError,
    DockerError,
    DockerNotFound,
    DockerPermissionError,
    DockerTimeout,
    NoSuchContainer,
    NoSuchImage,
)

pytestmark = pytest.mark.timeout(30)


def fake_docker(tmp_path, stderr: str = "", rc: int = 0, stdout: str = "", sleep: float = 0) -> str:
    path = tmp_path / "docker"
    path.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, time
        time.sleep({sleep})
        sys.stdout.write({stdout!r})
        sys.stderr.write({stderr!r})
        sys.exit({rc})
    """)
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize(
    ("stderr", "cls"),
    [
        (
            "Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
            " Is the docker daemon running?",
            DockerDaemonError,
        ),
        (
            "permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock",
            DockerPermissionError,
        ),
        (
            "Unable to find image 'nope:1' locally\n"
            "docker: Error response from daemon: pull access denied for nope",
            NoSuchImage,
        ),
        ("Error response from daemon: No such container: abc", NoSuchContainer),
        ("something else broke", DockerCommandError),
    ],
)
def test_stderr_maps_to_typed_errors(tmp_path, stderr, cls):
    docker = fake_docker(tmp_path, stderr=stderr, rc=1)
    with pytest.raises(cls) as info:
        _docker.run(["ps"], timeout=10, docker=docker)
    err = info.value
    assert isinstance(err, DockerError)
    assert err.returncode == 1
    if cls is not DockerCommandError and cls is not NoSuchContainer:
        assert err.hint  # every environment failure says what to do


def test_no_such_image_hint_points_to_offline_build(tmp_path):
    docker = fake_docker(
        tmp_path, stderr="Unable to find image 'x' locally\nmanifest unknown", rc=125
    )
    with pytest.raises(NoSuchImage) as info:
        _docker.run(["run", "x"], timeout=10, docker=docker)
    assert "scripts/build-image.sh" in info.value.hint


def test_timeout_is_mandatory_and_enforced(tmp_path):
    docker = fake_docker(tmp_path, sleep=5)
    with pytest.raises(DockerTimeout) as info:
        _docker.run(["ps"], timeout=0.5, docker=docker)
    assert isinstance(info.value, TimeoutError)
    with pytest.raises(ValueError):
        _docker.run(["ps"], timeout=0, docker=docker)


def test_missing_docker(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DockerNotFound) as info:
        _docker.run(["ps"], timeout=5)
    assert "install" in info.value.hint.lower()


def test_success_decodes_once_with_replacement(tmp_path):
    docker = fake_docker(tmp_path, stdout="ok \udcff")  # lone surrogate -> written as ? by the fake
    res = _docker.run(["ps"], timeout=10, docker=docker)
    assert res.returncode == 0
    assert res.stdout.startswith("ok ")


def test_redact_hides_env_values():
    shown = _docker.redact(["docker", "run", "-e", "OPENAI_API_KEY=sk-secret", "--env=A=b", "img"])
    assert "sk-secret" not in shown and "=b" not in shown
    assert "OPENAI_API_KEY=***" in shown


def test_only_one_module_imports_subprocess():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "dockerrepl")
    users = []
    for dirpath, _, files in os.walk(root):
        if "_bootstrap" in dirpath:
            continue  # runs inside the container, not on the host
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                if "import subprocess" in text:
                    users.append(f)
    assert users == ["_docker.py"]


def test_run_argv_hardened_defaults(tmp_path):
    cfg = ContainerConfig(image="img", workspace=str(tmp_path), labels={"dockerrepl.version": "1"})
    argv = cfg.run_argv("name", "python3")
    joined = " ".join(argv)
    for part in (
        "--cap-drop ALL",
        "--security-opt no-new-privileges",
        "--pids-limit",
        "--memory 2g",
        "--memory-swap 2g",
        "--rm",
        "-i",
        "--init",
        "host.docker.internal:host-gateway",
    ):
        assert part in joined
    assert argv[-3:] == ["img", "-B", "/workspace/.dockerrepl/dockerrepl_bootstrap.py"]
    assert "-e" not in argv and "--env" not in argv  # no host environment, ever
    none = ContainerConfig(
        image="img", workspace=str(tmp_path), network="none", user="65534:65534", read_only=True
    ).run_argv("n", "python")
    assert "--network" in none and none[none.index("--network") + 1] == "none"
    assert "host.docker.internal:host-gateway" not in none
    assert "--read-only" in none and "65534:65534" in none
    with pytest.raises(ValueError):
        ContainerConfig(image="i", workspace="/w", network="host").run_argv("n", "python3")


def test_owner_label_uses_proc_start_time():
    host, pid, start = owner_label().split(":")
    assert int(pid) == os.getpid()
    assert start == process_start_time(os.getpid()) != "0"


def test_import_does_nothing(tmp_path):
    code = (
        "import threading, sys, atexit\n"
        "import logging, concurrent.futures, socketserver  # stdlib registers its own\n"
        "before = atexit._ncallbacks()\n"
        "import dockerrepl, dockerrepl.clients, dockerrepl.lm_handler\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert atexit._ncallbacks() == before\n"
        "print(dockerrepl.__version__)\n"
    )
    env = {
        "PATH": "",
        "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
