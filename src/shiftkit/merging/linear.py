"""Linear merge / model soup: ``τ = Σ_t w_t τ_t / Σ_t w_t`` (mergekit ``linear``, spec §1.4).

With a common base, the weighted average of fine-tuned models is the base plus the weighted average of
their shifts, so a uniform soup (Wortsman et al., https://arxiv.org/abs/2203.05482) is ``weights=None``.
"""

from __future__ import annotations

from torch import Tensor

from shiftkit.errors import ShiftkitError
from shiftkit.merging.registry import register_merge

__all__ = ["linear"]


@register_merge("linear")
def linear(
    tensors: list[dict[str, Tensor]], weights: list[float], *, normalize: bool = True
) -> dict[str, Tensor]:
    """Weighted average of shifts (or weighted sum with ``normalize=False``).

    Args:
        tensors: T aligned float32 tensor dicts (any shapes, equal across t).
        weights: T weights.
        normalize: divide by ``Σ w_t`` (default True, mergekit's default: a soup is an average).

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
    return out
