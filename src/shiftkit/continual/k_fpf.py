"""``k_fpf``: FPF without every-step replay (Zhao et al., ICML 2023; spec adapt-continual.md §6.16).

The stream is trained plainly and FPF's partial fine-tuning on the memory is triggered periodically, every
``every`` training steps counted over the whole sequence, regardless of task boundaries. The memory holds up
to ``memory`` examples of each task, the current one included from its start."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shiftkit.continual.base import Memory, Strategy, TaskContext, check_positive
from shiftkit.continual.fpf import partial_finetune, sensitive_parameters
from shiftkit.continual.registry import register_method

__all__ = ["KFPF"]


@register_method("k_fpf", uses=("old_task_data",))
class KFPF(Strategy):
    """Plain training with FPF triggered every ``every`` steps.

    Args:
        every: training steps between two FPF rounds (50).
        memory: examples kept per task (64).
        steps: iterations of each FPF round (20).
        lr: their AdamW learning rate (1e-3).
        batch_size: memory examples per iteration (16).
        modules: which modules are tuned (``("norm", "head")``).
        seed: seeds the draws from the memory.

    Example:
        >>> strategy = continual.make("k_fpf", every=32)
    """

    def __init__(
        self,
        every: int = 50,
        memory: int = 64,
        steps: int = 20,
        lr: float = 1e-3,
        batch_size: int = 16,
        modules: Sequence[str] = ("norm", "head"),
        seed: int = 0,
    ) -> None:
        check_positive("k_fpf every", every, integer=True)
        check_positive("k_fpf memory", memory, integer=True)
        check_positive("k_fpf steps", steps, integer=True)
        check_positive("k_fpf lr", lr)
        check_positive("k_fpf batch_size", batch_size, integer=True)
        self.every, self.memory = every, Memory(memory)
        self.steps, self.lr, self.batch_size = steps, float(lr), batch_size
        self.modules = tuple(modules)
        self.generator = torch.Generator().manual_seed(seed)
        self.global_step = 0
        self.rounds = 0

    def begin_task(self, ctx: TaskContext) -> None:
        """The current task's examples join the memory from the start (the stream's buffer)."""
        super().begin_task(ctx)
        self.remember(ctx)

    def after_step(self) -> None:
        """Every ``every`` steps, one FPF round on the memory."""
        self.global_step += 1
        if self.global_step % self.every == 0:
            params = sensitive_parameters(self.ctx.model, self.modules)
            partial_finetune(
                self.ctx, self.memory, params, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                generator=self.generator,
            )  # fmt: skip
            self.rounds += 1

    def remember(self, ctx: TaskContext) -> None:
        """Keep the task's first ``memory`` training examples (idempotent: keyed by the task)."""
        self.memory.add_task(ctx.index, ctx.train_batches)
