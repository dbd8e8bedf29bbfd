"""``bn_ema``: source-free BatchNorm statistics re-estimated online with exponentially decaying momentum.

Each BatchNorm layer starts from the source running statistics and, on every test batch ``t = 0, 1, ...``,
updates them before normalising with the updated values:

    η_t = max(η_min, η_0 · exp(−t / τ))
    μ ← (1 − η_t)·μ + η_t·μ_B,    σ² ← (1 − η_t)·σ² + η_t·σ²_B (unbiased, as PyTorch's running variance)

so the statistics move quickly at first and then settle (OSUDA's exponential momentum decay); ``tau=None``
keeps η constant. No gradients; γ and β are unchanged.

One forward pass per batch: each layer updates its statistics from its input and normalises with the
updated values, so deeper layers see inputs already normalised by the adapted statistics of the layers
before them. mariodoebler's ``BNEMA`` instead runs two passes (a train-mode pass, in which every layer's
input is normalised by *batch* statistics, updates the running buffers; an eval-mode pass predicts); the
first layer's statistics agree, deeper ones differ slightly. We keep one pass: half the cost, and the
statistics each layer tracks are those of the inputs it actually receives at prediction time.

Defaults (OSUDA's constants are only in the paper, and we could not read the paper's values):
``momentum=0.1`` (PyTorch's BN momentum and mariodoebler's BNEMA), ``tau=100`` batches (after about
300 batches the statistics are nearly frozen), ``min_momentum=0.01`` so a long deployment still follows a
slow drift instead of freezing for ever. A channel with a single value in the batch is not updated.

Reference: Liu et al., "Adapting Off-the-Shelf Source Segmenter for Target Medical Image Segmentation",
MICCAI 2021, https://arxiv.org/abs/2106.12497.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from shiftkit.adapt.base import TTAMethod
from shiftkit.adapt.norm_stats import ForwardPatch, batch_norms
from shiftkit.adapt.registry import register_method
from shiftkit.errors import ShiftkitError

__all__ = ["BNEMA"]


@register_method("bn_ema", adapts="norm_statistics", needs_grad=False, norms=("batch",))
class BNEMA(TTAMethod):
    """Re-estimate every BatchNorm layer's running statistics on the test stream with decaying momentum.

    Args:
        model: a model with BatchNorm1d/2d/3d layers that track running statistics (modified in place).
        momentum: η_0, the first batch's update weight in ``(0, 1]``.
        tau: decay time constant in batches (> 0), or ``None`` for a constant momentum (BN-EMA).
        min_momentum: the floor of η_t in ``[0, momentum]``.
        episodic: reset the statistics before every batch (then each batch uses η_0 only).
        steps: accepted for a uniform interface; unused.

    Raises:
        ShiftkitError: no BatchNorm layer, a layer without running statistics, or bad momentum / tau.

    Example:
        >>> tta = adapt.make("bn_ema", model, momentum=0.1, tau=100)
        >>> for x in stream:
        ...     logits = tta(x)      # statistics updated with η_t, then used
        >>> tta.reset()              # back to the source statistics, t = 0
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        momentum: float = 0.1,
        tau: float | None = 100.0,
        min_momentum: float = 0.01,
        episodic: bool = False,
        steps: int = 1,
    ) -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0.0 < momentum <= 1.0:
            raise ShiftkitError(f"adapt method 'bn_ema': momentum must be in (0, 1], got {momentum!r}")
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int | float) or not tau > 0):
            raise ShiftkitError(f"adapt method 'bn_ema': tau must be None or a number > 0, got {tau!r}")
        if isinstance(min_momentum, bool) or not isinstance(min_momentum, int | float):
            raise ShiftkitError(f"adapt method 'bn_ema': min_momentum must be a number, got {min_momentum!r}")
        if not 0.0 <= min_momentum <= momentum:
            raise ShiftkitError(
                f"adapt method 'bn_ema': min_momentum must be in [0, momentum], got {min_momentum!r}"
            )
        self.momentum, self.tau, self.min_momentum = float(momentum), tau, float(min_momentum)
        self.batches_seen = 0
        self._eta = self.momentum  # read by the patched layers; forward() sets it per batch
        super().__init__(model, episodic=episodic, steps=steps)

    def current_momentum(self) -> float:
        """η_t for the next batch.

        Example:
            >>> adapt.make("bn_ema", model, momentum=0.1, tau=None).current_momentum()
            0.1
        """
        if self.tau is None:
            return self.momentum
        return max(self.min_momentum, self.momentum * math.exp(-self.batches_seen / self.tau))

    def configure_model(self) -> None:
        """Eval mode, no gradients, BatchNorm layers updating and using their running statistics."""
        super().configure_model()
        bns = batch_norms(self.model, self.name)
        for name, bn in bns:
            if bn.running_mean is None or bn.running_var is None:
                raise ShiftkitError(
                    f"adapt method 'bn_ema' needs source running statistics but BatchNorm {name!r} has none "
                    f"(track_running_stats=False)"
                )
        self._bns = [bn for _, bn in bns]
        for bn in self._bns:
            bn.forward = functools.partial(self._bn_forward, bn)  # type: ignore[method-assign]
        self._handles = [ForwardPatch(bn) for bn in self._bns]

    def _bn_forward(self, bn: _BatchNorm, x: Tensor) -> Tensor:
        per_channel = x.numel() // max(x.shape[1], 1) if x.dim() > 1 else 1
        if per_channel > 1:
            dims = [0, *range(2, x.dim())]
            with torch.no_grad():
                eta = self._eta
                bn.running_mean.mul_(1.0 - eta).add_(x.mean(dims), alpha=eta)  # type: ignore[union-attr]
                bn.running_var.mul_(1.0 - eta).add_(x.var(dims, unbiased=True), alpha=eta)  # type: ignore[union-attr]
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    def forward(self, x: Tensor) -> Tensor:
        """Update the statistics with η_t on ``x``, then predict with them (``(N, ...) -> (N, K)``).

        Example:
            >>> logits = adapt.make("bn_ema", model)(x)
        """
        if self.episodic:
            self.reset()
        self._eta = self.current_momentum()
        with torch.no_grad():
            out: Tensor = self.model(x)
        self.batches_seen += 1
        return out

    def reset_state(self) -> None:
        """Restart the momentum schedule at t = 0 (the statistics are restored by :meth:`reset`)."""
        self.batches_seen = 0

    def extra_repr(self) -> str:
        return (
            f"momentum={self.momentum}, tau={self.tau}, min_momentum={self.min_momentum}, "
            + super().extra_repr()
        )
