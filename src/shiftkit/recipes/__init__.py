"""shiftkit.recipes: explicit training / evaluation loops (no Trainer class).

Public names load lazily (PEP 562): ``import shiftkit.recipes`` alone does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_API: dict[str, str] = {
    "intrinsic_dimension": "shiftkit.recipes.intrinsic",
    "IntrinsicDimResult": "shiftkit.recipes.intrinsic",
    "light_peft": "shiftkit.recipes.light_peft",
    "LightPEFTSettings": "shiftkit.recipes.light_peft",
    "LightPEFTResult": "shiftkit.recipes.light_peft",
}

__all__ = ["IntrinsicDimResult", "LightPEFTResult", "LightPEFTSettings", "intrinsic_dimension", "light_peft"]


def __getattr__(name: str) -> Any:
    module_name = _API.get(name)
    if module_name is None:
        raise AttributeError(f"module 'shiftkit.recipes' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)


if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from shiftkit.recipes.intrinsic import IntrinsicDimResult, intrinsic_dimension
    from shiftkit.recipes.light_peft import LightPEFTResult, LightPEFTSettings, light_peft
