"""LoRA's settings, in PEFT's vocabulary (the math is in :mod:`~shiftkit.methods.lora.layers` and
:mod:`~shiftkit.methods.lora.dense`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from shiftkit.core.config import ShiftConfig
from shiftkit.errors import ShiftkitError

__all__ = ["LoRAConfig"]

_INITS = (True, False, "gaussian")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(ShiftConfig):
    """LoRA settings, in PEFT's vocabulary.

    Attributes:
        r: rank of the update. 8 is PEFT's default: enough for most single-task adaptation.
        lora_alpha: α; the update is scaled by α/r so changing r does not change the learning rate scale.
            PEFT's default is 8 (scale 1 at r=8).
        lora_dropout: dropout on the LoRA branch's input; 0 keeps the branch deterministic (PEFT default).
        use_rslora: scale by α/√r instead (rank-stabilised LoRA), better for large r.
        init_lora_weights: ``True`` = PEFT's init (Kaiming-uniform A, zero B: exact no-op at start);
            ``"gaussian"`` = A ~ N(0, 1/r²) as in the LoRA paper, B zero; ``False`` = B random too (the
            shift is non-zero from the start; for tests).
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ShiftkitError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int | float):
            raise ShiftkitError(f"LoRAConfig.lora_alpha must be a number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, int | float) or not 0.0 <= self.lora_dropout < 1.0:
            raise ShiftkitError(f"LoRAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in _INITS:
            raise ShiftkitError(f"LoRAConfig.init_lora_weights must be one of {_INITS}")

    @property
    def scaling(self) -> float:
        """``α/r``, or ``α/√r`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
