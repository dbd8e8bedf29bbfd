"""``replay``: experience replay with a small memory. After each task, up to ``memory`` of its training
examples are kept; every step then adds ``weight ×`` the cross-entropy of a batch drawn uniformly from the
memory, each example scored under its own task's labels (``ctx.set_task``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from shiftkit.continual.base import Memory, Strategy, TaskContext, check_positive
from shiftkit.continual.registry import register_method

__all__ = ["Replay"]


@register_method("replay", uses=("old_task_data",))
class Replay(Strategy):
    """Replay a memory of earlier tasks' examples at every step.

    Args:
        memory: examples kept per finished task (64).
        batch_size: replayed examples per step (16).
        weight: weight of the replay loss (1.0).
        seed: seeds the draws from the memory.

    Example:
        >>> strategy = continual.make("replay", memory=64)
    """

    def __init__(self, memory: int = 64, batch_size: int = 16, weight: float = 1.0, seed: int = 0) -> None:
        check_positive("replay memory", memory, integer=True)
        check_positive("replay batch_size", batch_size, integer=True)
        check_positive("replay weight", weight, allow_zero=True)
        self.memory = Memory(memory)
        self.batch_size, self.weight = batch_size, float(weight)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def extra_loss(self, logits: Tensor) -> Tensor | float:
        """``weight ×`` the mean cross-entropy of a replayed batch (0 before any task has finished)."""
        if not self.memory.items or self.weight == 0:
            return 0.0
        ctx = self.ctx
        total: Tensor | float = 0.0
        try:
            for task, batch in self.memory.sample(self.batch_size, self.generator):
                ctx.set_task(ctx.model, task)
                inputs = {k: v.to(logits.device) for k, v in batch.items() if k != "labels"}
                out = ctx.model(**inputs)
                total = total + F.cross_entropy(out, batch["labels"].to(out.device), reduction="sum")
        finally:
            ctx.set_task(ctx.model, ctx.index)
        return self.weight * total / self.batch_size

    def reset(self) -> None:
        """An empty memory and the generator back at its seed."""
        self.memory.items.clear()
        self.generator.manual_seed(self.seed)

    def remember(self, ctx: TaskContext) -> None:
        """Keep the finished task's first ``memory`` training examples."""
        self.memory.add_task(ctx.index, ctx.train_batches)
