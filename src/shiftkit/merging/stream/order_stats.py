"""Exact streaming order statistics (k-th largest magnitude, quantiles) over many tensors.

Global merge methods (original-paper TIES trimming, PCB quantiles) need an order statistic of one task's
values over the *whole* model — ``s[j]`` of the sorted concatenation of every tensor, ``d`` up to 10¹⁰ —
without materialising it. :class:`OrderStatistics` finds ``s[j]`` exactly in at most four passes over the
tensors, keeping O(bins + cap) memory per query:

1. **min/max pass**: the range ``[kmin, kmax]`` of the values' order keys and the count ``d``. The key is
   the float32 bit pattern made monotone (``bits`` for ``x ≥ 0``, ``bits ^ 0x7FFFFFFF`` for ``x < 0``), so
   for magnitudes its high bits are the binary exponent and leading mantissa bits: a bin over keys is a
   bin over ``log2|x|`` whose width adapts to the min/max exponent.
2. **log2 histogram pass**: ``bins`` (4096) equal key ranges over ``[kmin, kmax]``; walking the cumulative
   counts gives the bin holding rank ``j`` and the number of values below it.
3. **candidate pass**: if that bin holds at most ``cap`` values they are collected and sorted (exact);
   otherwise the bin is **sub-histogrammed** (another 4096 bins over its key range).
4. one more candidate/sub-histogram pass: a key range of ``2³²`` shrinks by ``4096`` per histogram, so a
   third histogram has one key per bin and is exact whatever the number of ties.

Ties (:class:`KthLargestMagnitude`): ``"keep_all"`` keeps every ``|x| ≥ thr`` (original TIES / ComPEFT);
``"exact_k"`` keeps ``|x| > thr`` and the first ``k − #{|x| > thr}`` entries equal to ``thr`` in stream
order (flattened, tensors in observation order) — the stable tie-break of :func:`..._ops.topk_mask`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError

__all__ = ["KthLargestMagnitude", "OrderStatistics", "decode_key", "order_key"]

_FLIP = 0x7FFFFFFF


def order_key(x: Tensor) -> Tensor:
    """Monotone int64 key of float32 values: ``a < b ⇔ key(a) < key(b)`` (−0.0 counts as +0.0).

    Example:
        >>> order_key(torch.tensor([-2.0, -0.0, 0.0, 1.0])).tolist()[1:3]
        [0, 0]
    """
    bits = (x.reshape(-1).to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ _FLIP, bits)


def decode_key(key: int) -> Tensor:
    """Float32 scalar whose :func:`order_key` is ``key``.

    Example:
        >>> decode_key(int(order_key(torch.tensor([-1.5]))[0]))
        tensor(-1.5000)
    """
    bits = key ^ _FLIP if key < 0 else key
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]


class _Query:
    """Narrowing state of one order statistic ``s[j]`` of one stream."""

    def __init__(self, j: int, lo: int, width: int) -> None:
        self.j = j  # rank still to find inside [lo, lo + width)
        self.lo = lo
        self.width = width
        self.less = 0  # values known to be below lo
        self.mode = "hist"
        self.counts: Tensor | None = None
        self.found: list[Tensor] = []
        self.value: Tensor | None = None
        self.equal = 0


class OrderStatistics:
    """Exact ascending order statistics ``s[j]`` of several value streams, in ``n_passes`` passes.

    Call :meth:`observe` for every tensor of every stream in each pass ``0 .. n_passes − 1`` and
    :meth:`end_pass` after each pass; passes after all queries are resolved cost nothing. ``n_passes`` is
    the worst case (4 with 4096 bins); a candidate pass usually resolves every query by pass 2.

    Args:
        n_streams: number of independent streams (e.g. one per task).
        ranks: ``ranks(d)`` → the 0-based ascending ranks wanted for a stream of ``d`` values.
        bins: histogram bins per pass (default 4096: 32 KiB of counts, 3 levels cover 2³² keys).
        cap: largest bin whose values are collected and sorted instead of sub-histogrammed.

    Example:
        >>> st = OrderStatistics(1, lambda d: [d // 2])
        >>> for p in range(st.n_passes):
        ...     st.observe(p, 0, torch.tensor([3.0, 1.0, 2.0])); st.end_pass(p)
        >>> st.value(0, 0)
        tensor(2.)
    """

    def __init__(
        self, n_streams: int, ranks: Callable[[int], Sequence[int]], *, bins: int = 4096, cap: int = 1 << 16
    ) -> None:
        if bins < 2:
            raise ShiftkitError(f"OrderStatistics needs bins >= 2, got {bins}")
        self.n_streams = n_streams
        self.ranks = ranks
        self.bins = bins
        self.cap = cap
        self.count = [0] * n_streams
        self.kmin: list[int | None] = [None] * n_streams
        self.kmax: list[int | None] = [None] * n_streams
        self.queries: list[list[_Query]] = [[] for _ in range(n_streams)]
        levels, width = 0, 1 << 32  # worst case: histogram levels until one key per bin
        while width > 1:
            width, levels = -(-width // bins), levels + 1
        #: min/max pass + histogram/candidate passes (4 with the default 4096 bins)
        self.n_passes = 1 + levels

    @property
    def done(self) -> bool:
        """Whether every query has its exact value."""
        return bool(self.queries[0]) and all(q.value is not None for qs in self.queries for q in qs)

    def observe(self, pass_index: int, stream: int, values: Tensor) -> None:
        """Accumulate one tensor of ``stream`` (any shape, float) for pass ``pass_index``."""
        if pass_index == 0:
            if values.numel() == 0:
                return
            key = order_key(values)
            lo, hi = int(key.min()), int(key.max())
            old_lo, old_hi = self.kmin[stream], self.kmax[stream]
            self.kmin[stream] = lo if old_lo is None else min(old_lo, lo)
            self.kmax[stream] = hi if old_hi is None else max(old_hi, hi)
            self.count[stream] += values.numel()
            return
        active = [q for q in self.queries[stream] if q.value is None]
        if not active or values.numel() == 0:
            return
        key = order_key(values)
        for q in active:
            inside = key[(key >= q.lo) & (key < q.lo + q.width)]
            if q.mode == "collect":
                q.found.append(inside)
                continue
            step = -(-q.width // self.bins)
            n_bins = -(-q.width // step)
            hist = torch.bincount((inside - q.lo) // step, minlength=n_bins)
            q.counts = hist if q.counts is None else q.counts + hist

    def end_pass(self, pass_index: int) -> None:
        """Resolve pass ``pass_index``: set up the ranks (pass 0) or narrow every query."""
        if pass_index == 0:
            for s in range(self.n_streams):
                d = self.count[s]
                lo, hi = self.kmin[s], self.kmax[s]
                wanted = list(self.ranks(d))
                if d == 0 or lo is None or hi is None:
                    if wanted:
                        raise ShiftkitError(f"order statistic of stream {s}: it has no values")
                    continue
                for j in wanted:
                    if not 0 <= j < d:
                        raise ShiftkitError(f"order statistic rank {j} out of range for {d} values")
                self.queries[s] = [_Query(j, lo, hi - lo + 1) for j in wanted]
            return
        for qs in self.queries:
            for q in qs:
                if q.value is not None:
                    continue
                if q.mode == "collect":
                    keys = torch.sort(torch.cat(q.found)).values if q.found else torch.empty(0)
                    k = int(keys[q.j])
                    q.value = decode_key(k)
                    q.less += int((keys < k).sum())
                    q.equal = int((keys == k).sum())
                    q.found = []
                    continue
                if q.counts is None:
                    raise ShiftkitError("OrderStatistics.end_pass called for a pass with no observed values")
                step = -(-q.width // self.bins)
                cum = torch.cumsum(q.counts, 0)
                b = int(torch.searchsorted(cum, torch.tensor(q.j), right=True))
                before = int(cum[b - 1]) if b > 0 else 0
                in_bin = int(q.counts[b])
                q.counts = None
                q.less += before
                q.j -= before
                q.lo += b * step
                q.width = min(step, q.width - b * step)
                if q.width == 1:
                    q.value, q.equal = decode_key(q.lo), in_bin
                elif in_bin <= self.cap:
                    q.mode = "collect"

    def value(self, stream: int, query: int) -> Tensor:
        """The float32 scalar ``s[j]`` of query ``query`` (index into ``ranks(d)``) of ``stream``."""
        v = self.queries[stream][query].value
        if v is None:
            raise ShiftkitError("order statistic not resolved yet: run all n_passes passes first")
        return v

    def tally(self, stream: int, query: int) -> tuple[int, int, int]:
        """``(#values < s[j], #values == s[j], d)`` for query ``query`` of ``stream``."""
        q = self.queries[stream][query]
        return q.less, q.equal, self.count[stream]


class KthLargestMagnitude:
    """Exact global k-th largest ``|x|`` per stream, and the matching keep-masks.

    Args:
        n_streams: number of streams (e.g. tasks).
        k: ``k(d)`` → how many entries to keep for a stream of ``d`` values (1 ≤ k ≤ d).
        ties: ``"keep_all"`` (keep ``|x| ≥ thr``) or ``"exact_k"`` (exactly k, first ties in stream order).

    Example:
        >>> sel = KthLargestMagnitude(1, lambda d: 2, ties="exact_k")
        >>> xs = [torch.tensor([1.0, -3.0]), torch.tensor([1.0, 0.5])]
        >>> for p in range(sel.n_passes):
        ...     for x in xs: sel.observe(p, 0, x)
        ...     sel.end_pass(p)
        >>> [sel.keep_mask(0, x).tolist() for x in xs]
        [[True, True], [False, False]]
    """

    def __init__(self, n_streams: int, k: Callable[[int], int], *, ties: str = "keep_all") -> None:
        if ties not in ("keep_all", "exact_k"):
            raise ShiftkitError(f"unknown ties {ties!r}; use 'keep_all' or 'exact_k'")
        self.ties = ties
        self.k = k
        self.stats = OrderStatistics(n_streams, lambda d: [d - k(d)])
        self.n_passes = self.stats.n_passes
        self._used = [0] * n_streams

    def observe(self, pass_index: int, stream: int, values: Tensor) -> None:
        """Accumulate the magnitudes of one tensor of ``stream``."""
        self.stats.observe(pass_index, stream, values.abs())

    def end_pass(self, pass_index: int) -> None:
        """Finish pass ``pass_index``."""
        self.stats.end_pass(pass_index)

    def threshold(self, stream: int) -> Tensor:
        """The k-th largest ``|x|`` of ``stream`` (float32 scalar)."""
        return self.stats.value(stream, 0)

    def keep_mask(self, stream: int, values: Tensor) -> Tensor:
        """Keep-mask of one tensor; with ``"exact_k"`` call it for the tensors in observation order."""
        thr = self.threshold(stream).to(values.device)
        mag = values.abs().to(torch.float32)
        if self.ties == "keep_all":
            return mag >= thr
        less, equal, d = self.stats.tally(stream, 0)
        quota = self.k(d) - (d - less - equal)
        eq = mag == thr
        keep = (mag > thr) | (
            eq & ((torch.cumsum(eq.reshape(-1), 0) + self._used[stream]) <= quota).reshape(eq.shape)
        )
        self._used[stream] += int(eq.sum())
        return keep
