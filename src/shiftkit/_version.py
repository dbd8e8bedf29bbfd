"""The shiftkit version (one place; the package root and file metadata read it)."""

from __future__ import annotations

__version__ = "0.1.0"
