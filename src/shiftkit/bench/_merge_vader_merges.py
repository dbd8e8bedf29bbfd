"""``merge-vader`` settings and rows: the per-method coefficient grids chosen on validation, and the merges.

Every merge starts from θ0 and the four per-domain task vectors (full fine-tuning, or the exact dense
``ΔW = (α/r) B A`` of the LoRA experts), builds ``θ = θ0 + merge(τ_1..τ_4)`` for each value of its grid,
scores each on the validation split (mean accuracy over the four domains) and reports the test accuracy
of the best one only. The test split never takes part in a choice.

Example:
    >>> best, scores = select_on_validation((0.3, 0.5, 1.0), lambda lam: val_accuracy(lam))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import shiftkit as sk
from shiftkit.recipes.learn import text_batches
from shiftkit.recipes.vader_experts import (
    DOMAINS,
    Experts,
    ExpertSettings,
    VaderSplits,
    evaluate,
    pooled,
    with_delta,
)

__all__ = [
    "GRIDS",
    "Grid",
    "MergeVaderSettings",
    "merge_rows",
    "model_row",
    "select_on_validation",
    "suite_settings",
]


@dataclass(frozen=True, kw_only=True)
class MergeVaderSettings(ExpertSettings):
    """A ``merge-vader`` run: the experts' settings plus those of merging and routing them.

    Attributes:
        atlas_epochs: passes of aTLAS over the validation split.
        atlas_lr: aTLAS's rate. Λ starts at 0 and Adam moves each λ by about ``lr`` per step; with 48 steps
            (the paper's 1e-3 assumes thousands; its few-shot runs use 0.1) 0.05 lets λ reach the ~1 that
            task arithmetic picks here (at 0.02 the learned λ averaged 0.1 and aTLAS trailed TA by 1 point).
        router_epochs: passes of the learned router over the validation split (each step runs the routed
            encoder forward and backward: 4 epochs of 256 sentences = 64 steps, about a minute on 2 cores).
        router_lr: its AdamW rate (PSEC's 3e-4 is for 10⁶ steps; 64 steps need a larger one).
        grid: ``"small"`` (≤ 3 values per merge method) or ``"one"`` (the first value only: --quick).
    """

    atlas_epochs: int = 3
    atlas_lr: float = 0.05
    router_epochs: int = 4
    router_lr: float = 3e-3
    grid: str = "small"


def suite_settings(data: VaderSplits) -> MergeVaderSettings:
    """``data.settings`` as the suite's settings (the splits were loaded for a ``merge-vader`` run).

    Raises:
        ShiftkitError: the splits were loaded with plain :class:`ExpertSettings`.
    """
    s = data.settings
    if not isinstance(s, MergeVaderSettings):
        raise sk.ShiftkitError(f"merge-vader needs MergeVaderSettings, got {type(s).__name__}")
    return s


@dataclass(frozen=True)
class Grid:
    """One merge method's validation grid: ``param`` takes each of ``values``; ``fixed`` are held constant.

    ``values`` are in order of preference: on a validation tie the earlier value wins. ``scale``: the
    parameter only multiplies the merged shift (``merge(λ) = λ · merge(1)``, true of every ``lambda_``
    below), so the method runs once and each grid value rescales its result: one merge of 4 × 22.7M
    parameters per method instead of three.
    """

    param: str | None = None
    values: tuple[Any, ...] = ()
    fixed: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    scale: bool = False


# The grid is over λ, the coefficient that matters most when merging 4 task vectors (methods leave their
# other parameters at their defaults, e.g. TIES density 0.2, DARE density 0.1, PCB ratio 0.1). Methods with
# normalize off *sum* the 4 vectors (task_arithmetic, dare_*, breadcrumbs*), so λ = 0.25 would be their
# mean; TIES (mergekit semantics, normalize on) and PCB are weighted *means*, so λ = 4 is their sum. The
# four domains share one task (sentiment), so their vectors largely agree and the sum works well: a first
# run with grids (0.3, 0.5, 1.0) and (1.0, 1.5, 2.0) chose the largest value for every method (2 epochs of
# 16 steps leave short task vectors), hence grids that reach 2x the sum. ≤ 3 values each.
SUM = (0.5, 1.0, 2.0)
MEAN = (1.0, 2.0, 4.0)
GRIDS: dict[str, Grid] = {
    "linear": Grid(note="uniform soup: the mean of the task vectors (normalize=True)"),
    "task_arithmetic": Grid("lambda_", SUM, note="θ0 + λ Σ τ_t", scale=True),
    "ties": Grid("lambda_", MEAN, note="trim to 20 %, elect sign, disjoint mean, × λ", scale=True),
    "dare_linear": Grid("lambda_", SUM, note="drop 90 % at random (L1 rescale), λ Σ τ̃_t", scale=True),
    "dare_ties": Grid("lambda_", SUM, note="drop 90 %, elect sign, λ Σ (no mean)", scale=True),
    "slerp": Grid("t", (0.5, 0.3, 0.7), note="pair only: tweets ↔ movies task vectors (n/a for 4 inputs)"),
    "breadcrumbs": Grid("lambda_", SUM, note="drop the top 1 % and the bottom 10 % of |τ|, λ Σ", scale=True),
    "breadcrumbs_ties": Grid("lambda_", SUM, note="breadcrumbs masks, TIES sign election, λ Σ", scale=True),
    "model_stock": Grid(note="the average pulled toward θ0 by the task vectors' angle (no coefficient)"),
    "pcb": Grid("lambda_", MEAN, note="parameter competition balancing (ratio 0.1), × λ", scale=True),
}
#: merge methods that are not one call of ``sk.merge`` on the task vectors (rows built separately)
SPECIAL: tuple[str, ...] = ("atlas",)


def select_on_validation(
    values: Sequence[Any], score: Callable[[Any], float]
) -> tuple[Any, dict[str, float]]:
    """The grid value with the best validation score (earliest on a tie) and every score by ``str(value)``.

    ``score`` must evaluate on the validation split; nothing else is consulted.

    Raises:
        ShiftkitError: an empty grid.

    Example:
        >>> select_on_validation((0.3, 0.5, 1.0), {0.3: 0.7, 0.5: 0.8, 1.0: 0.8}.__getitem__)
        (0.5, {'0.3': 0.7, '0.5': 0.8, '1.0': 0.8})
    """
    if not values:
        raise sk.ShiftkitError("select_on_validation needs at least one grid value")
    scores = {str(v): float(score(v)) for v in values}
    best = max(values, key=lambda v: (scores[str(v)], -list(values).index(v)))
    return best, scores


def model_row(
    data: VaderSplits, label: str, group: str, kind: str, delta: sk.Shift | None, **extra: Any
) -> dict[str, Any]:
    """Test ``θ0 + delta`` on every domain: a table row with ``accuracy``, ``mean`` and ``mixed``.

    Example:
        >>> row = model_row(data, "θ0", "base", "-", None)
    """
    with with_delta(data, delta) as model:
        acc = evaluate(model, data.test_batches)
    row: dict[str, Any] = {"row": label, "group": group, "kind": kind, "accuracy": acc}
    row.update(mean=sum(acc.values()) / len(acc), mixed=pooled(acc, data), coef="", seconds=0.0, notes="")
    row.update(extra)
    return row


def _val_mean(data: VaderSplits, delta: sk.Shift) -> float:
    with with_delta(data, delta) as model:
        acc = evaluate(model, data.val_batches)
    return sum(acc.values()) / len(acc)


def _grid_for(name: str, one: bool, seed: int) -> Grid:
    from shiftkit.merging.registry import get_merge_method

    grid = GRIDS.get(name, Grid(note="method defaults (no grid in merge_vader GRIDS)"))
    accepted = set(get_merge_method(name).params)
    if grid.param is not None and grid.param not in accepted:  # a method whose parameters changed
        grid = Grid(note=f"{grid.note}; defaults: it has no {grid.param!r}")
    fixed = {k: v for k, v in grid.fixed.items() if k in accepted}
    if "seed" in accepted:
        fixed.setdefault("seed", seed)  # DARE's random drop: seeded by the run's seed
    values = grid.values
    if one and values:
        values = (values[0],)
    return Grid(grid.param, values, fixed, grid.note, grid.scale)


def _merge_one(
    data: VaderSplits, name: str, kind: str, tvs: dict[str, sk.Shift], one: bool
) -> dict[str, Any]:
    grid = _grid_for(name, one, data.settings.seed)
    inputs = [tvs[d] for d in DOMAINS[:2]] if name == "slerp" else [tvs[d] for d in DOMAINS]
    t0 = time.perf_counter()

    unit = sk.merge(inputs, method=name, **grid.fixed) if grid.scale else None

    def build(value: Any) -> sk.Shift:
        if unit is not None:
            return float(value) * unit
        params = dict(grid.fixed)
        if grid.param is not None:
            params[grid.param] = value
        return sk.merge(inputs, method=name, **params)

    if grid.param is None:
        best, scores, merged = None, dict[str, float](), build(None)
    else:
        best, scores = select_on_validation(grid.values, lambda v: _val_mean(data, build(v)))
        merged = build(best)
    seconds = time.perf_counter() - t0
    coef = "" if grid.param is None else f"{grid.param.rstrip('_')}={best}"
    label = f"{kind} merge: {name}" + (f" ({DOMAINS[0]}+{DOMAINS[1]})" if name == "slerp" else "")
    return model_row(
        data,
        label,
        "merge",
        kind,
        merged,
        method=name,
        coef=coef,
        val_scores=scores,
        seconds=seconds,
        notes=grid.note,
        fixed={k: v for k, v in grid.fixed.items()},
    )


def _atlas_rows(
    data: VaderSplits, kind: str, tvs: dict[str, sk.Shift], progress: bool
) -> list[dict[str, Any]]:
    s = suite_settings(data)
    union = [data.val[d] for d in DOMAINS]
    from shiftkit.recipes.learn import EncodedTexts

    val = EncodedTexts(
        [x for e in union for x in e.input_ids], [y for e in union for y in e.labels], union[0].pad_id
    )
    rows = []
    for objective in ("supervised", "entropy"):
        torch.manual_seed(s.seed)
        batches = list(text_batches(val, s.batch_size))  # shuffled: every batch mixes the domains
        t0 = time.perf_counter()
        with with_delta(data, None) as model:
            res = sk.learn_atlas(
                model,
                [tvs[d] for d in DOMAINS],
                batches,
                objective=objective,
                epochs=s.atlas_epochs,
                lr=s.atlas_lr,
                progress=progress,
            )
        seconds = time.perf_counter() - t0
        lam = torch.tensor([v for c in res.coefficients.values() for v in c]).reshape(-1, len(DOMAINS))
        what = "labelled" if objective == "supervised" else "unlabelled (entropy)"
        rows.append(
            model_row(
                data,
                f"{kind} merge: atlas ({objective})",
                "merge",
                kind,
                res.shift,
                method="atlas",
                coef=f"mean λ={float(lam.mean()):.2f}",
                seconds=seconds,
                val_scores={},
                notes=f"blockwise λ learned on the {what} validation split of all domains, "
                f"{len(res.history)} steps, lr {s.atlas_lr:g}",
            )
        )
    return rows


def merge_rows(
    data: VaderSplits,
    experts: Experts,
    methods: Sequence[str],
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """One row per (method, full | LoRA); methods that fail are returned with their error instead.

    Example:
        >>> rows, failed = merge_rows(data, experts, sk.list_merge_methods())
    """
    say = log or (lambda _m: None)
    one = suite_settings(data).grid == "one"
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for kind, tvs in (("full", experts.full), ("lora", experts.lora_delta)):
        if not tvs:
            continue
        for name in methods:
            t0 = time.perf_counter()
            try:
                new = (
                    _atlas_rows(data, kind, tvs, progress)
                    if name == "atlas"
                    else [_merge_one(data, name, kind, tvs, one)]
                )
            except Exception as err:  # one method's failure is reported in the table's notes; the rest go on
                failed.append({"row": f"{kind} merge: {name}", "error": f"{type(err).__name__}: {err}"})
                say(f"{kind} merge {name} FAILED: {type(err).__name__}: {err}")
                continue
            rows += new
            for r in new:
                say(
                    f"{r['row']}: mean {r['mean']:.3f}, {r['coef'] or 'no grid'}, "
                    f"{time.perf_counter() - t0:.0f} s"
                )
    return rows, failed
