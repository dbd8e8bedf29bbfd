"""Hugging Face PEFT adapter folders ↔ shiftkit shifts: LoRA, (IA)³ and prompt tuning (PEFT 0.21.2 layout).

``sk.export_peft`` (:mod:`~shiftkit.interop.peft.write`) and ``sk.import_peft``
(:mod:`~shiftkit.interop.peft.read`). The methods are reached through the registry, not imported: a new
method with a PEFT counterpart adds its key mapping here.
"""

from __future__ import annotations

from shiftkit.interop.peft.read import CONFIG_NAME, PEFT_TYPES, WEIGHTS_NAME
from shiftkit.interop.peft.write import TASK_TYPES, export_peft, import_peft

__all__ = ["CONFIG_NAME", "PEFT_TYPES", "TASK_TYPES", "WEIGHTS_NAME", "export_peft", "import_peft"]
