"""scripts/demo.sh, the main job, run as a user runs it, against the real engine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from docker_helpers import exists, skip_or_fail
from fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.sh"
BASH = shutil.which("bash") or "/bin/bash"


def demo_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "DOCKERREPL_")) and k != "PYTHONPATH"
    }
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def run_demo(env, *args, demo=DEMO, cwd=None, timeout=600):
    return subprocess.run(
        [BASH, str(demo), *args],
        env=env,
        cwd=str(cwd) if cwd else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def container_gone(out: str) -> None:
    m = re.search(r"container ([0-9a-f]{12}) removed", out)
    assert m, out
    assert not exists(m.group(1))


def test_demo_with_the_echo_client(image, tmp_path):
    # no DOCKERREPL_IMAGE, no OPENAI_API_KEY: the default image, or the offline one when
    # the default cannot be pulled (the case on a machine with no registry)
    r = run_demo(demo_env(), cwd=tmp_path)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "LM client: EchoClient" in out
    if "cannot be found or pulled" in out:
        assert "dockerrepl/python:3.11-bookworm" in out
    assert "728 chars, 3 chapters, 135 words" in out
    assert "echo:In one sentence, what happens in this story?" in out
    for i in (1, 2, 3):
        assert f"chapter {i}: echo:Give a three-word title for this chapter: Chapter {i}." in out
    assert "LM calls made from the container: 4" in out
    assert "final answer: 3 chapters:" in out
    assert "Traceback" not in out + r.stderr
    container_gone(out)


def demo_model(messages: list[dict]) -> str:
    """Answers the demo's two kinds of prompt: a summary, and a chapter's title."""
    text = messages[-1]["content"]
    if text.startswith("In one sentence"):
        return "Tomas sails north and comes home."
    return f"Title {text.split('Chapter ')[1][0]}"


def test_demo_with_the_openai_client(image, tmp_path):
    with FakeOpenAI(answer=demo_model, tokens=(10, 5)) as fake:
        env = demo_env(
            OPENAI_API_KEY="sk-demo-secret",
            OPENAI_BASE_URL=fake.url,
            DOCKERREPL_MODEL="demo-model",
        )
        r = run_demo(env, "--image", image, cwd=tmp_path)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "LM client: OpenAIClient(model='demo-model'" in out
    assert "Tomas sails north and comes home." in out
    for i in (1, 2, 3):
        assert f"chapter {i}: Title {i}" in out
    assert "LM calls made from the container: 4 (40 input / 20 output tokens)" in out
    assert "sk-demo-secret" not in out + r.stderr
    assert len(fake.requests) == 4
    for req in fake.requests:
        assert req["path"] == "/v1/chat/completions"
        assert req["headers"]["authorization"] == "Bearer sk-demo-secret"
        assert req["body"]["model"] == "demo-model"
    container_gone(out)


def test_demo_with_a_context_file(image, tmp_path):
    ctx = tmp_path / "book.txt"
    ctx.write_text("First part.\n\nSecond part.\n", encoding="utf-8")
    r = run_demo(demo_env(), "--image", image, "--context", str(ctx), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "26 chars, 2 chapters, 4 words" in r.stdout
    assert "LM calls made from the container: 3" in r.stdout
    container_gone(r.stdout)


def test_demo_from_a_fresh_clone(image, tmp_path):
    """Only committed files, nothing on PYTHONPATH: the script finds its own package."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        skip_or_fail("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120, capture_output=True
    )
    r = run_demo(demo_env(), "--image", image, demo=clone / "scripts" / "demo.sh", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LM calls made from the container: 4" in r.stdout
    container_gone(r.stdout)


def test_demo_reports_a_dead_daemon_without_a_traceback(tmp_path):
    # no engine needed: a fake docker that says what a stopped daemon says
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
        " Is the docker daemon running?' >&2\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    for tool in ("dirname", "sed"):
        path = shutil.which(tool)
        assert path
        (bin_dir / tool).symlink_to(path)
    env = demo_env(PATH=str(bin_dir))
    r = run_demo(env, cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert "demo failed: DockerDaemonError" in r.stderr
    assert "start the engine" in r.stderr or "dockerd" in r.stderr  # the hint
    assert "Traceback" not in r.stderr
