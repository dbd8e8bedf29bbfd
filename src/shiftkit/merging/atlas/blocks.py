"""Internals of aTLAS (see :mod:`shiftkit.merging.atlas.method`): random partitions, the resident
task-vector blocks ``p_b(Λ) = θ0_b + Σ_t Σ_k λ_{t,b,k} (M_{b,k} ⊙ τ_{t,b})``, batch handling and the two
objectives.

Nothing here modifies the model: parameters are substituted with :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from shiftkit.core.attach import attached_wrappers
from shiftkit.core.encoding import decoded
from shiftkit.core.shift import DELTA, Shift
from shiftkit.core.tying import collapse_tied, model_names
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.sparsify import key_seed

__all__ = [
    "AtlasBlocks",
    "atlas_partition",
    "check_hparams",
    "default_forward",
    "entropy_loss",
    "split_batch",
    "supervised_loss",
    "to_device",
]

#: ``forward(model_or_callable, inputs) -> logits``
ForwardFn = Callable[[Callable[..., Any], Any], Tensor]


def atlas_partition(key: str, shape: Sequence[int], partitions: int, seed: int) -> Tensor:
    """The fixed random partition of block ``key`` (aTLAS × K): each entry's partition index in ``[0, K)``.

    Keyed by the tensor *name* and ``seed`` (not by block order or device), so every block gets its own
    partition and a merge can rebuild it without the training run. (The reference code keys it by shape; not
    reproduced.)

    Args:
        key: tensor name, e.g. ``"fc1.weight"``.
        shape: the block's shape.
        partitions: ``K >= 1``.
        seed: the partition seed.

    Returns:
        Partition indices, shape ``shape``, dtype uint8 (K <= 256) or int32.

    Example:
        >>> m = atlas_partition("fc1.weight", (8, 6), 4, seed=0)
        >>> m.shape, int(m.max()) < 4
        (torch.Size([8, 6]), True)
    """
    if partitions < 1:
        raise ShiftkitError(f"partitions must be >= 1, got {partitions}")
    gen = torch.Generator(device="cpu").manual_seed(key_seed(seed, key, 0))
    idx = torch.randint(0, partitions, tuple(shape), generator=gen)
    # stored compactly: the index map stays resident for the whole run, one per block
    return idx.to(torch.uint8 if partitions <= 256 else torch.int32)


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(inputs, labels)`` of one batch: a pair, a dict (its ``"labels"`` entry split off) or bare inputs.

    Example:
        >>> split_batch({"input_ids": ids, "attention_mask": m, "labels": y})[1] is y
        True
    """
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        return inputs, inputs.pop("labels", None)
    if isinstance(batch, tuple | list):
        if len(batch) != 2:
            raise ShiftkitError(f"a batch tuple must be (inputs, labels), got {len(batch)} items")
        return batch[0], batch[1]
    return batch, None


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or a dict of tensors) moved to ``device``; anything else unchanged."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def default_forward(model: Callable[..., Any], inputs: Any) -> Tensor:
    """``model(**inputs)`` for a dict, ``model(inputs)`` otherwise; ``.logits`` of the output if it has one.

    Example:
        >>> default_forward(model, {"input_ids": ids, "attention_mask": m}).shape
        torch.Size([4, 2])
    """
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    out = getattr(out, "logits", out)
    if not isinstance(out, Tensor):
        raise ShiftkitError(
            f"the model returned a {type(out).__name__}, not logits: "
            "pass forward=lambda m, x: ... to learn_atlas"
        )
    return out


def entropy_loss(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the last dimension.

    Args:
        logits: shape ``(..., classes)``.

    Returns:
        A scalar.

    Example:
        >>> float(entropy_loss(torch.zeros(4, 2)))  # uniform over 2 classes: ln 2
        0.6931...
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def supervised_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ``(..., C)`` logits against ``(...)`` class labels (-100 ignored, as in HF)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


class AtlasBlocks:
    """The blocks of one aTLAS run: frozen base tensors, resident task vectors and the coefficients Λ.

    Blocks are the model's parameters shifted by some task vector; buffers (BatchNorm statistics) stay at
    their base values while learning, and :meth:`coefficients` reports 0 for them.

    ``Λ`` has shape ``(T, B, K)`` when blockwise (``B`` blocks), ``(T, 1, K)`` otherwise; it is float32
    (float64 for a float64 model), initialised to zeros so that the run starts at the base model.

    Args:
        model: the base model (not modified; no shift may be attached).
        task_vectors: T delta shifts keyed by the model's tensor names.
        blockwise: one coefficient per (task, block) instead of per task.
        partitions: K random partitions per block (aTLAS × K).
        partition_seed: seed of the partitions.

    Example:
        >>> blocks = AtlasBlocks(model, [tv1, tv2], blockwise=True, partitions=1, partition_seed=0)
        >>> logits = blocks.call(model, x)  # Λ = 0: the base model's logits
    """

    def __init__(
        self,
        model: nn.Module,
        task_vectors: Sequence[Shift],
        *,
        blockwise: bool,
        partitions: int,
        partition_seed: int,
    ) -> None:
        if attached_wrappers(model):
            raise ShiftkitError(
                "learn_atlas needs a plain model: fold (sk.fold_) or detach the attached shift"
            )
        if isinstance(task_vectors, Shift) or not isinstance(task_vectors, Sequence) or not task_vectors:
            raise ShiftkitError("learn_atlas needs a non-empty list of task vectors (delta Shifts)")
        if partitions < 1:
            raise ShiftkitError(f"partitions must be >= 1, got {partitions}")
        if partitions > 1 and not blockwise:
            raise ShiftkitError("partitions > 1 splits blocks: it needs blockwise=True")
        names = model_names(model)
        own = names.first()
        tvs: list[dict[str, Tensor]] = []
        for i, tv in enumerate(task_vectors):
            tv = decoded(tv)
            if not isinstance(tv, Shift) or tv.method != DELTA:
                got = tv.method if isinstance(tv, Shift) else type(tv).__name__
                raise ShiftkitError(f"task vector {i} must be a delta Shift (sk.task_vector), got {got!r}")
            # a tied tensor (embedding = head) is one block, named once; a delta splitting it is refused
            unknown = [k for k in tv.tensors if k not in names.canonical]
            tied = collapse_tied(
                names, {k: t for k, t in tv.tensors.items() if k not in unknown}, "learn_atlas"
            )
            tvs.append({**tied, **{k: tv.tensors[k] for k in unknown}})
            for k, t in tvs[-1].items():
                if not t.is_floating_point():
                    continue  # integer buffers carry no shift (only floating tensors do)
                if k not in own:
                    raise ShiftMismatchError(
                        f"task vector {i} has tensor {k!r} that the model does not; "
                        f"model has e.g. {list(own)[:3]}"
                    )
                if t.shape != own[k].shape:
                    raise ShiftMismatchError(
                        f"task vector {i} tensor {k!r} has shape {tuple(t.shape)}, "
                        f"the model {tuple(own[k].shape)}"
                    )
                # one reduction first (cheap); the elementwise check only when the sum is not finite
                if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
                    raise ShiftkitError(f"task vector {i} has NaN or Inf in {k!r}")
        used = {k for tv in tvs for k, t in tv.items() if t.is_floating_point()}
        if not used:
            raise ShiftkitError("the task vectors have no floating tensor: nothing to scale")
        # blocks are the model's parameters (as in fredzzhang/atlas); a buffer in a task vector (BatchNorm
        # running statistics) stays frozen at the base value: its coefficients are reported as 0
        params = {n for n, _ in model.named_parameters()}
        self.keys: list[str] = [k for k in own if k in used and k in params]  # the model's order
        self.frozen_keys: list[str] = [k for k in own if k in used and k not in params]
        if not self.keys:
            raise ShiftkitError(
                "the task vectors shift no parameter of the model (only buffers): nothing to scale"
            )
        self.base: dict[str, Tensor] = {k: own[k].detach() for k in self.keys}
        # τ_{t,b} in the base dtype and device (T full vectors stay resident); None = missing
        # from that task vector, i.e. a zero shift whose coefficient never gets a gradient
        self.taus: list[list[Tensor | None]] = [
            [tv[k].detach().to(device=own[k].device, dtype=own[k].dtype) if k in tv else None for tv in tvs]
            for k in self.keys
        ]
        self.n_tasks = len(task_vectors)
        self.blockwise = blockwise
        self.partitions = partitions
        self.partition_seed = partition_seed
        self.parts: list[Tensor | None] = [
            atlas_partition(k, self.base[k].shape, partitions, partition_seed).to(self.base[k].device)
            if partitions > 1
            else None
            for k in self.keys
        ]
        ref = next(iter(self.base.values()))
        # accumulate Δ in float32 (not the vectors' dtype), float64 when the model itself is float64
        self.compute_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        n_blocks = len(self.keys) if blockwise else 1
        self.lam = nn.Parameter(
            torch.zeros(self.n_tasks, n_blocks, partitions, dtype=self.compute_dtype, device=ref.device)
        )

    def params(self) -> dict[str, Tensor]:
        """``{name: p_b(Λ)}`` for every block, differentiable in Λ only (shapes and dtypes of the base)."""
        out: dict[str, Tensor] = {}
        for b, k in enumerate(self.keys):
            base = self.base[k]
            lam_b = self.lam[:, b if self.blockwise else 0]  # (T, K)
            part = self.parts[b]
            idx = None if part is None else part.to(torch.int32)  # int32 indexes (uint8 would be a mask)
            p = base.to(self.compute_dtype)  # no copy when the model computes in that dtype already
            for t, tau in enumerate(self.taus[b]):
                if tau is not None:
                    coef = lam_b[t, 0] if idx is None else lam_b[t][idx]
                    # one fused p + λ·τ per task: the step's cost is T passes over the model's size
                    p = torch.addcmul(p, coef, tau.to(self.compute_dtype))
            out[k] = p.to(base.dtype)
        return out

    def call(self, model: nn.Module, inputs: Any, forward: ForwardFn | None = None) -> Tensor:
        """Logits of ``model`` with its blocks replaced by :meth:`params` (every other parameter detached).

        Example:
            >>> blocks.call(model, x).shape
            torch.Size([4, 3])
        """
        tensors: dict[str, Tensor] = {n: p.detach() for n, p in model.named_parameters()}
        tensors.update(self.params())

        def fm(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, tensors, args, kwargs, strict=False)

        return (forward or default_forward)(fm, inputs)

    def regularizer(self, p: float) -> Tensor:
        """``mean_b ‖Λ_{:,b}‖_p`` (norm over tasks and partitions, mean over blocks).

        The optional regulariser of the reference fredzzhang/atlas ``src/learn_task_addition.py``.
        """
        flat = self.lam.permute(1, 0, 2).reshape(self.lam.shape[1], -1)
        return torch.linalg.vector_norm(flat, ord=p, dim=1).mean()

    def coefficients(self) -> dict[str, list[Any]]:
        """Λ as ``{block: [λ_t ...]}`` (K = 1) or ``{block: [[λ_{t,k} ...] ...]}`` (K > 1), Python floats."""
        lam = self.lam.detach().cpu().double()
        out: dict[str, list[Any]] = {}
        for b, k in enumerate(self.keys):
            lb = lam[:, b if self.blockwise else 0]
            out[k] = lb[:, 0].tolist() if self.partitions == 1 else lb.tolist()
        for k in self.frozen_keys:
            out[k] = (
                [0.0] * self.n_tasks if self.partitions == 1 else [[0.0] * self.partitions] * self.n_tasks
            )
        return out


def check_hparams(objective: str, epochs: int, lr: float, reg_gamma: float, reg_p: float) -> None:
    """Validate the scalar settings of ``learn_atlas`` (ShiftkitError naming the bad one)."""
    if objective not in ("supervised", "entropy"):
        raise ShiftkitError(f"unknown objective {objective!r}; use 'supervised' or 'entropy'")
    if epochs < 1:
        raise ShiftkitError(f"epochs must be >= 1, got {epochs}")
    if not (math.isfinite(lr) and lr > 0):
        raise ShiftkitError(f"lr must be a positive number, got {lr}")
    if not (math.isfinite(reg_gamma) and reg_gamma >= 0):
        raise ShiftkitError(f"reg_gamma must be >= 0, got {reg_gamma}")
    if reg_p not in (1, 2):
        raise ShiftkitError(f"reg_p must be 1 or 2 (the paper's choices), got {reg_p}")
