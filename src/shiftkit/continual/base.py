"""What every continual-learning strategy shares: the task context a runner hands it, the hook base class,
the replay memory, and the helpers several strategies use (which parameters train, distillation).

A strategy is a :class:`Strategy`: the training loop's hooks (:class:`shiftkit.core.training.TrainHooks`:
an extra loss given the step's logits, a call after each backward and after each optimiser step) plus
:meth:`Strategy.begin_task` and :meth:`Strategy.end_task`, which a runner (:func:`shiftkit.recipes.continual
.run_sequence`) calls around each task with a :class:`TaskContext`.

Tasks may each have their own label set (a zero-shot classifier scores a task's label descriptions):
``ctx.set_task(model, i)`` makes ``model(**inputs)`` score task ``i``'s labels, which is how a strategy
replays an earlier task's examples under that task's labels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.continual.mixer import _pad_cat
from shiftkit.core.attach import attached_method, named_shift_parameters
from shiftkit.core.training import TrainHooks
from shiftkit.errors import ShiftkitError

__all__ = ["Batch", "Memory", "Strategy", "TaskContext", "frozen_copy", "kd_loss", "trainable_parameters"]

Batch = Mapping[str, Tensor]


@dataclass
class TaskContext:
    """What a runner tells a strategy about the task at hand.

    Attributes:
        model: the model being trained (its shift's parameters train when one is attached, else all).
        index: the task's position in the sequence (0-based).
        names: every task's name, in order.
        set_task: ``set_task(model, i)`` makes ``model(**inputs)`` return task ``i``'s logits.
        train_batches: the current task's training batches (each with ``labels``).
        features: ``features(model, inputs) -> (batch, dim)`` sentence/image features (ZSCL distils them);
            ``None`` when the model has none.
        reference: unlabelled reference batches (no ``labels``), diverse data for distillation.
        initial: the pretrained model, frozen (ZSCL's teacher); ``None`` when not provided.
    """

    model: nn.Module
    index: int
    names: Sequence[str]
    set_task: Callable[[nn.Module, int], None]
    train_batches: Iterable[Batch] = ()
    features: Callable[[nn.Module, Batch], Tensor] | None = None
    reference: Sequence[Batch] = ()
    initial: nn.Module | None = None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a continual run trains: the attached shift's, or every parameter that requires grad."""
    if attached_method(model) is not None:
        return named_shift_parameters(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no parameter requiring grad (a teacher)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def kd_loss(teacher: Tensor, student: Tensor, temperature: float = 2.0) -> Tensor:
    """Knowledge distillation as ZSCL and LwF compute it: ``CE(student/T, softmax(teacher/T))·T²``, averaged
    over rows."""
    t = temperature
    target = F.softmax(teacher.detach() / t, dim=-1)
    return -(target * F.log_softmax(student / t, dim=-1)).sum(-1).mean() * t * t


def _rows(batch: Batch) -> int:
    return int(next(iter(batch.values())).shape[0])


@dataclass
class Memory:
    """A replay memory: up to ``per_task`` examples of each finished task, kept with the task's index.

    Rows are taken in order from the task's training batches (which a DataLoader shuffles), padded to a
    common length when they are token sequences.
    """

    per_task: int
    items: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    def add_task(self, index: int, batches: Iterable[Batch]) -> None:
        """Keep the first ``per_task`` rows of ``batches`` as task ``index``'s examples."""
        parts: list[Batch] = []
        have = 0
        for b in batches:
            if have >= self.per_task:
                break
            take = min(self.per_task - have, _rows(b))
            parts.append({k: v[:take] for k, v in b.items()})
            have += take
        if parts:
            self.items[index] = _cat(parts)

    def __len__(self) -> int:
        return sum(_rows(b) for b in self.items.values())

    def sample(self, n: int, generator: torch.Generator) -> list[tuple[int, Batch]]:
        """``n`` examples drawn uniformly from the memory, grouped by task: ``[(task, batch), ...]``."""
        if not self.items:
            return []
        tasks = sorted(self.items)
        sizes = torch.tensor([_rows(self.items[t]) for t in tasks], dtype=torch.float64)
        pick = torch.multinomial(sizes / sizes.sum(), n, replacement=True, generator=generator)
        out: list[tuple[int, Batch]] = []
        for j, t in enumerate(tasks):
            k = int((pick == j).sum())
            if k:
                rows = torch.randint(_rows(self.items[t]), (k,), generator=generator)
                out.append((t, {key: v[rows] for key, v in self.items[t].items()}))
        return out


def _cat(parts: list[Batch]) -> dict[str, Tensor]:
    return {k: _pad_cat([p[k] for p in parts], -100 if k == "labels" else 0) for k in parts[0]}


class Strategy(TrainHooks):
    """A continual-learning strategy: the training loop's hooks plus the task boundaries.

    ``begin_task`` runs before a task's training (the model already scores that task), ``end_task`` after
    it; the hooks of :class:`~shiftkit.core.training.TrainHooks` run inside each step. The default of each
    does nothing, which is sequential fine-tuning.
    """

    def begin_task(self, ctx: TaskContext) -> None:
        """Called before training task ``ctx.index``."""
        self.ctx = ctx

    def end_task(self, ctx: TaskContext) -> None:
        """Called after training task ``ctx.index`` (the model is what will be evaluated)."""

    def remember(self, ctx: TaskContext) -> None:
        """Record what the strategy keeps of a finished task (a replay memory); called after
        :meth:`end_task`, and for finished tasks when a run resumes."""

    def reset(self) -> None:
        """Forget everything from an earlier run (memories, counters, random state); called when a run
        starts from its first task, so one strategy object can run several sequences."""


def check_positive(name: str, value: object, *, integer: bool = False, allow_zero: bool = False) -> None:
    """A clear error for a bad numeric option."""
    kinds = (int,) if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kinds)
    if ok and (value < 0 or (value == 0 and not allow_zero)):  # type: ignore[operator]
        ok = False
    if not ok:
        raise ShiftkitError(
            f"{name} must be a {'positive integer' if integer else 'positive number'}, got {value!r}"
        )
