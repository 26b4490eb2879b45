"""Every failure says what went wrong and what to do, never a traceback."""

from __future__ import annotations

import pytest
from cli_helpers import assert_clean_failure, base_env, cli

pytestmark = pytest.mark.timeout(60)

DEAD_SOCKET = "unix:///tmp/dockerrepl-test-nonexistent.sock"


@pytest.mark.parametrize("command", [["run", "-c", "print(1)"], ["repl"], ["gc"]])
def test_no_docker_on_path(tmp_path: object, command: list[str]) -> None:
    done = cli(*command, env=base_env(PATH=str(tmp_path)))
    assert_clean_failure(done)
    assert done.rc == 125
    assert "docker executable" in done.err
    assert "--docker" in done.err  # the fix names the command-line option


def test_docker_option_pointing_nowhere() -> None:
    done = cli("--docker", "/nonexistent/docker", "run", "-c", "1", "--backend", "echo")
    assert_clean_failure(done)
    assert "/nonexistent/docker" in done.err


@pytest.mark.parametrize("command", [["run", "-c", "print(1)"], ["repl"], ["gc", "--dry-run"]])
def test_daemon_down(docker_cli: str, command: list[str]) -> None:
    done = cli(*command, env=base_env(DOCKER_HOST=DEAD_SOCKET))
    assert_clean_failure(done)
    assert done.rc == 125
    assert "DOCKER_HOST" in done.err  # the fix says where to look


def test_doctor_without_docker(tmp_path: object) -> None:
    done = cli("doctor", env=base_env(PATH=str(tmp_path)))
    assert done.rc == 1
    assert "Traceback" not in done.out + done.err
    lines = done.out.splitlines()
    cli_line = next(line for line in lines if line.startswith("docker CLI"))
    assert " FAIL " in cli_line
    assert any(line.strip().startswith("fix:") for line in lines)
    assert sum(" skip " in line for line in lines) == 8


def test_doctor_daemon_down(docker_cli: str) -> None:
    done = cli("doctor", env=base_env(DOCKER_HOST=DEAD_SOCKET))
    assert done.rc == 1
    assert "Traceback" not in done.out + done.err
    verdicts = {line.split(" .")[0]: line for line in done.out.splitlines() if " ." in line}
    assert " ok " in verdicts["docker CLI"]
    assert " FAIL " in verdicts["daemon reachable"]
    assert " FAIL " in verdicts["permission on the engine socket"]  # no socket there
    assert " skip " in verdicts["a container starts"]


def test_usage_errors() -> None:
    # after FILE everything is the code's (as with python): here FILE is missing
    both = cli("run", "/nonexistent/x.py", "-c", "1")
    assert both.rc == 2
    assert "dockerrepl: error: cannot read /nonexistent/x.py" in both.err
    # --stdin with the code itself coming from stdin
    code_too = cli("run", "--stdin", stdin="print(1)")
    assert code_too.rc == 2
    assert "--stdin needs FILE or -c CODE" in code_too.err
    missing = cli("run", "/nonexistent/job.py")
    assert missing.rc == 2
    assert "/nonexistent/job.py" in missing.err
    assert "Traceback" not in missing.err
    nothing = cli()
    assert nothing.rc == 2
    assert "usage:" in nothing.err


def test_missing_context_file() -> None:
    done = cli("run", "--context", "/nonexistent/ctx.txt", "-c", "1")
    assert done.rc == 2
    assert "/nonexistent/ctx.txt" in done.err
    assert "Traceback" not in done.err


def test_missing_image(env: dict[str, str]) -> None:
    """The engine has no registry here: the pull fails fast, the fix says how to build one."""
    image = "dockerrepl/no-such-image:missing"
    done = cli("run", "--backend", "echo", "--image", image, "-c", "1", env=env, timeout=120)
    assert_clean_failure(done)
    assert done.rc == 125
    assert image in done.err
    assert "build-image.sh" in done.err
    doctor = cli("doctor", "--image", image, env=env, timeout=120)
    assert doctor.rc == 1
    image_line = next(
        ln for ln in doctor.out.splitlines() if ln.startswith("image present") and (" FAIL " in ln)
    )
    assert image in image_line
    assert "build-image.sh" in doctor.out
    assert "DOCKERREPL_IMAGE" in doctor.out


@pytest.mark.parametrize("image", ["Bad Name", "Python:3.11", "-rm", "python::3"])
def test_a_malformed_image_name_is_refused_for_its_name(docker_cli: str, image: str) -> None:
    """docker would try a registry and answer about that ("invalid reference format ...
    could not be pulled"); nothing is asked of docker (the daemon here is dead)."""
    done = cli("run", f"--image={image}", "-c", "1", env=base_env(DOCKER_HOST=DEAD_SOCKET))
    assert_clean_failure(done)
    assert done.rc == 125
    assert "error: --image " in done.err, done.err  # about the name
    assert "pull" not in done.err and "DOCKER_HOST" not in done.err
    done = cli("doctor", f"--image={image}", env=base_env(DOCKER_HOST=DEAD_SOCKET))
    assert_clean_failure(done)
    assert done.rc == 125
    assert "error: --image " in done.err, done.out + done.err
    assert "daemon" not in done.out + done.err  # no check ran
