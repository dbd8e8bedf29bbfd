"""``label_shift``: estimate the target label distribution by EM and correct the outputs (any inner method).

Under label shift the class-conditional inputs are unchanged and only the prior moves from ``π_s`` (the
training prior) to an unknown ``π_t``; Bayes' rule then gives the target posterior
``p_t(k | x) ∝ p(k | x) · π_t,k / π_s,k``. ``π_t`` is the fixed point of the EM iteration of Saerens et al.:

    p'_i ∝ p_i ⊙ π / π_s,        π ← (1/N) Σ_i p'_i,

which maximises the likelihood of the unlabeled batch under the mixture ``Σ_k π_k p(x | k)``. That
log-likelihood is concave in π, so the initialisation only changes the speed, not the answer.

Online (this module's choice): EM runs on each batch, initialised from the running estimate π̂ (fast
convergence), and π̂ ← m·π̂ + (1 − m)·π_batch with ``momentum`` m (π̂⁰ = π_s). An exponential average rather
than accumulated counts because the streams TTA targets drift (class-correlated, changing priors) and an
average over all past samples would stop tracking them, and rather than the raw batch estimate because EM on
a small batch (16 samples, 10 classes) is noisy. Starting from π_s makes the first batches close to the
identity correction. ``momentum=0`` is plain per-batch Saerens EM. The outputs are
``log p'`` with ``p' ∝ p · π̂ / π_s`` (log-probabilities), computed with the updated π̂.

Composable: ``p`` are the outputs of any registered method (``source``, ``norm``, ``tent``, ``lame``, ...)
passed through a softmax (correct for logits and for LAME's log-probabilities alike).

This replaces the trained "label shift adapter" of Park, Yang, Choo & Yun (ICCV'23: a hypernetwork
trained on the source under resampled priors, no public code) by the training-free EM estimate: nothing
is learned before deployment. After each batch π̂ is mixed with 0.1 % of π_s so that no class's prior
collapses to 0 while it is absent from a label-correlated stream.

Reference: Saerens, Latinne, Decaestecker, "Adjusting the Outputs of a Classifier to New a Priori
Probabilities: A Simple Procedure", Neural Computation 14(1), 2002,
https://doi.org/10.1162/089976602753284446.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.adapt.base import TTAMethod
from shiftkit.adapt.registry import make, register_method
from shiftkit.errors import ShiftkitError

__all__ = ["LabelShift", "em_prior"]

_MIN_PRIOR = 1e-12  # floor before log: a class whose estimate underflows to 0 must not give −inf/NaN
_PRIOR_FLOOR = 1e-3  # weight of π_s mixed into the running estimate after every batch


def em_prior(
    outputs: Tensor, log_source_prior: Tensor, init: Tensor, *, max_iter: int = 100, tol: float = 1e-6
) -> tuple[Tensor, int]:
    """Saerens EM estimate of a batch's label distribution.

    Iterates ``π ← mean_i softmax(outputs_i + log π − log π_s)`` from ``init`` until the largest *relative*
    change of a component, ``max_k |π_new − π| / max(π_k, π_new,k)``, is ``≤ tol`` or ``max_iter`` iterations
    ran. Relative, because a class the previous batches drove to ~1e-8 moves by less than any absolute
    tolerance on its first step back and an absolute test would stop EM right there.

    Args:
        outputs: ``(N, K)`` logits or log-probabilities of a model trained under the prior ``π_s``.
        log_source_prior: ``(K,)`` ``log π_s``.
        init: ``(K,)`` starting estimate (positive, sums to 1).
        max_iter: maximum EM iterations (≥ 1).
        tol: convergence threshold on the largest relative change of a component.

    Returns:
        ``(π, iterations)``: the ``(K,)`` estimate and the number of iterations run.

    Example:
        >>> logits = torch.randn(100, 3)
        >>> pi, iters = em_prior(logits, torch.full((3,), 1 / 3).log(), torch.full((3,), 1 / 3))
        >>> float(pi.sum())   # 1.0
    """
    pi = init
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        log_w = pi.clamp_min(_MIN_PRIOR).log() - log_source_prior
        new = (outputs + log_w).softmax(1).mean(0)
        change = float(((new - pi).abs() / torch.maximum(new, pi).clamp_min(_MIN_PRIOR)).max())
        pi = new
        if change <= tol:
            break
    return pi, iterations


def _check_options(momentum: float, em_iters: int, tol: float) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0.0 <= momentum < 1.0:
        raise ShiftkitError(
            f"adapt method 'label_shift': momentum must be a number in [0, 1), got {momentum!r}"
        )
    if isinstance(em_iters, bool) or not isinstance(em_iters, int) or em_iters < 1:
        raise ShiftkitError(f"adapt method 'label_shift': em_iters must be an integer >= 1, got {em_iters!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not math.isfinite(tol) or tol < 0:
        raise ShiftkitError(f"adapt method 'label_shift': tol must be a finite number >= 0, got {tol!r}")


def _check_prior(source_prior: Sequence[float] | None) -> list[float] | None:
    if source_prior is None:
        return None
    values = [float(v) for v in source_prior]
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ShiftkitError(
            f"adapt method 'label_shift': source_prior must be positive finite class frequencies, "
            f"got {list(source_prior)!r}"
        )
    total = sum(values)
    return [v / total for v in values]  # frequencies or counts: normalised to sum 1


@register_method("label_shift", adapts="inner", needs_grad=False, wraps="method")
class LabelShift(TTAMethod):
    """Run an inner adaptation method and correct its outputs for the estimated target label distribution.

    Each batch: ``outputs = inner(x)``; EM on ``softmax(outputs)`` estimates the batch prior (from the
    running estimate); the running estimate ``prior`` is updated with ``momentum``; the returned outputs are
    the **log-probabilities** ``log_softmax(outputs + log prior − log π_s)``. :meth:`reset` resets the inner
    method (model, optimizer, its state) and the prior estimate.

    Args:
        model: the model, passed to the inner method (adapted in place by it, if it adapts).
        episodic: reset the inner method and the prior before every batch (per-batch EM from π_s).
        method: the inner registered method (``"source"``, ``"norm"``, ``"tent"``, ``"lame"``, ...).
        method_params: keyword options of the inner method, e.g. ``{"lr": 1e-3}``.
        source_prior: the training label frequencies π_s (counts are normalised); default uniform.
        momentum: weight of the previous estimate in the running average (0.9: about the last 10 batches
            count; 0 = the current batch's EM estimate only).
        em_iters: maximum EM iterations per batch (100; from the running prior a few usually suffice).
        tol: EM stops when no component of π moves more than this (1e-6).

    Raises:
        ShiftkitError: ``method="label_shift"``, bad options, outputs that are not ``(N, K)`` or a
            ``source_prior`` whose length is not K.
        UnknownMethodError: an unknown inner method (the message lists the registered names).

    Example:
        >>> tta = adapt.make("label_shift", model, method="tent", method_params={"lr": 1e-3})
        >>> log_probs = tta(x)   # (N, K) prior-corrected log-probabilities; tta.prior is the estimate
        >>> tta.reset()          # source model, fresh optimizer, prior back to π_s
    """

    owns_model_state = False  # the inner method snapshots and resets the model

    def __init__(
        self,
        model: nn.Module,
        *,
        episodic: bool = False,
        method: str = "source",
        method_params: dict[str, Any] | None = None,
        source_prior: Sequence[float] | None = None,
        momentum: float = 0.9,
        em_iters: int = 100,
        tol: float = 1e-6,
    ) -> None:
        if method == "label_shift":
            raise ShiftkitError(
                "adapt method 'label_shift' cannot wrap itself: pass the method to correct, e.g. "
                "method='tent' (one prior correction is enough)"
            )
        if method_params is not None and not isinstance(method_params, dict):
            raise ShiftkitError(
                f"adapt method 'label_shift': method_params must be a dict of options, got {method_params!r}"
            )
        _check_options(momentum, em_iters, tol)
        self.method_name = method
        self.method_params = dict(method_params or {})
        self.source_prior = _check_prior(source_prior)
        self.momentum, self.em_iters, self.tol = float(momentum), em_iters, float(tol)
        self.last_em_iterations = 0
        self._prior: Tensor | None = None
        super().__init__(model, episodic=episodic)

    def configure_model(self) -> None:
        """Build the inner method (which configures the model)."""
        self.inner = make(self.method_name, self.model, **self.method_params)

    def adapted_parameters(self) -> list[nn.Parameter]:
        """The inner method's adapted parameters.

        Example:
            >>> adapt.make("label_shift", model, method="tent").adapted_parameters()  # tent's γ, β
        """
        return self.inner.adapted_parameters()

    @property
    def prior(self) -> Tensor | None:
        """The current ``(K,)`` target prior estimate; before the first batch π_s (None if K is unknown yet).

        Example:
            >>> _ = tta(x); tta.prior   # e.g. tensor([0.69, 0.21, 0.10])
        """
        if self._prior is None and self.source_prior is not None:
            return torch.tensor(self.source_prior)
        return self._prior

    def _log_source_prior(self, k: int, device: torch.device) -> Tensor:
        if self.source_prior is None:
            return torch.full((k,), -math.log(k), device=device)
        if len(self.source_prior) != k:
            raise ShiftkitError(
                f"adapt method 'label_shift': source_prior has {len(self.source_prior)} classes but the "
                f"outputs have {k}"
            )
        return torch.tensor(self.source_prior, device=device).log()

    def forward(self, x: Tensor) -> Tensor:
        """Return the inner method's outputs corrected for the estimated label distribution.

        Args:
            x: one unlabeled batch.

        Returns:
            ``(N, K)`` log-probabilities ``log p'``, ``p' ∝ softmax(inner(x)) · prior / π_s``.

        Example:
            >>> log_probs = tta(x)
            >>> log_probs.argmax(1)   # prior-corrected predictions
        """
        if self.episodic:
            self.reset()
        outputs = self.inner(x)
        if not isinstance(outputs, Tensor) or outputs.dim() != 2:
            shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise ShiftkitError(
                f"adapt method 'label_shift' needs (N, K) class scores from {self.method_name!r}, got {shape}"
            )
        with torch.no_grad():
            out = outputs.detach().to(torch.promote_types(outputs.dtype, torch.float32))
            k = out.shape[1]
            log_ps = self._log_source_prior(k, out.device)
            running = self._prior
            if running is None or running.shape[0] != k:
                running = log_ps.exp()
            running = running.to(out.device, out.dtype)
            batch_prior, self.last_em_iterations = em_prior(
                out, log_ps, running, max_iter=self.em_iters, tol=self.tol
            )
            prior = self.momentum * running + (1.0 - self.momentum) * batch_prior
            # keep every class reachable: a class absent for many batches must not be driven to ~0 (EM would
            # need hundreds of iterations to bring it back when it reappears)
            self._prior = (1.0 - _PRIOR_FLOOR) * prior + _PRIOR_FLOOR * log_ps.exp()
            corrected = (out + self._prior.clamp_min(_MIN_PRIOR).log() - log_ps).log_softmax(1)
        return corrected.to(outputs.dtype)

    def close(self) -> None:
        """Remove the inner method's patches and hooks (see :meth:`TTAMethod.close`).

        Example:
            >>> tta.close()
        """
        self.inner.close()

    @torch.no_grad()
    def reset(self) -> None:
        """Reset the inner method (bit-exact model and optimizer) and the prior estimate to π_s.

        Example:
            >>> _ = tta(x); tta.reset()
            >>> tta(x)   # identical to the first call
        """
        self.inner.reset()
        self.reset_state()

    def reset_state(self) -> None:
        """Forget the running prior estimate."""
        self._prior = None
        self.last_em_iterations = 0

    def extra_repr(self) -> str:
        return (
            f"method={self.method_name!r}, episodic={self.episodic}, momentum={self.momentum}, "
            f"em_iters={self.em_iters}, tol={self.tol}"
        )
