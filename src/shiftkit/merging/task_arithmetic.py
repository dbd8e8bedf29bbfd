"""Task arithmetic (Ilharco et al., https://arxiv.org/abs/2212.04089; mlfoundations/task_vectors).

``τ = λ · Σ_t w_t τ_t``; with ``normalize=True`` the sum is divided by ``Σ_t w_t`` (mergekit; a sum with
``|Σw| < 1e-8`` is divided by 1). Negation (forgetting a task) is a negative weight or ``lambda_ < 0``.
"""

from __future__ import annotations

from torch import Tensor

from shiftkit.merging.registry import register_merge

__all__ = ["task_arithmetic"]


# mergekit accepts density and rescale for task_arithmetic but has no sparsification to apply them to
@register_merge("task_arithmetic", recipe_required=("weight",), recipe_ignored=("density", "rescale"))
def task_arithmetic(
    tensors: list[dict[str, Tensor]], weights: list[float], *, lambda_: float = 1.0, normalize: bool = False
) -> dict[str, Tensor]:
    """Scaled weighted sum of shifts.

    Args:
        tensors: T aligned float32 tensor dicts (any shapes, equal across t).
        weights: T weights.
        lambda_: global scaling λ (default 1.0, the reference repo's and mergekit's default; tune it on
            validation data — the TIES repo sweeps 0.1..1.0).
        normalize: divide by ``Σ w_t`` (default False, as mergekit).

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2], method="task_arithmetic", lambda_=0.4)
        >>> forget = sk.merge([tv1], weights=[-1.0])
        >>> sk.apply_(base, merged)
    """
    total = sum(weights)
    div = total if normalize and abs(total) >= 1e-8 else 1.0
    out: dict[str, Tensor] = {}
    for k in tensors[0]:
        acc = tensors[0][k] * weights[0]
        for w, t in zip(weights[1:], tensors[1:], strict=True):
            acc = acc + w * t[k]
        out[k] = acc * (lambda_ / div)
    return out
