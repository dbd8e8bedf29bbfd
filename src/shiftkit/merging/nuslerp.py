"""NuSLERP: spherical interpolation of two shifts with weights (mergekit 0.1.5 ``nuslerp`` semantics).

Shoemake's slerp (K. Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985) of two vectors
``v0, v1`` at ``t``: with ``cos Ω = ⟨v0, v1⟩ / (‖v0‖‖v1‖)``,

    slerp(v0, v1; t) = sin((1 − t) Ω) / sin Ω · v0 + sin(t Ω) / sin Ω · v1

applied to the unnormalised vectors. NuSLERP takes ``t = w1 / (w0 + w1)`` from the two models' weights
(0.5 when ``|w0 + w1| < 1e-6``) and chooses what a "vector" is:

* ``nuslerp_flatten=True`` (default): the whole tensor, flattened, is one vector;
* ``nuslerp_flatten=False``: every fibre along the last axis (each row of a matrix) is slerped on its own,
  or along the first axis (each column of a matrix) with ``nuslerp_row_wise=True``.

Edge cases as mergekit: a norm is clamped to at least 1e-7 before dividing (a zero vector has cosine 0 with
anything, so ``Ω = π/2``), and parallel or antiparallel vectors give the lerp ``(1 − t) v0 + t v1``.
Norms and dot products accumulate in float64. mergekit's parallel test ``1 − cos²Ω ≤ (1e-8)²`` runs in
float32, where it holds exactly when the cosine rounds to ±1; in float64 that is ``1 − cos²Ω ≤ 2⁻²⁴``,
the test used here (one deviation: where mergekit's float32 cosine of two antiparallel rows lands one ulp
short of −1, it divides by ``sin Ω ≈ 3e-4`` and returns entries thousands of times the inputs', and here
the lerp; below that angle slerp and lerp agree to ~1e-8 anyway).

Shift space: with a ``base_model`` mergekit slerps the task vectors ``τ_i = θ_i − θ0`` and adds ``θ0``, which
is exactly this function on shifts (the base is not merged, only the origin); without one it slerps the
weights themselves, what a recipe without a base gives (θ0 = 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shiftkit.core.functional import BLOCK64, dot64, norm64
from shiftkit.errors import ShiftkitError
from shiftkit.merging.registry import register_merge

__all__ = ["nuslerp", "nuslerp_tensor", "nuslerp_weight_t"]

#: mergekit's guard: norms clamped below by NORM_EPS before dividing
NORM_EPS = 1e-7
#: parallel or antiparallel when 1 − cos² ≤ COLINEAR_TOL: the float64 form of mergekit's float32 test
#: ``1 − cos² ≤ (1e-8)²``, true exactly when the float32 cosine rounds to ±1 (|cos| > 1 − 2⁻²⁵)
COLINEAR_TOL = 2.0**-24


def nuslerp_weight_t(w0: float, w1: float) -> float:
    """The interpolation factor of two weights: ``w1 / (w0 + w1)``, or 0.5 when the sum is ~0.

    Example:
        >>> nuslerp_weight_t(1.0, 3.0)
        0.75
    """
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _coefficients(n0: Tensor, n1: Tensor, d: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """Slerp coefficients ``(c0, c1)`` from float64 norms and dot products (any shape, elementwise)."""
    cos = (d / (n0.clamp(min=NORM_EPS) * n1.clamp(min=NORM_EPS))).clamp(-1.0, 1.0)
    colinear = (1.0 - cos.square()) <= COLINEAR_TOL
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.where(colinear, torch.ones_like(omega), torch.sin(omega))
    c0 = torch.where(colinear, torch.full_like(cos, 1.0 - t), torch.sin((1.0 - t) * omega) / s)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * omega) / s)
    return c0, c1


def _row_stats(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``‖a‖``, ``‖b‖`` and ``⟨a, b⟩`` of two ``(rows, m)`` tensors, in float64 over column blocks."""
    rows, m = a.shape
    sa = torch.zeros(rows, dtype=torch.float64, device=a.device)
    sb = torch.zeros_like(sa)
    dab = torch.zeros_like(sa)
    step = max(1, BLOCK64 // max(rows, 1))
    for c in range(0, m, step):
        x = a[:, c : c + step].to(torch.float64)
        y = b[:, c : c + step].to(torch.float64)
        sa += x.square().sum(-1)
        sb += y.square().sum(-1)
        dab += (x * y).sum(-1)
    return sa.sqrt(), sb.sqrt(), dab


def nuslerp_tensor(
    v0: Tensor, v1: Tensor, t: float, *, row_wise: bool = False, flatten: bool = True
) -> Tensor:
    """Slerp of two same-shape tensors: as one flat vector, or fibre by fibre (mergekit's ``nuslerp``).

    Args:
        v0, v1: float tensors of equal shape (any).
        t: interpolation factor; 0 → ``v0``, 1 → ``v1`` (values outside [0, 1] extrapolate).
        row_wise: without ``flatten``, slerp the fibres along the first axis (columns of a matrix) instead
            of those along the last axis (rows).
        flatten: the whole tensor is one vector (default; ``row_wise`` is then ignored).

    Returns:
        Tensor of the inputs' shape (float32).

    Raises:
        ShiftkitError: the shapes differ.

    Example:
        >>> nuslerp_tensor(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
        tensor([0.7071, 0.7071])
        >>> nuslerp_tensor(torch.eye(2), torch.ones(2, 2), 0.5, flatten=False).shape
        torch.Size([2, 2])
    """
    if v0.shape != v1.shape:
        raise ShiftkitError(
            f"nuslerp needs tensors of one shape, got {tuple(v0.shape)} and {tuple(v1.shape)}"
        )
    a, b = v0.to(torch.float32), v1.to(torch.float32)
    if flatten or a.dim() <= 1:
        n0, n1, d = (torch.tensor(x, dtype=torch.float64) for x in (norm64(a), norm64(b), dot64(a, b)))
        c0, c1 = _coefficients(n0, n1, d, t)
        return float(c0) * a + float(c1) * b
    if row_wise:  # fibres along axis 0: move it last, as mergekit's transpose(0, -1)
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    shape = a.shape
    ra, rb = a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])
    c0, c1 = _coefficients(*_row_stats(ra, rb), t)
    out = (c0.to(torch.float32)[:, None] * ra + c1.to(torch.float32)[:, None] * rb).reshape(shape)
    return out.transpose(0, -1) if row_wise else out


@register_merge(
    "nuslerp",
    needs_base=False,
    recipe_required=("weight",),
    min_inputs=2,
    max_inputs=2,
    weighting="normalized",
)
def nuslerp(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> dict[str, Tensor]:
    """NuSLERP of exactly two shifts, ``t = w1 / (w0 + w1)`` from their weights.

    Args:
        tensors: 2 aligned float32 tensor dicts (any shapes, equal across the two).
        weights: the 2 models' weights (only their ratio matters; a sum of ~0 gives t = 0.5).
        nuslerp_row_wise: with ``nuslerp_flatten=False``, slerp columns (fibres along axis 0) instead of
            rows (fibres along the last axis), as mergekit.
        nuslerp_flatten: slerp each tensor as one flat vector (default True, mergekit's default).

    Returns:
        Merged tensors, same keys and shapes.

    Raises:
        ShiftkitError: not exactly two shifts.

    Example:
        >>> mid = sk.merge([tv1, tv2], method="nuslerp")                  # t = 0.5
        >>> rows = sk.merge([tv1, tv2], method="nuslerp", weights=[1, 3], nuslerp_flatten=False)
        >>> sk.apply_(base_model, mid)
    """
    if len(tensors) != 2 or len(weights) != 2:
        raise ShiftkitError(
            f"nuslerp merges exactly 2 shifts, got {len(tensors)} (and {len(weights)} weights)"
        )
    t = nuslerp_weight_t(float(weights[0]), float(weights[1]))
    if not math.isfinite(t):
        raise ShiftkitError(f"nuslerp weights {weights} give no finite interpolation factor")
    return {
        k: nuslerp_tensor(tensors[0][k], tensors[1][k], t, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
        for k in tensors[0]
    }
