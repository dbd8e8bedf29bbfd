"""The common online test-time-adaptation protocol shared by every ``shiftkit.adapt`` method.

For each unlabeled batch ``x_t`` a method (1) computes outputs with the current model, (2) computes an
unsupervised loss and takes ``steps`` optimizer steps, and (3) returns the outputs of the forward pass made
*before* the (last) update. ``episodic=True`` resets the model and optimizer before every batch; otherwise
the adaptation is continual and only :meth:`TTAMethod.reset` restores the source state.

The model is adapted *in place* (as the TENT reference does; no copy of a possibly large model is made).
:meth:`TTAMethod.reset` restores the adapted parameters, every buffer and the optimizer state bit for bit.

Reference: Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021,
https://arxiv.org/abs/2006.10726 (protocol §6.1 of the shiftkit adapt spec).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from shiftkit.errors import ShiftkitError

__all__ = ["BATCH_NORMS", "NORMS", "TTAMethod", "batch_norms", "check_lr", "use_batch_statistics"]

#: BatchNorm layer types whose statistics a test-time method may replace by the test batch's.
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Normalisation layer types whose affine parameters TENT-style methods adapt.
NORMS: tuple[type[nn.Module], ...] = (*BATCH_NORMS, nn.LayerNorm, nn.GroupNorm)


def _type_names(types: tuple[type[nn.Module], ...]) -> str:
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
            f"adapt method {method!r} needs BatchNorm layers ({_type_names(BATCH_NORMS)}) but "
            f"{type(model).__name__} has none"
        )
    return found


def use_batch_statistics(bns: list[tuple[str, _BatchNorm]]) -> list[RemovableHandle]:
    """Make BatchNorm layers normalise with the current batch's mean and biased variance.

    ``track_running_stats`` is switched off so the source running buffers are never updated (they are
    unused in batch mode, and keeping them intact makes :meth:`TTAMethod.reset` cheap). A forward
    pre-hook puts each layer in train mode, except when a channel has a single value in the batch
    (batch size 1 with no spatial extent): there the batch variance is undefined, so the layer falls back
    to the source running statistics instead of crashing or returning NaN.

    Args:
        bns: the layers, as returned by :func:`batch_norms`.

    Returns:
        The hook handles (remove them to undo the pre-hook; ``track_running_stats`` stays off).

    Example:
        >>> handles = use_batch_statistics(batch_norms(model, "norm"))
        >>> model.eval(); y = model(x)   # BN layers use x's statistics
        >>> for h in handles: h.remove()
    """

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        per_channel = x.numel() // max(x.shape[1], 1) if x.dim() > 1 else 1
        has_source = getattr(module, "running_mean", None) is not None
        module.training = per_channel > 1 or not has_source

    handles = []
    for _, bn in bns:
        bn.track_running_stats = False
        handles.append(bn.register_forward_pre_hook(pre_hook))
    return handles


class TTAMethod(nn.Module):
    """Base class of online test-time adaptation methods: ``outputs = tta(x)`` predicts and adapts.

    Subclasses override :meth:`configure_model` (set modes, hooks, ``requires_grad``),
    :meth:`collect_params` (the parameters adapted) and :meth:`loss` (unsupervised loss on the outputs);
    methods without gradients (``source``, ``norm``) return no parameters and take no optimizer step.

    Args:
        model: the model to adapt; it is modified in place (no copy is made).
        episodic: reset before every batch (each batch is adapted independently from the source).
        steps: optimizer steps per batch (≥ 1); the returned outputs come from the forward pass made
            before the last step, as in the TENT reference.

    Example:
        >>> tta = adapt.make("tent", model, lr=1e-3)
        >>> logits = tta(x)          # (N, C) outputs, model adapted on x
        >>> tta.reset()              # back to the source model and a fresh optimizer
    """

    name = "base"

    def __init__(self, model: nn.Module, *, episodic: bool = False, steps: int = 1) -> None:
        super().__init__()
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ShiftkitError(f"adapt method {self.name!r}: steps must be an integer >= 1, got {steps!r}")
        self.model = model
        self.episodic = bool(episodic)
        self.steps = steps
        self._handles: list[RemovableHandle] = []
        self.configure_model()
        self._params = list(self.collect_params())
        self.optimizer = self.build_optimizer(self._params) if self._params else None
        # Snapshot: the adapted parameters and every buffer (other parameters are never touched), plus the
        # optimizer state, all deep copies so later in-place updates cannot alias them.
        self._param_snapshot = [p.detach().clone() for p in self._params]
        self._buffer_snapshot = {n: b.detach().clone() for n, b in model.named_buffers()}
        self._opt_snapshot = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None

    # --- hooks for subclasses -------------------------------------------------------------------
    def configure_model(self) -> None:
        """Put the model in the method's test-time configuration (default: eval mode, no gradients)."""
        self.model.eval()
        self.model.requires_grad_(False)

    def collect_params(self) -> list[nn.Parameter]:
        """Return the parameters the method adapts (default: none)."""
        return []

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Return the optimizer over ``params`` (only called when there are parameters to adapt)."""
        raise ShiftkitError(f"{type(self).__name__} adapts parameters but defines no optimizer")

    def loss(self, outputs: Tensor) -> Tensor:
        """Return the scalar unsupervised loss on ``outputs`` (only used when parameters are adapted)."""
        raise ShiftkitError(f"{type(self).__name__} adapts parameters but defines no loss")

    # --- protocol -------------------------------------------------------------------------------
    def adapted_parameters(self) -> list[nn.Parameter]:
        """The parameters this method updates (empty for gradient-free methods).

        Example:
            >>> tta = adapt.make("tent", model)
            >>> sum(p.numel() for p in tta.adapted_parameters())
            8
        """
        return list(self._params)

    def forward(self, x: Tensor) -> Tensor:
        """Predict on ``x`` and adapt on it (predict-before-update).

        Args:
            x: one unlabeled batch, e.g. ``(N, C, H, W)`` images.

        Returns:
            The model outputs (e.g. ``(N, num_classes)`` logits) of the forward pass made before the last
            optimizer step.

        Example:
            >>> for x in stream:
            ...     logits = tta(x)
            >>> tta.reset()
        """
        if self.episodic:
            self.reset()
        if self.optimizer is None:
            with torch.no_grad():
                return self.model(x)
        outputs: Tensor | None = None
        with torch.enable_grad():
            for _ in range(self.steps):
                outputs = self.model(x)
                loss = self.loss(outputs)
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        assert outputs is not None
        return outputs.detach()

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the adapted parameters, every buffer and the optimizer state bit for bit.

        Example:
            >>> _ = tta(x)
            >>> tta.reset()   # the model equals the one passed in, the optimizer is fresh
            >>> _ = tta(x)    # identical to the first call
        """
        for p, saved in zip(self._params, self._param_snapshot, strict=True):
            p.copy_(saved)
            p.grad = None
        buffers = dict(self.model.named_buffers())
        for n, saved in self._buffer_snapshot.items():
            buffers[n].copy_(saved)
        if self.optimizer is not None and self._opt_snapshot is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._opt_snapshot))  # replaces the whole state

    def extra_repr(self) -> str:
        return f"episodic={self.episodic}, steps={self.steps}"


def check_lr(method: str, lr: float) -> float:
    """Return ``lr`` as a float or raise :class:`ShiftkitError` if it is not finite and > 0.

    Example:
        >>> check_lr("tent", 1e-3)
        0.001
        >>> check_lr("tent", -1.0)  # raises ShiftkitError
    """
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ShiftkitError(f"adapt method {method!r}: lr must be a finite number > 0, got {lr!r}")
    return float(lr)
