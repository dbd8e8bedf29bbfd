"""``wise_ft``: weight-space ensembling after each task (WiSE-FT, Wortsman et al., CVPR 2022; ZSCL's
baseline with ``wise_ft_alpha`` 0.8): at the end of task t, ``θ ← (1 − α)·θ_start + α·θ``, θ_start the
weights at the start of the task (the zero-shot model for the first task). Only the trained parameters are
interpolated (the shift's when one is attached)."""

from __future__ import annotations

import torch
from torch import Tensor

from shiftkit.continual.base import Strategy, TaskContext, trainable_parameters
from shiftkit.continual.registry import register_method
from shiftkit.errors import ShiftkitError

__all__ = ["WiseFT"]


@register_method("wise_ft")
class WiseFT(Strategy):
    """Interpolate each task's result with its starting weights.

    Args:
        alpha: the weight of the fine-tuned weights, in [0, 1] (0.8; 1 is plain fine-tuning).

    Example:
        >>> strategy = continual.make("wise_ft", alpha=0.8)
    """

    def __init__(self, alpha: float = 0.8) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ShiftkitError(f"wise_ft alpha must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.start: dict[str, Tensor] = {}

    def begin_task(self, ctx: TaskContext) -> None:
        """Remember the task-start weights."""
        super().begin_task(ctx)
        self.start = {n: p.detach().clone() for n, p in trainable_parameters(ctx.model).items()}

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> None:
        """``θ ← (1 − α)·θ_start + α·θ``."""
        for n, p in trainable_parameters(ctx.model).items():
            p.mul_(self.alpha).add_(self.start[n].to(p.dtype), alpha=1.0 - self.alpha)
        self.start = {}
