"""Pure tensor math shared by methods, merging and compression. No modules, no state.

Conventions: a Linear weight is ``W ∈ R^{out×in}``, a Conv weight ``W ∈ R^{C_out×C_in/groups×k...}``;
"channel" means the output channel of the op a shift follows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "abs_sum64",
    "channel_axis",
    "channel_view",
    "dot64",
    "kaiming_uniform_a_sqrt5_",
    "lora_conv_delta",
    "lora_delta",
    "mean_pool",
    "norm64",
    "scale_rows",
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
