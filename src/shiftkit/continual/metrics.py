"""The metrics of a continual run from its accuracy matrix (MTIL's and Avalanche's; spec: adapt-continual.md
§6.15).

``A[t, d]`` is the accuracy on task ``d`` after training task ``t`` (tasks in training order, ``T × T``):

* **Transfer**: for each task ``d ≥ 1`` the mean of ``A[t, d]`` over ``t < d`` (its accuracy *before* it is
  learned: the zero-shot skill that survived), averaged over ``d``;
* **Avg**: the mean of every entry;
* **Last**: the mean of the last row (accuracy on every task after the whole sequence);
* **forgetting**: the mean over ``d < T − 1`` of ``A[d, d] − A[T − 1, d]`` (Avalanche's, measured right after
  learning ``d``); **bwt** = −forgetting.

With the zero-shot row ``z[d]`` (the pretrained model's accuracy), ``transfer_gain`` is Transfer minus the
mean of ``z[d]`` over ``d ≥ 1`` (MTIL's Transfer read against the pretrained model, not against random
initialisation), and ``zero_shot`` is that mean.

Example:
    >>> m = mtil_metrics([[0.9, 0.5], [0.8, 0.95]])
    >>> m["transfer"], m["avg"], m["last"], round(m["forgetting"], 6)
    (0.5, 0.7875, 0.875, 0.1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError

__all__ = ["mtil_metrics"]


def _matrix(a: Any, name: str) -> Tensor:
    try:
        m = torch.as_tensor(a, dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise ShiftkitError(f"{name} must be a matrix of numbers: {err}") from None
    return m


def mtil_metrics(
    a: Tensor | Sequence[Sequence[float]], zero_shot: Sequence[float] | Tensor | None = None
) -> dict[str, float]:
    """Transfer, Avg, Last, forgetting and BWT of the accuracy matrix ``a`` (``a[t][d]``, ``T × T``).

    Args:
        a: accuracy on task ``d`` (column) after training task ``t`` (row), tasks in training order.
        zero_shot: optional accuracy of the pretrained model on each task (length ``T``): adds
            ``zero_shot`` (its mean over tasks 1..T−1, the ones Transfer covers) and ``transfer_gain``.

    Returns:
        ``{"transfer", "avg", "last", "forgetting", "bwt"}`` (plus ``"zero_shot"``, ``"transfer_gain"``), in
        the units of ``a``. With one task, Transfer and forgetting are 0 (nothing to measure).

    Raises:
        ShiftkitError: ``a`` is not a non-empty square matrix or holds NaN; ``zero_shot`` of the wrong length.
    """
    m = _matrix(a, "A")
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ShiftkitError(
            "A must be a square T × T matrix (A[t, d]: task d after training task t), "
            f"got shape {tuple(m.shape)}"
        )
    if torch.isnan(m).any():
        raise ShiftkitError("A holds NaN: every task must be evaluated after every training task")
    t = m.shape[0]
    transfer = [float(m[:d, d].mean()) for d in range(1, t)]
    out = {
        "transfer": sum(transfer) / len(transfer) if transfer else 0.0,
        "avg": float(m.mean()),
        "last": float(m[-1].mean()),
        "forgetting": float((m.diagonal()[:-1] - m[-1, :-1]).mean()) if t > 1 else 0.0,
    }
    out["bwt"] = -out["forgetting"]
    if zero_shot is not None:
        z = _matrix(zero_shot, "zero_shot").reshape(-1)
        if z.numel() != t:
            raise ShiftkitError(f"zero_shot needs one accuracy per task ({t}), got {z.numel()}")
        out["zero_shot"] = float(z[1:].mean()) if t > 1 else float(z.mean())
        out["transfer_gain"] = out["transfer"] - out["zero_shot"]
    return out
