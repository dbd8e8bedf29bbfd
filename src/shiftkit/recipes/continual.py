"""Run a task sequence with a continual-learning strategy and fill the accuracy matrix.

:func:`run_sequence` evaluates the model zero-shot on every task, then for each task in turn: makes the model
score that task (``set_task``), lets the strategy prepare (:meth:`~shiftkit.continual.Strategy.begin_task`),
trains with :func:`~shiftkit.recipes.learn.train` and the strategy's hooks, lets the strategy finish
(``end_task``, ``remember``), and evaluates every task: ``A[t, d]``. The metrics are
:func:`shiftkit.continual.mtil_metrics` of ``A`` against the zero-shot row.

With ``checkpoint_dir`` the run is resumable: after each task the trained parameters (the shift's, or the
whole model's), the buffers and the rows so far are written as one atomic file, and a re-run with the same
tasks, strategy and settings skips the finished tasks (the strategy's memory is rebuilt from their training
batches; random draws after the restart differ from an uninterrupted run's, so a resumed run is equivalent,
not bit-identical). A folder holding another run is refused.

:class:`ZeroShotTextClassifier` is the model the text suites use: a sentence encoder that classifies by the
cosine similarity of a sentence to each of the task's label descriptions ("This review is positive."), the
CLIP recipe on one tower; ``set_task`` swaps the descriptions.

Example:
    >>> model = ZeroShotTextClassifier(encoder, tokenizer, [task.labels for task in tasks])
    >>> zs = ZeroShotTextClassifier
    >>> res = run_sequence(model, tasks, continual.make("zscl", avg_freq=10), TrainConfig(lr=1e-5),
    ...                    set_task=zs.set_task_of, features=zs.features_of, reference=reference_batches)
    >>> res.metrics["transfer"], res.metrics["last"]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.continual import Strategy, TaskContext, get_method, mtil_metrics
from shiftkit.continual.base import frozen_copy, trainable_parameters
from shiftkit.errors import ShiftkitError
from shiftkit.recipes.learn import Batches, TrainConfig, accuracy, train
from shiftkit.recipes.models import mean_pool

__all__ = ["ContinualResult", "ContinualTask", "ZeroShotTextClassifier", "evaluate_tasks", "run_sequence"]

Batch = Mapping[str, Tensor]


@dataclass
class ContinualTask:
    """One task of a sequence.

    Attributes:
        name: the task's name.
        labels: one description per class, in class order ("This review is negative.", ...).
        train: training batches (each with ``labels``).
        test: test batches.
    """

    name: str
    labels: Sequence[str]
    train: Batches
    test: Sequence[Batch]


@dataclass
class ContinualResult:
    """A run's accuracy matrix, zero-shot row, metrics and costs."""

    names: list[str]
    accuracy: list[list[float]]
    zero_shot: list[float]
    metrics: dict[str, float]
    train_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_tasks: int = 0


class ZeroShotTextClassifier(nn.Module):
    """``logits = scale · cos(f(x), f(label description))`` for the current task's descriptions.

    ``f`` is the encoder's mean-pooled token states (a sentence-transformers model such as the zoo's MiniLM
    is trained for exactly that similarity). The descriptions are encoded by the same encoder at every
    forward (with gradients while training), as CLIP's text tower is in ZSCL's fine-tuning.

    Args:
        encoder: called as ``encoder(input_ids=..., attention_mask=...)``, returning token states or an
            object with ``last_hidden_state``.
        tokenizer: a Hugging Face tokenizer (for the descriptions).
        tasks: each task's label descriptions, in task order.
        scale: the logit scale (CLIP's ``exp(logit_scale)`` is 100; 30 suits MiniLM's similarities).
    """

    def __init__(
        self, encoder: nn.Module, tokenizer: Any, tasks: Sequence[Sequence[str]], scale: float = 30.0
    ) -> None:
        super().__init__()
        if not tasks or any(len(t) < 2 for t in tasks):
            raise ShiftkitError("every task needs at least two label descriptions")
        self.encoder, self.scale, self.task = encoder, float(scale), 0
        self._labels: list[dict[str, Tensor]] = []
        for descriptions in tasks:
            if any(not isinstance(d, str) or not d.strip() for d in descriptions):
                raise ShiftkitError(
                    f"label descriptions must be non-empty strings, got {list(descriptions)!r}"
                )
            enc = tokenizer(
                list(descriptions), padding=True, truncation=True, max_length=32, return_tensors="pt"
            )
            self._labels.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised mean-pooled sentence features ``(batch, hidden)``."""
        out: Any = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out if isinstance(out, Tensor) else out.last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits over the current task's classes ``(batch, classes)``."""
        labels = self._labels[self.task]
        dev = input_ids.device
        desc = self.embed(labels["input_ids"].to(dev), labels["attention_mask"].to(dev))
        return self.scale * self.embed(input_ids, attention_mask) @ desc.T

    @staticmethod
    def set_task_of(model: nn.Module, index: int) -> None:
        """``set_task`` for :func:`run_sequence`: score task ``index``'s descriptions."""
        if not isinstance(model, ZeroShotTextClassifier):
            raise ShiftkitError(f"set_task_of expects a ZeroShotTextClassifier, got {type(model).__name__}")
        if not 0 <= index < len(model._labels):
            raise ShiftkitError(f"task index {index} out of range 0..{len(model._labels) - 1}")
        model.task = index

    @staticmethod
    def features_of(model: nn.Module, batch: Batch) -> Tensor:
        """``features`` for :func:`run_sequence`: the sentence features of a batch."""
        if not isinstance(model, ZeroShotTextClassifier):
            raise ShiftkitError(f"features_of expects a ZeroShotTextClassifier, got {type(model).__name__}")
        dev = next(model.parameters()).device
        return model.embed(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))


def evaluate_tasks(
    model: nn.Module, tasks: Sequence[ContinualTask], set_task: Callable[[nn.Module, int], None]
) -> list[float]:
    """The accuracy of ``model`` on every task's test set, each scored under its own labels (``set_task``)."""
    row = []
    for d, task in enumerate(tasks):
        set_task(model, d)
        row.append(accuracy(model, task.test))
    return row


def _save(path: Path, model: nn.Module, state: dict[str, Any]) -> None:
    """One atomic file: the trained parameters, the model's buffers (BatchNorm statistics) and the run's
    progress in its metadata; ``progress.json`` beside it is a readable copy."""
    from shiftkit._fileio import atomic_write_text
    from shiftkit.core.io import atomic_save_tensors

    tensors = {f"param.{n}": p.detach().contiguous().cpu() for n, p in trainable_parameters(model).items()}
    tensors.update({f"buffer.{n}": b.detach().contiguous().cpu() for n, b in model.named_buffers()})
    text = json.dumps(state)
    atomic_save_tensors(tensors, path / "latest.safetensors", {"progress": text})
    atomic_write_text(path / "progress.json", text + "\n")


def _resume(path: Path, model: nn.Module, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The progress of the run checkpointed in ``path`` (its weights loaded into ``model``), or ``None``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = path / "latest.safetensors"
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        state = json.loads(meta["progress"])
    except (KeyError, ValueError):
        raise ShiftkitError(f"{file} is not a run_sequence checkpoint; use another folder") from None
    if state.get("identity") != identity:
        raise ShiftkitError(
            f"{path} holds another run ({state.get('identity')}); use another checkpoint folder for this one"
        )
    saved = load_file(str(file))
    params = trainable_parameters(model)
    buffers = dict(model.named_buffers())
    if {k[6:] for k in saved if k.startswith("param.")} != set(params):
        raise ShiftkitError(f"{file} does not fit this model's trained parameters")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[f"param.{n}"])
        for n, b in buffers.items():
            if f"buffer.{n}" in saved:
                b.copy_(saved[f"buffer.{n}"])
    return state


def run_sequence(
    model: nn.Module,
    tasks: Sequence[ContinualTask],
    strategy: Strategy,
    train_config: TrainConfig,
    *,
    set_task: Callable[[nn.Module, int], None],
    features: Callable[[nn.Module, Batch], Tensor] | None = None,
    reference: Sequence[Batch] = (),
    initial: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool | None = None,
) -> ContinualResult:
    """Train ``tasks`` in order with ``strategy``; return the accuracy matrix and its metrics.

    Args:
        model: the model (a shift attached, or every parameter that requires grad trains).
        tasks: the sequence.
        strategy: a :class:`~shiftkit.continual.Strategy` (``continual.make(name, ...)``).
        train_config: the optimiser settings of each task's training.
        set_task: ``set_task(model, i)`` makes the model score task ``i``.
        features: sentence/image features of a batch (needed by ``zscl``'s distillation).
        reference: unlabelled reference batches (``zscl``).
        initial: the pretrained model as a frozen teacher; by default a frozen copy of ``model`` as given,
            made only when the strategy declares ``initial_model`` among its ``uses``.
        checkpoint_dir: write per-task checkpoints there and resume from them.
        progress: progress bars.

    Raises:
        ShiftkitError: no tasks, or a checkpoint folder of another run.
    """
    if not tasks:
        raise ShiftkitError("run_sequence needs at least one task")
    names = [t.name for t in tasks]
    spec_uses: tuple[str, ...] = ()
    for name in _strategy_names(strategy):
        spec_uses = get_method(name).uses
    if initial is None and "initial_model" in spec_uses:
        initial = frozen_copy(model)
    start = time.perf_counter()
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    identity = {"tasks": names, "strategy": type(strategy).__name__, "train": repr(train_config)}
    state = _resume(ckpt, model, identity) if ckpt is not None else None
    rows: list[list[float]] = state["accuracy"] if state else []
    seconds: list[float] = state["train_seconds"] if state else []
    done = len(rows)
    zero_shot: list[float] = state["zero_shot"] if state else evaluate_tasks(model, tasks, set_task)
    if done == 0:
        strategy.reset()
    params = list(trainable_parameters(model).values())
    for t, task in enumerate(tasks):
        set_task(model, t)
        ctx = TaskContext(
            model=model, index=t, names=names, set_task=set_task, train_batches=task.train,
            features=features, reference=reference, initial=initial,
        )  # fmt: skip
        if t < done:  # finished in an earlier run: only what the strategy keeps of it
            strategy.remember(ctx)
            continue
        strategy.begin_task(ctx)
        res = train(
            model, params, task.train, None, train_config, progress=progress, desc=task.name, hooks=strategy
        )
        strategy.end_task(ctx)
        strategy.remember(ctx)
        seconds.append(res.seconds)
        rows.append(evaluate_tasks(model, tasks, set_task))
        if ckpt is not None:
            progress_state = {
                "identity": identity,
                "accuracy": rows,
                "zero_shot": zero_shot,
                "train_seconds": seconds,
            }
            _save(ckpt, model, progress_state)
    set_task(model, len(tasks) - 1)
    return ContinualResult(
        names=names,
        accuracy=rows,
        zero_shot=zero_shot,
        metrics=mtil_metrics(rows, zero_shot=zero_shot or None),
        train_seconds=seconds,
        seconds=time.perf_counter() - start,
        resumed_tasks=done,
    )


def _strategy_names(strategy: Strategy) -> list[str]:
    from shiftkit.continual import CONTINUAL_METHODS

    return [name for name, spec in CONTINUAL_METHODS.items() if isinstance(strategy, spec.cls)]
