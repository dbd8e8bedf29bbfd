"""``lwf``: Learning without Forgetting (Li & Hoiem, ECCV 2016; ZSCL's baseline, spec adapt-continual.md
§6.14): while training task t, the model's outputs on the current inputs are distilled towards those of
the model as it was at the start of the task, ``weight · KD(teacher(x), student(x))`` with ZSCL's
``KD(t, s) = CE(s/T, softmax(t/T))·T²`` (T = 2). The first task has no earlier model: plain training."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from shiftkit.continual.base import Strategy, TaskContext, check_positive, frozen_copy, kd_loss
from shiftkit.continual.registry import register_method

__all__ = ["LwF"]


@register_method("lwf")
class LwF(Strategy):
    """Distil the current task's outputs towards the task-start model.

    Args:
        weight: weight of the distillation term (1.0).
        temperature: distillation temperature T (2.0, as ZSCL's code).

    Example:
        >>> strategy = continual.make("lwf", weight=1.0)
    """

    def __init__(self, weight: float = 1.0, temperature: float = 2.0) -> None:
        check_positive("lwf weight", weight, allow_zero=True)
        check_positive("lwf temperature", temperature)
        self.weight, self.temperature = float(weight), float(temperature)
        self.teacher: nn.Module | None = None
        self._inputs: Mapping[str, Tensor] | None = None

    def begin_task(self, ctx: TaskContext) -> None:
        """The teacher is the model now (it already scores this task's labels)."""
        super().begin_task(ctx)
        self.teacher = frozen_copy(ctx.model) if ctx.index > 0 else None

    def on_batch(self, inputs: Mapping[str, Tensor]) -> None:
        """Keep the inputs: the teacher sees the same batch."""
        self._inputs = inputs

    def extra_loss(self, logits: Tensor) -> Tensor | float:
        """``weight · KD(teacher(x), logits)``."""
        if self.teacher is None or self._inputs is None or self.weight == 0:
            return 0.0
        return self.weight * kd_loss(self.teacher(**self._inputs), logits, self.temperature)

    def end_task(self, ctx: TaskContext) -> None:
        """Drop the teacher."""
        self.teacher = None
