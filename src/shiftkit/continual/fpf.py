"""``fpf`` and the shared fine-tuning step of ``k_fpf``: Fine-tuning Partial Forgettable parameters (Zhao et
al., "Does Continual Learning Equally Forget All Parameters?", ICML 2023; spec adapt-continual.md §6.16).

Only a few modules are task-specific and change sensitively between tasks; the paper finds normalisation
layers and the classifier head the most sensitive (the CNN finding; for a transformer the same "norm + head"
subset is the default here). After each task, FPF fine-tunes only those modules' parameters for a few
iterations on a small replay memory of every task seen so far, each example scored under its own task's
labels.

The modules are chosen by ``modules``: ``"norm"`` selects every normalisation layer (a class whose name
contains ``Norm``), any other entry a module whose name equals it or ends with ``"." + entry``. Their own
parameters train (temporarily unfrozen), so FPF fine-tunes the model itself; with a shift attached it
tunes the shift's parameters inside those modules instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shiftkit.continual.base import Memory, Strategy, TaskContext, check_positive
from shiftkit.continual.registry import register_method
from shiftkit.core.attach import attached_method, named_shift_parameters
from shiftkit.errors import ShiftkitError

__all__ = ["FPF", "partial_finetune", "sensitive_parameters"]


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def sensitive_parameters(
    model: nn.Module, modules: Sequence[str] = ("norm", "head")
) -> dict[str, nn.Parameter]:
    """The parameters FPF tunes: those of the modules ``modules`` selects (see the module docstring).

    Raises:
        ShiftkitError: nothing is selected.
    """
    chosen = []
    for name, module in model.named_modules():
        is_norm = "Norm" in type(module).__name__
        if any(is_norm if e == "norm" else _matches(name, e) for e in modules):
            chosen.append(name)
    if attached_method(model) is not None:
        params = {
            n: p
            for n, p in named_shift_parameters(model).items()
            if any(n.startswith(c + ".") for c in chosen)
        }
    else:
        params = {}
        for c in chosen:
            for n, p in model.get_submodule(c).named_parameters(recurse=False):
                params[f"{c}.{n}" if c else n] = p
    if not params:
        raise ShiftkitError(f"FPF selected no parameter with modules={list(modules)!r}")
    return params


def partial_finetune(
    ctx: TaskContext,
    memory: Memory,
    params: dict[str, nn.Parameter],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """``steps`` AdamW steps on ``params`` only, on batches drawn from ``memory`` (each example under its
    own task's labels); every other parameter keeps its ``requires_grad`` and is left unchanged."""
    model = ctx.model
    device = next(iter(params.values())).device
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    try:
        for _ in range(steps):
            loss: torch.Tensor | float = 0.0
            for task, batch in memory.sample(batch_size, generator):
                ctx.set_task(model, task)
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                out = model(**inputs)
                loss = loss + F.cross_entropy(out, batch["labels"].to(out.device), reduction="sum")
            if not isinstance(loss, torch.Tensor):
                return
            opt.zero_grad(set_to_none=True)
            (loss / batch_size).backward()
            opt.step()
    finally:
        ctx.set_task(model, ctx.index)
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        for p in params.values():
            p.grad = None


@register_method("fpf", uses=("old_task_data",))
class FPF(Strategy):
    """After each task, fine-tune the sensitive modules on a memory of every task so far.

    Args:
        memory: examples kept per task (64).
        steps: fine-tuning iterations after each task (20).
        lr: their AdamW learning rate (1e-3).
        batch_size: memory examples per iteration (16).
        modules: which modules are tuned (``("norm", "head")``).
        seed: seeds the draws from the memory.

    Example:
        >>> strategy = continual.make("fpf", steps=20)
    """

    def __init__(
        self,
        memory: int = 64,
        steps: int = 20,
        lr: float = 1e-3,
        batch_size: int = 16,
        modules: Sequence[str] = ("norm", "head"),
        seed: int = 0,
    ) -> None:
        check_positive("fpf memory", memory, integer=True)
        check_positive("fpf steps", steps, integer=True)
        check_positive("fpf lr", lr)
        check_positive("fpf batch_size", batch_size, integer=True)
        self.memory = Memory(memory)
        self.steps, self.lr, self.batch_size = steps, float(lr), batch_size
        self.modules = (modules,) if isinstance(modules, str) else tuple(modules)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def end_task(self, ctx: TaskContext) -> None:
        """Add the task to the memory, then fine-tune the sensitive modules on it."""
        self.remember(ctx)
        self.finetune(ctx)

    def finetune(self, ctx: TaskContext) -> None:
        """One round of partial fine-tuning of the sensitive modules on the memory."""
        params = sensitive_parameters(ctx.model, self.modules)
        partial_finetune(
            ctx, self.memory, params, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
            generator=self.generator,
        )  # fmt: skip

    def reset(self) -> None:
        """An empty memory and the generator back at its seed."""
        self.memory.items.clear()
        self.generator.manual_seed(self.seed)

    def remember(self, ctx: TaskContext) -> None:
        """Keep the task's first ``memory`` training examples (idempotent: keyed by the task)."""
        self.memory.add_task(ctx.index, ctx.train_batches)
