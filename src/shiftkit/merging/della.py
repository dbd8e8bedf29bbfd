"""DELLA — Drop and rEscaLe via sampLing with mAgnitude (Deep, Bhardwaj & Poria,
https://arxiv.org/abs/2406.11617; code declare-lab/della; mergekit ``della`` and ``della_linear``).

1. **Drop** (MagPrune): in each row of a shift tensor the entries are ranked by ``|τ|`` (rank 0 the smallest,
   ``n − 1`` the largest of the row's ``n``) and each is kept with probability

   ``p_r = (density − ε) + 2ε · r / (n − 1)``,

   so the smallest entry of a row is kept with ``density − ε``, the largest with ``density + ε`` and the row
   keeps ``density`` of its entries on average. The survivors are rescaled: ``rescale="l1"`` (default,
   mergekit's ``rescale: true``) scales the whole tensor back to its L1 norm, ``"inverse"`` divides each
   survivor by its own ``p_r`` (the paper's ``1/(1 − p)``), ``"none"`` does not rescale.
2. **Elect** (``della`` only): a sign per coordinate from the weighted shifts (TIES, ``consensus="sum"``).
3. **Fuse**: ``della``: ``λ · Σ_t m_t w_t τ̃_t / Σ_t m_t w_t`` (the division with ``normalize``, default True,
   as mergekit); ``della_linear``: ``λ · Σ_t w_t τ̃_t`` (divided by ``Σ_t w_t`` with ``normalize``, default
   False, as mergekit).

Rows as in mergekit: a tensor with two or more dimensions is ranked along dimension 1 (the rows of a
``(out, in)`` weight), a 1-D tensor as one row. Ties in ``|τ|`` are ranked by position (stable), a row of
one entry (a 0-d tensor, or a ``(k, 1)`` matrix, which mergekit cannot prune) is kept with ``density``.
``density`` and ``epsilon`` may differ per input (one value per shift); ``density >= 1`` keeps the shift
as it is, ``density <= 0`` drops it, and otherwise ``density ± ε`` must lie strictly inside (0, 1).
The keep decisions are drawn per tensor from ``(seed, tensor name, shift index)``
(:func:`~shiftkit.merging.sparsify.key_seed`), so results do not depend on key or streaming order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError
from shiftkit.merging.consensus import ties_disjoint_merge
from shiftkit.merging.registry import register_merge
from shiftkit.merging.sparsify import key_seed, l1_rescaled, per_input
from shiftkit.merging.task_arithmetic import task_arithmetic

__all__ = ["della", "della_drop", "della_linear", "magprune", "magprune_probs"]

# sk.merge defaults: the paper repository's example run (drop rate 0.3, window 0.14). A recipe gets
# mergekit's: density 1.0 (no drop) and epsilon 0.15.
DEFAULT_DENSITY = 0.7
DEFAULT_EPSILON = 0.14
_RESCALES = ("l1", "inverse", "none")


def _check(density: float, epsilon: float) -> None:
    if 0.0 < density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise ShiftkitError(
            f"DELLA keep probabilities density ± epsilon must lie strictly inside (0, 1), got density "
            f"{density} and epsilon {epsilon}: choose epsilon < min(density, 1 − density)"
        )


def magprune_probs(x: Tensor, density: float, epsilon: float) -> Tensor:
    """MagPrune's keep probability of every entry of ``x``: ``(density − ε) + 2ε · r / (n − 1)`` by row rank.

    Args:
        x: float tensor; rows are along dimension 1 (``ndim >= 2``) or the whole tensor (``ndim <= 1``).
        density: mean keep probability of a row, in (0, 1).
        epsilon: half-width ε of the probability window.

    Returns:
        float32 tensor of ``x``'s shape (a row of one entry gets ``density``).

    Example:
        >>> magprune_probs(torch.tensor([0.1, -3.0, 2.0]), 0.5, 0.1)
        tensor([0.4000, 0.6000, 0.5000])
    """
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    n = rows.shape[1]
    if n <= 1:
        return torch.full(x.shape, float(density), dtype=torch.float32, device=x.device)
    order = torch.argsort(rows.abs(), dim=1, stable=True)  # ascending |x|: order[.., r] has rank r
    ranks = torch.empty_like(order)
    ramp = torch.arange(n, device=x.device).view(1, n, *([1] * (rows.dim() - 2))).expand_as(order)
    ranks.scatter_(1, order, ramp)
    probs = (density - epsilon) + (2.0 * epsilon) * (ranks.to(torch.float32) / (n - 1))
    return probs.reshape(x.shape)


def magprune(x: Tensor, density: float, epsilon: float, *, rescale: str = "l1", seed: int = 0) -> Tensor:
    """Drop entries of one tensor with MagPrune's rank-based keep probabilities and rescale the survivors.

    Args:
        x: float32 tensor (any shape).
        density: mean keep probability; ``>= 1`` returns ``x``, ``<= 0`` zeros.
        epsilon: half-width of the probability window; ``density ± epsilon`` must be inside (0, 1).
        rescale: ``"l1"`` (match ``‖x‖₁``, mergekit), ``"inverse"`` (each survivor ``/ p``, the paper) or
            ``"none"``.
        seed: generator seed of the Bernoulli draws.

    Returns:
        Tensor of ``x``'s shape.

    Example:
        >>> x = torch.randn(4, 64)
        >>> out = magprune(x, 0.5, 0.2, rescale="none", seed=1)
        >>> bool(((out == 0) | (out == x)).all())
        True
    """
    if rescale not in _RESCALES:
        raise ShiftkitError(f"unknown DELLA rescale {rescale!r}; use one of {list(_RESCALES)}")
    if density >= 1.0:
        return x
    if density <= 0.0:
        return torch.zeros_like(x)
    _check(density, epsilon)
    probs = magprune_probs(x, density, epsilon)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    draws = torch.rand(tuple(x.shape), generator=gen, dtype=torch.float32).to(x.device)
    keep = draws < probs
    kept = torch.where(keep, x, torch.zeros_like(x))
    if rescale == "inverse":
        return torch.where(keep, x / probs.to(x.dtype), torch.zeros_like(x))
    if rescale == "l1":
        return l1_rescaled(x, kept)
    return kept


def della_drop(
    tensors: list[dict[str, Tensor]],
    *,
    density: float | Sequence[float],
    epsilon: float | Sequence[float],
    rescale: str,
    seed: int,
) -> list[dict[str, Tensor]]:
    """MagPrune every tensor of every shift (DELLA's drop step).

    Args:
        tensors: T dicts of float32 tensors (any shapes).
        density: keep probability, one value or one per shift.
        epsilon: probability half-window, one value or one per shift.
        rescale: ``"l1"``, ``"inverse"`` or ``"none"``.
        seed: base seed; tensor ``key`` of shift ``t`` uses ``key_seed(seed, key, t)``.

    Returns:
        T dicts with the same keys and shapes.

    Example:
        >>> tensors = [tv1.tensors, tv2.tensors]
        >>> out = della_drop(tensors, density=[0.3, 0.7], epsilon=0.1, rescale="l1", seed=0)
    """
    n = len(tensors)
    densities = per_input(density, n, "density")
    epsilons = per_input(epsilon, n, "epsilon")
    if rescale not in _RESCALES:
        raise ShiftkitError(f"unknown DELLA rescale {rescale!r}; use one of {list(_RESCALES)}")
    for d, e in zip(densities, epsilons, strict=True):
        _check(d, e)
    return [
        {k: magprune(v, d, e, rescale=rescale, seed=key_seed(seed, k, i)) for k, v in shift.items()}
        for i, (shift, d, e) in enumerate(zip(tensors, densities, epsilons, strict=True))
    ]


@register_merge(
    "della",
    recipe_defaults={"density": 1.0, "epsilon": 0.15},
    recipe_required=("weight",),
    weighting="normalized",
    lossless={"density": 1.0},
    per_input=("density", "epsilon"),
)
def della(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    density: float | Sequence[float] = DEFAULT_DENSITY,
    epsilon: float | Sequence[float] = DEFAULT_EPSILON,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: str = "l1",
    consensus: str = "sum",
    seed: int = 0,
) -> dict[str, Tensor]:
    """DELLA: MagPrune, TIES sign election on the weighted shifts, disjoint weighted mean, ``× λ``.

    Args:
        tensors: T aligned float32 tensor dicts; weights: T weights.
        density: mean keep probability, one value or one per shift (default 0.7, the paper repository's
            drop rate 0.3; a recipe that omits it gets mergekit's 1.0, no drop).
        epsilon: half-width ε of the keep-probability window (default 0.14; recipes: mergekit's 0.15).
        lambda_: final scale λ (mergekit's ``lambda``). normalize: divide by the agreeing weights' sum
            ``Σ_t m_t w_t`` (default True, as mergekit). rescale: ``"l1"`` (default; mergekit's ``rescale:
            true``), ``"inverse"`` (the paper's ``1/p``) or ``"none"``. consensus: ``"sum"`` (mergekit) or
            ``"count"``. seed: base seed of the drop.

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2], method="della", density=0.5, epsilon=0.1, seed=0)
        >>> per_model = sk.merge([tv1, tv2], method="della", density=[0.3, 0.7], weights=[1.0, 0.5])
        >>> sk.apply_(base, merged)
    """
    dropped = della_drop(tensors, density=density, epsilon=epsilon, rescale=rescale, seed=seed)
    mixed = ties_disjoint_merge(
        dropped, weights, semantics="mergekit", consensus=consensus, normalize=normalize, zero_sign="positive"
    )
    return {k: v * lambda_ for k, v in mixed.items()}


@register_merge(
    "della_linear",
    recipe_defaults={"density": 1.0, "epsilon": 0.15},
    recipe_required=("weight",),
    lossless={"density": 1.0},
    per_input=("density", "epsilon"),
)
def della_linear(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    density: float | Sequence[float] = DEFAULT_DENSITY,
    epsilon: float | Sequence[float] = DEFAULT_EPSILON,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "l1",
    seed: int = 0,
) -> dict[str, Tensor]:
    """DELLA without sign election: MagPrune then task arithmetic ``λ · Σ_t w_t τ̃_t``.

    Args:
        tensors: T aligned float32 tensor dicts; weights: T weights.
        density: mean keep probability, one value or one per shift (default 0.7; recipes: mergekit's 1.0).
        epsilon: half-width of the keep-probability window (default 0.14; recipes: mergekit's 0.15).
        lambda_: final scale λ. normalize: divide by ``Σ_t w_t`` (default False, as mergekit).
        rescale: ``"l1"`` (default), ``"inverse"`` or ``"none"``. seed: base seed of the drop.

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2], method="della_linear", density=0.6, epsilon=0.2, weights=[0.5, 0.5])
        >>> sk.apply_(base, merged)
    """
    dropped = della_drop(tensors, density=density, epsilon=epsilon, rescale=rescale, seed=seed)
    return task_arithmetic(dropped, weights, lambda_=lambda_, normalize=normalize)
