"""``zscl``: Zero-Shot Continual Learning (Zheng et al., ICCV 2023; spec adapt-continual.md §6.14), its two
mechanisms on any model with sentence (or image) features.

* **Feature distillation towards the pretrained model on reference data.** Each step draws a batch of
  unlabelled, diverse reference inputs. The frozen initial model gives their features ``f_t`` and the
  features of a fixed anchor set ``a`` (ZSCL's reference captions; here the first ``anchors`` reference
  inputs); the student gives ``f_s``; all L2-normalised. With ``R = s·f_t·aᵀ`` and ``S = s·f_s·aᵀ``
  (s = ``scale``), the loss is ``KD(R, S) + KD(Rᵀ, Sᵀ)`` with ``KD(t, s) = CE(s/T, softmax(t/T))·T²``, T = 2
  (the reference's image and text terms, both weighted 1).
* **Parameter L2** to the task-start weights, ``l2 · Σ‖θ − θ_start‖²`` (the reference's ``--l2 1``).
* **Weight ensemble** (``--we``): the uniform average of the task-start weights and a snapshot every
  ``avg_freq`` steps (after steps 0, avg_freq, 2·avg_freq, ... and the last one), written into the model at
  the end of the task
  (:class:`~shiftkit.continual.WeightEnsemble`).

``distill=0`` or ``we=False`` runs one mechanism alone. CLIP's two towers become one encoder here: the
anchors are embedded by the teacher, the reference batch by both (what the reference's image term does).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from shiftkit.continual.base import (
    Batch,
    Strategy,
    TaskContext,
    check_positive,
    kd_loss,
    trainable_parameters,
)
from shiftkit.continual.ensemble import WeightEnsemble
from shiftkit.continual.registry import register_method
from shiftkit.errors import ShiftkitError

__all__ = ["ZSCL"]


@register_method("zscl", uses=("reference_data", "initial_model"))
class ZSCL(Strategy):
    """Distil reference features towards the pretrained model and average weights along training.

    Args:
        distill: weight of the distillation loss (1.0; 0 turns it off).
        l2: weight of the squared distance to the task-start weights (1.0, the reference's; 0 turns it off).
        we: keep the weight ensemble (True).
        avg_freq: steps between ensemble snapshots (100, the reference's; use fewer on short tasks).
        temperature: distillation temperature (2.0).
        scale: logit scale of the feature similarities (100, CLIP's ``exp(logit_scale)``).
        anchors: how many reference inputs form the anchor set (the first ones; 64).

    Raises:
        ShiftkitError: distillation without reference data, features or an initial model in the context.

    Example:
        >>> strategy = continual.make("zscl", avg_freq=10)
    """

    def __init__(
        self,
        distill: float = 1.0,
        l2: float = 1.0,
        we: bool = True,
        avg_freq: int = 100,
        temperature: float = 2.0,
        scale: float = 100.0,
        anchors: int = 64,
    ) -> None:
        check_positive("zscl distill", distill, allow_zero=True)
        check_positive("zscl l2", l2, allow_zero=True)
        check_positive("zscl avg_freq", avg_freq, integer=True)
        check_positive("zscl temperature", temperature)
        check_positive("zscl scale", scale)
        check_positive("zscl anchors", anchors, integer=True)
        self.distill, self.l2, self.we_on = float(distill), float(l2), bool(we)
        self.avg_freq, self.temperature, self.scale, self.anchors = (
            avg_freq,
            float(temperature),
            float(scale),
            anchors,
        )
        self.ensemble: WeightEnsemble | None = None
        self._anchor_feats: Tensor | None = None
        self._refs: Iterator[Batch] | None = None
        self._start: dict[str, Tensor] = {}
        self._steps = 0

    def begin_task(self, ctx: TaskContext) -> None:
        """Set up the teacher's anchor features, the task-start weights and the ensemble."""
        super().begin_task(ctx)
        if self.distill > 0:
            if not ctx.reference:
                raise ShiftkitError(
                    "zscl: distillation needs reference data (an empty reference set was given)"
                )
            if ctx.features is None or ctx.initial is None:
                raise ShiftkitError("zscl: distillation needs the model's features and the initial model")
            with torch.no_grad():
                feats, have = [], 0
                for b in ctx.reference:
                    f = ctx.features(ctx.initial, b)
                    feats.append(f[: self.anchors - have])
                    have += feats[-1].shape[0]
                    if have >= self.anchors:
                        break
                self._anchor_feats = F.normalize(torch.cat(feats), dim=-1)
            self._refs = self._cycle(ctx)
        params = trainable_parameters(ctx.model)
        self._start = {n: p.detach().clone() for n, p in params.items()} if self.l2 > 0 else {}
        self.ensemble = WeightEnsemble(ctx.model) if self.we_on else None
        self._steps = 0

    @staticmethod
    def _cycle(ctx: TaskContext) -> Iterator[Batch]:
        while True:
            yield from ctx.reference

    def _distill(self) -> Tensor:
        ctx = self.ctx
        assert self._refs is not None and self._anchor_feats is not None and ctx.features is not None
        assert ctx.initial is not None
        batch = next(self._refs)
        with torch.no_grad():
            teacher = F.normalize(ctx.features(ctx.initial, batch), dim=-1)
        student = F.normalize(ctx.features(ctx.model, batch), dim=-1)
        anchors = self._anchor_feats.to(student.dtype)
        r, s = self.scale * teacher @ anchors.T, self.scale * student @ anchors.T
        return kd_loss(r, s, self.temperature) + kd_loss(r.T, s.T, self.temperature)

    def extra_loss(self, logits: Tensor) -> Tensor | float:
        """``distill · (KD(R, S) + KD(Rᵀ, Sᵀ)) + l2 · Σ‖θ − θ_start‖²``."""
        loss: Tensor | float = 0.0
        if self.distill > 0:
            loss = loss + self.distill * self._distill()
        if self.l2 > 0:
            params = trainable_parameters(self.ctx.model)
            loss = loss + self.l2 * sum((params[n] - t).square().sum() for n, t in self._start.items())
        return loss

    def after_step(self) -> None:
        """Snapshot into the ensemble at steps 0, avg_freq, 2·avg_freq, ... (counted after the step)."""
        if self.ensemble is not None and self._steps % self.avg_freq == 0:
            self.ensemble.update(self.ctx.model)
        self._steps += 1

    def end_task(self, ctx: TaskContext) -> None:
        """Write the ensemble into the model (what is evaluated and carried to the next task)."""
        if self.ensemble is not None:
            if self._steps and (self._steps - 1) % self.avg_freq:  # the final weights, unless just taken
                self.ensemble.update(ctx.model)
            self.ensemble.apply_(ctx.model)
        self.ensemble, self._refs, self._anchor_feats, self._start = None, None, None, {}
