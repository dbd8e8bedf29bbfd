"""Model Breadcrumbs (Davari & Belilovsky, https://arxiv.org/abs/2312.06795; mergekit ``breadcrumbs``).

Per tensor and per task, rank the entries by ``|τ|`` (descending, ties by lower flattened index) and keep
only the band of ranks ``[g, g + k)`` with ``g = ⌊γ·n⌋`` (the largest-magnitude *outliers* are dropped)
and ``k = ⌊density·n⌋`` (the next ``density`` fraction is kept; the small "negligible" rest is dropped).
If ``g + k > n`` fewer outliers are dropped (``g = n − k``) so that exactly ``k`` entries survive, as
mergekit does. Then

* ``breadcrumbs``: task arithmetic on the masked shifts, ``τ = λ·Σ_t w_t τ̂_t`` (divided by ``Σ_t w_t``
  when ``normalize``; mergekit: no sign consensus, ``normalize=False``);
* ``breadcrumbs_ties``: TIES sign election and disjoint merge on the masked shifts (mergekit semantics:
  vote on weighted shifts, ``Σ_t m_t w_t τ̂_t`` divided by ``Σ_t m_t w_t`` only when ``normalize``;
  mergekit's default ``normalize=False``).

Unlike mergekit (``argsort``, arbitrary tie order) the mask here keeps exactly ``k`` entries with a stable
index tie-break; ``gamma = 0`` is plain magnitude pruning in both. ``rescale="l1"`` scales each masked
tensor back to its L1 norm (mergekit's ``rescale: true``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from shiftkit.core.functional import topk_mask
from shiftkit.errors import ShiftkitError
from shiftkit.merging.consensus import ties_disjoint_merge
from shiftkit.merging.registry import register_merge
from shiftkit.merging.sparsify import per_input, rescale_pruned
from shiftkit.merging.task_arithmetic import task_arithmetic

__all__ = ["breadcrumbs", "breadcrumbs_mask", "breadcrumbs_ties"]

# density 0.9 / gamma 0.01 in sk.merge: mergekit's gamma default is 0.01 (drop the top 1 %); its density
# default 1.0 disables the method entirely, so sk.merge keeps 90 % (drops the smallest 9 %), a mild
# sparsification in the range the paper sweeps (Davari & Belilovsky 2023, §4: tune both on validation
# data). Recipes use mergekit's defaults (density 1.0).
DEFAULT_DENSITY = 0.9
DEFAULT_GAMMA = 0.01


def breadcrumbs_mask(x: Tensor, density: float, gamma: float) -> Tensor:
    """Keep-mask of the magnitude band ``[⌊γn⌋, ⌊γn⌋ + ⌊density·n⌋)`` of ``x`` (ranks by ``|x|`` descending).

    Args:
        x: any-shape float tensor (n entries).
        density: kept fraction in [0, 1]; ``>= 1`` keeps everything (no outlier drop either, as mergekit).
        gamma: fraction of the largest magnitudes dropped, in [0, 1].

    Returns:
        Bool tensor of ``x``'s shape with exactly ``min(⌊density·n⌋, n)`` True entries.

    Example:
        >>> breadcrumbs_mask(torch.tensor([4.0, -3.0, 2.0, 1.0]), density=0.5, gamma=0.25)
        tensor([False,  True,  True, False])
    """
    n = x.numel()
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    k = int(density * n)
    top = min(int(gamma * n), n - k)
    return topk_mask(x, top + k) & ~topk_mask(x, top)


def _masked(
    tensors: list[dict[str, Tensor]],
    density: float | Sequence[float],
    gamma: float | Sequence[float],
    rescale: str,
) -> list[dict[str, Tensor]]:
    densities = per_input(density, len(tensors), "breadcrumbs density")
    gammas = per_input(gamma, len(tensors), "breadcrumbs gamma")
    if any(d < 0 for d in densities):
        raise ShiftkitError(f"breadcrumbs density must be >= 0, got {density}")
    if not all(0.0 <= g <= 1.0 for g in gammas):
        raise ShiftkitError(f"breadcrumbs gamma must be in [0, 1], got {gamma}")
    out = []
    for t, d, g in zip(tensors, densities, gammas):
        if d >= 1.0:  # mergekit: no masking, so nothing to rescale either
            out.append(t)
            continue
        out.append(
            {
                k: rescale_pruned(v, torch.where(breadcrumbs_mask(v, d, g), v, torch.zeros_like(v)), rescale)
                for k, v in t.items()
            }
        )
    return out


@register_merge(
    "breadcrumbs",
    recipe_defaults={"density": 1.0},
    recipe_required=("weight",),
    lossless={"density": 1.0},
    per_input=("density", "gamma"),
)
def breadcrumbs(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    density: float | Sequence[float] = DEFAULT_DENSITY,
    gamma: float | Sequence[float] = DEFAULT_GAMMA,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "none",
) -> dict[str, Tensor]:
    """Breadcrumbs masks then task arithmetic: ``τ = λ·Σ_t w_t (M_t ⊙ τ_t)``.

    Args:
        tensors: T aligned float32 tensor dicts (any shapes, equal across t).
        weights: T weights.
        density: fraction of each tensor kept after the outlier drop (default 0.9, see module note;
            recipes: mergekit's 1.0, no masking), or one per shift.
        gamma: fraction of largest magnitudes dropped as outliers (default 0.01, mergekit's default), or
            one per shift.
        lambda_: global scale λ (default 1.0, as mergekit).
        normalize: divide by ``Σ_t w_t`` (default False, as mergekit's ``breadcrumbs``).
        rescale: ``"l1"`` scales each masked tensor back to its L1 norm; ``"none"`` (default, as mergekit).

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2], method="breadcrumbs", density=0.9, gamma=0.01)
        >>> weighted = sk.merge([tv1, tv2], method="breadcrumbs", weights=[0.7, 0.3])
        >>> sk.apply_(base, merged)
    """
    masked = _masked(tensors, density, gamma, rescale)
    return task_arithmetic(masked, weights, lambda_=lambda_, normalize=normalize)


@register_merge(
    "breadcrumbs_ties",
    recipe_defaults={"density": 1.0},
    recipe_required=("weight",),
    lossless={"density": 1.0},
    per_input=("density", "gamma"),
)
def breadcrumbs_ties(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    density: float | Sequence[float] = DEFAULT_DENSITY,
    gamma: float | Sequence[float] = DEFAULT_GAMMA,
    lambda_: float = 1.0,
    consensus: str = "sum",
    normalize: bool = False,
    rescale: str = "none",
) -> dict[str, Tensor]:
    """Breadcrumbs masks then TIES sign election and disjoint merge (mergekit ``breadcrumbs_ties``).

    Args:
        tensors: T aligned float32 tensor dicts; weights: T weights.
        density: kept fraction after the outlier drop (default 0.9). gamma: outlier fraction (default 0.01).
        lambda_: final scale λ. consensus: ``"sum"`` or ``"count"`` (mergekit uses ``"sum"``).
        normalize: divide by the agreeing weights' sum ``Σ_t m_t w_t`` (default False, as mergekit).
        rescale: ``"l1"`` or ``"none"`` (default), as in :func:`breadcrumbs`.

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2, tv3], method="breadcrumbs_ties", density=0.8, gamma=0.02)
        >>> mean = sk.merge([tv1, tv2], method="breadcrumbs_ties", normalize=True)
        >>> sk.apply_(base, merged)
    """
    mixed = ties_disjoint_merge(
        _masked(tensors, density, gamma, rescale),
        weights,
        semantics="mergekit",
        consensus=consensus,
        normalize=normalize,
        zero_sign="positive",
    )
    return {k: v * lambda_ for k, v in mixed.items()}
