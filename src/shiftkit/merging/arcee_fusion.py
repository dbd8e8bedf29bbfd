"""Arcee Fusion: take the other model's change only where it matters most (mergekit ``arcee_fusion``).

Of two inputs ``a`` (the base) and ``b`` (the other model), with ``Δ = b − a``, each entry gets an
importance

``s = |Δ| · KL(p ‖ q)``, ``p = softmax(b) + 1e-8``, ``q = softmax(a) + 1e-8``, ``KL(p ‖ q) = Σ p·log(p/q)``,

the softmax and the sum over the last dimension (one divergence per row, shared by the row's entries; a 1-D
tensor is one row). A Tukey-style outlier threshold over all of the tensor's importances,

``thr = Q(0.5) + 1.5·(Q(0.75) − Q(0.25))``, ``Q(q)`` = the ``⌊q·(n − 1)⌋``-th smallest (0-based) of the n,

selects the entries that change: ``a + Δ·[s ≥ thr]``.

Unlike the shift-only methods the importance depends on the weights themselves (the softmax), so a recipe
passes ``base=`` (θ0) and the method runs on ``θ0 + τ``; without ``base`` it treats the shifts as the
weights (θ0 = 0). In a recipe the base model is the first input (``τ_a = 0``): the merged shift is
``τ_b·[s ≥ thr]``.

Difference from mergekit 0.1.5: for a tensor of more than 10⁶ entries mergekit estimates the three quantiles
from 10⁶ entries drawn at random (with replacement, from torch's global generator), so its mask varies from
run to run near the threshold; here the quantiles are exact over every entry (deterministic; the value the
sampled estimate scatters around). Up to 10⁶ entries the two are the same.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from shiftkit.core.functional import select_ranks
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.registry import register_merge
from shiftkit.merging.stream.kernels import parallel_map

__all__ = ["arcee_fusion", "fusion_importance", "fusion_mask", "fusion_threshold"]

#: added to both softmaxes before the divergence (mergekit's), so ``log(p/q)`` stays finite
EPS = 1e-8
#: the quantiles of the threshold ``Q(0.5) + 1.5·(Q(0.75) − Q(0.25))``
QUANTILES = (0.25, 0.5, 0.75)
IQR_FACTOR = 1.5


def fusion_importance(a: Tensor, b: Tensor) -> Tensor:
    """Importance of changing ``a`` into ``b``: ``|b − a| · KL(softmax(b) + ε ‖ softmax(a) + ε)`` per row.

    Args:
        a: the base side's weights (any shape, at least 1-D; the softmax runs over the last dimension).
        b: the other side's weights, same shape.

    Returns:
        Tensor of the inputs' shape (each row's divergence times the entries' absolute changes).

    Example:
        >>> fusion_importance(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]))
        tensor([0., 0.])
    """
    p = torch.softmax(b, dim=-1) + EPS
    q = torch.softmax(a, dim=-1) + EPS
    kl = (p * (p / q).log()).sum(dim=-1, keepdim=True)
    return (b - a).abs() * kl


def fusion_threshold(scores: Tensor) -> Tensor:
    """``Q(0.5) + 1.5·(Q(0.75) − Q(0.25))`` over all entries, ``Q(q)`` the ``⌊q(n−1)⌋``-th smallest.

    Args:
        scores: importances (any shape, at least one entry).

    Returns:
        0-d tensor of the scores' dtype.

    Example:
        >>> fusion_threshold(torch.arange(9.0))  # Q = 2, 4, 6
        tensor(10.)
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    q1, med, q3 = (v.to(flat.device) for v in select_ranks(flat, [int(q * (n - 1)) for q in QUANTILES]))
    return med + IQR_FACTOR * (q3 - q1)


def fusion_mask(a: Tensor, b: Tensor) -> Tensor:
    """The entries Arcee Fusion changes: importance at or above the tensor's outlier threshold.

    Args:
        a: the base side's weights.
        b: the other side's weights, same shape.

    Returns:
        Boolean tensor of the inputs' shape.

    Example:
        >>> fusion_mask(torch.zeros(2, 4), torch.eye(2, 4))
        tensor([[ True,  True,  True,  True],
                [ True,  True,  True,  True]])
    """
    scores = fusion_importance(a, b)
    return scores >= fusion_threshold(scores)


@register_merge("arcee_fusion", base_is_input=True, min_inputs=2, max_inputs=2, weighting="none")
def arcee_fusion(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    base: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Arcee Fusion of exactly two shifts: the second's change where its importance is an outlier.

    Args:
        tensors: 2 aligned float tensor dicts; the first is the base side (in a recipe the base model, τ = 0).
        weights: ignored (must be the default all-ones).
        base: θ0 by name, so the importance sees the weights ``θ0 + τ`` (what a recipe passes); without it
            the shifts themselves are the weights.

    Returns:
        Merged tensors ``τ_a + (τ_b − τ_a)·mask``, same keys, shapes and dtypes.

    Example:
        >>> zero = sk.task_vector(base, base)
        >>> fused = sk.merge([zero, tv], method="arcee_fusion", base=dict(base.state_dict()))
        >>> sk.apply_(base, fused)
    """
    if len(tensors) != 2:
        raise ShiftkitError(f"arcee_fusion merges exactly 2 shifts (the base side first), got {len(tensors)}")
    if any(w != 1.0 for w in weights):
        raise ShiftkitError(f"arcee_fusion takes no weights (got {weights}); it has no parameters")
    ta, tb = tensors
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for k in ta:
            x, y = ta[k], tb[k]
            if x.numel() == 0:
                out[k] = x.clone()
                continue
            b0 = None
            if base is not None:
                if k not in base or tuple(base[k].shape) != tuple(x.shape):
                    raise ShiftMismatchError(
                        f"arcee_fusion base has no tensor {k!r} of shape {tuple(x.shape)}"
                    )
                b0 = base[k].to(device=x.device, dtype=x.dtype)
            out[k] = _fuse(x, y, b0)
    return out


#: rows per chunk of :func:`_fuse` hold about this many entries
_CHUNK = 1 << 18


def _fuse(x: Tensor, y: Tensor, b0: Tensor | None) -> Tensor:
    """``x + (y − x)·mask`` of one tensor, the importances computed row chunk by row chunk (the softmax and
    the divergence are per row), so the temporaries are chunk-sized: the full-size tensors are the
    importances (whose storage then takes the result) and the threshold's selection copy."""
    shape = x.shape
    width = shape[-1] if x.dim() > 0 else 1
    xs, ys = x.reshape(-1, width), y.reshape(-1, width)
    bs = b0.reshape(-1, width) if b0 is not None else None
    rows = xs.shape[0]
    step = max(1, _CHUNK // width)
    chunks = [slice(i, min(i + step, rows)) for i in range(0, rows, step)]
    scores = torch.empty_like(xs)

    def importance(c: slice) -> None:
        a, b = (xs[c], ys[c]) if bs is None else (bs[c] + xs[c], bs[c] + ys[c])
        scores[c] = fusion_importance(a, b)

    def fuse(c: slice) -> None:  # the result takes the importances' storage, chunk by chunk
        keep = scores[c] >= thr
        scores[c] = xs[c] + (ys[c] - xs[c]) * keep

    # chunks write disjoint rows: the streaming merge may run them on its idle workers (largest tensors)
    parallel_map(importance, chunks)
    thr = fusion_threshold(scores)
    parallel_map(fuse, chunks)
    return scores.reshape(shape)
