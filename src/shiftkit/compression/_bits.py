"""Bit-level codes for compressed shifts: packed bits, Golomb–Rice gap coding of sorted positions, and the
exact global magnitude threshold over many tensors (two passes, any number of tensors).

Golomb–Rice with parameter ``b`` codes a gap ``g ≥ 0`` as ``g >> b`` in unary (that many ones, then a zero)
and ``g mod 2^b`` in ``b`` bits. The unary parts and the remainders are kept in two streams, so both decode
without a per-symbol loop; the total is the same number of bits as the interleaved code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "golomb_decode",
    "golomb_encode",
    "golomb_estimate_bits",
    "golomb_parameter",
    "kth_largest_magnitude",
    "pack_bits",
    "unpack_bits",
]

_PHI = (1 + math.sqrt(5)) / 2


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Bits (0/1 or bool, any length) as bytes, most significant bit first."""
    return np.packbits(np.asarray(bits, dtype=np.uint8))


def unpack_bits(data: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` bits of ``data`` as a uint8 0/1 array."""
    return np.unpackbits(np.asarray(data, dtype=np.uint8), count=count)


def golomb_parameter(p: float) -> int:
    """The Golomb–Rice parameter ``b* = 1 + ⌊log2(ln(φ−1) / ln(1−p))⌋`` (clamped at 0) for density ``p``.

    Sattler et al.'s choice for geometric gaps between nonzeros kept with probability ``p``.
    """
    if p <= 0 or p >= 1:
        return 0
    return max(0, 1 + math.floor(math.log2(math.log(_PHI - 1) / math.log(1 - p))))


def golomb_estimate_bits(p: float, b: int) -> float:
    """Expected bits per position, i.i.d. density ``p``, parameter ``b``: ``b + 1/(1 − (1−p)^(2^b))``."""
    if p <= 0:
        return 0.0
    return b + 1 / (1 - (1 - p) ** (2**b))


def golomb_encode(positions: np.ndarray, b: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Code sorted distinct ``positions`` as gaps: ``(unary bytes, unary bit count, remainder bytes)``."""
    pos = np.asarray(positions, dtype=np.int64)
    n = pos.size
    if n == 0:
        return np.zeros(0, np.uint8), 0, np.zeros(0, np.uint8)
    gaps = np.diff(pos, prepend=-1) - 1
    q = gaps >> b
    length = int(q.sum()) + n
    unary = np.ones(length, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0
    if b:
        rem = gaps & ((1 << b) - 1)
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        rbits = ((rem[:, None] >> shifts) & 1).astype(np.uint8).ravel()
    else:
        rbits = np.zeros(0, np.uint8)
    return pack_bits(unary), length, pack_bits(rbits)


def golomb_decode(unary: np.ndarray, unary_bits: int, remainders: np.ndarray, n: int, b: int) -> np.ndarray:
    """Positions coded by :func:`golomb_encode` (``n`` of them)."""
    if n == 0:
        return np.zeros(0, np.int64)
    ubits = unpack_bits(unary, unary_bits)
    ends = np.flatnonzero(ubits == 0)
    if ends.size != n:
        raise ValueError(f"unary stream holds {ends.size} codes, expected {n}")
    q = np.diff(ends, prepend=-1) - 1
    gaps = q << b
    if b:
        rbits = unpack_bits(remainders, n * b).reshape(n, b).astype(np.int64)
        gaps += rbits @ (1 << np.arange(b - 1, -1, -1, dtype=np.int64))
    return np.cumsum(gaps + 1) - 1


def _key(x: Tensor) -> Tensor:
    # |x| as float32 bit patterns: non-negative floats order like their int32 patterns
    return x.detach().abs().to(torch.float32).reshape(-1).contiguous().view(torch.int32)


def kth_largest_magnitude(tensors: Callable[[], Iterable[Tensor]], k: int) -> float:
    """The exact ``k``-th largest ``|x|`` over all tensors that ``tensors()`` yields (1 ≤ k ≤ total size).

    Two passes, each calling ``tensors()`` afresh (so a streamed source reads each tensor twice and holds
    one at a time): a histogram of the upper 16 bits of the float32 patterns finds the bucket of the
    ``k``-th value, then the values inside that bucket are sorted. Memory: 32,768 counters and one bucket.
    """
    counts = torch.zeros(1 << 15, dtype=torch.int64)
    total = 0
    for t in tensors():
        key = _key(t)
        total += key.numel()
        counts += torch.bincount(key >> 16, minlength=1 << 15)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # above[i] = count in buckets >= i
    bucket = int(torch.nonzero(above >= k).max())
    higher = int(above[bucket + 1]) if bucket + 1 < counts.numel() else 0
    inside: list[Tensor] = []
    for t in tensors():
        key = _key(t)
        inside.append(key[(key >> 16) == bucket])
    vals = torch.sort(torch.cat(inside), descending=True).values
    return float(vals[k - higher - 1 : k - higher].view(torch.float32).item())
