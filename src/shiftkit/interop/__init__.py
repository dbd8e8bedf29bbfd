"""File formats of other tools, in and out: Hugging Face PEFT adapter folders today
(:mod:`~shiftkit.interop.peft`), with room for mergekit's and diffusers' formats."""

from __future__ import annotations

from shiftkit.interop.peft import export_peft, import_peft

__all__ = ["export_peft", "import_peft"]
