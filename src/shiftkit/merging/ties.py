"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., https://arxiv.org/abs/2306.01708).

Reference code: prateeky2806/ties-merging (the paper's), peft ``merge_utils.py``, mergekit ``ties``.

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

Streaming (``semantics="paper"``): :func:`ties_multipass` finds each task's global threshold with the exact
streaming order statistic of :mod:`shiftkit.merging.stream.order_stats` (4 passes), then, for ``zero_sign=
"global_majority"``, one more pass sums the elected signs over the whole model; the apply step is
tensor-local. Its output equals the in-memory merge bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from shiftkit.core.functional import kth_smallest
from shiftkit.errors import ShiftkitError
from shiftkit.merging.consensus import SEMANTICS, elected_sign_sum, ties_disjoint_merge
from shiftkit.merging.registry import register_merge
from shiftkit.merging.sparsify import per_input, rescale_pruned, topk_magnitude
from shiftkit.merging.stream.kernels import ties_kernel
from shiftkit.merging.stream.multipass import register_multipass
from shiftkit.merging.stream.order_stats import OrderStatistics

__all__ = ["TiesPaperPasses", "paper_trim", "ties", "ties_multipass"]


def _paper_rank(d: int, density: float) -> int:
    """0-based ascending rank of the paper's threshold: the ``(d − ⌊d·K⌋)``-th smallest ``|τ|``."""
    return max(d - int(d * density), 1) - 1


def paper_trim(task: dict[str, Tensor], density: float) -> dict[str, Tensor]:
    """Global trim of one task's shift as in the original TIES code (prateeky2806/ties-merging).

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
    thr = kth_smallest(flat.cpu(), _paper_rank(d, density))
    return {k: torch.where(t.abs() >= thr.to(t.device), t, torch.zeros_like(t)) for k, t in task.items()}


@register_merge(
    "ties",
    recipe_defaults={"density": 1.0},  # mergekit: no trim unless the recipe asks for one
    recipe_required=("weight",),
    kernel=ties_kernel,
    weighting="normalized",
    lossless={"density": 1.0},
    per_input=("density",),
)
def ties(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    density: float | Sequence[float] = 0.2,
    semantics: str = "mergekit",
    lambda_: float = 1.0,
    consensus: str = "sum",
    normalize: bool = True,
    zero_sign: str | None = None,
    rescale: str = "none",
) -> dict[str, Tensor]:
    """TIES merge of aligned shifts.

    Args:
        tensors: T aligned float32 tensor dicts (any shapes, equal across t).
        weights: T weights (``semantics="paper"`` accepts only all-ones: the original has none).
        density: fraction of entries kept by the trim (default 0.2, the paper's top-20 %), or one per
            shift. A recipe (``shiftkit merge``) that omits it gets mergekit's default 1.0, no trim.
        semantics: ``"mergekit"``, ``"paper"`` or ``"peft"`` (see module docstring).
        lambda_: final scale λ (default 1, the paper's recommendation without validation data).
        consensus: ``"sum"`` (alias ``"total"``) or ``"count"`` (alias ``"frequency"``).
        normalize: mergekit only: divide by the agreeing weights' sum (default True, as mergekit).
        zero_sign: sign of a coordinate whose vote is 0: ``"positive"`` (peft, mergekit) or
            ``"global_majority"`` (paper); default per ``semantics``.
        rescale: mergekit only: ``"l1"`` scales each trimmed tensor back to its L1 norm before the vote
            (mergekit's ``rescale: true``); ``"none"`` (default, the paper's and mergekit's default).

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2, tv3], method="ties", density=0.2)
        >>> paper = sk.merge([tv1, tv2], method="ties", semantics="paper", lambda_=1.2)
        >>> sk.apply_(base, merged)
    """
    if semantics not in SEMANTICS:
        raise ShiftkitError(f"unknown TIES semantics {semantics!r}; use one of {list(SEMANTICS)}")
    densities = per_input(density, len(tensors), "TIES density")
    if any(d < 0 for d in densities):
        raise ShiftkitError(f"TIES density must be >= 0, got {density}")
    if semantics == "paper":
        if any(w != 1.0 for w in weights):
            raise ShiftkitError("TIES semantics='paper' has no per-task weights; use lambda_ or 'mergekit'")
        pruned = [paper_trim(t, d) for t, d in zip(tensors, densities)]
    else:
        least = 1 if semantics == "mergekit" else 0  # mergekit keeps >= 1 entry per tensor; peft may keep 0
        pruned = [{k: topk_magnitude(v, d, least) for k, v in t.items()} for t, d in zip(tensors, densities)]
    if rescale != "none":
        if semantics != "mergekit":
            raise ShiftkitError(f"TIES rescale={rescale!r} is a mergekit option: use semantics='mergekit'")
        pruned = [
            {k: rescale_pruned(t[k], p[k], rescale) for k in t} if d < 1.0 else p
            for t, p, d in zip(tensors, pruned, densities)
        ]
    if zero_sign is None:
        zero_sign = "global_majority" if semantics == "paper" else "positive"
    mixed = ties_disjoint_merge(
        pruned, weights, semantics=semantics, consensus=consensus, normalize=normalize, zero_sign=zero_sign
    )
    return {k: v * lambda_ for k, v in mixed.items()}


class TiesPaperPasses:
    """Multi-pass computation of ``ties(semantics="paper")`` (see :mod:`shiftkit.merging.stream.multipass`).

    Passes 0–3: per-task exact global threshold of ``|τ_t|`` (:class:`OrderStatistics`); pass 4 (only
    with ``zero_sign="global_majority"``): ``Σ_p γ_p`` over the whole model; apply: trim with ``≥ thr_t``,
    elect, disjoint mean, ``× λ``.

    Args:
        n_tasks: number of shifts T.
        density: kept fraction K; ``lambda_``, ``consensus``, ``zero_sign`` as in :func:`ties`.

    Example:
        >>> passes = get_merge_method("ties").multipass([1.0, 1.0], semantics="paper", density=0.2)
        >>> out = run_multipass_in_memory(passes, [tv1.tensors, tv2.tensors], [1.0, 1.0])
        >>> passes.n_passes
        5
    """

    def __init__(
        self, n_tasks: int, *, density: float, lambda_: float, consensus: str, zero_sign: str
    ) -> None:
        self.density = density
        self.lambda_ = lambda_
        self.consensus = consensus
        self.zero_sign = zero_sign
        self.stats = OrderStatistics(n_tasks, lambda d: [_paper_rank(d, density)])
        self.n_passes = self.stats.n_passes + (1 if zero_sign == "global_majority" else 0)
        self.total = torch.zeros((), dtype=torch.float64)

    def _trim(self, tensors: list[Tensor]) -> list[Tensor]:
        if self.density >= 1.0:
            return list(tensors)
        out = []
        for t, x in enumerate(tensors):
            thr = self.stats.value(t, 0).to(x.device)
            out.append(torch.where(x.abs() >= thr, x, torch.zeros_like(x)))
        return out

    def observe(self, pass_index: int, key: str, tensors: list[Tensor], weights: list[float]) -> None:
        """Pass < 4: feed ``|τ_t|`` to the threshold search; pass 4: add this tensor's elected signs."""
        if pass_index < self.stats.n_passes:
            if self.density < 1.0:
                for t, x in enumerate(tensors):
                    self.stats.observe(pass_index, t, x.abs())
            return
        stack = torch.stack(self._trim(tensors))
        self.total = self.total + elected_sign_sum(
            stack, weights, semantics="paper", consensus=self.consensus
        )

    def end_pass(self, pass_index: int) -> None:
        """Resolve the thresholds (passes 0–3)."""
        if pass_index < self.stats.n_passes and self.density < 1.0:
            self.stats.end_pass(pass_index)

    def apply(self, key: str, tensors: list[Tensor], weights: list[float]) -> Tensor:
        """Merged tensor ``key``."""
        pruned = [{key: x} for x in self._trim(tensors)]
        sign = float(torch.sign(self.total)) if self.zero_sign == "global_majority" else None
        mixed = ties_disjoint_merge(
            pruned,
            weights,
            semantics="paper",
            consensus=self.consensus,
            normalize=True,
            zero_sign=self.zero_sign,
            global_sign=sign,
        )
        return mixed[key] * self.lambda_


@register_multipass("ties")
def ties_multipass(
    weights: list[float],
    *,
    density: float | Sequence[float] = 0.2,
    semantics: str = "mergekit",
    lambda_: float = 1.0,
    consensus: str = "sum",
    normalize: bool = True,
    zero_sign: str | None = None,
    rescale: str = "none",
) -> TiesPaperPasses | None:
    """Multi-pass computation of :func:`ties`: :class:`TiesPaperPasses` for ``semantics="paper"``, else None.

    Args:
        weights: T weights (all 1 for ``"paper"``); the other arguments as :func:`ties`.

    Returns:
        The computation, or None when the merge is tensor-local (``"mergekit"``, ``"peft"``).

    Example:
        >>> ties_multipass([1.0, 1.0], semantics="mergekit") is None
        True
        >>> passes = ties_multipass([1.0, 1.0], semantics="paper", density=0.2)
    """
    if semantics not in SEMANTICS:
        raise ShiftkitError(f"unknown TIES semantics {semantics!r}; use one of {list(SEMANTICS)}")
    if semantics != "paper":
        if zero_sign == "global_majority":  # whole-model statistics no multi-pass computation covers
            raise ShiftkitError(
                f"TIES zero_sign='global_majority' with semantics={semantics!r} needs whole-model "
                "statistics, which only semantics='paper' streams: merge in memory (sk.merge), or use "
                "zero_sign='positive'"
            )
        return None
    if not isinstance(density, (int, float)):
        raise ShiftkitError(
            "TIES semantics='paper' in a streaming merge takes one density for every model, got "
            f"{list(density)}: merge in memory (sk.merge) for per-model densities"
        )
    if rescale != "none":
        raise ShiftkitError(f"TIES rescale={rescale!r} is a mergekit option: use semantics='mergekit'")
    if density < 0:
        raise ShiftkitError(f"TIES density must be >= 0, got {density}")
    if any(w != 1.0 for w in weights):
        raise ShiftkitError("TIES semantics='paper' has no per-task weights; use lambda_ or 'mergekit'")
    zs = zero_sign or "global_majority"
    if zs not in ("positive", "global_majority"):
        raise ShiftkitError(f"unknown zero_sign {zs!r}; use 'positive' or 'global_majority'")
    return TiesPaperPasses(len(weights), density=density, lambda_=lambda_, consensus=consensus, zero_sign=zs)
