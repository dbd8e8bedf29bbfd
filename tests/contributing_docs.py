"""Run a code example of CONTRIBUTING.md as written: the first ```python block after a section heading."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_section_example(heading: str) -> dict[str, object]:
    """Execute the first Python block of the CONTRIBUTING.md section titled ``heading``; its namespace."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text[text.index(f"## {heading}") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, f"no python block under '## {heading}'"
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "CONTRIBUTING.md", "exec"), namespace)  # our own docs, run as written
    return namespace
