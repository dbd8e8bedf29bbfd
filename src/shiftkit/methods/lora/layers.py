"""LoRA: a trainable low-rank update of a frozen weight (Hu et al., 2021, arXiv:2106.09685).

``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` with ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` and ``s = α/r``
(``α/√r`` with rsLoRA, Kalajdzievski 2023, arXiv:2312.03732). Initialisation follows PEFT: A is Kaiming
uniform (a=√5), B is zero, so the model is unchanged at step 0; for embeddings A is zero and B normal.
Fold: ``W' = W + s · B A`` (exact up to rounding). Conv2d uses a ``k×k`` conv to r channels then a ``1×1``
conv, whose product is one ``k×k`` kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.functional import kaiming_uniform_a_sqrt5_, lora_conv_delta, lora_delta
from shiftkit.core.registry import register_method
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError
from shiftkit.methods.lora.config import LoRAConfig
from shiftkit.methods.lora.dense import LORA_DENSE

__all__ = ["LoRAConv2d", "LoRAEmbedding", "LoRALinear"]


def _init_pair(a: Tensor, b: Tensor, config: LoRAConfig) -> None:
    with torch.no_grad():
        if config.init_lora_weights == "gaussian":
            a.normal_(0.0, 1.0 / config.r)
        else:
            kaiming_uniform_a_sqrt5_(a)
        if config.init_lora_weights is False:
            kaiming_uniform_a_sqrt5_(b)
        else:
            b.zero_()


class _LoRABase(ShiftWrapper):
    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base)
        self.r = config.r
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def _branch_input(self, x: Tensor) -> Tensor:
        return self.dropout(x)


class LoRALinear(_LoRABase):
    """LoRA around an ``nn.Linear`` (or subclass). Parameters ``lora_A (r, in)``, ``lora_B (out, r)``."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__(base, config)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(config.r, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(w.shape[0], config.r, dtype=w.dtype, device=w.device))
        _init_pair(self.lora_A, self.lora_B, config)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        out = self.base(x)
        # no module call for the usual dropout-free branch (_branch_input would only call the Identity)
        branch = x if isinstance(self.dropout, nn.Identity) else self._branch_input(x)
        h = F.linear(branch.to(self.lora_A.dtype), self.lora_A)
        # Scaling goes on B, not on the (tokens, out) result: fewer flops. s·Bᵀ is made a contiguous
        # (r, out) matrix because MKL's skinny GEMMs of the backward (∂h = g·s·B, ∂B = gᵀ·h) run 2-3×
        # faster with that layout than with B's own (out, r) one (benchmarks/peft_lora_step.py).
        bt = (self.lora_B * self.scaling).t().contiguous()
        if out.dtype == h.dtype == bt.dtype:
            # addmm adds h·(s·Bᵀ) to the base output in the GEMM itself: no (tokens, out) temporary + add
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), bt)
            return flat.view(out.shape)
        return out + h @ bt  # mixed dtypes (e.g. under autocast): the usual type promotion

    def delta(self) -> dict[str, Tensor]:
        """``{"weight": s·B A}`` of shape ``(out, in)``."""
        return {"weight": lora_delta(self.lora_A, self.lora_B, self.scaling)}


class LoRAConv2d(_LoRABase):
    """LoRA around an ``nn.Conv2d`` with ``groups=1`` and zero padding.

    Parameters ``lora_A (r, C_in, kh, kw)`` (same stride/padding/dilation as the base) and
    ``lora_B (C_out, r, 1, 1)``.
    """

    def __init__(self, base: nn.Conv2d, config: LoRAConfig) -> None:
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ShiftkitError(
                f"LoRA supports Conv2d with groups=1 and padding_mode='zeros' "
                f"(got groups={base.groups}, padding_mode={base.padding_mode!r})"
            )
        super().__init__(base, config)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(config.r, *w.shape[1:], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(w.shape[0], config.r, 1, 1, dtype=w.dtype, device=w.device))
        _init_pair(self.lora_A, self.lora_B, config)

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, C_in, H, W) -> (N, C_out, H', W')``."""
        conv: nn.Conv2d = self.base  # type: ignore[assignment]
        out = conv(x)
        h = F.conv2d(
            self._branch_input(x).to(self.lora_A.dtype),
            self.lora_A,
            None,
            conv.stride,
            conv.padding,
            conv.dilation,
        )
        return out + F.conv2d(h, self.lora_B * self.scaling)

    def delta(self) -> dict[str, Tensor]:
        """``{"weight": kernel}`` of shape ``(C_out, C_in, kh, kw)``."""
        return {"weight": lora_conv_delta(self.lora_A, self.lora_B, self.scaling)}


class LoRAEmbedding(_LoRABase):
    """LoRA around an ``nn.Embedding``: ``lora_A (r, num_embeddings)`` (zero), ``lora_B (dim, r)`` (normal).

    As in PEFT, the roles of A and B are swapped at init for embeddings (A zero, B random), and dropout
    does not apply (the input is indices).
    """

    def __init__(self, base: nn.Embedding, config: LoRAConfig) -> None:
        super().__init__(base, config)
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(config.r, w.shape[0], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(w.shape[1], config.r, dtype=w.dtype, device=w.device))
        with torch.no_grad():
            self.lora_B.normal_()
            if config.init_lora_weights is False:
                self.lora_A.normal_()

    def forward(self, x: Tensor) -> Tensor:
        """``x (...) int -> (..., dim)``."""
        emb: nn.Embedding = self.base  # type: ignore[assignment]
        out = emb(x)
        h = F.embedding(
            x, self.lora_A.T, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse
        )
        return out + F.linear(h, self.lora_B * self.scaling)

    def delta(self) -> dict[str, Tensor]:
        """``{"weight": (s·B A)ᵀ}`` of shape ``(num_embeddings, dim)``."""
        return {"weight": lora_delta(self.lora_A, self.lora_B, self.scaling).T}


@register_method(
    "lora",
    config=LoRAConfig,
    targets=(nn.Linear, nn.Conv2d, nn.Embedding),
    foldable=True,
    zero_init={},
    default_targets="all-linear",
    dense=LORA_DENSE,
)
def wrap(module: nn.Module, config: ShiftConfig) -> ShiftWrapper:
    """Wrap one module with the LoRA class for its type."""
    assert isinstance(config, LoRAConfig)
    if isinstance(module, nn.Linear):
        return LoRALinear(module, config)
    if isinstance(module, nn.Conv2d):
        return LoRAConv2d(module, config)
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding(module, config)
    raise ShiftkitError(f"LoRA cannot wrap {type(module).__name__}")
