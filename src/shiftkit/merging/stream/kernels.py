"""In-place blockwise TIES and DARE-TIES (mergekit semantics) for the streaming merge (private).

The registered :func:`shiftkit.merging.ties.ties` stacks the T shifts and builds several ``T × n``
temporaries; the streaming engine owns its τ buffers, so it can trim them in place and do the sign election
and the disjoint mean over blocks of 2¹⁶ elements. Same roundings in the same order, so the values equal
``ties(..., semantics="mergekit")`` exactly (tests check it), at a fraction of the memory and CPU time.
The exact k-th largest magnitude comes from a radix select instead of ``kthvalue`` on a full copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from shiftkit.core.functional import abs_sum64, kth_smallest

__all__ = [
    "KernelFn",
    "dare_ties_into_",
    "dare_ties_kernel",
    "owns_pool",
    "parallel_in",
    "parallel_map",
    "ties_into_",
    "ties_kernel",
]

#: ``kernel(acc, taus, weights, key)``: adds the merged shift of tensor ``key`` into ``acc`` in place, free to
#: overwrite the float32 ``taus`` it owns
KernelFn = Callable[[Tensor, list[Tensor], list[float], str], None]
#: the consensus rules the kernels implement (mergekit's names and PEFT's)
_CONSENSUS = ("sum", "total", "count", "frequency")

#: elements per block of the lean TIES kernel: 256 KiB of float32 temporaries (per thread), tiny next to a
#: large tensor
_BLOCK = 1 << 16

#: the streaming merge's worker pool and the thread allowed to use it (see :func:`parallel_in`)
_POOL: dict[str, Any] = {"pool": None, "owner": None}


@contextmanager
def parallel_in(pool: Any) -> Iterator[None]:
    """Let the kernels called from this thread split their work over ``pool`` (a ``ThreadPoolExecutor``).

    The streaming merge runs its largest tensors alone on the calling thread, while the pool is idle: the
    inputs' trims then run side by side and the election splits its blocks (torch releases the GIL in its
    operations). Calls from any other thread, such as the pool's own workers, stay sequential, so a worker
    never waits on its own pool.
    """
    _POOL.update(pool=pool, owner=threading.get_ident())
    try:
        yield
    finally:
        _POOL.update(pool=None, owner=None)


def owns_pool() -> bool:
    """Whether this thread runs inside :func:`parallel_in` (a large tensor alone, the workers idle)."""
    return _POOL["pool"] is not None and _POOL["owner"] == threading.get_ident()


def parallel_map(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, run on the streaming merge's idle workers when this thread may use them
    (inside :func:`parallel_in`; sequential anywhere else). ``fn`` must be safe to run concurrently: each
    call writing its own part of a tensor.

    Example:
        >>> parallel_map(lambda c: out[c].copy_(src[c]), chunks)
    """
    if len(items) < 2 or not owns_pool():
        return [fn(x) for x in items]
    return list(_POOL["pool"].map(fn, items))


def _blocks(n: int, size: int = 0) -> list[slice]:
    size = size or _BLOCK
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


#: ``_radix_kth`` histograms the top 16 bits of ``|x|`` (sign 0, 8 exponent, 7 mantissa bits: 2¹⁵ bins)
_RADIX_BINS = 1 << 15
#: up to this many entries the k-th largest ``|x|`` is a radix select over the whole tensor; above, a
#: sampled bracket and one blockwise pass (blocks of 2²⁰ when that bracket misses)
_SELECT_WHOLE, _RADIX_BLOCK = 1 << 22, 1 << 20
#: sample size and quantile margin of the bracket: it holds the k-th largest value unless the sample
#: quantile is off by > 0.01 (about 5 standard deviations at 65 536 samples)
_SAMPLE, _MARGIN = 1 << 16, 0.01


def _kth_largest_abs(flat: Tensor, k: int) -> tuple[Tensor, int, int]:
    """The exact k-th largest ``|x|`` (``1 <= k <= n``) and the counts of entries above it and equal to it.

    ``torch.kthvalue`` copies the whole tensor and selects in it. Instead, up to ``_SELECT_WHOLE`` entries,
    a radix select (:func:`_radix_kth`); above, a seeded random sample brackets the value, one blockwise
    pass counts the entries above the bracket and gathers the few inside it, and the shared exact selector
    (:func:`shiftkit.core.functional.kth_smallest`) runs on those only; a bracket that misses (a heavily
    tied tensor) falls back to the radix select in blocks. Either way the returned value is exactly
    ``kthvalue(|x|, n − k + 1)``.
    """
    n = flat.numel()
    if n <= _SELECT_WHOLE:
        return _radix_kth(flat, k, whole=True)
    gen = torch.Generator(device="cpu").manual_seed(n)
    idx = torch.randint(n, (_SAMPLE,), generator=gen).to(flat.device)
    sample = flat[idx].abs().sort().values
    q = 1.0 - k / n  # fraction of entries below the k-th largest
    lo = sample[max(int((q - _MARGIN) * _SAMPLE), 0)]
    hi = sample[min(int((q + _MARGIN) * _SAMPLE), _SAMPLE - 1)]
    above, inside = 0, []
    for b in _blocks(n):
        mag = flat[b].abs()
        above += int(torch.count_nonzero(mag > hi))
        inside.append(mag[(mag >= lo) & (mag <= hi)])
    cand = torch.cat(inside)
    rank = k - above  # the wanted value is the rank-th largest inside [lo, hi]
    if 1 <= rank <= cand.numel():
        thr = kth_smallest(cand, cand.numel() - rank)
        return thr, above + int(torch.count_nonzero(cand > thr)), int(torch.count_nonzero(cand == thr))
    return _radix_kth(flat, k, whole=False)


def _radix_kth(flat: Tensor, k: int, whole: bool) -> tuple[Tensor, int, int]:
    """:func:`_kth_largest_abs` by a radix select: the bit patterns of non-negative float32 values order
    like the values, so one pass histograms the top 16 bits of ``|x|``, the histogram names the bin holding
    the k-th largest and how many entries lie above it, and a second pass gathers that bin's entries for
    the exact selector. Every step is a torch operation (the GIL is released); ``whole=False`` goes in
    blocks of ``_RADIX_BLOCK``."""
    n = flat.numel()
    blocks = [slice(0, n)] if whole else _blocks(n, _RADIX_BLOCK)
    mag = flat.abs() if whole else None
    counts = torch.zeros(_RADIX_BINS, dtype=torch.int64, device=flat.device)
    for b in blocks:
        m = mag if mag is not None else flat[b].abs()
        counts += torch.bincount((m.view(torch.int32) >> 16).long(), minlength=_RADIX_BINS)
    from_top = counts.flip(0).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor(k, device=from_top.device)))
    hit = _RADIX_BINS - 1 - pos
    above = int(from_top[pos]) - int(counts[hit])
    parts = []
    for b in blocks:
        m = mag if mag is not None else flat[b].abs()
        parts.append(m[(m.view(torch.int32) >> 16) == hit])
    cand = torch.cat(parts)
    rank = k - above  # the wanted value is the rank-th largest of the bin
    thr = kth_smallest(cand, cand.numel() - rank)
    return thr, above + int(torch.count_nonzero(cand > thr)), int(torch.count_nonzero(cand == thr))


def _prune_(x: Tensor, density: float) -> None:
    """Zero all but the ``max(1, ⌊density·n⌋)`` largest ``|x|`` in place (ties: lower flat index first).

    The same selection as ``shiftkit.merging.consensus.topk_mask``, with block-sized temporaries only.
    """
    n = x.numel()
    if density >= 1.0:
        return
    k = min(max(int(density * n), 1), n) if density > 0 else 0  # mergekit keeps at least one entry
    if k <= 0:
        x.zero_()
        return
    flat = x.view(-1)
    thr, greater, equal_total = _kth_largest_abs(flat, min(k, n))
    quota = k - greater  # entries equal to thr still to keep, lowest flat index first
    # hardshrink keeps |x| > λ and writes +0.0 elsewhere, in one fused pass: with λ the float32 just below
    # thr, that is |x| >= thr (no float32 lies between them), the same bits as a masked fill
    below = float(torch.nextafter(thr.to(torch.float32), torch.zeros((), dtype=torch.float32)))
    if quota == equal_total:  # the usual case: keep exactly the entries >= thr
        for b in _blocks(n):
            flat[b].copy_(torch.nn.functional.hardshrink(flat[b], below))
        return
    # more entries tie at thr than the quota: keep the first `quota` of them by flat index
    seen = 0
    for b in _blocks(n):
        blk = flat[b]
        equal = blk.abs() == thr
        n_eq = int(torch.count_nonzero(equal))
        if n_eq:
            drop = equal & ((torch.cumsum(equal, 0) + seen) > quota)
            seen += n_eq
            blk.copy_(torch.nn.functional.hardshrink(blk, below).masked_fill_(drop, 0.0))
        else:
            blk.copy_(torch.nn.functional.hardshrink(blk, below))


def ties_into_(acc: Tensor, taus: list[Tensor], weights: list[float], params: dict[str, Any]) -> None:
    """``acc += ties(taus)`` (mergekit semantics) computed in place over blocks; ``taus`` are consumed.

    Trim each τ_t (:func:`_prune_`), ``u_t = w_t τ̂_t``, elect ``γ = sgn(Σ u_t)`` (or of ``Σ sgn(u_t)``;
    0 → +1), ``mixed = Σ_t [sgn(u_t) = γ] u_t`` divided by ``Σ_t [sgn(u_t) = γ] w_t`` (zeros → 1) when
    ``normalize``, times λ: the values of :func:`shiftkit.merging.ties.ties` exactly (the same roundings in
    the same order; only the sign of an all-zero result may differ), with block-sized temporaries instead
    of several ``T × n`` stacks, and about 5× less CPU time.

    Args:
        acc: float32 accumulator of the tensor's shape (θ0 for a model output, zeros for a delta), or
            ``taus[0]`` itself: the merged shift then replaces it.
        taus: T float32 shifts of that shape, owned by the caller; trimmed and scaled in place.
        weights: T weights.
        params: resolved ``ties`` parameters (``density``: one, or one per input; ``consensus``,
            ``normalize``, ``lambda_``).

    Example:
        >>> acc = theta0.clone()
        >>> ties_into_(acc, [tau1, tau2], [1.0, 1.0], {"density": 0.5, "consensus": "sum",
        ...            "normalize": True, "lambda_": 1.0})
    """
    from shiftkit.merging.sparsify import per_input

    densities = per_input(params["density"], len(taus), "TIES density")
    parallel_map(lambda td: _prune_(*td), list(zip(taus, densities)))
    _elect_into_(acc, taus, weights, params)


def dare_ties_into_(
    acc: Tensor, taus: list[Tensor], weights: list[float], params: dict[str, Any], key: str
) -> None:
    """``acc += dare_ties(taus)`` (mergekit semantics) in place: DARE drop and rescale, then the election.

    Each τ_t keeps the entries of ``dare_keep_mask(shape, density, key_seed(seed, key, t))`` and is rescaled
    (``"l1"``: by ``‖τ‖₁ / ‖kept‖₁``, unless either is < 1e-7; ``"inverse"``: by 1/density), exactly as
    :func:`shiftkit.merging.dare.dare_drop`; the sign election and disjoint sum follow without ``T × n``
    stacks.

    Args:
        acc: float32 accumulator (θ0 or zeros); taus: T float32 shifts, consumed; weights: T weights.
        params: resolved ``dare_ties`` parameters. key: the tensor name (it seeds the masks, so they do not
            depend on streaming order).

    Example:
        >>> dare_ties_into_(acc, [tau1, tau2], [1.0, 1.0], {"density": 0.3, "rescale": "l1", "seed": 0,
        ...                 "consensus": "sum", "normalize": False, "lambda_": 1.0}, "fc.weight")
    """
    from shiftkit.merging.sparsify import dare_keep_mask, key_seed, per_input

    rescale = params["rescale"]
    densities = per_input(params["density"], len(taus), "DARE density")
    for i, (t, density) in enumerate(zip(taus, densities)):
        if density >= 1.0:
            continue
        if density == 0.0:
            t.mul_(0.0)
            continue
        keep = dare_keep_mask(t.shape, density, key_seed(params["seed"], key, i))
        before = abs_sum64(t) if rescale == "l1" else None
        t.masked_fill_(~keep.to(t.device), 0.0)
        del keep
        if rescale == "inverse":
            t.div_(density)
        elif before is not None:  # l1_rescaled, in place
            after = abs_sum64(t)
            if not (before < 1e-7 or after < 1e-7):
                t.mul_(before / after)
    _elect_into_(acc, taus, weights, params)


def _elect_into_(acc: Tensor, taus: list[Tensor], weights: list[float], params: dict[str, Any]) -> None:
    """mergekit sign election and disjoint sum of already-trimmed shifts, blockwise, added to ``acc``.

    ``acc`` may be ``taus[0]`` itself: each block is then assigned (not added) once all inputs' values of
    that block have been read, so the result overwrites the first shift without a separate buffer.
    """
    count = params["consensus"] in ("count", "frequency")
    assign = bool(taus) and acc.data_ptr() == taus[0].data_ptr()
    for t, w in zip(taus, weights):
        if w != 1.0:  # u_t = w_t τ̂_t (a product with 1 is exact: skip it)
            t.mul_(w)
    flats = [t.view(-1) for t in taus]
    out = acc.view(-1)

    def run(blocks: list[slice]) -> None:
        for b in blocks:
            us = [f[b] for f in flats]
            votes = torch.sign(us[0]) if count else us[0].clone()
            for u in us[1:]:
                votes.add_(torch.sign(u) if count else u)
            gamma = torch.where(votes < 0, -1.0, 1.0)  # sgn(votes) with 0 → +1
            del votes
            mixed = torch.zeros_like(gamma)
            div = torch.zeros_like(gamma)
            for u, w in zip(us, weights):
                p = u * gamma  # |u| where sgn(u) = γ, else ≤ 0: one product replaces sign + compare + select
                if params["normalize"]:
                    div.add_(p > 0, alpha=w)
                mixed.add_(p.clamp_(min=0.0))
            mixed.mul_(gamma)  # Σ|u| of the agreeing entries, signed: negation commutes with rounding
            if params["normalize"]:
                mixed.div_(div.masked_fill_(div == 0, 1.0))
            if assign:
                out[b].copy_(mixed.mul_(params["lambda_"]))
            else:
                out[b].add_(mixed.mul_(params["lambda_"]))

    blocks = _blocks(out.numel())
    half = (len(blocks) + 1) // 2  # two contiguous halves: each block reads and writes only its own range
    parallel_map(run, [blocks[:half], blocks[half:]] if len(blocks) > 1 else [blocks])


def ties_kernel(params: Mapping[str, Any]) -> KernelFn | None:
    """The in-place kernel of ``ties`` for these parameters (``MergeSpec.kernel``), or None where only the
    general path computes them (paper or PEFT semantics, the global zero sign, an L1 rescale).

    Example:
        >>> kernel = ties_kernel({"density": 0.5, "semantics": "mergekit", "consensus": "sum", ...})
    """
    p = dict(params)
    if p.get("semantics") != "mergekit" or p.get("consensus") not in _CONSENSUS:
        return None
    if p.get("zero_sign") not in (None, "positive") or p.get("rescale", "none") != "none":
        return None
    return lambda acc, taus, weights, key: ties_into_(acc, taus, weights, p)


def dare_ties_kernel(params: Mapping[str, Any]) -> KernelFn | None:
    """The in-place kernel of ``dare_ties`` for these parameters (``MergeSpec.kernel``), or None.

    Example:
        >>> kernel = dare_ties_kernel({"density": 0.5, "rescale": "l1", "seed": 0, ...})
    """
    p = dict(params)
    if p.get("semantics") != "mergekit" or p.get("consensus") not in _CONSENSUS:
        return None
    if p.get("rescale") not in ("l1", "inverse", "none"):
        return None
    return lambda acc, taus, weights, key: dare_ties_into_(acc, taus, weights, p, key)
