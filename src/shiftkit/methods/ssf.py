"""SSF: scale and shift the features after an op (Lian et al., NeurIPS 2022, arXiv:2210.08823).

``SSF(z) = γ ⊙ z + β`` on the channel axis of the output of a Linear, Conv or normalisation layer.
Because it follows a linear op (or a norm's affine), it folds exactly into that op:
Linear/Conv ``W' = diag(γ) W``, ``b' = γ ⊙ b + β``; norm ``g' = γ ⊙ g``, ``h' = γ ⊙ h + β`` (a missing bias
or affine is created). SSF is never placed after a nonlinearity, so every placement here is foldable.
The reference initialises ``γ ~ N(1, 0.02²)``, ``β ~ N(0, 0.02²)``; ``identity_init=True`` gives γ=1, β=0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.functional import channel_axis, scale_rows, scale_shift
from shiftkit.core.registry import register_method
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError

__all__ = ["SSFConfig", "SSFModule"]

_NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_TARGETS = (nn.Linear, nn.Conv1d, nn.Conv2d, *_NORMS)


@dataclass(frozen=True, kw_only=True)
class SSFConfig(ShiftConfig):
    """SSF settings.

    Attributes:
        identity_init: start from γ=1, β=0 (the model is unchanged at step 0). The reference instead
            draws small random values (``init_std``), which is the default here to match its results.
        init_std: standard deviation of the reference initialisation around (1, 0).
    """

    identity_init: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_std < 0:
            raise ShiftkitError(f"SSFConfig.init_std must be >= 0, got {self.init_std}")


def _channels(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.Linear):
        return (module.out_features,)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return (module.out_channels,)
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (module.num_features,)
    if isinstance(module, nn.GroupNorm):
        return (module.num_channels,)
    raise ShiftkitError(f"SSF cannot follow {type(module).__name__}")


class SSFModule(ShiftWrapper):
    """SSF after one Linear, Conv1d/2d, LayerNorm, BatchNorm or GroupNorm.

    Parameters ``scale (C,)`` and ``shift (C,)`` (the normalised shape for LayerNorm).
    """

    def __init__(self, base: nn.Module, config: SSFConfig) -> None:
        super().__init__(base)
        shape = _channels(base)
        # a norm without affine has no parameters: its floating buffers (running stats) tell the dtype
        tensors = [*base.parameters(recurse=False), *base.buffers(recurse=False)]
        ref = next((t for t in tensors if t.is_floating_point()), None)
        kw = {
            "dtype": ref.dtype if ref is not None else None,
            "device": ref.device if ref is not None else None,
        }
        self.scale = nn.Parameter(torch.ones(shape, **kw))  # type: ignore[arg-type]
        self.shift = nn.Parameter(torch.zeros(shape, **kw))  # type: ignore[arg-type]
        if not config.identity_init:
            with torch.no_grad():
                self.scale.normal_(1.0, config.init_std)
                self.shift.normal_(0.0, config.init_std)

    def forward(self, x: Tensor) -> Tensor:
        """Base output ``(..., C, ...)`` scaled and shifted on its channel axis."""
        y = self.base(x)
        return scale_shift(y, self.scale, self.shift, channel_axis(self.base, y.dim()))

    def effective_params(self) -> dict[str, Tensor]:
        """``{"weight": diag(γ)·W, "bias": γ⊙b + β}`` (γ alone / β alone where the base has none)."""
        w = getattr(self.base, "weight", None)
        b = getattr(self.base, "bias", None)
        weight: Tensor
        if w is None:
            weight = self.scale
        elif w.shape == self.scale.shape:  # norms: elementwise gain
            weight = w * self.scale
        else:  # Linear / Conv: scale the output rows
            weight = scale_rows(w, self.scale.to(w.dtype))
        bias = self.shift if b is None else b * self.scale + self.shift
        return {"weight": weight, "bias": bias}


@register_method(
    "ssf",
    config=SSFConfig,
    targets=_TARGETS,
    foldable=True,
    zero_init={"identity_init": True},
    default_targets="all",
)
def wrap(module: nn.Module, config: ShiftConfig) -> ShiftWrapper:
    """Wrap one module with SSF."""
    assert isinstance(config, SSFConfig)
    return SSFModule(module, config)
