"""Linear merge / model soup: ``τ = Σ_t w_t τ_t / Σ_t w_t`` (mergekit ``linear``).

With a common base, the weighted average of fine-tuned models is the base plus the weighted average of
their shifts, so a uniform soup (Wortsman et al., https://arxiv.org/abs/2203.05482) is ``weights=None``.
Unnormalised, mergekit's linear is the weighted sum of *weights*, ``Σ_t w_t θ_t``; in shift space that is
``Σ_t w_t τ_t + (Σ_t w_t − 1)·θ0``, which needs θ0: given ``base=`` (what a recipe does) the merge returns
exactly that; without it ``normalize=False`` is the plain weighted sum of shifts ``Σ_t w_t τ_t``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.registry import register_merge

__all__ = ["linear"]


@register_merge(
    "linear", needs_base=False, base_is_input=True, recipe_required=("weight",), weighting="normalized"
)
def linear(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    normalize: bool = True,
    base: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Weighted average of shifts (or weighted sum with ``normalize=False``).

    Args:
        tensors: T aligned float32 tensor dicts (any shapes, equal across t).
        weights: T weights.
        normalize: divide by ``Σ w_t`` (default True, mergekit's default: a soup is an average).
        base: θ0 by name: with ``normalize=False`` the result is the weighted sum of the full weights,
            ``Σ_t w_t θ_t − θ0`` (mergekit); ignored when normalising (the two agree).

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> soup = sk.merge([tv1, tv2, tv3], method="linear")
        >>> weighted = sk.merge([tv1, tv2], method="linear", weights=[3, 1])
        >>> summed = sk.merge([tv1, tv2], method="linear", normalize=False)
    """
    total = sum(weights)
    if normalize and abs(total) < 1e-8:
        raise ShiftkitError(f"linear merge with normalize=True needs a nonzero weight sum, got {weights}")
    div = total if normalize else 1.0
    out: dict[str, Tensor] = {}
    for k in tensors[0]:
        acc = tensors[0][k] * weights[0]
        for w, t in zip(weights[1:], tensors[1:], strict=True):
            acc = acc + w * t[k]
        out[k] = acc / div
        if base is not None and not normalize and total != 1.0:
            if k not in base or tuple(base[k].shape) != tuple(acc.shape):
                raise ShiftMismatchError(f"linear base has no tensor {k!r} of shape {tuple(acc.shape)}")
            out[k] = out[k] + (total - 1.0) * base[k].to(device=acc.device, dtype=acc.dtype)
    return out
