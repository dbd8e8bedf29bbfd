"""PST: parameter-efficient sparse training (Li et al., IJCAI 2022): learn a sparse model as a shift.

Per targeted Linear, with ``W`` and ``b`` frozen:

* a low-rank weight update ``W̃ = W + β·U V`` (``U ~ N(0, 1)``, ``V = 0``: the update starts at 0);
* importance scores combining a data-free term with data-driven low-rank and structured terms,
  ``S = |W̃| + α₁·A B + α₂·(R 1ᵀ + 1 Cᵀ)`` (``A ~ N(0, 1)``, ``B, R, C = 0``: ``S = |W|`` at first);
* a mask ``M`` that zeroes the ``⌊s·numel⌋`` entries of lowest ``S`` (exactly that many, per matrix), with
  the straight-through estimator (``∂L/∂S := ∂L/∂M``); the layer computes ``x (M ⊙ W̃)ᵀ + b``.

The sparsity ``s`` follows the paper's cubic schedule (:func:`cubic_sparsity`, set each step with
:func:`set_sparsity_`): ``s_i`` for the first ``t_i·T`` steps, ``s_f`` for the last ``t_f·T``, cubic in
between. It is saved with the shift (the mask depends on it). Fold: exact, ``W ← M ⊙ (W + β U V)``: a
pruned base, stored dense with zeros (``sparsity`` of its entries are 0).

The reference trains only ``U, V`` and the scores (its classifier head is never trained: a precedence slip
in its parameter filter); shiftkit trains what you give the optimiser, so train a new head with
``modules_to_save``.

Example:
    >>> sk.attach_(model, sk.PSTConfig(sparsity=0.9, target_modules="all-linear"))
    >>> for step in range(T):
    ...     set_sparsity_(model, cubic_sparsity(step, T, final=0.9))
    ...     ...  # forward, backward, optimiser step
    >>> sk.fold_(model)   # 90 % of each targeted weight is now 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.registry import register_method
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError

__all__ = ["PSTConfig", "PSTLinear", "cubic_sparsity", "set_sparsity_"]


@dataclass(frozen=True, kw_only=True)
class PSTConfig(ShiftConfig):
    """PST settings (the paper's defaults).

    Attributes:
        sparsity: the final sparsity ``s_f`` (fraction of each weight set to 0).
        initial_sparsity: ``s_i``, the sparsity at attach (0: an exact no-op).
        rank_w: rank ``r_w`` of the weight update ``U V``.
        rank_m: rank ``r_m`` of the data-driven score term ``A B``.
        beta, alpha1, alpha2: ``β`` on the update, ``α₁`` and ``α₂`` on the score terms.
        total_steps: when set, each layer follows :func:`cubic_sparsity` by itself, one step per forward
            in training mode (from ``initial_sparsity`` to ``sparsity`` over ``total_steps``); when ``None``
            the training loop calls :func:`set_sparsity_`.
    """

    sparsity: float = 0.9
    initial_sparsity: float = 0.0
    rank_w: int = 8
    rank_m: int = 8
    beta: float = 1.0
    alpha1: float = 1.0
    alpha2: float = 1.0
    total_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sparsity", "initial_sparsity"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
                raise ShiftkitError(f"PSTConfig.{name} must be in [0, 1), got {v!r}")
        if self.total_steps is not None and (
            isinstance(self.total_steps, bool)
            or not isinstance(self.total_steps, int)
            or self.total_steps < 1
        ):
            raise ShiftkitError(
                f"PSTConfig.total_steps must be None or an integer >= 1, got {self.total_steps!r}"
            )
        for name in ("rank_w", "rank_m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ShiftkitError(f"PSTConfig.{name} must be an integer >= 1, got {v!r}")


def cubic_sparsity(
    step: int, total: int, *, final: float = 0.9, initial: float = 0.0, t_i: float = 0.1, t_f: float = 0.3
) -> float:
    """The paper's cubic schedule: ``s_i`` for ``t ≤ t_i·T``, ``s_f`` for ``t > T − t_f·T``, and between
    ``s_f + (s_i − s_f)·(1 − (t − t_i·T)/(T − (t_i + t_f)·T))³``."""
    if total < 1:
        raise ShiftkitError(f"cubic_sparsity needs total >= 1 steps, got {total}")
    if step <= t_i * total:
        return initial
    if step > total - t_f * total:
        return final
    span = total - (t_i + t_f) * total
    frac = (step - t_i * total) / span if span > 0 else 1.0
    return final + (initial - final) * (1 - frac) ** 3


class _STE(torch.autograd.Function):
    """Forward: the hard mask; backward: the mask's gradient passed to the scores unchanged."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, drop: int) -> Tensor:
        mask = torch.ones_like(scores)
        if drop > 0:
            idx = torch.topk(scores.reshape(-1), drop, largest=False).indices
            mask.view(-1)[idx] = 0
        return mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class PSTLinear(ShiftWrapper):
    """A Linear computing ``x (M ⊙ (W + β U V))ᵀ + b`` with the mask ``M`` from the scores ``S``."""

    def __init__(self, base: nn.Linear, config: PSTConfig) -> None:
        super().__init__(base)
        out_f, in_f = base.weight.shape
        like = base.weight
        self.beta, self.alpha1, self.alpha2 = config.beta, config.alpha1, config.alpha2
        self.pst_U = nn.Parameter(torch.randn(out_f, config.rank_w, dtype=like.dtype, device=like.device))
        self.pst_V = nn.Parameter(torch.zeros(config.rank_w, in_f, dtype=like.dtype, device=like.device))
        self.pst_A = nn.Parameter(torch.randn(out_f, config.rank_m, dtype=like.dtype, device=like.device))
        self.pst_B = nn.Parameter(torch.zeros(config.rank_m, in_f, dtype=like.dtype, device=like.device))
        self.pst_R = nn.Parameter(torch.zeros(out_f, dtype=like.dtype, device=like.device))
        self.pst_C = nn.Parameter(torch.zeros(in_f, dtype=like.dtype, device=like.device))
        self.sparsity: Tensor
        self.register_buffer("sparsity", torch.tensor(float(config.initial_sparsity), device=like.device))
        self.schedule = (config.total_steps, config.initial_sparsity, config.sparsity)
        self.steps_taken = 0

    def _weight(self) -> Tensor:
        w = self.base.weight
        assert isinstance(w, Tensor)
        return w

    def scores(self, updated: Tensor) -> Tensor:
        """``S = |W̃| + α₁ A B + α₂ (R 1ᵀ + 1 Cᵀ)``."""
        return (
            updated.abs()
            + self.alpha1 * (self.pst_A @ self.pst_B)
            + self.alpha2 * (self.pst_R[:, None] + self.pst_C[None, :])
        )

    def mask(self, updated: Tensor | None = None) -> Tensor:
        """The current mask (1 = kept), ``⌊s·numel⌋`` zeros."""
        w = self._weight() + self.beta * (self.pst_U @ self.pst_V) if updated is None else updated
        drop = math.floor(float(self.sparsity) * w.numel())
        out: Tensor = _STE.apply(self.scores(w), drop)
        return out

    def effective_params(self) -> dict[str, Tensor]:
        updated = self._weight() + self.beta * (self.pst_U @ self.pst_V)
        return {"weight": self.mask(updated) * updated}

    def forward(self, x: Tensor) -> Tensor:
        total, start, final = self.schedule
        if total is not None and self.training and torch.is_grad_enabled():
            self.sparsity.fill_(cubic_sparsity(self.steps_taken, total, final=final, initial=start))
            self.steps_taken += 1
        bias = self.base.bias
        assert bias is None or isinstance(bias, Tensor)
        return nn.functional.linear(x, self.effective_params()["weight"], bias)

    def named_shift_buffers(self) -> dict[str, Tensor]:
        """The sparsity is saved with the shift: the mask depends on it."""
        return {"sparsity": self.sparsity}


def set_sparsity_(model: nn.Module, sparsity: float) -> nn.Module:
    """Set the sparsity of every PST layer of ``model`` (call it each step with :func:`cubic_sparsity`)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0 <= sparsity < 1:
        raise ShiftkitError(f"sparsity must be in [0, 1), got {sparsity!r}")
    layers = [m for m in model.modules() if isinstance(m, PSTLinear)]
    if not layers:
        raise ShiftkitError("set_sparsity_: no PST shift is attached to this model")
    for m in layers:
        m.sparsity.fill_(float(sparsity))
    return model


@register_method(
    "pst", config=PSTConfig, targets=(nn.Linear,), foldable=True, zero_init={}, default_targets="all-linear"
)
def wrap(module: nn.Module, config: ShiftConfig) -> PSTLinear:
    """Wrap one ``nn.Linear``."""
    assert isinstance(config, PSTConfig) and isinstance(module, nn.Linear)
    return PSTLinear(module, config)
