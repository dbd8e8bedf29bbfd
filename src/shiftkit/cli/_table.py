"""Plain-text tables and JSON output for the command line (no torch import)."""

from __future__ import annotations

import json
import os
from typing import Any

from shiftkit._text import format_table

__all__ = ["format_table", "write_json"]


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (temp file + rename)."""
    from shiftkit._fileio import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
