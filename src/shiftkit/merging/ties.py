"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., https://arxiv.org/abs/2306.01708; spec §1.2).

1. Trim each shift to its largest-magnitude entries (fraction ``density``).
2. Elect a sign per coordinate ``γ = sgn(Σ_t τ̂_t)``.
3. Average only the entries that agree with ``γ``; ``τ = λ · τ_m``.

Three reference semantics, picked with ``semantics=``:

* ``"mergekit"`` (default): per-tensor trim to exactly ``⌊density·n⌋`` entries, vote on weighted shifts,
  weight-normalised disjoint mean (``normalize=True``) — scaling all weights changes nothing.
* ``"peft"``: per-tensor trim, vote on unweighted shifts, count-normalised mean of weighted entries.
* ``"paper"``: trim per task over the whole flattened shift (sorted keys), keeping ``|τ| ≥`` the
  ``(d − ⌊d·density⌋)``-th smallest magnitude (``⌊d·density⌋+1`` entries plus ties, as the original code);
  zero votes take the global majority sign; no per-task weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError
from shiftkit.merging._ops import SEMANTICS, ties_disjoint_merge, topk_magnitude
from shiftkit.merging.registry import register_merge

__all__ = ["paper_trim", "ties"]


def paper_trim(task: dict[str, Tensor], density: float) -> dict[str, Tensor]:
    """Global trim of one task's shift as in the original TIES code (spec §1.2(a)).

    Args:
        task: float32 tensors of one shift (any shapes).
        density: fraction K in (0, 1]; ``>= 1`` keeps everything.

    Returns:
        Trimmed tensors, same keys and shapes.

    Example:
        >>> paper_trim({"w": torch.tensor([0.5, -0.2, 0.1, 0.0])}, 0.5)
        {'w': tensor([ 0.5000, -0.2000,  0.1000,  0.0000])}
    """
    if density >= 1.0:
        return dict(task)
    flat = torch.cat([task[k].reshape(-1).abs() for k in sorted(task)])
    d = flat.numel()
    if d == 0:
        return dict(task)
    thr = torch.kthvalue(flat.cpu(), d - int(d * density)).values
    return {k: torch.where(t.abs() >= thr.to(t.device), t, torch.zeros_like(t)) for k, t in task.items()}


@register_merge("ties")
def ties(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    density: float = 0.2,
    semantics: str = "mergekit",
    lambda_: float = 1.0,
    consensus: str = "sum",
    normalize: bool = True,
    zero_sign: str | None = None,
) -> dict[str, Tensor]:
    """TIES merge of aligned shifts.

    Args:
        tensors: T aligned float32 tensor dicts (any shapes, equal across t).
        weights: T weights (``semantics="paper"`` accepts only all-ones: the original has none).
        density: fraction of entries kept by the trim (default 0.2, the paper's top-20 %; mergekit's own
            default 1.0 means no trim).
        semantics: ``"mergekit"``, ``"paper"`` or ``"peft"`` (see module docstring).
        lambda_: final scale λ (default 1, the paper's recommendation without validation data).
        consensus: ``"sum"`` (alias ``"total"``) or ``"count"`` (alias ``"frequency"``).
        normalize: mergekit only: divide by the agreeing weights' sum (default True, as mergekit).
        zero_sign: sign of a coordinate whose vote is 0: ``"positive"`` (peft, mergekit) or
            ``"global_majority"`` (paper); default per ``semantics``.

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2, tv3], method="ties", density=0.2)
        >>> paper = sk.merge([tv1, tv2], method="ties", semantics="paper", lambda_=1.2)
        >>> sk.apply_(base, merged)
    """
    if semantics not in SEMANTICS:
        raise ShiftkitError(f"unknown TIES semantics {semantics!r}; use one of {list(SEMANTICS)}")
    if density < 0:
        raise ShiftkitError(f"TIES density must be >= 0, got {density}")
    if semantics == "paper":
        if any(w != 1.0 for w in weights):
            raise ShiftkitError("TIES semantics='paper' has no per-task weights; use lambda_ or 'mergekit'")
        pruned = [paper_trim(t, density) for t in tensors]
    else:
        pruned = [{k: topk_magnitude(v, density) for k, v in t.items()} for t in tensors]
    if zero_sign is None:
        zero_sign = "global_majority" if semantics == "paper" else "positive"
    mixed = ties_disjoint_merge(
        pruned, weights, semantics=semantics, consensus=consensus, normalize=normalize, zero_sign=zero_sign
    )
    return {k: v * lambda_ for k, v in mixed.items()}
