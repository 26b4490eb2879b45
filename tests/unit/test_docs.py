"""The docs tell the truth about the code: tables checked against signatures."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from dockerrepl import DockerREPL

ROOT = Path(__file__).resolve().parents[2]


def table_names(doc: Path, heading: str) -> set[str]:
    """The backticked names in the first column of the table under ``heading``."""
    text = doc.read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    names: set[str] = set()
    for line in text[start : end if end != -1 else None].splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return names


def test_the_options_table_lists_every_keyword_only_option() -> None:
    params = inspect.signature(DockerREPL.__init__).parameters.values()
    options = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    documented = table_names(ROOT / "docs" / "usage.md", "## Options (keyword-only)")
    assert documented == options, (
        f"missing from docs/usage.md: {sorted(options - documented)}; "
        f"documented but not options: {sorted(documented - options)}"
    )


def test_every_doc_link_resolves() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        links = re.findall(r"\]\(([^)#:]+\.(?:md|py|png|json))(?:#[^)]*)?\)", doc.read_text())
        for target in links:
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
