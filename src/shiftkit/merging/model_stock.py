"""Model Stock (Jang et al., https://arxiv.org/abs/2403.19522; mergekit ``model_stock``).

For ``k ≥ 2`` fine-tunes of one base, per tensor: ``cos θ`` = the mean pairwise cosine between the task
vectors ``τ_i`` (the paper assumes one common angle; for ``k > 2`` we take the mean over the
``k(k−1)/2`` pairs, as mergekit), the interpolation ratio

    t = k·cos θ / (1 + (k − 1)·cos θ)

and ``θ = t·θ_avg + (1 − t)·θ0``, i.e. the merged shift ``τ = t · (1/k)·Σ_i τ_i``.

``filter_wise=True`` computes ``cos θ`` (and so ``t``) per output row / filter ``τ[r, ...]`` (flattened)
instead of per tensor; a 1-D tensor is one row. mergekit's ``filter_wise`` takes cosines along the *last*
dimension: the same for 1-D and 2-D tensors (all of an LLM), different for conv kernels, where the paper's
"filter" is the output channel as here. Guards: a cosine is ``⟨a, b⟩ / max(‖a‖‖b‖, 1e-6)`` clamped to
``[−1, 1]`` (mergekit's guard), so a zero task vector gives ``cos θ = 0`` → ``t = 0`` (no NaN); the
singular ``1 + (k − 1)·cos θ = 0`` (anti-correlated vectors, outside the paper's assumptions) also
gives ``t = 0``. Model Stock has no per-model weights. Norms and dot products accumulate in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shiftkit.core.functional import BLOCK64
from shiftkit.errors import ShiftkitError
from shiftkit.merging.registry import register_merge

__all__ = ["model_stock", "model_stock_ratio"]


def model_stock_ratio(vectors: list[Tensor]) -> Tensor:
    """Interpolation ratio ``t = k·c / (1 + (k−1)·c)`` with ``c`` the mean pairwise cosine.

    Args:
        vectors: k ≥ 2 tensors of shape ``(..., m)``; cosines are taken along the last dimension.

    Returns:
        ``t`` of shape ``(...)`` (a scalar tensor for 1-D inputs).

    Example:
        >>> model_stock_ratio([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])])
        tensor(0.8284)
    """
    k = len(vectors)
    if k < 2:
        raise ShiftkitError(f"model_stock needs at least 2 fine-tuned shifts, got {k}")
    squares, dots = _row_sums(vectors)
    norms = squares.sqrt()
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    cosines = [
        (dots[p] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0) for p, (i, j) in enumerate(pairs)
    ]
    cos = torch.stack(cosines).mean(0)
    den = 1.0 + (k - 1) * cos
    t = torch.where(den.abs() > 1e-6, k * cos / torch.where(den == 0, torch.ones_like(den), den), 0.0)
    return t.to(vectors[0].dtype)


def _row_sums(vectors: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Squared norms ``(k, ...)`` and pairwise dot products ``(k(k−1)/2, ...)`` along the last dimension,
    accumulated in float64 over column blocks (a float32 reduction over a whole large tensor is ~1e-4 off)."""
    lead = vectors[0].shape[:-1]
    flat = [v.reshape(-1, v.shape[-1]) for v in vectors]
    rows, m = flat[0].shape
    k = len(flat)
    squares = torch.zeros(k, rows, dtype=torch.float64, device=flat[0].device)
    dots = torch.zeros(k * (k - 1) // 2, rows, dtype=torch.float64, device=flat[0].device)
    step = max(1, BLOCK64 // max(rows, 1))
    for c in range(0, m, step):
        block = [f[:, c : c + step].to(torch.float64) for f in flat]
        p = 0
        for i in range(k):
            squares[i] += block[i].square().sum(-1)
            for j in range(i + 1, k):
                dots[p] += (block[i] * block[j]).sum(-1)
                p += 1
    return squares.reshape(k, *lead), dots.reshape(-1, *lead)


@register_merge("model_stock", min_inputs=2, weighting="none")
def model_stock(
    tensors: list[dict[str, Tensor]], weights: list[float], *, filter_wise: bool = False
) -> dict[str, Tensor]:
    """Model Stock merge of k ≥ 2 shifts: ``τ = t · mean_i τ_i`` per tensor (or per row).

    Args:
        tensors: k aligned float32 tensor dicts (any shapes, equal across i).
        weights: k weights; must all be 1 (the method has none).
        filter_wise: one ratio per output row (dim 0) instead of per tensor (default False, as mergekit).

    Returns:
        Merged tensors, same keys and shapes.

    Raises:
        ShiftkitError: fewer than 2 shifts, or weights other than 1.

    Example:
        >>> merged = sk.merge([tv1, tv2, tv3], method="model_stock")
        >>> rows = sk.merge([tv1, tv2], method="model_stock", filter_wise=True)
        >>> sk.apply_(base, merged)
    """
    if len(tensors) < 2:
        raise ShiftkitError(f"model_stock needs at least 2 fine-tuned shifts, got {len(tensors)}")
    if any(w != 1.0 for w in weights):
        raise ShiftkitError("model_stock has no per-model weights; leave weights at 1")
    out: dict[str, Tensor] = {}
    for key in tensors[0]:
        xs = [t[key] for t in tensors]
        shape = xs[0].shape
        if filter_wise and xs[0].dim() >= 1:
            rows = [x.reshape(shape[0], -1) if x.dim() > 1 else x.reshape(1, -1) for x in xs]
        else:
            rows = [x.reshape(1, -1) for x in xs]
        t = model_stock_ratio(rows).unsqueeze(-1)
        mean = sum(rows[1:], rows[0]) / len(rows)
        out[key] = (t * mean).reshape(shape)
    return out
