"""CONTRIBUTING.md's continual-strategy example, run as written: registered by its one decorator, built by
continual.make, and trained through run_sequence with its extra loss in every step."""

from __future__ import annotations

import torch
from torch import nn

from contributing_docs import run_section_example
from shiftkit import continual
from shiftkit.continual.registry import CONTINUAL_METHODS
from shiftkit.recipes.continual import ContinualTask, run_sequence
from shiftkit.recipes.learn import TrainConfig


class _Head(nn.Module):
    """Logits of task ``task`` from one shared linear map (two tasks, two classes each)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.task = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out[:, 2 * self.task : 2 * self.task + 2]


def _set(model: nn.Module, i: int) -> None:
    assert isinstance(model, _Head)
    model.task = i


def test_contributing_strategy_example() -> None:
    try:
        run_section_example("A continual strategy")
        g = torch.Generator().manual_seed(1)
        tasks = []
        for t in range(2):
            x = torch.randn(16, 4, generator=g)
            y = (x[:, t] > 0).long()
            batches = [{"x": x[i : i + 8], "labels": y[i : i + 8]} for i in (0, 8)]
            tasks.append(ContinualTask(f"t{t}", ["no", "yes"], batches, batches))
        tc = TrainConfig(epochs=3, lr=0.1, warmup_ratio=0.0, grad_clip=0.0)
        free, anchored = _Head(), _Head()
        start = anchored.lin.weight.detach().clone()
        run_sequence(free, tasks, continual.make("finetune"), tc, set_task=_set, progress=False)
        res = run_sequence(
            anchored, tasks, continual.make("anchor", weight=10.0), tc, set_task=_set, progress=False
        )
        assert len(res.accuracy) == 2
        moved_free = (free.lin.weight - start).norm()
        moved_anchored = (anchored.lin.weight - start).norm()
        assert moved_anchored < 0.5 * moved_free  # the pull towards the task start is in every step
    finally:
        CONTINUAL_METHODS._entries.pop("anchor", None)
