"""Pure tensor math shared by methods, merging and compression. No modules, no state.

Conventions: a Linear weight is ``W ∈ R^{out×in}``, a Conv weight ``W ∈ R^{C_out×C_in/groups×k...}``;
"channel" means the output channel of the op a shift follows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from shiftkit.errors import ShiftkitError

__all__ = [
    "abs_sum64",
    "channel_axis",
    "channel_view",
    "dot64",
    "kaiming_uniform_a_sqrt5_",
    "kth_smallest",
    "lora_conv_delta",
    "lora_delta",
    "mean_pool",
    "norm64",
    "scale_rows",
    "scale_shift",
    "select_ranks",
    "topk_mask",
    "truncated_svd",
]

#: elements per block of the float64 reductions: 8 MiB of float64 scratch whatever the tensor's size
BLOCK64 = 1 << 20


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """Dense LoRA update ``scaling · B A``.

    Args:
        lora_a: ``(r, in)``.
        lora_b: ``(out, r)``.
        scaling: ``α/r`` (or ``α/√r`` for rsLoRA).

    Returns:
        ``(out, in)``.
    """
    return (lora_b @ lora_a) * scaling


def lora_conv_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """Dense update of a LoRA conv pair: a ``k×k`` conv to ``r`` channels followed by a ``1×1`` conv.

    Args:
        lora_a: ``(r, C_in, *kernel)``.
        lora_b: ``(C_out, r, 1, ..., 1)``.
        scaling: ``α/r``.

    Returns:
        ``(C_out, C_in, *kernel)``, the kernel of the single equivalent convolution.
    """
    r = lora_a.shape[0]
    delta = lora_b.reshape(lora_b.shape[0], r) @ lora_a.reshape(r, -1)
    return delta.reshape(lora_b.shape[0], *lora_a.shape[1:]) * scaling


def scale_rows(weight: Tensor, scale: Tensor) -> Tensor:
    """``diag(scale) · W`` for any weight whose first axis is the output channel.

    Args:
        weight: ``(out, ...)``.
        scale: ``(out,)``.
    """
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


def channel_view(vec: Tensor, ndim: int, axis: int) -> Tensor:
    """Reshape a per-channel vector to broadcast against a tensor of rank ``ndim`` on ``axis``.

    Args:
        vec: ``(C,)`` or, for LayerNorm, the normalised shape.
        ndim: rank of the activation.
        axis: channel axis of the activation (negative counts from the end).
    """
    if axis < 0:
        axis += ndim
    trailing = ndim - axis - vec.dim()
    return vec.reshape(*vec.shape, *([1] * trailing)) if trailing > 0 else vec


def kaiming_uniform_a_sqrt5_(tensor: Tensor) -> Tensor:
    """In place ``U(-1/√fan_in, 1/√fan_in)``: torch's default Linear init (Kaiming uniform, a=√5).

    Args:
        tensor: ``(out, in, ...)``; fan_in is the product of all axes but the first.
    """
    fan_in = tensor[0].numel() if tensor.dim() > 1 else tensor.numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def channel_axis(module: nn.Module, ndim: int) -> int:
    """The channel axis of ``module``'s output of rank ``ndim`` (negative, counted from the end).

    Linear and LayerNorm outputs carry channels last; convolutions, batch and group norms on axis 1
    (``-(spatial dims + 1)`` so unbatched inputs work too).
    """
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return -(module.weight.dim() - 1)
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.InstanceNorm1d):
        return -(ndim - 1) if ndim > 1 else -1
    return -1


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Average of the hidden states over the real (unpadded) tokens.

    Args:
        hidden: token states, shape ``(batch, seq, hidden)``.
        attention_mask: 1 for real tokens, 0 for padding, shape ``(batch, seq)``, or ``(batch, seq - p)``
            when prompt tuning prepended ``p`` virtual tokens (they are padded in as ones); ``None`` = every
            token.

    Returns:
        The pooled states, shape ``(batch, hidden)``.

    Example:
        >>> mean_pool(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]])).shape
        torch.Size([2, 4])
    """
    if attention_mask is None:
        return hidden.mean(1)
    extra = hidden.shape[1] - attention_mask.shape[1]
    if extra > 0:  # prompt tuning prepended `extra` virtual tokens: they count as real tokens
        ones = attention_mask.new_ones(attention_mask.shape[0], extra)
        attention_mask = torch.cat([ones, attention_mask], 1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


# --- whole-tensor reductions in float64 --------------------------------------------------------------------
# A float32 reduction over a large tensor loses precision (torch's CPU norm of 16.4M entries is 2e-4 low,
# of 2e8 entries 3 % low: enough to push SLERP's cosine over its lerp threshold). Merges that reduce over a
# whole tensor accumulate in float64, one block at a time, so the scratch stays at BLOCK64 entries.
def _blocks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    flats = [t.reshape(-1) for t in tensors]
    for i in range(0, flats[0].numel(), BLOCK64):
        yield tuple(f[i : i + BLOCK64].to(torch.float64) for f in flats)


def norm64(x: Tensor) -> float:
    """``‖x‖₂`` of a whole tensor (flattened), accumulated in float64 block by block.

    Example:
        >>> norm64(torch.tensor([3.0, 4.0]))
        5.0
    """
    total = 0.0
    for (b,) in _blocks(x):
        total += float(b.square().sum())
    return math.sqrt(total)


def dot64(a: Tensor, b: Tensor) -> float:
    """``⟨a, b⟩`` of two same-size tensors (flattened), accumulated in float64 block by block.

    Example:
        >>> dot64(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
        11.0
    """
    if a.numel() != b.numel():
        raise ValueError(f"dot64 needs tensors of one size, got {a.numel()} and {b.numel()}")
    total = 0.0
    for x, y in _blocks(a, b):
        total += float((x * y).sum())
    return total


def abs_sum64(x: Tensor) -> float:
    """``‖x‖₁`` of a whole tensor, accumulated in float64 block by block.

    Example:
        >>> abs_sum64(torch.tensor([1.0, -2.0]))
        3.0
    """
    total = 0.0
    for (b,) in _blocks(x):
        total += float(b.abs().sum())
    return total


# --- selection and factorisation ---------------------------------------------------------------------------
def kth_smallest(values: Tensor, j: int) -> Tensor:
    """Exact 0-based ``j``-th smallest entry of a 1-D float tensor, as a 0-d tensor on its device.

    On CPU ``numpy.partition`` (introselect, about 2× faster than ``torch.kthvalue`` on 10⁷ floats, same
    value); elsewhere ``torch.kthvalue``.

    Example:
        >>> kth_smallest(torch.tensor([3.0, 1.0, 2.0]), 0)
        tensor(1.)
    """
    if values.device.type == "cpu" and values.dtype in (torch.float16, torch.float32, torch.float64):
        import numpy as np

        arr = values.detach().contiguous().numpy()
        return torch.tensor(np.partition(arr, j)[j], dtype=values.dtype)
    return torch.kthvalue(values, j + 1).values


def select_ranks(values: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """Exact 0-based ``j``-th smallest entries of a float32 tensor, for several ``j`` at once (radix select).

    float32 bit patterns, mapped so that signed integers order like the floats, are histogrammed on their
    top 16 bits in one pass (blocks of :data:`BLOCK64`); each rank's bin is then gathered and finished with
    :func:`kth_smallest`. No copy of the whole tensor is sorted or partitioned, and every step is a torch
    operation that releases the GIL. Values must be finite; other dtypes go through :func:`kth_smallest`.

    Args:
        values: any-shape tensor (flattened).
        ranks: 0-based ranks in ``[0, numel)``.

    Returns:
        One 0-d tensor per rank, in the order given.

    Example:
        >>> select_ranks(torch.tensor([3.0, -1.0, 2.0, 0.5]), [0, 2])
        [tensor(-1.), tensor(2.)]
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if any(not 0 <= j < n for j in ranks):
        raise ShiftkitError(f"select_ranks: ranks {list(ranks)} are outside [0, {n})")
    if flat.dtype != torch.float32:
        return [kth_smallest(flat, j) for j in ranks]
    blocks = [slice(i, min(i + BLOCK64, n)) for i in range(0, n, BLOCK64)]

    signed = bool((flat < 0).any())

    def bins_of(x: Tensor) -> Tensor:
        bits = x.view(torch.int32)
        if not signed:  # non-negative floats order like their bit patterns: bins 2¹⁵ … 2¹⁶ − 1
            return (bits >> 16) + (1 << 15)
        key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reversed, still below 0
        return (key >> 16) + (1 << 15)

    counts = torch.zeros(1 << 16, dtype=torch.int64, device=flat.device)
    for b in blocks:
        counts += torch.bincount(bins_of(flat[b]), minlength=1 << 16)
    cum = counts.cumsum(0)
    wanted = {}
    for j in ranks:
        hit = int(torch.searchsorted(cum, torch.tensor(j, device=cum.device), right=True))
        wanted[j] = (hit, int(cum[hit]) - int(counts[hit]))
    hits = sorted({h for h, _ in wanted.values()})
    parts: dict[int, list[Tensor]] = {h: [] for h in hits}
    for b in blocks:
        x = flat[b]
        bins = bins_of(x)
        for h in hits:
            parts[h].append(x[bins == h])
    cand = {h: torch.cat(p) for h, p in parts.items()}
    return [kth_smallest(cand[h], j - below) for j, (h, below) in ((j, wanted[j]) for j in ranks)]


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest-|x| entries of ``x``, ties broken by lower flattened index first.

    The order is total (``|x|`` descending, then index ascending), so ``topk_mask(x, a)`` ⊆
    ``topk_mask(x, b)`` for ``a <= b``. Computed without a full sort: the threshold ``thr`` is the k-th
    largest magnitude (:func:`kth_smallest` in float32), every ``|x| > thr`` is kept and, among the entries
    ``== thr``, the first ``k − #{|x| > thr}`` by flattened index (a cumulative sum of the equality mask).

    Args:
        x: any-shape float tensor.
        k: number of entries to keep; clipped to ``[0, numel]``.

    Returns:
        Bool tensor of ``x``'s shape with exactly ``min(max(k, 0), numel)`` True entries.

    Example:
        >>> topk_mask(torch.tensor([1.0, -3.0, 1.0, 1.0]), 2)
        tensor([ True,  True, False, False])
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    mag = flat.abs().to(torch.float32)
    thr = kth_smallest(mag, n - k)
    keep = mag >= thr
    extra = int(keep.sum()) - k  # > 0 only when several entries tie at the threshold
    if extra > 0:
        equal = mag == thr
        quota = int(equal.sum()) - extra
        keep = (mag > thr) | (equal & (torch.cumsum(equal, 0) <= quota))
    return keep.reshape(x.shape)


def truncated_svd(m: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` factors of a matrix (Eckart–Young): ``U_r Σ_r`` and ``V_rᵀ``.

    Args:
        m: ``(out, in)`` matrix (any float dtype; the SVD runs in it).
        rank: r; a matrix of rank below r gives ``min(r, out, in)`` columns.

    Returns:
        ``(U_r Σ_r (out, k), V_rᵀ (k, in))`` with ``k = min(rank, out, in)``; their product is the best
        rank-k approximation in Frobenius norm.

    Example:
        >>> us, vh = truncated_svd(torch.eye(3), 2)
        >>> (us @ vh).shape
        torch.Size([3, 3])
    """
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.numel())
    return u[:, :k] * s[:k], vh[:k]


def scale_shift(y: Tensor, scale: Tensor, shift: Tensor, axis: int, *, per_sample: bool = False) -> Tensor:
    """SSF's transform: ``y ⊙ scale + shift`` on the channel axis ``axis`` of ``y``.

    Args:
        y: an activation of rank ``nd``; ``axis`` is its channel axis (negative counts from the end).
        scale: ``(*C,)``: one channel vector (``C`` is LayerNorm's normalised shape: the trailing axes), or
            ``(B, *C)`` with ``per_sample=True``: one per sample of the batch on ``y``'s first axis.
        shift: the shape of ``scale``.
        per_sample: ``scale``/``shift`` carry a leading batch axis (per-sample routing mixes).

    Returns:
        ``y``'s shape and dtype.

    Raises:
        ValueError: ``per_sample`` on an activation whose channel axis is its first axis.

    Example:
        >>> scale_shift(torch.ones(2, 3), torch.tensor([1.0, 2, 3]), torch.zeros(3), -1)
        tensor([[1., 2., 3.],
                [1., 2., 3.]])
    """
    s, b = scale.to(y.dtype), shift.to(y.dtype)
    if not per_sample:
        return y * channel_view(s, y.dim(), axis) + channel_view(b, y.dim(), axis)
    nd, shape = y.dim(), tuple(s.shape[1:])
    start = axis % nd
    if start + len(shape) > nd:  # LayerNorm: the normalised shape is the trailing axes
        start = nd - len(shape)
    if start < 1:
        raise ValueError("a per-sample scale needs a batch axis in front of the channel axis")
    view = (y.shape[0], *([1] * (start - 1)), *shape, *([1] * (nd - start - len(shape))))
    return y * s.reshape(view) + b.reshape(view)
