"""The README's quick start runs as written (only the image comes from the environment)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def quick_start() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Quick start") :]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "no python block under '## Quick start'"
    return m.group(1)


def test_the_quick_start_runs_as_written(image: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DOCKERREPL_"))}
    env.update(DOCKERREPL_IMAGE=image, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", quick_start()],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # stdout ends with the cell's own newline: "ok echo:summarise 10600 chars\n 10600 1"
    assert r.stdout == "ok echo:summarise 10600 chars\n 10600 1\n10600\n", r.stdout
