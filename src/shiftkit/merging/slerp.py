"""SLERP of two shifts (mergekit ``merge_methods/slerp.py`` math), per tensor as one flattened vector.

``v̂ = v/‖v‖`` (left as is when ‖v‖ ≤ 1e-8), ``c = ⟨v̂0, v̂1⟩``; if ``|c| > 0.9995`` return the lerp
``(1−t) v0 + t v1``; else ``Ω = arccos c`` and ``sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1`` on the
original (unnormalised) tensors. Norms and the dot product accumulate in float64, block by block.
By default it interpolates the **shifts** (``θ0 + slerp(τ0, τ1)``), which differs from mergekit's slerp of
full weights; pass ``base=`` (the θ0 state dict) to interpolate weights: ``slerp(θ0+τ0, θ0+τ1) − θ0``
(what a recipe does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from shiftkit.core.functional import dot64, norm64
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.registry import register_merge

__all__ = ["slerp", "slerp_tensor"]

#: mergekit's thresholds: near-(anti)parallel vectors fall back to lerp; tiny norms are not normalised
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_tensor(v0: Tensor, v1: Tensor, t: float) -> Tensor:
    """Spherical interpolation of two same-shape tensors treated as flat vectors.

    Args:
        v0, v1: float tensors of equal shape (any).
        t: interpolation in [0, 1]; 0 → ``v0``, 1 → ``v1``.

    Returns:
        Tensor of the inputs' shape (float32).

    Example:
        >>> slerp_tensor(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
        tensor([0.7071, 0.7071])
    """
    a, b = v0.to(torch.float32), v1.to(torch.float32)
    # norms and the dot product in float64: in float32 a 2e8-entry norm is ~3 % low, enough to push the
    # cosine over the lerp threshold and silently interpolate linearly
    na, nb = norm64(a), norm64(b)
    c = dot64(a, b) / ((na if na > EPS else 1.0) * (nb if nb > EPS else 1.0))
    c = min(max(c, -1.0), 1.0)
    if abs(c) > DOT_THRESHOLD:
        return (1.0 - t) * a + t * b
    omega = math.acos(c)
    s = math.sin(omega)
    return (math.sin((1.0 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b


@register_merge(
    "slerp", base_is_input=True, recipe_required=("t",), min_inputs=2, max_inputs=2, weighting="none"
)
def slerp(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    t: float = 0.5,
    base: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """SLERP between exactly two shifts (weights are not used; ``t`` sets the mix).

    Args:
        tensors: 2 aligned float32 tensor dicts.
        weights: ignored (must be the default all-ones).
        t: interpolation factor in [0, 1] (default 0.5, the midpoint).
        base: optional θ0 tensors by name to slerp full weights (mergekit) instead of shifts.

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> mid = sk.merge([tv1, tv2], method="slerp", t=0.5)
        >>> mk = sk.merge([tv1, tv2], method="slerp", t=0.3, base=dict(base_model.state_dict()))
        >>> sk.apply_(base_model, mid)
    """
    if len(tensors) != 2:
        raise ShiftkitError(f"slerp merges exactly 2 shifts, got {len(tensors)}")
    if any(w != 1.0 for w in weights):
        raise ShiftkitError("slerp takes no weights; use t= to set the interpolation")
    if not 0.0 <= t <= 1.0:
        raise ShiftkitError(f"slerp t must be in [0, 1], got {t}")
    out: dict[str, Tensor] = {}
    for k in tensors[0]:
        a, b = tensors[0][k], tensors[1][k]
        if base is None:
            out[k] = slerp_tensor(a, b, t)
            continue
        if k not in base or tuple(base[k].shape) != tuple(a.shape):
            raise ShiftMismatchError(f"slerp base has no tensor {k!r} of shape {tuple(a.shape)}")
        b0 = base[k].to(device=a.device, dtype=torch.float32)
        out[k] = slerp_tensor(b0 + a, b0 + b, t) - b0
    return out
