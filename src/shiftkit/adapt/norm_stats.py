"""BatchNorm statistics for test-time adaptation: test-batch, source-mixed, and the batch-size-1 fallback.

:func:`mix_batch_statistics` makes BatchNorm layers normalise with ``(1 − a)``·source + ``a``·test-batch
statistics through a per-instance ``forward`` (removed by the returned :class:`ForwardPatch` handles);
:func:`use_batch_statistics` is the pure test-batch case (BN-1). Without autograd on CPU the statistics come
from one-pass moments, which are several times faster than PyTorch's train-mode kernel on CPU.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from shiftkit.errors import ShiftkitError

__all__ = [
    "BATCH_NORMS",
    "NORMS",
    "SINGLE_SAMPLE_TARGET_WEIGHT",
    "ForwardPatch",
    "batch_norms",
    "mix_batch_statistics",
    "use_batch_statistics",
]

#: BatchNorm layer types whose statistics a test-time method may replace by the test batch's.
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Normalisation layer types whose affine parameters TENT-style methods adapt.
NORMS: tuple[type[nn.Module], ...] = (*BATCH_NORMS, nn.LayerNorm, nn.GroupNorm)


def type_names(types: tuple[type[nn.Module], ...]) -> str:
    return ", ".join(t.__name__ for t in types)


def batch_norms(model: nn.Module, method: str) -> list[tuple[str, _BatchNorm]]:
    """Return the ``(name, module)`` BatchNorm layers of ``model`` or raise naming what is missing.

    Args:
        model: any module.
        method: the adaptation method's name, used in the error message.

    Returns:
        The BatchNorm1d/2d/3d layers in module order.

    Example:
        >>> bns = batch_norms(model, "norm")
        >>> [name for name, _ in bns]
        ['bn1', 'bn2']
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not found:
        raise ShiftkitError(
            f"adapt method {method!r} needs BatchNorm layers ({type_names(BATCH_NORMS)}) but "
            f"{type(model).__name__} has none"
        )
    return found


#: Weight of the test statistics used when a batch holds a single sample (batch size 1): one image is too
#: little to estimate a channel's statistics, so they are mixed with the source ones as robusta/mariodoebler
#: ``BNAlpha`` does at batch size 1 (test weight 0.1 in its CIFAR/ImageNet configs).
SINGLE_SAMPLE_TARGET_WEIGHT = 0.1


class ForwardPatch:
    """Undo handle for a per-instance ``forward`` override (``remove()`` restores the class forward)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _bn_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


#: Above this ratio mean² / variance the one-pass moments lose precision to cancellation (relative error of
#: the variance ≈ 1e-7·(1 + mean²/var) in float32, so at most ~1e-4 here); such layers use PyTorch's
#: two-pass kernel instead.
_CANCELLATION_RATIO = 1e3


def _batch_moments(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """Per-channel mean and biased variance of ``(N, C, ...)`` from one pass of sums and squared norms.

    On CPU this is 2–6× faster than the train-mode ``batch_norm`` kernel's own statistics at 8×8 spatial
    positions and more (measured on EfficientNet-Lite0's activations; it took ``norm`` from 0.71× to 0.87×
    of the source forward's throughput at 224 px). Returns
    ``None`` where the float32 ``E[x²] − E[x]²`` would cancel badly (the caller then uses the native kernel).
    Not differentiable at all-zero slices (the norm's gradient), so only used without autograd.
    """
    n, c = x.shape[0], x.shape[1]
    xv = x.reshape(n, c, -1)
    m = xv.shape[0] * xv.shape[2]
    mean = xv.sum(-1).sum(0).div_(m)  # the contiguous last axis first: faster than one reduction over (0, 2)
    sq = torch.linalg.vector_norm(xv, dim=-1).square_().sum(0).div_(m)
    var = sq.addcmul_(mean, mean, value=-1.0).clamp_min_(0.0)
    if bool((mean * mean > _CANCELLATION_RATIO * var).any()):
        return None
    return mean, var


def _mixed_bn_forward(bn: _BatchNorm, x: Tensor, target_weight: float, single_weight: float) -> Tensor:
    """BatchNorm with ``μ = (1 − a)·μ_src + a·μ_batch`` and ``σ² = (1 − a)·σ²_src + a·σ²_batch``."""
    per_channel = x.numel() // max(x.shape[1], 1) if x.dim() > 1 else 1
    has_source = bn.running_mean is not None and bn.running_var is not None
    a = target_weight if x.shape[0] > 1 else min(target_weight, single_weight)
    if per_channel <= 1:
        a = 0.0  # one value per channel: the batch variance is undefined, use the source statistics
    if not has_source:
        if per_channel <= 1:
            raise ShiftkitError(
                f"{type(bn).__name__} has no running statistics (track_running_stats=False) and the batch "
                f"has one value per channel: its statistics cannot be estimated; use a larger batch"
            )
        a = 1.0
    if a <= 0.0:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    fast = (
        not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    )
    # below ~2×2 spatial positions the native kernel's fixed cost is lower than our few extra ops (measured)
    if fast and x.dim() > 2 and math.prod(x.shape[2:]) > 4:
        moments = _batch_moments(x)
        if moments is not None:
            mean, var = moments
            if a < 1.0:
                mean = (1.0 - a) * bn.running_mean + a * mean  # type: ignore[operator]
                var = (1.0 - a) * bn.running_var + a * var  # type: ignore[operator]
            return F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
    if a >= 1.0:
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    dims = _bn_dims(x)
    mean = (1.0 - a) * bn.running_mean + a * x.mean(dims)  # type: ignore[operator]
    var = (1.0 - a) * bn.running_var + a * x.var(dims, unbiased=False)  # type: ignore[operator]
    # Written out (F.batch_norm in eval mode is not differentiable in its statistics, TENT needs them to be).
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.weight is not None:
        y = y * bn.weight.view(shape)
    if bn.bias is not None:
        y = y + bn.bias.view(shape)
    return y


def mix_batch_statistics(
    bns: list[tuple[str, _BatchNorm]],
    target_weight: float = 1.0,
    *,
    single_sample_weight: float = SINGLE_SAMPLE_TARGET_WEIGHT,
) -> list[ForwardPatch]:
    """Make BatchNorm layers normalise with a mix of the source and the current batch's statistics.

    Each layer computes ``μ = (1 − a)·μ_src + a·μ_B`` and ``σ² = (1 − a)·σ²_src + a·σ²_B`` per channel,
    where ``μ_B`` and the biased ``σ²_B`` are the test batch's statistics and ``a = target_weight`` is the
    weight of the *test* statistics (``a = 1``: pure batch statistics, BN-1/``norm``; ``a = 0``: the source
    model). The layer's mode (train/eval) is ignored and the running buffers are never updated, so
    gradients flow through ``μ_B``, ``σ²_B`` exactly as in a train-mode BatchNorm. Safeguards, so no batch
    crashes or returns NaN: a batch of one sample uses ``a = min(target_weight, single_sample_weight)``
    (source-mixed statistics), and a channel with a single value uses the source statistics.

    Args:
        bns: the layers, as returned by :func:`batch_norms`.
        target_weight: ``a`` in ``[0, 1]``, the weight of the test-batch statistics.
        single_sample_weight: the test weight used for a batch of size 1.

    Returns:
        Undo handles (``h.remove()`` restores the layer's own forward).

    Raises:
        ShiftkitError: a weight outside ``[0, 1]``.

    Example:
        >>> handles = mix_batch_statistics(batch_norms(model, "alpha_bn"), target_weight=0.1)
        >>> y = model(x)                      # 90 % source, 10 % test statistics
        >>> for h in handles: h.remove()
    """
    for label, w in (("target_weight", target_weight), ("single_sample_weight", single_sample_weight)):
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 <= w <= 1.0:
            raise ShiftkitError(
                f"{label} must be a number in [0, 1] (weight of the test statistics), got {w!r}"
            )
    a, single = float(target_weight), float(single_sample_weight)
    patches = []
    for _, bn in bns:
        # A per-instance forward: nn.Module.__call__ finds it before the class's; ForwardPatch removes it.
        bn.forward = functools.partial(_mixed_bn_forward, bn, target_weight=a, single_weight=single)  # type: ignore[method-assign]
        patches.append(ForwardPatch(bn))
    return patches


def use_batch_statistics(bns: list[tuple[str, _BatchNorm]]) -> list[ForwardPatch]:
    """Make BatchNorm layers normalise with the current batch's mean and biased variance (BN-1).

    The same as :func:`mix_batch_statistics` with ``target_weight=1``: the source running buffers are kept
    but unused (and never updated, which keeps :meth:`TTAMethod.reset` cheap). A batch of one sample uses
    source-mixed statistics (:data:`SINGLE_SAMPLE_TARGET_WEIGHT`) and a channel with a single value the
    source statistics, instead of crashing or returning NaN.

    Args:
        bns: the layers, as returned by :func:`batch_norms`.

    Returns:
        Undo handles (``h.remove()`` restores the layer's own forward).

    Example:
        >>> handles = use_batch_statistics(batch_norms(model, "norm"))
        >>> model.eval(); y = model(x)   # BN layers use x's statistics
        >>> for h in handles: h.remove()
    """
    return mix_batch_statistics(bns, 1.0)
