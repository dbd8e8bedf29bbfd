"""NearSwap: take the other model's value only where it is already near the base (mergekit ``nearswap``).

Of two inputs ``a`` (the base) and ``b`` (the other model), every entry becomes

``w·b + (1 − w)·a`` with ``w = clamp(t / max(|a − b|, 1e-6), 0, 1)``:

entries that differ by at most ``t`` are swapped for ``b``'s value outright (``w = 1``), entries that differ
by more move towards ``b`` by exactly ``t`` in magnitude (``w·|a − b| = t``), so no entry moves further than
``t``. The floor ``1e-6`` keeps equal entries (``|a − b| = 0``) finite: they stay where they are.
A negative ``t`` gives ``w = 0`` (the base everywhere), as in mergekit.

The weight depends on the difference ``a − b`` only, which is the same in shift space and weight space, so
the method runs on the shifts directly: ``τ = w·τ_b + (1 − w)·τ_a``. In a recipe the base model is the first
input (``τ_a = 0``) and the merged shift is ``w·τ_b``. Reference model:
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError
from shiftkit.merging.registry import register_merge

__all__ = ["nearswap", "nearswap_tensor"]

#: the smallest ``|a − b|`` the weight divides by (mergekit's): equal entries stay finite
MIN_DIFF = 1e-6


def nearswap_tensor(a: Tensor, b: Tensor, t: float) -> Tensor:
    """NearSwap of two same-shape tensors: ``w·b + (1 − w)·a``, ``w = clamp(t / max(|a − b|, 1e-6), 0, 1)``.

    Args:
        a: the base side (kept where the two differ by much more than ``t``).
        b: the other side (taken where the two differ by at most ``t``).
        t: the swap distance (same units as the tensors; mergekit recipes use 1e-4 to 1e-3).

    Returns:
        Tensor of the inputs' shape and dtype.

    Example:
        >>> nearswap_tensor(torch.tensor([0.0, 0.0]), torch.tensor([0.5, 2.0]), 1.0)
        tensor([0.5000, 1.0000])
    """
    w = (t / (a - b).abs().clamp(min=MIN_DIFF)).clamp(min=0.0, max=1.0)
    return w * b + (1.0 - w) * a


@register_merge(
    "nearswap",
    base_is_input=True,
    recipe_required=("t",),
    min_inputs=2,
    max_inputs=2,
    weighting="none",
    lossless={"t": math.inf},
)
def nearswap(
    tensors: list[dict[str, Tensor]], weights: list[float], *, t: float | None = None
) -> dict[str, Tensor]:
    """NearSwap of exactly two shifts: the second's entries where they lie within ``t`` of the first's.

    Args:
        tensors: 2 aligned float tensor dicts; the first is the base side (in a recipe the base model, τ = 0).
        weights: ignored (must be the default all-ones).
        t: the swap distance, required (mergekit has no default): entries within ``t`` of each other take
            the second input's value, others move ``t`` towards it. ``t = inf`` takes the second input whole.

    Returns:
        Merged tensors, same keys, shapes and dtypes.

    Example:
        >>> merged = sk.merge([sk.task_vector(base, base), tv], method="nearswap", t=1e-4)
        >>> sk.apply_(base, merged)
    """
    if len(tensors) != 2:
        raise ShiftkitError(f"nearswap merges exactly 2 shifts (the base side first), got {len(tensors)}")
    if any(w != 1.0 for w in weights):
        raise ShiftkitError(f"nearswap takes no weights (got {weights}); use t= to set the swap distance")
    if t is None:
        raise ShiftkitError("nearswap needs t= (the swap distance, e.g. 1e-4); it has no default")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t):
        raise ShiftkitError(f"nearswap t must be a number, got {t!r}")
    a, b = tensors
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for k in a:
            out[k] = nearswap_tensor(a[k], b[k], float(t))
    return out
