"""SCE — Select, Calculate, Erase (Wan et al., FuseChat, https://arxiv.org/abs/2408.07990; mergekit ``sce``).

Per tensor, with the shifts ``τ_1 … τ_T`` stacked:

1. **Select**: keep the fraction ``select_topk`` of the coordinates whose values vary most across the shifts
   (population variance ``Var_t τ_t``; the fraction is of the coordinates with non-zero variance, so with one
   shift, or identical ones, nothing is selected); the other coordinates are zeroed in every shift.
   ``select_topk >= 1`` (default, as mergekit) selects everything.
2. **Calculate**: a weight per shift from its squared magnitude, ``η_t = mean(τ_t²) / Σ_s mean(τ_s²)``
   (uniform ``1/T`` when ``Σ_s mean(τ_s²) < 1e-6``, as mergekit — an absolute threshold, so shifts whose
   entries are all around 1e-3 or smaller get equal weights).
3. **Erase**: elect a sign per coordinate, ``γ = sgn(Σ_t τ_t)`` (0 counts as +), and drop the entries of the
   other sign (and zeros); the result is ``Σ_t η_t m_t τ_t / max(Σ_t η_t m_t, 1e-6)``.

The method has no per-shift weights (mergekit's ``sce`` takes none): the weights are computed in step 2.
Unlike mergekit (``torch.topk``, arbitrary order among equal variances) the selection keeps exactly ``k``
coordinates with ties broken by position, and the magnitudes of step 2 are summed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shiftkit.core.functional import norm64, topk_mask
from shiftkit.errors import ShiftkitError
from shiftkit.merging.consensus import elect_sign
from shiftkit.merging.registry import register_merge

__all__ = ["sce", "sce_select_mask", "sce_weights"]

#: below this sum of mean squares the shifts get equal weights (mergekit's guard)
MIN_TOTAL = 1e-6
#: the smallest divisor of the erase step (mergekit's clamp)
MIN_DIVISOR = 1e-6


def sce_select_mask(stack: Tensor, select_topk: float) -> Tensor:
    """SCE's select step: mask of the ``⌊select_topk · #{Var ≠ 0}⌋`` coordinates of highest variance.

    Args:
        stack: ``(T, *shape)`` float tensor of the shifts' tensors.
        select_topk: fraction in [0, 1]; ``>= 1`` selects every coordinate, ``<= 0`` none.

    Returns:
        Bool tensor of ``shape``.

    Example:
        >>> sce_select_mask(torch.tensor([[0.0, 1.0, 2.0], [0.0, -1.0, 2.5]]), 0.5)
        tensor([False,  True, False])
    """
    shape = stack.shape[1:]
    if select_topk >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=stack.device)
    if select_topk <= 0.0:
        return torch.zeros(shape, dtype=torch.bool, device=stack.device)
    var = stack.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    return topk_mask(var, k)


def sce_weights(stack: Tensor) -> list[float]:
    """SCE's calculate step: ``η_t = mean(τ_t²) / Σ_s mean(τ_s²)`` (uniform below a total of 1e-6).

    Args:
        stack: ``(T, *shape)`` float tensor of the (selected) shifts' tensors.

    Returns:
        T weights summing to 1.

    Example:
        >>> sce_weights(torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
        [0.3333333333333333, 0.6666666666666666]
    """
    t = stack.shape[0]
    n = max(stack[0].numel(), 1)
    means = [norm64(x) ** 2 / n for x in stack]
    total = sum(means)
    if abs(total) < MIN_TOTAL:
        return [1.0 / t] * t
    return [m / total for m in means]


@register_merge(
    "sce",
    weighting="none",
    lossless={"select_topk": 1.0},
)
def sce(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    select_topk: float = 1.0,
) -> dict[str, Tensor]:
    """SCE merge: select high-variance coordinates, weight shifts by magnitude, erase sign conflicts.

    Args:
        tensors: T aligned float32 tensor dicts (any shapes, equal across t).
        weights: ignored (all 1: SCE computes its own per-tensor weights).
        select_topk: fraction of the coordinates with non-zero variance across the shifts that is kept
            (default 1.0, everything, as mergekit; the paper tunes it, e.g. 0.1 keeps the top 10 %).

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2, tv3], method="sce", select_topk=0.1)
        >>> sk.apply_(base, merged)
    """
    if not 0.0 <= select_topk:
        raise ShiftkitError(
            f"SCE select_topk must be >= 0 (a fraction of the coordinates), got {select_topk}"
        )
    out: dict[str, Tensor] = {}
    for key in tensors[0]:
        stack = torch.stack([t[key] for t in tensors])
        if select_topk < 1.0:
            stack = stack * sce_select_mask(stack, select_topk).to(stack.dtype)
        eta = torch.tensor(sce_weights(stack), dtype=stack.dtype, device=stack.device)
        eta = eta.view(-1, *([1] * (stack.dim() - 1)))
        gamma = elect_sign(stack, "sum")
        gamma = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
        kept = (torch.sign(stack) == gamma).to(stack.dtype) * eta
        out[key] = (stack * kept).sum(0) / kept.sum(0).clamp(min=MIN_DIVISOR)
    return out
