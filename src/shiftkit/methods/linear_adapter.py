"""ZeroI2V linear adapters: dense adapters without a nonlinearity, merged away after training.

Li & Wang, "ZeroI2V: Zero-Cost Adaptation of Pre-trained Transformers from Image to Video" (ECCV 2024,
arXiv:2310.01324). An adapter on a ``D``-wide activation ``z`` is

``LA(z) = z + s · (W₂ · Dropout(W₁ z + b₁) + b₂)``, ``W₁ ∈ R^{h×D}``, ``W₂ ∈ R^{D×h}``, ``h = ⌊0.25·D⌋``.

With dropout off it is the affine map ``LA(z) = M z + c``, ``M = I + s·W₂W₁``, ``c = s·(W₂b₁ + b₂)``, so
it folds exactly into the Linear ``(W, b)`` it sits beside:

* ``position="before"`` (on the Linear's input): ``W' = W M``, ``b' = W c + b``;
* ``position="after"`` (on its output): ``W' = M W``, ``b' = M b + c``.

A missing base bias is created by the fold. The reference (CLIP ViT) puts adapters before the attention
in-projection and the MLP's ``c_fc`` and after the attention out-projection and ``c_proj``; per-module
sides are chosen here with ``after_modules``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.registry import register_method
from shiftkit.core.targets import match_names
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError

__all__ = ["LinearAdapterConfig", "LinearAdapterLinear", "linear_adapter_affine"]

_POSITIONS = ("before", "after")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class LinearAdapterConfig(ShiftConfig):
    """ZeroI2V linear adapter settings.

    Attributes:
        ratio: hidden width ``h = max(1, ⌊ratio·D⌋)``; 0.25 is the reference's ``mlp_ratio``.
        hidden: an explicit hidden width ``h`` (overrides ``ratio``).
        scale: ``s``; 0.5 is the reference's ``adapter_scale`` (it "should not matter in theory", since
            it can be absorbed into W₂, but it sets the effective learning rate of the branch).
        dropout: dropout on the hidden activation ``W₁z + b₁`` in training; 0.1 as in the reference.
            Dropout is off in eval mode, where the adapter is exactly affine and the fold is exact.
            ``nn.MultiheadAttention``
            reads its ``out_proj`` weights directly, so an adapter there folds into the weights on every
            forward and gets no dropout.
        position: ``"before"`` (adapter on the Linear's input, the reference's LA_Tin / LA_MLP) or
            ``"after"`` (on its output, LA_S / LA_MLPout) for every target, except:
        after_modules: names (matched like ``target_modules``: a list is exact-or-suffix, a string a
            full regex) whose adapter goes *after* the Linear whatever ``position`` says.

    Only ``nn.Linear`` is supported. Note that with separate q/k/v projections, adapters "before" each of
    them are three independent adapters, not the reference's single one before a fused in-projection.

    Example:
        >>> cfg = sk.LinearAdapterConfig(target_modules=["c_fc", "out_proj", "c_proj"],
        ...                               after_modules=["out_proj", "c_proj"])
        >>> sk.attach_(vit, cfg); train(vit); sk.fold_(vit)   # zero extra inference cost
    """

    ratio: float = 0.25
    hidden: int | None = None
    scale: float = 0.5
    dropout: float = 0.1
    position: str = "before"
    after_modules: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _number(self.ratio) or self.ratio <= 0:
            raise ShiftkitError(f"LinearAdapterConfig.ratio must be a number > 0, got {self.ratio!r}")
        if self.hidden is not None and (
            isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1
        ):
            raise ShiftkitError(
                f"LinearAdapterConfig.hidden must be a positive integer or None, got {self.hidden!r}"
            )
        if not _number(self.scale):
            raise ShiftkitError(f"LinearAdapterConfig.scale must be a number, got {self.scale!r}")
        if not _number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ShiftkitError(f"LinearAdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.position not in _POSITIONS:
            raise ShiftkitError(
                f"LinearAdapterConfig.position must be one of {_POSITIONS}, got {self.position!r}"
            )
        after = self.after_modules
        if isinstance(after, Sequence) and not isinstance(after, str):
            if not all(isinstance(p, str) for p in after):
                raise ShiftkitError(f"LinearAdapterConfig.after_modules must hold strings, got {after!r}")
            object.__setattr__(self, "after_modules", tuple(after))  # hashable, round-trips equal
        elif after is not None and not isinstance(after, str):
            raise ShiftkitError(
                f"LinearAdapterConfig.after_modules must be a string, a list or None, got {after!r}"
            )

    def hidden_width(self, width: int) -> int:
        """``h`` for an activation of width ``D``: ``hidden`` or ``max(1, ⌊ratio·D⌋)``."""
        return self.hidden if self.hidden is not None else max(1, math.floor(self.ratio * width))


def linear_adapter_affine(
    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """The adapter as an affine map ``z ↦ M z + c`` (dropout off).

    Args:
        w1: ``(h, D)``.
        b1: ``(h,)``.
        w2: ``(D, h)``.
        b2: ``(D,)``.
        scale: ``s``.

    Returns:
        ``M = I + s·W₂W₁`` of shape ``(D, D)`` and ``c = s·(W₂b₁ + b₂)`` of shape ``(D,)``.

    Example:
        >>> m, c = linear_adapter_affine(w1, b1, w2, b2, 0.5)
        >>> torch.allclose(z @ m.T + c, adapter(z))
        True
    """
    eye = torch.eye(w2.shape[0], dtype=w2.dtype, device=w2.device)
    return eye + scale * (w2 @ w1), scale * (w2 @ b1 + b2)


class LinearAdapterLinear(ShiftWrapper):
    """A ZeroI2V linear adapter before or after an ``nn.Linear`` (or subclass).

    Parameters ``w1 (h, D)``, ``b1 (h,)``, ``w2 (D, h)``, ``b2 (D,)`` with ``D = in`` (before) or
    ``D = out`` (after).

    Example:
        >>> la = LinearAdapterLinear(nn.Linear(8, 4), sk.LinearAdapterConfig(), position="after")
        >>> la(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, base: nn.Linear, config: LinearAdapterConfig, position: str) -> None:
        super().__init__(base)
        if position not in _POSITIONS:
            raise ShiftkitError(f"linear adapter position must be one of {_POSITIONS}, got {position!r}")
        self.position = position
        self.scale = float(config.scale)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        w = base.weight
        width = base.in_features if position == "before" else base.out_features
        h = config.hidden_width(width)
        dt, dev = w.dtype, w.device
        self.w1 = nn.Parameter(torch.empty(h, width, dtype=dt, device=dev))
        self.b1 = nn.Parameter(torch.zeros(h, dtype=dt, device=dev))
        # W₂ = 0 and b₂ = 0 make the adapter the identity at init (the reference's choice)
        self.w2 = nn.Parameter(torch.zeros(width, h, dtype=dt, device=dev))
        self.b2 = nn.Parameter(torch.zeros(width, dtype=dt, device=dev))
        with (
            torch.no_grad()
        ):  # the reference's trunc_normal_(std=0.02), whose default bounds are ±2 (absolute)
            tmp = torch.empty(h, width, dtype=torch.float32, device=w.device)
            nn.init.trunc_normal_(tmp, std=0.02)
            self.w1.copy_(tmp)

    def adapter(self, z: Tensor) -> Tensor:
        """``LA(z) = z + s·(W₂ Dropout(W₁z + b₁) + b₂)``: ``z (..., D) -> (..., D)``."""
        hidden = self.dropout(F.linear(z.to(self.w1.dtype), self.w1, self.b1))
        branch = F.linear(hidden, self.w2, self.b2)
        return z + (branch * self.scale).to(z.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        if self.position == "before":
            return self.base(self.adapter(x))
        return self.adapter(self.base(x))

    def delta(self) -> dict[str, Tensor]:
        """``{"weight": W'−W (out, in), "bias": b'−b (out,)}``; ``b'`` itself where the base has no bias.

        Computed as ``s·(W W₂)W₁`` / ``s·W₂(W₁W)`` (cheaper and more accurate than forming ``M``), in at
        least float32 and cast back to the base dtype.
        """
        lin = self.base
        assert isinstance(lin, nn.Linear)
        weight, bias = lin.weight, lin.bias
        dtype = torch.promote_types(weight.dtype, torch.float32)
        w, w1, b1, w2, b2 = (t.to(dtype) for t in (weight, self.w1, self.b1, self.w2, self.b2))
        s = self.scale
        c = s * (w2 @ b1 + b2)
        if self.position == "before":  # W' = W M, b' = W c + b
            d_weight = s * ((w @ w2) @ w1)
            d_bias = w @ c
        else:  # W' = M W, b' = M b + c
            d_weight = s * (w2 @ (w1 @ w))
            d_bias = c if bias is None else s * (w2 @ (w1 @ bias.to(dtype))) + c
        return {"weight": d_weight.to(weight.dtype), "bias": d_bias.to(weight.dtype)}


@register_method(
    "linear_adapter",
    config=LinearAdapterConfig,
    targets=(nn.Linear,),
    foldable=True,
    zero_init={},  # W₂ = b₂ = 0 by default: the adapter is exactly the identity
    default_targets="all-linear",
    group=True,  # only to see module names (after_modules); the wrappers share nothing
)
def wrap_group(
    root: nn.Module, targets: list[tuple[str, nn.Module]], config: ShiftConfig
) -> list[ShiftWrapper]:
    """Wrap each target ``nn.Linear``, on the side ``position`` / ``after_modules`` gives it."""
    assert isinstance(config, LinearAdapterConfig)
    after = set(match_names([n for n, _ in targets], config.after_modules))
    out: list[ShiftWrapper] = []
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise ShiftkitError(f"linear_adapter cannot wrap {name} ({type(module).__name__})")
        position = "after" if name in after else config.position
        out.append(LinearAdapterLinear(module, config, position))
    return out
