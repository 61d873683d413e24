"""The Python examples in the README and docs/ import what they say they import."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def import_lines(path: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if re.match(r"(import|from) \w", line.strip()) and "(" not in line]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_documented_imports_work(path):
    for line in import_lines(path):
        exec(line, {})  # noqa: S102 - our own documentation, to prove its imports resolve
