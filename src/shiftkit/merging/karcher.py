"""Karcher mean: the weighted Riemannian centre of mass on the unit sphere (mergekit ``karcher``).

Each tensor, flattened, is one point ``x_i = ‖x_i‖ u_i``. The direction of the merge is the weighted
Karcher (Fréchet) mean of the unit vectors ``u_i``, the minimiser of ``Σ α_i d(m, u_i)²`` with ``d`` the
great-circle distance (H. Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl.
Math. 1977; M. Fréchet 1948; on spheres S. Buss and J. Fillmore, ACM TOG 2001), found by Riemannian gradient
steps: starting from the normalised weighted Euclidean mean, each step maps every ``u_i`` to the tangent
space at ``m`` with the log map ``log_m(u) = θ / sin θ · (u − cos θ · m)``, ``cos θ = ⟨m, u⟩``, averages
them with the weights, ``v = Σ α_i log_m(u_i)``, and moves along the exponential map
``m ← cos‖v‖ · m + sin‖v‖ · v / ‖v‖``, until ``‖v‖ < tol`` or ``max_iter`` steps. The merge is
``(Σ α_i ‖x_i‖) · m``: the direction of the mean, the weighted mean norm (mergekit's
https://arxiv.org/abs/2603.04972 model merging by Karcher mean).

Weights: ``α_i = w_i / Σ w`` (mergekit has no weights: ``α_i = 1/n``, what the default weights give).
Edge cases as mergekit: one input is returned as it is; an input with ``‖x_i‖ ≤ tol`` has no direction and
leaves the mean (the others' weights are renormalised for the direction) but still counts in the norm, so
all-zero inputs give zeros; a weighted Euclidean mean of norm ``< tol`` starts from the first direction;
``θ < tol`` terms are skipped. Norms and dot products accumulate in float64.

Weight space: mergekit averages the models' weights ``θ_i`` themselves and, with a ``base_model``, the base
is one of the points (``base_is_input``). ``base=`` (θ0 by name; what a recipe passes) merges ``θ0 + τ_i`` and
returns the result minus θ0; without it the shifts ``τ_i`` are the points. In a recipe ``weight`` is
accepted and ignored, as mergekit does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from shiftkit.core.functional import dot64, norm64
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.registry import register_merge

__all__ = ["karcher", "karcher_mean"]


def karcher_mean(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> Tensor:
    """Weighted Karcher mean of same-shape tensors on the sphere, scaled to their weighted mean norm.

    Args:
        tensors: one or more float tensors of equal shape (each flattened to one point).
        weights: one weight per tensor (normalised to sum 1); ``None`` for equal weights.
        max_iter: most Riemannian gradient steps (default 10).
        tol: stop when the tangent step is shorter; also the norm below which an input has no direction
            and the angle below which a point adds nothing (default 1e-5).

    Returns:
        Tensor of the inputs' shape (float32).

    Raises:
        ShiftkitError: no tensors, a weight count that differs, weights summing to 0, ``max_iter < 0`` or
            ``tol < 0``.

    Example:
        >>> karcher_mean([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
        tensor([0.7071, 0.7071])
    """
    n = len(tensors)
    ws = [1.0] * n if weights is None else [float(w) for w in weights]
    if n == 0 or len(ws) != n:
        raise ShiftkitError(f"karcher needs one weight per tensor, got {n} tensors and {len(ws)} weights")
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 0:
        raise ShiftkitError(f"karcher max_iter must be a non-negative integer, got {max_iter!r}")
    if not tol >= 0.0:
        raise ShiftkitError(f"karcher tol must be >= 0, got {tol!r}")
    if n == 1:
        return tensors[0]
    total = math.fsum(ws)
    if total == 0.0:
        raise ShiftkitError(f"karcher needs a nonzero weight sum, got {ws}")
    alphas = [w / total for w in ws]
    xs = [x.to(torch.float32) for x in tensors]
    norms = [norm64(x) for x in xs]
    valid = [i for i in range(n) if norms[i] > tol]
    scale = math.fsum(a * nrm for a, nrm in zip(alphas, norms, strict=True))
    if not valid:
        return torch.zeros_like(xs[0])
    vsum = math.fsum(alphas[i] for i in valid)
    pts = [(alphas[i] / vsum, xs[i], norms[i]) for i in valid]  # (weight, x, ‖x‖): u = x / ‖x‖

    # start: the normalised weighted Euclidean mean of the directions (the first direction if it vanishes)
    mean = torch.zeros_like(xs[0])
    for a, x, nrm in pts:
        mean.add_(x / nrm, alpha=a)
    mean_norm = norm64(mean)
    mean = pts[0][1] / pts[0][2] if mean_norm < tol else mean / mean_norm

    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        for a, x, nrm in pts:
            cos = min(max(dot64(mean, x) / nrm, -1.0), 1.0)
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent.add_(x / nrm - cos * mean, alpha=a * theta / math.sin(theta))  # log map, weighted
        step = norm64(tangent)
        if step < tol:
            break
        mean = math.cos(step) * mean + (math.sin(step) / step) * tangent  # exp map
        mean_norm = norm64(mean)
        if mean_norm > tol:
            mean = mean / mean_norm
    return scale * mean


@register_merge(
    "karcher", needs_base=False, base_is_input=True, recipe_ignored=("weight",), weighting="normalized"
)
def karcher(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    base: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Karcher mean of shifts (or, with ``base=``, of the weights ``θ0 + τ_i``), per tensor.

    Args:
        tensors: T aligned float32 tensor dicts (any shapes, equal across t).
        weights: T weights (only their ratios matter; equal weights are mergekit's method).
        max_iter: most iterations of the mean (default 10).
        tol: convergence tolerance (default 1e-5; see :func:`karcher_mean`).
        base: optional θ0 tensors by name: average full weights (mergekit) instead of shifts.

    Returns:
        Merged tensors, same keys and shapes.

    Raises:
        ShiftkitError: weights summing to 0 or bad ``max_iter`` / ``tol``.
        ShiftMismatchError: ``base`` lacks a tensor or has another shape.

    Example:
        >>> merged = sk.merge([tv1, tv2, tv3], method="karcher")
        >>> mk = sk.merge([tv1, tv2], method="karcher", base=dict(base_model.state_dict()))
        >>> sk.apply_(base_model, merged)
    """
    out: dict[str, Tensor] = {}
    for k in tensors[0]:
        xs = [t[k] for t in tensors]
        if base is None:
            out[k] = karcher_mean(xs, weights, max_iter=max_iter, tol=tol)
            continue
        if k not in base or tuple(base[k].shape) != tuple(xs[0].shape):
            raise ShiftMismatchError(f"karcher base has no tensor {k!r} of shape {tuple(xs[0].shape)}")
        b0 = base[k].to(device=xs[0].device, dtype=torch.float32)
        if len(xs) == 1:  # returned as it is (mergekit): no round trip through θ0 + τ − θ0
            karcher_mean(xs, weights, max_iter=max_iter, tol=tol)  # still checks the parameters
            out[k] = xs[0]
            continue
        out[k] = karcher_mean([b0 + x for x in xs], weights, max_iter=max_iter, tol=tol) - b0
    return out
