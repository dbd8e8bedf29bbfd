"""PCB-Merging — Parameter Competition Balancing (Du et al., NeurIPS 2024, https://arxiv.org/abs/2410.02396).

Reference code duguodong7/pcb-merging (``pcb-merging.py``). On the ``n × d`` matrix ``T`` of flattened shifts
(rows = tasks, sorted keys):

1. ``A = qclamp(|T|; c, c)``, ``C = sgn(T) ⊙ A`` where ``qclamp`` clamps each row to its sorted values
   ``[s[⌊d·c⌋], s[⌊d(1−c) − 1⌋]]``;
2. intra-balancing ``β_intra = exp(n · mm(A)²)`` with ``mm`` the row-wise min–max normalisation;
3. inter-balancing ``β_inter = tanh(T ⊙ Σ_j T_j)`` (``inter="root"``: root and NLP scripts) or
   ``β_inter,i = Σ_j tanh(N_i ⊙ N_j)``, ``N = sgn(T) ⊙ mm(A)`` (``inter="vision"``: ``pcb_ES.py``);
4. ``β = β_intra ⊙ β_inter``; ``β̃ = mm(qclamp(β; 1 − r, 0))`` — every entry at or below the row's
   ``s[⌊d(1−r)⌋]`` of the *signed* β becomes 0, the row maximum 1 (``r`` = kept fraction);
5. ``τ = λ · Σ_i λ_i β̃_i ⊙ C_i / max(Σ_i β̃_i, 1e-12)``.

Arithmetic is float32 as the reference; order statistics are exact (``torch.kthvalue``). A row whose ``mm``
denominator is 0 (e.g. an all-zero shift) gets 0 instead of NaN, so such a task has ``β̃ = 0``.
``scope="per_tensor"`` computes every statistic per tensor instead (a labelled approximation, one pass).
Streaming (:class:`PCBPasses`, 8 passes at most) finds the same order statistics with the exact
streaming selector of :mod:`shiftkit.merging.stream.order_stats` and reproduces the in-memory result
bit for bit.
:func:`search_pcb_coefficients` tunes the per-task ``λ_i`` (the reference's optional evolutionary stage).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from shiftkit.core.functional import kth_smallest
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError
from shiftkit.merging.registry import register_merge
from shiftkit.merging.stream.multipass import register_multipass
from shiftkit.merging.stream.order_stats import OrderStatistics

__all__ = ["PCBPasses", "pcb", "pcb_multipass", "search_pcb_coefficients"]

INTER = ("root", "vision")


def _ranks_a(d: int, c: float) -> list[int]:
    return [int(d * c), int(d * (1 - c) - 1)]  # qclamp(|T|; c, c), the reference's index arithmetic


def _ranks_b(d: int, r: float) -> list[int]:
    return [int(d * (1 - r)), d - 1]  # qclamp(β; 1 − r, 0): lower bound and the row max


def _mm(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    den = hi - lo
    if bool(den > 0):
        return (x - lo) / den
    return torch.zeros_like(x)


def _select(flat: Tensor, ranks: list[int]) -> list[Tensor]:
    flat = flat + 0.0  # −0.0 → +0.0, as the streaming selector
    return [kth_smallest(flat, j) for j in ranks]


def _beta(xs: list[Tensor], a_stats: list[list[Tensor]], inter: str) -> tuple[list[Tensor], list[Tensor]]:
    """Clamped shifts ``C_i`` and PCB scores ``β_i`` of one tensor given the per-task |τ| bounds."""
    n = len(xs)
    cs, mms, signs = [], [], []
    for x, (lo, hi) in zip(xs, a_stats, strict=True):
        a = torch.clamp(x.abs(), lo, hi)
        amin, amax = torch.clamp(lo, lo, hi), torch.clamp(hi, lo, hi)
        sign = torch.sign(x)
        cs.append(sign * a)
        mms.append(_mm(a, amin, amax))
        signs.append(sign)
    betas = []
    if inter == "root":
        colsum = xs[0]
        for x in xs[1:]:
            colsum = colsum + x
        for x, m in zip(xs, mms, strict=True):
            betas.append(torch.exp(n * m**2) * torch.tanh(x * colsum))
    else:
        ns = [s * m for s, m in zip(signs, mms, strict=True)]
        for ni, m in zip(ns, mms, strict=True):
            acc = torch.tanh(ni * ns[0])
            for nj in ns[1:]:
                acc = acc + torch.tanh(ni * nj)
            betas.append(torch.exp(n * m**2) * acc)
    return cs, betas


def _scales(betas: list[Tensor], b_stats: list[list[Tensor]]) -> list[Tensor]:
    return [_mm(torch.clamp(b, lo, hi), lo, hi) for b, (lo, hi) in zip(betas, b_stats, strict=True)]


def _combine(cs: list[Tensor], scales: list[Tensor], lambdas: Sequence[float], lambda_: float) -> Tensor:
    num = (cs[0] * lambdas[0]) * scales[0]
    den = scales[0]
    for c, s, lam in zip(cs[1:], scales[1:], lambdas[1:], strict=True):
        num = num + (c * lam) * s
        den = den + s
    return num / torch.clamp(den, min=1e-12) * lambda_


def _check(n: int, ratio: float, clamp: float, inter: str, lambdas: Sequence[float] | None) -> list[float]:
    if not 0.0 < ratio <= 1.0:
        raise ShiftkitError(f"pcb ratio (kept fraction) must be in (0, 1], got {ratio}")
    if not 0.0 <= clamp < 0.5:
        raise ShiftkitError(f"pcb clamp must be in [0, 0.5), got {clamp}")
    if inter not in INTER:
        raise ShiftkitError(f"unknown pcb inter {inter!r}; use 'root' or 'vision'")
    if lambdas is None:
        return [1.0] * n
    if len(lambdas) != n:
        raise ShiftkitError(f"pcb got {len(lambdas)} lambdas for {n} shifts")
    return [float(v) for v in lambdas]


def _check_weights(weights: Sequence[float]) -> None:
    if any(w != 1.0 for w in weights):
        raise ShiftkitError("pcb has no per-shift weights; pass per-task coefficients as lambdas=[...]")


def _pcb_parts(
    tensors: list[dict[str, Tensor]], *, ratio: float, clamp: float, inter: str, scope: str
) -> dict[str, tuple[list[Tensor], list[Tensor]]]:
    """Per key: the clamped shifts ``C_i`` and the scales ``β̃_i`` (materialised reference math)."""
    if scope not in ("global", "per_tensor"):
        raise ShiftkitError(f"unknown pcb scope {scope!r}; use 'global' or 'per_tensor'")
    keys = sorted(tensors[0])
    groups = [keys] if scope == "global" else [[k] for k in keys]
    out: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    for group in groups:
        flats = [torch.cat([t[k].reshape(-1) for k in group]) for t in tensors]
        d = flats[0].numel()
        if d == 0:
            for k in group:
                out[k] = ([t[k] for t in tensors], [torch.zeros_like(t[k]) for t in tensors])
            continue
        a_stats = [_select(f.abs(), _ranks_a(d, clamp)) for f in flats]
        parts = {k: _beta([t[k] for t in tensors], a_stats, inter) for k in group}
        b_flat = [torch.cat([parts[k][1][i].reshape(-1) for k in group]) for i in range(len(tensors))]
        b_stats = [_select(f, _ranks_b(d, ratio)) for f in b_flat]
        for k in group:
            cs, betas = parts[k]
            out[k] = (cs, _scales(betas, b_stats))
    return out


# no setting keeps every entry: step 4's min–max normalisation zeroes each task's least-balanced one
@register_merge("pcb", weighting="none", lossless={"ratio": 1.0, "clamp": 0.0}, drops_entries=True)
def pcb(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    ratio: float = 0.1,
    clamp: float = 0.01,
    inter: str = "root",
    lambda_: float = 1.0,
    lambdas: Sequence[float] | None = None,
    scope: str = "global",
) -> dict[str, Tensor]:
    """PCB merge of aligned shifts (Du et al., NeurIPS 2024; see the module docstring for the formulas).

    Args:
        tensors: n aligned float32 tensor dicts (any shapes, equal across tasks).
        weights: n weights; must be 1 (use ``lambdas`` for per-task coefficients).
        ratio: kept fraction r of each task's β (default 0.1, the middle of the {5, 10, 20} % of the run
            scripts; the vision ES script uses 0.05).
        clamp: outlier clamp fraction c (default 0.01 as the NLP and vision scripts; the root file uses 1e-4).
        inter: ``"root"`` (``tanh(T ⊙ Σ_j T_j)``, default) or ``"vision"`` (``Σ_j tanh(N_i ⊙ N_j)``).
        lambda_: global λ (default 1.0: the IA3 setting; tune on validation data, e.g. 0.8..2.2).
        lambdas: optional per-task coefficients λ_i; they multiply the numerator only.
        scope: ``"global"`` (the paper: statistics over the whole flattened model) or ``"per_tensor"``
            (approximation: every statistic per tensor).

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2, tv3], method="pcb", ratio=0.1)
        >>> vision = sk.merge([tv1, tv2], method="pcb", inter="vision", ratio=0.05, lambdas=[1.1, 0.9])
        >>> sk.apply_(base, merged)
    """
    _check_weights(weights)
    lams = _check(len(tensors), ratio, clamp, inter, lambdas)
    parts = _pcb_parts(tensors, ratio=ratio, clamp=clamp, inter=inter, scope=scope)
    return {k: _combine(parts[k][0], parts[k][1], lams, lambda_) for k in tensors[0]}


class PCBPasses:
    """Multi-pass computation of :func:`pcb` with ``scope="global"`` (streamed: never the ``n × d`` matrix).

    Passes 0–3: per-task bounds ``s[⌊dc⌋]``, ``s[⌊d(1−c)−1⌋]`` of ``|τ_i|`` (exact selector; min/max of
    ``A`` follow from them); passes 4–7: ``β`` per tensor (tensor-local given those bounds) and its
    per-task ``s[⌊d(1−r)⌋]`` and maximum; apply: ``β̃`` and the weighted merge per tensor.

    Example:
        >>> passes = pcb_multipass([1.0, 1.0], ratio=0.1)
        >>> merged = run_multipass_in_memory(passes, [tv1.tensors, tv2.tensors], [1.0, 1.0])
        >>> passes.n_passes
        8
    """

    def __init__(
        self, n: int, *, ratio: float, clamp: float, inter: str, lambda_: float, lambdas: list[float]
    ) -> None:
        self.inter = inter
        self.lambda_ = lambda_
        self.lambdas = lambdas
        self.a = OrderStatistics(n, lambda d: _ranks_a(d, clamp))
        self.b = OrderStatistics(n, lambda d: _ranks_b(d, ratio))
        self.half = self.a.n_passes
        self.n_passes = self.a.n_passes + self.b.n_passes

    def _a_stats(self) -> list[list[Tensor]]:
        return [[self.a.value(i, 0), self.a.value(i, 1)] for i in range(self.a.n_streams)]

    def observe(self, pass_index: int, key: str, tensors: list[Tensor], weights: list[float]) -> None:
        """Feed |τ_i| (passes 0–3) or β_i (passes 4–7) of tensor ``key`` to the selectors."""
        if pass_index < self.half:
            for i, x in enumerate(tensors):
                self.a.observe(pass_index, i, x.abs())
            return
        p = pass_index - self.half
        if p > 0 and self.b.done:
            return
        _, betas = _beta(tensors, self._a_stats(), self.inter)
        for i, b in enumerate(betas):
            self.b.observe(p, i, b)

    def end_pass(self, pass_index: int) -> None:
        """Resolve the selectors' pass."""
        if pass_index < self.half:
            self.a.end_pass(pass_index)
        else:
            self.b.end_pass(pass_index - self.half)

    def apply(self, key: str, tensors: list[Tensor], weights: list[float]) -> Tensor:
        """Merged tensor ``key``."""
        cs, betas = _beta(tensors, self._a_stats(), self.inter)
        b_stats = [[self.b.value(i, 0), self.b.value(i, 1)] for i in range(self.b.n_streams)]
        return _combine(cs, _scales(betas, b_stats), self.lambdas, self.lambda_)


@register_multipass("pcb")
def pcb_multipass(
    weights: list[float],
    *,
    ratio: float = 0.1,
    clamp: float = 0.01,
    inter: str = "root",
    lambda_: float = 1.0,
    lambdas: Sequence[float] | None = None,
    scope: str = "global",
) -> PCBPasses | None:
    """Multi-pass computation for :func:`pcb`: a :class:`PCBPasses`, or None for ``scope="per_tensor"``
    (tensor-local).

    Args:
        weights: n weights (must be 1); the other arguments as :func:`pcb`.

    Returns:
        The computation, or None.

    Example:
        >>> pcb_multipass([1.0, 1.0], scope="per_tensor") is None
        True
        >>> passes = pcb_multipass([1.0, 1.0], inter="vision")
    """
    _check_weights(weights)
    lams = _check(len(weights), ratio, clamp, inter, lambdas)
    if scope == "per_tensor":
        return None
    if scope != "global":
        raise ShiftkitError(f"unknown pcb scope {scope!r}; use 'global' or 'per_tensor'")
    return PCBPasses(len(weights), ratio=ratio, clamp=clamp, inter=inter, lambda_=lambda_, lambdas=lams)


def search_pcb_coefficients(
    shifts: Sequence[Shift],
    evaluate: Callable[[Shift], float],
    *,
    bounds: tuple[float, float] = (0.8, 1.3),
    budget: int = 100,
    seed: int = 0,
    **pcb_params: object,
) -> tuple[list[float], float]:
    """Search per-task PCB coefficients ``λ_i`` maximising ``evaluate(merged)`` (optional ES stage).

    Replaces the reference's nevergrad ``NGOpt`` (no extra dependency) with a seeded (1+1) evolution
    strategy: start at ``λ = 1`` (clipped to ``bounds``), Gaussian steps ``σ·N(0, I)`` clipped to the box,
    keep a candidate only if it scores strictly higher, and adapt ``σ`` by the 1/5-success rule
    (``×1.5`` after a success, ``×1.5^(−1/4)`` after a failure; ``σ₀ = (hi − lo)/4``). The PCB statistics are
    computed once; each evaluation only re-weights ``β̃_i ⊙ C_i``.

    Args:
        shifts: n delta shifts with equal keys and shapes.
        evaluate: scores a merged delta Shift; higher is better (e.g. mean validation accuracy).
        bounds: box for every λ_i (default (0.8, 1.3), the vision script's).
        budget: number of ``evaluate`` calls, including the start point (default 100, as the reference).
        seed: seed of the step generator.
        **pcb_params: ``ratio``, ``clamp``, ``inter``, ``lambda_``, ``scope`` for :func:`pcb`.

    Returns:
        ``(best λ list, its score)``; pass the list as ``sk.merge(..., method="pcb", lambdas=...)``.

    Example:
        >>> score = lambda s: -float(sum((s[k] - target[k]).norm() for k in target))
        >>> lams, best = search_pcb_coefficients([tv1, tv2], score, budget=60)
        >>> merged = sk.merge([tv1, tv2], method="pcb", lambdas=lams)
    """
    from shiftkit.merging.in_memory import _as_deltas, _check_inputs

    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo <= hi or budget < 1:
        raise ShiftkitError(
            f"search_pcb_coefficients needs bounds lo <= hi and budget >= 1, got {bounds}, {budget}"
        )
    unknown = sorted(set(pcb_params) - {"ratio", "clamp", "inter", "lambda_", "scope"})
    if unknown:
        raise ShiftkitError(f"search_pcb_coefficients: unknown pcb parameter(s) {unknown}")
    shifts = _as_deltas(shifts)
    keys = _check_inputs(shifts, "error")
    tensors = [{k: s.tensors[k].to(torch.float32) for k in keys} for s in shifts]
    ratio = float(pcb_params.get("ratio", 0.1))  # type: ignore[arg-type]
    clamp = float(pcb_params.get("clamp", 0.01))  # type: ignore[arg-type]
    inter = str(pcb_params.get("inter", "root"))
    scope = str(pcb_params.get("scope", "global"))
    lambda_ = float(pcb_params.get("lambda_", 1.0))  # type: ignore[arg-type]
    n = len(shifts)
    _check(n, ratio, clamp, inter, None)
    parts = _pcb_parts(tensors, ratio=ratio, clamp=clamp, inter=inter, scope=scope)
    terms = {}
    for k, (cs, scales) in parts.items():
        den = scales[0]
        for s in scales[1:]:
            den = den + s
        terms[k] = [c * s / torch.clamp(den, min=1e-12) * lambda_ for c, s in zip(cs, scales, strict=True)]
    dtypes = {k: shifts[0].tensors[k].dtype for k in keys}

    def score(lams: Tensor) -> float:
        merged = {
            k: sum((float(lam) * t for lam, t in zip(lams, ts, strict=True)), torch.zeros_like(ts[0]))
            for k, ts in terms.items()
        }
        out = {k: v.to(dtypes[k]) for k, v in merged.items()}
        value = float(evaluate(Shift(DELTA, None, out, {k: tuple(v.shape) for k, v in out.items()})))
        if math.isnan(value):
            raise ShiftkitError("search_pcb_coefficients: evaluate returned NaN")
        return value

    gen = torch.Generator().manual_seed(seed)
    best = torch.full((n,), 1.0, dtype=torch.float64).clamp(lo, hi)
    best_score = score(best)
    sigma = (hi - lo) / 4
    for _ in range(budget - 1):
        cand = (best + sigma * torch.randn(n, generator=gen, dtype=torch.float64)).clamp(lo, hi)
        value = score(cand)
        if value > best_score:
            best, best_score = cand, value
            sigma *= 1.5
        else:
            sigma *= 1.5 ** (-0.25)
    return [float(v) for v in best], best_score
