"""BitFit: train only the existing bias terms (Ben Zaken et al., ACL 2022, arXiv:2106.10199).

The frozen bias ``b`` gets a learned offset ``Δb`` (zero at start): ``y = f(x) + Δb`` on the channel axis.
Storing the offset rather than the absolute bias makes the shift a proper delta (it merges and compresses
like a task vector). Fold: ``b' = b + Δb``, exact. Only modules that already have a bias are targeted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.functional import channel_axis, channel_view
from shiftkit.core.registry import register_method
from shiftkit.core.wrapper import ShiftWrapper

__all__ = ["BitFitConfig", "BitFitModule"]

_TARGETS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


@dataclass(frozen=True, kw_only=True)
class BitFitConfig(ShiftConfig):
    """BitFit settings: which biases train. By default every bias of a supported module."""


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


class BitFitModule(ShiftWrapper):
    """A learned offset ``bias_delta`` (same shape as the base bias) added to the base output."""

    def __init__(self, base: nn.Module, config: BitFitConfig) -> None:
        super().__init__(base)
        b = base.bias
        assert isinstance(b, torch.Tensor)
        self.bias_delta = nn.Parameter(torch.zeros_like(b, requires_grad=True))

    def forward(self, x: Tensor) -> Tensor:
        """Base output with ``bias_delta`` added on its channel axis."""
        y = self.base(x)
        return y + channel_view(self.bias_delta, y.dim(), channel_axis(self.base, y.dim()))

    def delta(self) -> dict[str, Tensor]:
        """``{"bias": Δb}``."""
        return {"bias": self.bias_delta}


@register_method(
    "bitfit",
    config=BitFitConfig,
    targets=_TARGETS,
    foldable=True,
    zero_init={},
    default_targets="all",
    accepts=_has_bias,
)
def wrap(module: nn.Module, config: ShiftConfig) -> ShiftWrapper:
    """Wrap one module that has a bias."""
    assert isinstance(config, BitFitConfig)
    return BitFitModule(module, config)
