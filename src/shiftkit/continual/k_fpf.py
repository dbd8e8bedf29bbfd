"""``k_fpf``: FPF without every-step replay (Zhao et al., ICML 2023; spec adapt-continual.md §6.16).

The stream is trained plainly and FPF's partial fine-tuning on the memory is triggered periodically, every
``every`` training steps counted over the whole sequence, regardless of task boundaries. The memory holds up
to ``memory`` examples of each task, the current one included from its start."""

from __future__ import annotations

from typing import Any

from shiftkit.continual.base import TaskContext, check_positive
from shiftkit.continual.fpf import FPF
from shiftkit.continual.registry import register_method

__all__ = ["KFPF"]


@register_method("k_fpf", uses=("old_task_data",))
class KFPF(FPF):
    """Plain training with FPF triggered every ``every`` steps.

    Args:
        every: training steps between two FPF rounds (50).
        **fpf: :class:`~shiftkit.continual.fpf.FPF`'s options (``memory``, ``steps``, ``lr``, ``batch_size``,
            ``modules``, ``seed``).

    Example:
        >>> strategy = continual.make("k_fpf", every=32)
    """

    def __init__(self, every: int = 50, **fpf: Any) -> None:
        check_positive("k_fpf every", every, integer=True)
        super().__init__(**fpf)
        self.every = every
        self.global_step = 0
        self.rounds = 0

    def reset(self) -> None:
        """An empty memory, the generator at its seed, the step and round counters at 0."""
        super().reset()
        self.global_step = self.rounds = 0

    def begin_task(self, ctx: TaskContext) -> None:
        """The current task's examples join the memory from the start (the stream's buffer)."""
        super().begin_task(ctx)
        self.remember(ctx)

    def end_task(self, ctx: TaskContext) -> None:
        """Nothing at the task boundary: k-FPF's rounds ignore them."""

    def after_step(self) -> None:
        """Every ``every`` steps, one FPF round on the memory."""
        self.global_step += 1
        if self.global_step % self.every == 0:
            self.finetune(self.ctx)
            self.rounds += 1
