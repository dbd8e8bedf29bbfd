"""RAM+ (tensor-local), Reinforced Agent Merging Plus (mergekit ``ramplus_tl``; https://arxiv.org/abs/2601.13572).

RAM (:mod:`~shiftkit.merging.ram`) takes an entry changed by one shift alone whole and averages an entry
changed by several over its contributors only. RAM+ also *reinforces* each shift's lone changes by how much of
that shift was diluted by the averaging. Within one tensor, for shifts ``τ_1 … τ_T`` and an entry ``j``:

* ``τ_i`` contributes to ``j`` when ``|τ_ij| > ε``; ``c_j`` is the number of shifts that contribute;
* ``U_i`` is the number of entries ``τ_i`` alone changes (it contributes and ``c_j = 1``), ``S_i`` the
  number it shares (it contributes and ``c_j > 1``);
* the overlap ratio ``ρ_i = S_i / max(U_i, ε)`` and the rescaling ``λ_i = 1 + r · clamp(ρ_i, 0, α)``
  (``torch.clamp``'s rule: ``α < 0`` gives ``λ_i = 1 + r·α``);

and the merged entry is

``τ_j = λ_i · τ_ij`` where ``c_j = 1`` (``i`` its one contributor), ``Σ_i [|τ_ij| > ε] · τ_ij / c_j`` where
``c_j > 1``, and ``0`` where ``c_j = 0``.

``r = 0`` (or ``α = 0``) is RAM exactly. The counts are taken per tensor ("tensor-local"), not over the whole
model. The shifts are ``θ_i − θ0``; the base model itself is not an input.

One deviation from mergekit 0.1.5: a shift that changes no entry of a tensor alone (``U_i = 0``) has nothing
to rescale, so its ``λ_i`` plays no part. mergekit multiplies ``λ_i`` by zeros there, which turns the whole
tensor into NaN where ``λ_i`` is not finite: ``ρ_i = 0/0`` for a shift that leaves the tensor unchanged at
``ε ≤ 0``, or ``S_i/0 = ∞`` with ``α = ∞``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError
from shiftkit.merging.ram import ram_tensor
from shiftkit.merging.registry import register_merge

__all__ = ["ramplus_tl", "ramplus_tl_scales", "ramplus_tl_tensor"]


def _contributions(taus: list[Tensor], epsilon: float) -> tuple[list[Tensor], Tensor]:
    """Each shift's contribution mask ``|τ_i| > ε`` and the mask of entries exactly one shift changes."""
    hits = [tau.abs() > epsilon for tau in taus]
    count = torch.zeros(taus[0].shape, dtype=torch.int32, device=taus[0].device)
    for hit in hits:
        count += hit
    return hits, count == 1


def _scales(hits: list[Tensor], alone: Tensor, r: float, alpha: float, epsilon: float) -> list[float]:
    scales = []
    for hit in hits:
        n_alone = int((hit & alone).sum())
        if n_alone == 0:  # nothing to rescale (mergekit: ρ may be 0/0 here, a NaN tensor)
            scales.append(1.0)
            continue
        rho = (int(hit.sum()) - n_alone) / max(float(n_alone), epsilon)
        scales.append(1.0 + r * min(max(rho, 0.0), alpha))  # torch.clamp(ρ, 0, α), α < 0 included
    return scales


def ramplus_tl_scales(
    taus: list[Tensor], r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> list[float]:
    """The rescaling ``λ_i = 1 + r·clamp(S_i / max(U_i, ε), 0, α)`` of each shift's lone changes (one tensor).

    Args:
        taus: one or more same-shape shift tensors ``θ_i − θ0``.
        r: the reinforcement strength (mergekit's default 0.1).
        alpha: the cap on the overlap ratio ``ρ_i`` (mergekit's default 0.2).
        epsilon: the largest change that does not count as one (mergekit's default 1e-5).

    Returns:
        One ``λ_i`` per shift; 1.0 for a shift that changes no entry alone (its ``λ_i`` scales nothing).

    Example:
        >>> ramplus_tl_scales([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 0.0])], 0.5, 1.0)
        [1.25, 1.0]
    """
    hits, alone = _contributions(taus, epsilon)
    return _scales(hits, alone, r, alpha, epsilon)


def ramplus_tl_tensor(
    taus: list[Tensor], r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> Tensor:
    """RAM+ of same-shape shifts: RAM, with each shift's lone changes rescaled by its ``λ_i``.

    Args:
        taus: one or more same-shape shift tensors ``θ_i − θ0``.
        r: the reinforcement strength (mergekit's default 0.1).
        alpha: the cap on the overlap ratio (mergekit's default 0.2).
        epsilon: the largest change that does not count as one (mergekit's default 1e-5).

    Returns:
        Tensor of the inputs' shape and dtype.

    Example:
        >>> # shift 1 changes entry 0 alone and shares entry 1: ρ = 1, λ = 1 + 0.5·min(1, 1) = 1.5
        >>> ramplus_tl_tensor([torch.tensor([2.0, 2.0]), torch.tensor([0.0, 4.0])], r=0.5, alpha=1.0)
        tensor([3., 3.])
    """
    out = ram_tensor(taus, epsilon)  # a lone change comes out of RAM as itself
    hits, alone = _contributions(taus, epsilon)
    for tau, hit, scale in zip(taus, hits, _scales(hits, alone, r, alpha, epsilon)):
        if scale != 1.0:
            out = torch.where(hit & alone, tau * scale, out)
    return out


def _number(name: str, value: object, finite: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ShiftkitError(f"ramplus_tl {name} must be a number, got {value!r}")
    if finite and math.isinf(value):
        raise ShiftkitError(f"ramplus_tl {name} must be finite, got {value!r}")
    return float(value)


@register_merge("ramplus_tl", min_inputs=1, weighting="none", lossless={"epsilon": 0.0})
def ramplus_tl(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> dict[str, Tensor]:
    """RAM+ (tensor-local): RAM, with each shift's lone changes scaled up by ``1 + r·min(S_i/U_i, α)``.

    Args:
        tensors: T aligned float tensor dicts (the fine-tunes' shifts; the base is not an input).
        weights: ignored (must be the default all-ones).
        r: reinforcement strength (default 0.1, mergekit's); 0 gives RAM.
        alpha: cap on each shift's shared-to-lone ratio (default 0.2, mergekit's).
        epsilon: changes of at most this magnitude count as none (default 1e-5, mergekit's).

    Returns:
        Merged tensors, same keys, shapes and dtypes.

    Example:
        >>> merged = sk.merge([tv_math, tv_code, tv_tools], method="ramplus_tl", r=0.1, alpha=0.2)
        >>> sk.apply_(base, merged)
    """
    if not tensors:
        raise ShiftkitError("ramplus_tl merges 1 or more shifts, got none")
    if any(w != 1.0 for w in weights):
        raise ShiftkitError(
            f"ramplus_tl takes no weights (got {weights}); every contributing shift counts once"
        )
    r_, alpha_, eps = _number("r", r, finite=True), _number("alpha", alpha), _number("epsilon", epsilon)
    with torch.no_grad():
        return {k: ramplus_tl_tensor([t[k] for t in tensors], r_, alpha_, eps) for k in tensors[0]}
