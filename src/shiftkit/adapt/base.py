"""The common online test-time-adaptation protocol shared by every ``shiftkit.adapt`` method.

For each unlabeled batch ``x_t`` a method (1) computes outputs with the current model, (2) computes an
unsupervised loss and takes ``steps`` optimizer steps, and (3) returns the outputs of the forward pass made
*before* the (last) update. ``episodic=True`` resets the model and optimizer before every batch; otherwise
the adaptation is continual and only :meth:`TTAMethod.reset` restores the source state.

The model is adapted *in place* (as the TENT reference does; no copy of a possibly large model is made).
:meth:`TTAMethod.reset` restores the adapted parameters, every buffer and the optimizer state bit for bit.

Reference: Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021,
https://arxiv.org/abs/2006.10726 (the online protocol of the TENT, EATA and SAR reference code).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from shiftkit.adapt.norm_stats import NORMS, type_names, use_batch_statistics
from shiftkit.errors import ShiftkitError

__all__ = [
    "NormAffineMethod",
    "TTAMethod",
    "check_lr",
    "check_positive",
    "default_entropy_margin",
    "norm_affine_params",
    "softmax_entropy",
]


def softmax_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of the softmax over the last dimension.

    Args:
        logits: ``(..., C)`` scores.

    Returns:
        ``(...)`` entropies ``−Σ_c p_c log p_c`` with ``p = softmax(logits)`` (nats).

    Example:
        >>> softmax_entropy(torch.zeros(2, 4))
        tensor([1.3863, 1.3863])
    """
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


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
        collapse_entropy: collapse guard for methods that train (``None`` = off). After each batch the
            exponential average (momentum 0.9) of the batch-mean prediction entropy is updated; when it
            falls below this many nats the model has collapsed onto confident predictions and the method
            resets to the source state (counted in ``collapse_resets``). SAR's model recovery uses the
            same mechanism on its own loss. Entropy methods with Adam move every collected parameter by
            about ``lr`` per step whatever its gradient (see :class:`NormAffineMethod`), so on a long
            stream the parameters drift steadily even where the loss barely depends on them: the guard
            is what brings such a drift back.

    Example:
        >>> tta = adapt.make("tent", model, lr=1e-3)
        >>> logits = tta(x)          # (N, C) outputs, model adapted on x
        >>> tta.reset()              # back to the source model and a fresh optimizer
    """

    name = "base"
    #: False for wrappers whose inner method owns the model's state and its reset (``label_shift``): then
    #: no snapshot of the model's buffers is taken here.
    owns_model_state = True

    def __init__(
        self,
        model: nn.Module,
        *,
        episodic: bool = False,
        steps: int = 1,
        collapse_entropy: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ShiftkitError(f"adapt method {self.name!r}: steps must be an integer >= 1, got {steps!r}")
        if collapse_entropy is not None and (
            isinstance(collapse_entropy, bool)
            or not isinstance(collapse_entropy, int | float)
            or not math.isfinite(collapse_entropy)
            or collapse_entropy <= 0
        ):
            raise ShiftkitError(
                f"adapt method {self.name!r}: collapse_entropy must be None or a number > 0 (nats), "
                f"got {collapse_entropy!r}"
            )
        self.model = model
        self.episodic = bool(episodic)
        self.steps = steps
        self.collapse_entropy = None if collapse_entropy is None else float(collapse_entropy)
        self.collapse_resets = 0
        self._entropy_ema: float | None = None
        self._handles: list[Any] = []  # undo handles of hooks / patches (objects with .remove())
        self.configure_model()
        self._params = list(self.collect_params())
        self.optimizer = self.build_optimizer(self._params) if self._params else None
        # Snapshot: the adapted parameters and every buffer (other parameters are never touched), plus the
        # optimizer state, all deep copies so later in-place updates cannot alias them.
        self._param_snapshot = [p.detach().clone() for p in self._params]
        self._buffer_snapshot = (
            {n: b.detach().clone() for n, b in model.named_buffers()} if self.owns_model_state else {}
        )
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
        outputs = outputs.detach()
        self.guard_collapse(softmax_entropy(outputs).mean())
        return outputs

    def guard_collapse(self, value: Tensor | float) -> bool:
        """Update the collapse guard with one batch's entropy (or loss) and reset if it collapsed.

        Args:
            value: the batch's mean prediction entropy in nats (SAR passes its reliable-sample loss).

        Returns:
            True if the model was reset.

        Example:
            >>> tta = adapt.make("tent", model, collapse_entropy=0.2)
            >>> tta.guard_collapse(0.01)   # called by forward(); resets once the average is below 0.2
        """
        if self.collapse_entropy is None:
            return False
        v = float(value)
        if not math.isfinite(v):
            return False  # a NaN batch says nothing about collapse (SAR skips it too)
        self._entropy_ema = v if self._entropy_ema is None else 0.9 * self._entropy_ema + 0.1 * v
        if self._entropy_ema < self.collapse_entropy:
            self.reset()
            self.collapse_resets += 1
            return True
        return False

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
        self._entropy_ema = None
        self.reset_state()

    def reset_state(self) -> None:
        """Clear method-specific state (memory, moving averages) on :meth:`reset`; default: nothing."""

    def close(self) -> None:
        """Remove the method's BatchNorm patches and hooks from the model (idempotent).

        The model keeps its current (possibly adapted) parameters and its eval mode and frozen gradients;
        call :meth:`reset` first to get the source weights back. Use it to hand a model back to plain
        inference after adapting, or before making a second method on the same model.

        Example:
            >>> tta = adapt.make("norm", model)
            >>> _ = tta(x)
            >>> tta.close()   # model(x) uses the running statistics again
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def extra_repr(self) -> str:
        guard = "" if self.collapse_entropy is None else f", collapse_entropy={self.collapse_entropy}"
        return f"episodic={self.episodic}, steps={self.steps}{guard}"


def check_positive(method: str, label: str, value: float) -> float:
    """Return ``value`` as a float, or raise :class:`ShiftkitError` naming ``label`` unless finite and > 0.

    Example:
        >>> check_positive("eata", "d_margin", 0.4)
        0.4
        >>> check_positive("eata", "d_margin", -1.0)  # raises ShiftkitError
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ShiftkitError(f"adapt method {method!r}: {label} must be a finite number > 0, got {value!r}")
    return float(value)


def check_lr(method: str, lr: float) -> float:
    """Return ``lr`` as a float or raise :class:`ShiftkitError` if it is not finite and > 0.

    Example:
        >>> check_lr("tent", 1e-3)
        0.001
        >>> check_lr("tent", -1.0)  # raises ShiftkitError
    """
    return check_positive(method, "lr", lr)


def default_entropy_margin(num_classes: int) -> float:
    """The reliability margin ``E0 = 0.4·ln C`` of EATA and SAR (40 % of the maximum entropy), in nats.

    Example:
        >>> round(default_entropy_margin(1000), 4)
        2.7631
    """
    return 0.4 * math.log(num_classes)


def norm_affine_params(
    model: nn.Module, method: str, exclude: Callable[[str], bool] | None = None
) -> list[nn.Parameter]:
    """The weight and bias of every affine BatchNorm/LayerNorm/GroupNorm layer of ``model``, in module order.

    Args:
        model: any module.
        method: the adaptation method's name, used in the error message.
        exclude: ``exclude(module_name)`` True drops that layer (SAR's excluded top layers).

    Returns:
        The parameters (each once).

    Raises:
        ShiftkitError: no affine normalisation layer is left.

    Example:
        >>> [p.shape for p in norm_affine_params(model, "tent")]
        [torch.Size([4]), torch.Size([4])]
    """
    params: list[nn.Parameter] = []
    seen_norm = False
    for name, m in model.named_modules():
        if not isinstance(m, NORMS):
            continue
        seen_norm = True
        if exclude is not None and exclude(name):
            continue
        params += [p for n, p in m.named_parameters(recurse=False) if n in ("weight", "bias")]
    if not params:
        names = type_names(NORMS)
        why = "all are excluded" if seen_norm and exclude is not None else "it has none"
        raise ShiftkitError(
            f"adapt method {method!r} needs normalisation layers with affine parameters ({names}) but "
            f"{type(model).__name__} has none to adapt: {why}"
        )
    return params


class NormAffineMethod(TTAMethod):
    """Base of the entropy methods (TENT, EATA, SAR): adapt the norm layers' affine parameters.

    The model is put in eval mode with every BatchNorm on batch statistics (as in mariodoebler's
    test-time-adaptation collection: dropout and stochastic depth stay off), all gradients off except the
    weight and bias of the affine BatchNorm/LayerNorm/GroupNorm layers. The optimizer is Adam
    (β = (0.9, 0.999)) or Nesterov SGD (momentum 0.9) from ``self.optimizer_name``, ``self.lr`` and
    ``self.weight_decay``.

    With Adam every collected parameter moves by about ``lr`` per step **whatever the size of its
    gradient**: Adam divides the gradient by its own running magnitude, so its first step is
    ``lr·g/(|g| + 1e-8)``, ``≈ lr·sign(g)`` even for ``|g| = 1e-7`` (a fifth of EfficientNet-Lite0's BN
    parameters get gradients that small from the entropy). The set of collected parameters, not the
    gradient, then decides what changes, and over a long stream every γ and β drifts by roughly
    ``lr × steps``. The TENT reference does the same (shiftkit matches it to float noise); for steps in
    proportion to the gradient use ``optimizer="sgd"``, and keep the collapse guard on for long streams.

    Example:
        >>> class Mine(NormAffineMethod):
        ...     def loss(self, outputs): return softmax_entropy(outputs).mean()
    """

    lr: float = 1e-3
    optimizer_name: str = "adam"
    weight_decay: float = 0.0

    def set_optimizer_options(self, lr: float, optimizer: str, weight_decay: float = 0.0) -> None:
        """Validate and store ``lr``, ``optimizer`` (``"adam"`` or ``"sgd"``) and ``weight_decay``.

        Example:
            >>> self.set_optimizer_options(1e-3, "adam")   # in a subclass's __init__, before super().__init__
        """
        self.lr = check_lr(self.name, lr)
        if optimizer not in ("adam", "sgd"):
            raise ShiftkitError(
                f"adapt method {self.name!r}: optimizer must be 'adam' or 'sgd', got {optimizer!r}"
            )
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float) or weight_decay < 0:
            raise ShiftkitError(
                f"adapt method {self.name!r}: weight_decay must be >= 0, got {weight_decay!r}"
            )
        self.optimizer_name = optimizer
        self.weight_decay = float(weight_decay)

    def configure_model(self) -> None:
        """Eval mode, gradients only for the adapted norm parameters, BatchNorm on batch statistics."""
        super().configure_model()
        bns = [(n, m) for n, m in self.model.named_modules() if isinstance(m, _BatchNorm)]
        self._handles = use_batch_statistics(bns)
        for p in self.collect_params():
            p.requires_grad_(True)

    def collect_params(self) -> list[nn.Parameter]:
        """The weight and bias of every affine norm layer (see :func:`norm_affine_params`)."""
        return norm_affine_params(self.model, self.name)

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam (β = (0.9, 0.999)) or Nesterov SGD (momentum 0.9) over ``params``."""
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay
            )
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay)
