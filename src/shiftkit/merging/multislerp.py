"""Multi-SLERP: a weighted barycentre of several shifts on the sphere (mergekit 0.1.5 ``multislerp``).

Each tensor, flattened, is one point. The directions ``u_i = x_i / (‖x_i‖ + ε)`` are averaged through the
tangent space of the unit sphere at their normalised weighted Euclidean mean ``m = Σ w_i u_i / ‖Σ w_i u_i‖``
(C. Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea): the log map projects each
direction onto the tangent plane, ``v_i = u_i − ⟨u_i, m⟩ m``; their weighted sum ``v = Σ w_i v_i`` is
mapped back with the exponential map ``exp_m(v) = cos‖v‖ · m + sin‖v‖ · v / ‖v‖`` (with ``ε`` added to
``‖v‖``), and the result is scaled to the weighted mean norm ``Σ w_i ‖x_i‖``. This is one step of the
fixed-point iteration for the weighted spherical (Fréchet) mean of S. Buss and J. Fillmore, "Spherical
averages and applications to spherical splines and interpolation", ACM TOG 2001, started at ``m`` (the
orthogonal projection makes ``v`` vanish up to rounding, so the direction is ``m`` itself; see
:mod:`~shiftkit.merging.karcher` for the iterated mean).

As mergekit: the weights are first normalised to sum 1 (``normalize_weights``, default), one input is
returned as it is, and when the weighted mean of the directions vanishes (``‖Σ w_i u_i‖ < ε``: antipodal
inputs that balance out) two inputs fall back to the weighted sum ``w0 x0 + w1 x1`` while more are an
error. Norms and dot products accumulate in float64.

Shift space: with a ``base_model`` mergekit averages the task vectors and adds the base (the base is the
origin, not a merged point), exactly this function on shifts; without one it averages the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from shiftkit.core.functional import dot64, norm64
from shiftkit.errors import ShiftkitError
from shiftkit.merging.registry import register_merge

__all__ = ["multislerp", "multislerp_tensor"]


def multislerp_tensor(
    tensors: Sequence[Tensor], weights: Sequence[float], *, normalize_weights: bool = True, eps: float = 1e-8
) -> Tensor:
    """Weighted spherical barycentre of same-shape tensors (each flattened to one point).

    Args:
        tensors: one or more float tensors of equal shape.
        weights: one weight per tensor.
        normalize_weights: divide the weights by their sum first (default True).
        eps: added to norms before dividing (default 1e-8, mergekit's).

    Returns:
        Tensor of the inputs' shape (float32).

    Raises:
        ShiftkitError: no tensors, a weight count that differs, weights summing to 0 with
            ``normalize_weights``, or three or more inputs whose weighted directions cancel out.

    Example:
        >>> multislerp_tensor([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [1.0, 1.0])
        tensor([0.7071, 0.7071])
    """
    if not tensors or len(tensors) != len(weights):
        raise ShiftkitError(f"multislerp needs one weight per tensor, got {len(tensors)} and {len(weights)}")
    if len(tensors) == 1:
        return tensors[0]
    xs = [x.to(torch.float32) for x in tensors]
    ws = [float(w) for w in weights]
    if normalize_weights:
        total = math.fsum(ws)
        if total == 0.0:
            raise ShiftkitError(
                f"multislerp with normalize_weights=True needs a nonzero weight sum, got {ws}"
            )
        ws = [w / total for w in ws]
    norms = [norm64(x) for x in xs]
    # Σ w_i u_i with u_i = x_i / (‖x_i‖ + ε): the weighted Euclidean mean of the directions (the units
    # divided out first, as mergekit, so exactly cancelling directions give exactly 0 and the fallback)
    mean = torch.zeros_like(xs[0])
    for w, n, x in zip(ws, norms, xs, strict=True):
        mean.add_(x / (n + eps), alpha=w)
    mean_norm = norm64(mean)
    if mean_norm < eps:
        if len(xs) == 2:  # mergekit's fallback: the weighted sum of the two inputs
            return ws[0] * xs[0] + ws[1] * xs[1]
        raise ShiftkitError(
            "multislerp: the weighted mean of the inputs' directions is zero (antipodal inputs whose weights "
            f"balance out, weights {ws}); use other weights"
        )
    m = mean / mean_norm
    # log map at m: v_i = u_i − ⟨u_i, m⟩ m, summed with the weights: v = Σ w_i u_i − (Σ w_i ⟨u_i, m⟩) m
    along = math.fsum(w * dot64(x, m) / (n + eps) for w, n, x in zip(ws, norms, xs, strict=True))
    tangent = mean - along * m
    # exp map back to the sphere, then the weighted mean norm
    tn = norm64(tangent) + eps
    result = math.cos(tn) * m + (math.sin(tn) / tn) * tangent
    return result * math.fsum(w * n for w, n in zip(ws, norms, strict=True))


@register_merge("multislerp", needs_base=False, recipe_required=("weight",), weighting="normalized")
def multislerp(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> dict[str, Tensor]:
    """Multi-SLERP of one or more shifts: their weighted barycentre on the sphere, per tensor.

    Args:
        tensors: T aligned float32 tensor dicts (any shapes, equal across t).
        weights: T weights.
        normalize_weights: divide the weights by their sum (default True, mergekit's default).
        eps: numerical guard added to norms (default 1e-8).

    Returns:
        Merged tensors, same keys and shapes.

    Raises:
        ShiftkitError: weights summing to 0 (with ``normalize_weights``), or three or more shifts whose
            weighted directions cancel out in some tensor.

    Example:
        >>> merged = sk.merge([tv1, tv2, tv3], method="multislerp", weights=[1, 2, 1])
        >>> sk.apply_(base_model, merged)
    """
    return {
        k: multislerp_tensor([t[k] for t in tensors], weights, normalize_weights=normalize_weights, eps=eps)
        for k in tensors[0]
    }
