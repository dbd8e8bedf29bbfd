"""SVFit: fine-tune the top singular values of each weight (Sun et al., 2024, arXiv:2409.05926).

Each targeted ``W ∈ R^{out×in}`` is decomposed once, at attach time, as ``W = U Σ Vᵀ`` (thin SVD in
float64). The top-r triplets span the principal part ``W_r = U_r diag(σ) V_rᵀ``; the residual
``W_e = W − W_r`` stays frozen, and only the r singular values are trained:

``W(s) = U_r diag(s) V_rᵀ + W_e``, ``s ∈ R^r`` initialised to ``σ_{1..r}``.

shiftkit trains ``s = σ + δ`` through ``δ`` (``s_delta``, zero at init), and computes

``y = x Wᵀ + b + ((x V_r) ⊙ δ) U_rᵀ``,

which equals the paper's ``x W_eᵀ + ((x V_r) ⊙ s) U_rᵀ + b`` exactly in real arithmetic but needs no
``W_e`` buffer (that would double the weight memory), and whose branch is exactly zero at init, so the
attached model reproduces the base bit for bit. Fold (exact): ``ΔW = U_r diag(δ) V_rᵀ``, a rank ≤ r update
whose columns lie in span(U_r) and rows in span(V_r).

Choice of r (``SVFitConfig``): a fixed ``r``, or ``energy=τ``: the smallest r with
``Σ_{i≤r} σ_i² / Σ_i σ_i² ≥ τ`` (default τ = 0.99, the paper's "top-r singular values capture over 99% of
the matrix's information"). **Unverified**: no reference code exists. The abstract's claim of 16× fewer
trainable parameters than LoRA suggests r close to full rank for d=768 models; the energy rule on trained
transformer weights typically also keeps most singular values, so treat r as a hyperparameter and log it
(``SVFitLinear.rank``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.registry import register_method
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError

__all__ = ["SVFitConfig", "SVFitLinear", "energy_rank"]

# the paper keeps the singular values that "capture over 99% of the matrix's information"
_DEFAULT_ENERGY = 0.99
# cumulative energies are compared with this slack, so τ = 1 (or a share hit exactly, e.g. 2 of 4 equal
# singular values for τ = 0.5) is not missed by float64 rounding of the running sum
_ENERGY_SLACK = 1e-12


@dataclass(frozen=True, kw_only=True)
class SVFitConfig(ShiftConfig):
    """SVFit settings: which singular values of each targeted ``nn.Linear`` are trained.

    Exactly one rank rule is active. With neither given, ``energy`` becomes 0.99 (stored in the config,
    so a saved shift records the rule it was trained with).

    Attributes:
        r: train the top ``r`` singular values of every targeted weight (capped at ``min(out, in)``).
        energy: train the smallest number of top singular values whose squares make up at least this
            share of ``‖W‖_F²``; in (0, 1]. 0.99 (the paper's "over 99%") when ``r`` is not given.

    Target modules: the paper's are unspecified; the default is every ``nn.Linear`` except the output
    embedding (``"all-linear"``). Pass ``target_modules`` (e.g. ``["query", "value"]``) to narrow it.

    Weight decay: the trained tensor is ``δ = s − σ`` (zero at init), not ``s``. Decay on ``s`` would
    shrink the singular values towards 0; decay on ``δ`` pulls towards the pretrained weight, the usual
    prior. ``δ`` is 1-D, so the learn recipe's AdamW groups exempt it from decay anyway. ``δ`` near 0 also
    keeps full relative precision in bf16, where ``s ≈ σ`` would round small updates away.

    Example:
        >>> sk.attach_(model, sk.SVFitConfig(energy=0.99, target_modules=["query", "value"]))
        >>> model.encoder.layer[0].attention.self.query.rank   # the r chosen for that matrix
        >>> opt = torch.optim.AdamW(sk.shift_parameters(model), lr=1e-3)
    """

    r: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r is not None and self.energy is not None:
            raise ShiftkitError(
                f"SVFitConfig takes one rank rule: r={self.r!r} or energy={self.energy!r}, not both"
            )
        if self.r is not None:
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
                raise ShiftkitError(f"SVFitConfig.r must be a positive integer, got {self.r!r}")
            return
        energy = _DEFAULT_ENERGY if self.energy is None else self.energy
        if isinstance(energy, bool) or not isinstance(energy, int | float) or not 0.0 < energy <= 1.0:
            raise ShiftkitError(f"SVFitConfig.energy must be in (0, 1], got {energy!r}")
        object.__setattr__(self, "energy", float(energy))


def energy_rank(sigma: Tensor, energy: float) -> int:
    """The smallest r with ``Σ_{i≤r} σ_i² / Σ_i σ_i² ≥ energy`` (at least 1).

    Args:
        sigma: ``(k,)`` singular values in descending order.
        energy: the share τ in (0, 1].

    Returns:
        r in ``[1, k]``; 1 for an all-zero matrix (nothing to rank, one value is still trainable).

    Example:
        >>> energy_rank(torch.tensor([3.0, 1.0, 0.0]), 0.9)   # 9/10 ≥ 0.9
        1
    """
    sq = sigma.detach().to(torch.float64).square()
    total = float(sq.sum())
    if sq.numel() == 0 or total == 0.0 or not math.isfinite(total):
        return 1
    share = torch.cumsum(sq, 0) / total
    below = int((share < energy - _ENERGY_SLACK).sum())
    return max(1, min(below + 1, sq.numel()))


class SVFitLinear(ShiftWrapper):
    """SVFit around an ``nn.Linear`` (or subclass).

    Trainable: ``s_delta (r,)`` = ``s − σ``. Frozen, non-persistent buffers in the weight's dtype (they are
    recomputed from the base weight at every attach, so a shift file stores only ``s_delta``):
    ``U_r (out, r)``, ``Vh_r (r, in)`` (= ``V_rᵀ``) and ``sigma (r,)``. The buffers cost
    ``r·(out + in + 1)`` values, close to twice the weight at full rank.
    """

    def __init__(self, base: nn.Linear, config: SVFitConfig) -> None:
        super().__init__(base)
        w = base.weight
        with torch.no_grad():
            # float64: the energy rule then picks the same r on every re-attach (ties to τ at 1e-16, not
            # 1e-7), and U_r, V_r are orthonormal to the precision of the compute dtype
            u, sigma, vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
        k = sigma.numel()
        if config.r is not None:
            r = min(config.r, k)
        else:
            assert config.energy is not None  # __post_init__ sets it whenever r is None
            r = energy_rank(sigma, config.energy)
        self.rank = r
        dtype, device = w.dtype, w.device
        self.U_r: Tensor
        self.Vh_r: Tensor
        self.sigma: Tensor
        self.register_buffer("U_r", u[:, :r].to(device, dtype).contiguous(), persistent=False)
        self.register_buffer("Vh_r", vh[:r].to(device, dtype).contiguous(), persistent=False)
        self.register_buffer("sigma", sigma[:r].to(device, dtype), persistent=False)
        self.s_delta = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))

    @property
    def singular_values(self) -> Tensor:
        """The paper's trained ``s = σ + δ``, shape ``(r,)``."""
        return self.sigma + self.s_delta

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``: ``x Wᵀ + b + ((x V_r) ⊙ δ) U_rᵀ``."""
        out = self.base(x)
        h = F.linear(x.to(self.Vh_r.dtype), self.Vh_r)  # (..., r) = x V_r
        # δ scales the columns of U_r (out·r products) rather than h (tokens·r): fewer when tokens > out
        branch = F.linear(h, self.U_r * self.s_delta)
        return out + branch.to(out.dtype)

    def delta(self) -> dict[str, Tensor]:
        """``{"weight": U_r diag(δ) V_rᵀ}`` of shape ``(out, in)``."""
        return {"weight": (self.U_r * self.s_delta) @ self.Vh_r}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


@register_method(
    "svfit",
    config=SVFitConfig,
    targets=(nn.Linear,),
    foldable=True,
    zero_init={},  # δ = 0: the branch is exactly zero, outputs equal the base bit for bit
    default_targets="all-linear",
)
def wrap(module: nn.Module, config: ShiftConfig) -> ShiftWrapper:
    """Wrap one ``nn.Linear`` with SVFit (runs its SVD)."""
    assert isinstance(config, SVFitConfig)
    if not isinstance(module, nn.Linear):
        raise ShiftkitError(f"SVFit wraps nn.Linear, not {type(module).__name__}")
    return SVFitLinear(module, config)
