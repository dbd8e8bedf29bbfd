"""PEGO: a group of LoRA modules with orthogonal regularisation (Hu et al., ECCV 2024, arXiv:2407.15085).

Each targeted Linear gets n LoRA pairs, added with **no** ``α/r`` scaling:

``y = x Wᵀ + b + Σ_{i=1..n} (x A_iᵀ) B_iᵀ``, ``A_i ∈ R^{r×in}`` Kaiming-uniform (a=√5), ``B_i = 0``.

Training adds ``λ · [Σ_i ‖W ΔW_iᵀ‖₁ + Σ_{i<j} ‖ΔW_i ΔW_jᵀ‖₁]`` with ``ΔW_i = B_i A_i`` (``‖·‖₁`` = sum of
absolute entries): the first term keeps each update's rows orthogonal to the frozen weight's rows
("preserve the pretrained knowledge"), the second keeps the group members' updates mutually orthogonal
("diversify"). It is evaluated in factored form, ``(W A_iᵀ) B_iᵀ`` and ``B_i (A_i A_jᵀ) B_jᵀ``, never by
forming ``ΔW_i``. ``sk.regularization_loss(model)`` sums it over the wrappers; the learn recipe adds it.

The reference applies the group to the q and v slices of CLIP's fused qkv projection. shiftkit shifts the
whole targeted Linear, so pass the separate projections: ``target_modules=["query", "value"]`` (BERT,
MiniLM) or ``["q_proj", "v_proj"]`` (Llama); the default is every Linear.

Fold: ``W' = W + Σ_i B_i A_i`` (exact up to rounding).

Example:
    >>> sk.attach_(model, sk.PEGOConfig(r=4, num_modules=4, target_modules=["query", "value"]))
    >>> loss = F.cross_entropy(model(x), y) + sk.regularization_loss(model)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.functional import kaiming_uniform_a_sqrt5_
from shiftkit.core.registry import register_method
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError

__all__ = ["LOSS_FORMS", "PEGOConfig", "PEGOLinear", "pego_orthogonality"]

#: ``l1`` = sum of absolute entries (the reference), ``fro2`` = squared Frobenius norm; ``rows`` =
#: ``W ΔWᵀ`` and ``ΔW_i ΔW_jᵀ`` (row spaces, the reference), ``cols`` = ``Wᵀ ΔW`` and ``ΔW_iᵀ ΔW_j``.
LOSS_FORMS = ("l1_rows", "l1_cols", "fro2_rows", "fro2_cols")


@dataclass(frozen=True, kw_only=True)
class PEGOConfig(ShiftConfig):
    """PEGO settings (defaults from the reference scripts).

    Attributes:
        r: rank of each LoRA in the group; 4 in every reference script.
        num_modules: group size n. The scripts use 4 on OfficeHome, VLCS, TerraIncognita and DomainNet
            and 2 only on PACS (the smallest benchmark), so 4 is the default.
        lam: λ, the weight of the orthogonality loss. The scripts override the config's 0.1 with 1e-3.
        loss_form: ``"l1_rows"`` (the reference), ``"l1_cols"``, ``"fro2_rows"`` or ``"fro2_cols"``; the
            reference keeps the other three as commented-out alternatives.

    Example:
        >>> cfg = PEGOConfig(num_modules=2, target_modules=["q_proj", "v_proj"])   # PACS-sized group
        >>> sk.attach_(model, cfg); float(sk.regularization_loss(model))   # B = 0 at init
        0.0
    """

    r: int = 4
    num_modules: int = 4
    lam: float = 1e-3
    loss_form: str = "l1_rows"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "num_modules"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ShiftkitError(f"PEGOConfig.{name} must be a positive integer, got {v!r}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, int | float) or self.lam < 0:
            raise ShiftkitError(f"PEGOConfig.lam must be a number >= 0, got {self.lam!r}")
        if self.loss_form not in LOSS_FORMS:
            raise ShiftkitError(f"PEGOConfig.loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}")


def _norm(m: Tensor, l1: bool) -> Tensor:
    # sum over every matrix of a stack: ‖·‖₁ = Σ|entries|, fro2 = Σ entries²
    return m.abs().sum() if l1 else m.square().sum()


def _fro2_factored(u: Tensor, v: Tensor) -> Tensor:
    """``Σ_k ‖U_k V_kᵀ‖_F²`` for stacks ``u (k, m, r)``, ``v (k, p, r)``, without forming ``m×p`` products."""
    # ‖U Vᵀ‖_F² = tr(UᵀU VᵀV) = Σ (UᵀU) ⊙ (VᵀV), both r×r and symmetric
    return (u.transpose(-1, -2) @ u * (v.transpose(-1, -2) @ v)).sum()


def pego_orthogonality(weight: Tensor, lora_a: Tensor, lora_b: Tensor, loss_form: str = "l1_rows") -> Tensor:
    """PEGO's orthogonality loss of one layer, unweighted: ``Σ_i ‖W ΔW_iᵀ‖ + Σ_{i<j} ‖ΔW_i ΔW_jᵀ‖``.

    ``ΔW_i = B_i A_i`` is never formed: the l1 forms compute ``(W A_iᵀ) B_iᵀ`` and ``B_i (A_i A_jᵀ) B_jᵀ``
    (``out×out`` results, ``O(out·in·r + out²·r)``); the squared-Frobenius forms need only ``r×r`` traces.
    The ``cols`` forms use ``Wᵀ ΔW_i = (Wᵀ B_i) A_i`` and ``ΔW_iᵀ ΔW_j = A_iᵀ (B_iᵀ B_j) A_j``.

    Args:
        weight: the frozen weight ``W``, ``(out, in)``.
        lora_a: the group's A matrices, ``(n, r, in)``.
        lora_b: the group's B matrices, ``(n, out, r)``.
        loss_form: one of :data:`LOSS_FORMS`.

    Returns:
        A scalar tensor, differentiable in ``lora_a`` and ``lora_b``.

    Example:
        >>> a, b = torch.randn(2, 4, 16), torch.randn(2, 8, 4)
        >>> pego_orthogonality(torch.randn(8, 16), a, b).shape
        torch.Size([])
    """
    if loss_form not in LOSS_FORMS:
        raise ShiftkitError(f"loss_form must be one of {LOSS_FORMS}, got {loss_form!r}")
    l1, rows = loss_form.startswith("l1"), loss_form.endswith("rows")
    n = lora_a.shape[0]
    w = weight.to(lora_a.dtype)
    # In the "cols" forms A and B swap roles: Wᵀ ΔW_i = (Wᵀ B_i) A_i and ΔW_iᵀ ΔW_j = A_iᵀ (B_iᵀ B_j) A_j
    # are the "rows" computation on Wᵀ with (A_i, B_i) replaced by (B_iᵀ, A_iᵀ).
    if not rows:
        w, lora_a, lora_b = w.t(), lora_b.transpose(1, 2), lora_a.transpose(1, 2)
    wa = w @ lora_a.transpose(1, 2)  # (n, out, r): W A_iᵀ
    preserve = _norm(wa @ lora_b.transpose(1, 2), True) if l1 else _fro2_factored(wa, lora_b)
    if n < 2:
        return preserve
    ii, jj = torch.triu_indices(n, n, 1, device=lora_a.device)
    cross = lora_a[ii] @ lora_a[jj].transpose(1, 2)  # (pairs, r, r): A_i A_jᵀ
    left = lora_b[ii] @ cross  # (pairs, out, r): B_i (A_i A_jᵀ)
    if l1:
        diversify = _norm(left @ lora_b[jj].transpose(1, 2), True)
    else:
        diversify = _fro2_factored(left, lora_b[jj])
    return preserve + diversify


class PEGOLinear(ShiftWrapper):
    """A group of ``n`` unscaled LoRA pairs around an ``nn.Linear`` (or subclass).

    Parameters ``lora_A (n, r, in)`` (each ``A_i`` Kaiming-uniform, a=√5) and ``lora_B (n, out, r)`` (zero).
    """

    def __init__(self, base: nn.Linear, config: PEGOConfig) -> None:
        super().__init__(base)
        w = base.weight
        n, r = config.num_modules, config.r
        self.lam = float(config.lam)
        self.loss_form = config.loss_form
        self.lora_A = nn.Parameter(torch.empty(n, r, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(n, w.shape[0], r, dtype=w.dtype, device=w.device))
        for i in range(n):  # fan_in = in per A_i, not r·in of the stack
            kaiming_uniform_a_sqrt5_(self.lora_A.data[i])

    def _stacked(self) -> tuple[Tensor, Tensor]:
        # Σ_i B_i A_i = [B_1 … B_n] [A_1; …; A_n]: one (n·r)-rank LoRA with the group concatenated
        n, r, d_in = self.lora_A.shape
        a = self.lora_A.reshape(n * r, d_in)
        b = self.lora_B.transpose(0, 1).reshape(self.lora_B.shape[1], n * r)
        return a, b

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        out = self.base(x)
        a, b = self._stacked()
        h = F.linear(x.to(a.dtype), a)
        return out + F.linear(h, b).to(out.dtype)

    def delta(self) -> dict[str, Tensor]:
        """``{"weight": Σ_i B_i A_i}`` of shape ``(out, in)``."""
        a, b = self._stacked()
        return {"weight": b @ a}

    def regularization_loss(self) -> Tensor | None:
        """``λ · (Σ_i ‖W ΔW_iᵀ‖₁ + Σ_{i<j} ‖ΔW_i ΔW_jᵀ‖₁)`` (or the configured form); 0 at init (B = 0).

        ``None`` (nothing to compute) when ``λ = 0``.
        """
        if self.lam == 0:
            return None
        weight = self.base.weight
        assert isinstance(weight, Tensor)
        return self.lam * pego_orthogonality(weight.detach(), self.lora_A, self.lora_B, self.loss_form)


@register_method(
    "pego",
    config=PEGOConfig,
    targets=(nn.Linear,),
    foldable=True,
    zero_init={},
    default_targets="all-linear",
)
def wrap(module: nn.Module, config: ShiftConfig) -> ShiftWrapper:
    """Wrap one Linear with a PEGO group."""
    assert isinstance(config, PEGOConfig)
    if not isinstance(module, nn.Linear):
        raise ShiftkitError(f"PEGO wraps nn.Linear layers, not {type(module).__name__}")
    return PEGOLinear(module, config)
