"""Shared by the benchmark scripts: put one section's latest figures into BENCHMARKS.md."""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nLatest figures; each section names the command that produced it. Earlier runs' figures "
          "are in this file's history (`git log -p BENCHMARKS.md`).\n")


def write_section(title: str, body: str) -> None:
    """Replace the section headed ``## {title}`` (or append it) with ``body``."""
    section = f"## {title}\n\n{body.strip()}\n"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    pattern = re.compile(r"## " + re.escape(title) + r"\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    BENCHMARKS.write_text(text)
