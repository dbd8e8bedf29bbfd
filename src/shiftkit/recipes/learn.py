"""An explicit training loop for shifts (and for full fine-tuning or a linear probe): copy it and edit it.

AdamW without weight decay on 1-D parameters, linear warm-up then cosine decay to 0, gradient-norm
clipping, periodic evaluation, a tqdm progress bar, and one seed for everything random.

Example:
    >>> model, tok = text_classifier("minilm")
    >>> sk.attach_(model, sk.LoRAConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
    ...                                 modules_to_save=("head",)))
    >>> data = encode_texts(tok, texts, labels, max_length=64)
    >>> result = train(model, sk.shift_parameters(model), text_batches(data, 16, shuffle=True),
    ...                None, TrainConfig(epochs=2, lr=5e-4))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from shiftkit.core.attach import regularization_loss
from shiftkit.core.training import TrainHooks
from shiftkit.errors import ShiftkitError
from shiftkit.recipes.distributed import PARALLEL, Dist, local_rows

__all__ = [
    "Batches",
    "EncodedTexts",
    "LengthBuckets",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "accuracy",
    "cosine_schedule",
    "encode_texts",
    "eval_batches",
    "logits_accuracy",
    "param_groups",
    "predict",
    "tensor_batches",
    "text_batches",
    "train",
]

Batch = Mapping[str, Tensor]


class Batches(Sized, Iterable[Batch], Protocol):
    """What :func:`train` iterates once per epoch: a sized, re-iterable source of batches (a DataLoader)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training settings.

    Attributes:
        epochs: passes over the training batches.
        lr: peak learning rate (reached at the end of the warm-up).
        weight_decay: AdamW decoupled weight decay on matrices; vectors (biases, norms, SSF's γ/β) get none,
            since decaying SSF's γ would pull the scale towards 0 instead of towards the identity.
        warmup_ratio: fraction of the steps spent warming up linearly from 0.
        batch_size: examples per batch (used by the batch helpers and the ``learn`` recipe).
        grad_clip: maximum global gradient norm; ``0`` disables clipping.
        eval_every: evaluate every this many steps (``0``: only at the end).
        seed: seeds the global RNG at the start of :func:`train` (shuffling, dropout, head init).
        max_length: tokens kept per text (longer texts are truncated).
        parallel: how ``torchrun`` ranks share the model (:mod:`shiftkit.recipes.distributed`): ``"ddp"``
            (each holds it whole) or ``"fsdp"`` (FSDP2: every parameter sharded across them). Without
            ``torchrun`` it has no effect.
        max_steps: stop after this many steps (the schedule is laid over them); ``0``: run every epoch.
    """

    epochs: int = 3
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    batch_size: int = 16
    grad_clip: float = 1.0
    eval_every: int = 0
    seed: int = 0
    max_length: int = 64
    parallel: str = "ddp"
    max_steps: int = 0

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "batch_size": self.batch_size >= 1,
            "grad_clip": self.grad_clip >= 0,
            "eval_every": self.eval_every >= 0,
            "max_length": self.max_length >= 2,
            "parallel": self.parallel in PARALLEL,
            "max_steps": isinstance(self.max_steps, int) and self.max_steps >= 0,
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise ShiftkitError(f"invalid TrainConfig: {', '.join(bad)}")


@dataclass
class TrainResult:
    """What :func:`train` measured.

    Attributes:
        steps: optimiser steps taken.
        seconds: wall time of the loop, evaluations excluded.
        losses: training loss of every step.
        evals: ``(step, metrics)`` of every evaluation, the last one at the final step.
    """

    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def final_metrics(self) -> dict[str, float]:
        """Metrics of the last evaluation (empty without an ``eval_fn``)."""
        return self.evals[-1][1] if self.evals else {}


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up ``step / warmup``, then cosine decay from 1 to 0.

    Same formula as ``transformers.get_cosine_schedule_with_warmup`` (half a cosine period).

    Example:
        >>> cosine_schedule(5, total=110, warmup=10), cosine_schedule(60, total=110, warmup=10)
        (0.5, 0.5)
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; vectors, scalars and vector-shaped matrices do not.

    A vector stored as a ``(n, 1)`` or ``(1, n)`` matrix (PEFT's layout of the (IA)³ scales) is a vector:
    decaying scales (or SSF's γ, or SVFit's singular values) would pull them toward 0, not toward the base.

    Example:
        >>> opt = torch.optim.AdamW(param_groups(sk.shift_parameters(model), 0.01), lr=1e-3)
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and sum(d > 1 for d in p.shape) >= 2]
    ids = {id(p) for p in decay}
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0},
    ]


# --- batching ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedTexts:
    """Tokenised texts, unpadded (padding happens per batch), with their labels.

    Attributes:
        input_ids: token ids of each text.
        labels: class of each text.
        pad_id: the tokenizer's padding id.
    """

    input_ids: list[list[int]]
    labels: list[int]
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)


def encode_texts(
    tokenizer: Any, texts: Sequence[str], labels: Iterable[int], max_length: int
) -> EncodedTexts:
    """Tokenise once (truncating to ``max_length``), so every epoch and every method reuses the ids.

    Args:
        tokenizer: a Hugging Face tokenizer, or any callable ``tokenizer(texts, truncation=True,
            max_length=n)`` returning ``{"input_ids": [[int, ...], ...]}`` with a ``pad_token_id``.
        texts: the texts.
        labels: their classes (a list or an int array of shape ``(n,)``).
        max_length: tokens kept per text.

    Example:
        >>> data = encode_texts(tok, ["good", "bad"], [1, 0], max_length=64)
    """
    texts = list(texts)
    # Hugging Face's fast tokenizers fail on an empty batch: no texts, no call
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
    labels = [int(y) for y in labels]
    if len(ids) != len(labels):
        raise ShiftkitError(f"{len(ids)} texts but {len(labels)} labels")
    pad = getattr(tokenizer, "pad_token_id", None)
    return EncodedTexts([list(x) for x in ids], labels, 0 if pad is None else int(pad))


def _collate(pad_id: int) -> Callable[[list[tuple[list[int], int]]], dict[str, Tensor]]:
    def collate(items: list[tuple[list[int], int]]) -> dict[str, Tensor]:
        # dynamic padding: pad to the longest text of this batch, not to max_length
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (ids, _) in enumerate(items):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        labels = torch.tensor([y for _, y in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    return collate


class LengthBuckets(Sampler[list[int]]):
    """Batches of similar length: each epoch shuffles, cuts pools of ``pool`` batches, sorts each pool by
    length, and shuffles the batches (all from the global RNG, so :func:`train`'s seed fixes the order).

    Texts of a batch are padded to the longest of them, so random batches of short and long sentences spend
    much of their compute on padding; batches drawn from a sorted pool carry little (the usual bucketing of
    sequence training, e.g. fairseq's and Hugging Face's ``group_by_length``).

    Example:
        >>> batches = list(LengthBuckets([5, 1, 4, 2], batch_size=2, pool=2))
        >>> sorted(len(b) for b in batches)
        [2, 2]
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, pool: int = 16) -> None:
        if batch_size < 1 or pool < 1:
            raise ShiftkitError(f"batch_size and pool must be positive, got {batch_size} and {pool}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.pool = pool

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths)).tolist()
        size = self.batch_size * self.pool
        batches: list[list[int]] = []
        for i in range(0, len(order), size):
            chunk = sorted(order[i : i + size], key=lambda j: self.lengths[j])
            batches += [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches)).tolist():
            yield batches[b]


def text_batches(
    data: EncodedTexts, batch_size: int, *, shuffle: bool = True, by_length: bool = False
) -> DataLoader:
    """Training batches ``{"input_ids", "attention_mask", "labels"}``, dynamically padded.

    The shuffle draws from the global RNG, so the seed that :func:`train` sets fixes the order.

    Args:
        data: the tokenised texts.
        batch_size: texts per batch.
        shuffle: reshuffle every epoch.
        by_length: with ``shuffle``, batch texts of similar length together (:class:`LengthBuckets`): less
            padding, so an epoch of short sentences costs up to about half as much compute.

    Example:
        >>> loader = text_batches(encode_texts(tok, texts, labels, 64), batch_size=16)
    """
    items = list(zip(data.input_ids, data.labels))
    collate = _collate(data.pad_id)
    # a list is a map-style dataset (len + getitem); the cast is for the type checker only
    if shuffle and by_length:
        sampler = LengthBuckets([len(x) for x in data.input_ids], batch_size)
        return DataLoader(cast(Dataset, items), batch_sampler=sampler, collate_fn=collate)
    return DataLoader(cast(Dataset, items), batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


def eval_batches(data: EncodedTexts, batch_size: int = 64) -> list[dict[str, Tensor]]:
    """Evaluation batches, built once: texts sorted by length so each batch carries little padding.

    The order differs from ``data``'s; labels travel with their batch, so metrics are unaffected.

    Example:
        >>> acc = accuracy(model, eval_batches(encode_texts(tok, texts, labels, 64)))
    """
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    collate = _collate(data.pad_id)
    items = [(data.input_ids[i], data.labels[i]) for i in order]
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def tensor_batches(features: Tensor, labels: Tensor, batch_size: int, *, shuffle: bool = True) -> DataLoader:
    """Batches ``{"input", "labels"}`` of precomputed features, for a model called as ``model(input)``.

    That is how a linear probe trains its ``nn.Linear`` head on cached sentence features.

    Args:
        features: one row per example, shape ``(n, d)``.
        labels: classes, shape ``(n,)``.
        batch_size: examples per batch.
        shuffle: reshuffle every epoch (from the global RNG).

    Example:
        >>> train(model.head, list(model.head.parameters()), tensor_batches(x, y, 32), None, TrainConfig())
    """
    items = [{"input": f, "labels": y} for f, y in zip(features, labels)]
    return DataLoader(cast(Dataset, items), batch_size=batch_size, shuffle=shuffle)


# --- the loop ---------------------------------------------------------------------------------------
def _to(batch: Batch, device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    train_batches: Batches,
    eval_fn: Callable[[], Mapping[str, float]] | None,
    config: TrainConfig,
    *,
    progress: bool | None = None,
    desc: str = "train",
    dist: Dist | None = None,
    hooks: TrainHooks | None = None,
) -> TrainResult:
    """Train ``params`` of ``model`` on ``train_batches`` with cross-entropy.

    The loss is cross-entropy plus :func:`shiftkit.regularization_loss` of the attached shift.
    Each batch is a mapping with a ``"labels"`` tensor ``(batch,)``; every other entry is passed to
    ``model(**inputs)``, which must return logits ``(batch, classes)``. The model is in train mode while
    training (dropout on) and in eval mode during ``eval_fn`` and after the loop.

    Args:
        model: the model (with a shift attached, or not).
        params: the parameters to optimise, e.g. ``sk.shift_parameters(model)``.
        train_batches: a sized, re-iterable batch source (a DataLoader), iterated once per epoch.
        eval_fn: returns metrics (e.g. ``{"accuracy": 0.9}``); called every ``config.eval_every`` steps
            and at the end. ``None`` skips evaluation.
        config: the settings.
        progress: show a tqdm bar with the loss on stderr; ``None`` shows it only on a terminal.
        desc: the bar's label.
        dist: this process's rank among several (:mod:`shiftkit.recipes.distributed`): each global batch
            is split row-wise and each rank's loss is its share of the global mean, so the averaged
            gradients are single-process training's. The logged loss is the global one.
        hooks: extension points called at each step (:class:`TrainHooks`).

    Returns:
        Steps, timing, the loss of every step and the evaluations.

    Example:
        >>> sk.attach_(model, sk.SSFConfig(modules_to_save=("head",)))
        >>> res = train(model, sk.shift_parameters(model), loader, None, TrainConfig(lr=5e-3))
    """
    dist = dist or Dist()
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ShiftkitError("train: no parameter requires grad; attach a shift or unfreeze parameters first")
    if len(train_batches) == 0:
        raise ShiftkitError("train: the training set has no batches")
    torch.manual_seed(config.seed)
    device = params[0].device
    opt = torch.optim.AdamW(param_groups(params, config.weight_decay), lr=config.lr)
    hooks = hooks or TrainHooks()
    total = config.epochs * len(train_batches)
    if config.max_steps:
        total = min(total, config.max_steps)
    warmup = round(config.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, total, warmup))
    result = TrainResult()
    quiet = (progress is False) or not dist.is_main
    bar = tqdm(
        total=total, desc=desc, disable=True if quiet else None if progress is None else False, leave=False
    )

    def evaluate() -> None:
        if eval_fn is None:
            return
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in eval_fn().items()}
        model.train()
        result.evals.append((result.steps, metrics))
        bar.set_postfix({"loss": f"{result.losses[-1]:.3f}", **{k: f"{v:.3f}" for k, v in metrics.items()}})

    start, eval_time = time.perf_counter(), 0.0
    model.train()
    try:
        for _ in range(config.epochs):
            if result.steps >= total:
                break
            for batch in train_batches:
                if result.steps >= total:
                    break
                mine, n_global = local_rows(batch, dist)  # this rank's rows of the global batch
                inputs = _to(mine, device)
                labels = inputs.pop("labels")
                hooks.on_batch(inputs)
                # this rank's share of the global mean (the ranks' gradients are averaged), plus the shift's
                # own regulariser (PEGO's orthogonality loss; zero for most methods)
                logits = model(**inputs)
                ce = F.cross_entropy(logits, labels, reduction="sum") * (dist.world / n_global)
                loss = ce + regularization_loss(model) + hooks.extra_loss(logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                hooks.after_backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                sched.step()
                hooks.after_step()
                result.steps += 1
                result.losses.append(_global_loss(loss.detach(), dist))
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
                if config.eval_every and result.steps % config.eval_every == 0 and result.steps < total:
                    t = time.perf_counter()
                    evaluate()
                    eval_time += time.perf_counter() - t
        result.seconds = time.perf_counter() - start - eval_time
        evaluate()
    finally:
        bar.close()
        model.eval()
    return result


def _global_loss(loss: Tensor, dist: Dist) -> float:
    """The loss of the whole global batch: the mean over the ranks of their shares."""
    if not dist.active:
        return float(loss)
    import torch.distributed as td

    total = loss.clone()
    td.all_reduce(total)
    return float(total) / dist.world


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch]) -> tuple[Tensor, Tensor]:
    """Logits and labels over ``batches`` (model in eval mode, no gradients).

    Returns:
        ``(logits, labels)`` of shapes ``(n, classes)`` and ``(n,)``, in batch order.

    Example:
        >>> logits, labels = predict(model, eval_batches(data))
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    try:
        for batch in batches:
            inputs = _to(batch, device)
            labels.append(inputs.pop("labels"))
            logits.append(model(**inputs).float())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def accuracy(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Fraction of ``batches``' examples whose arg-max logit is the label.

    Example:
        >>> accuracy(model, eval_batches(data))
        0.87
    """
    return logits_accuracy(*predict(model, batches))


def logits_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max logit is the label.

    Args:
        logits: ``(n, classes)``.
        labels: ``(n,)``.

    Example:
        >>> logits_accuracy(torch.tensor([[0.1, 0.9]]), torch.tensor([1]))
        1.0
    """
    return float((logits.argmax(-1) == labels).float().mean())
