"""aTLAS: learned anisotropic (block-wise) scaling of task vectors (Zhang et al., NeurIPS 2024,
https://arxiv.org/abs/2407.11091; reference code fredzzhang/atlas).

Every parameter tensor is a *block* ``b``; each task vector ``τ_t`` gets a learned coefficient per block::

    p_b(Λ) = θ0_b + Σ_t λ_{t,b} τ_{t,b}                      Λ ∈ R^{T×B}    blockwise: the paper's aTLAS
    p_b(λ) = θ0_b + Σ_t λ_t τ_{t,b}                          λ ∈ R^T        blockwise=False: learned TA
    p_b(Λ) = θ0_b + Σ_t Σ_k λ_{t,b,k} (M_{b,k} ⊙ τ_{t,b})    Λ ∈ R^{T×B×K}  aTLAS × K (partitions=K)

``M_{b,k}`` is a fixed random partition of block ``b``'s entries into K parts (seeded by ``(seed, block
name)``). Buffers shifted by a task vector (BatchNorm statistics) stay frozen at θ0 (coefficient 0).
Λ starts at zero, i.e. at the base model; only Λ trains (the gradient is
``∂L/∂λ_{t,b} = ⟨∇_{p_b} L, τ_{t,b}⟩``), so a few hundred labelled (or unlabelled) examples suffice.

Two entry points:

* :func:`learn_atlas` learns Λ on batches and returns an :class:`AtlasResult` whose ``shift`` is the merged
  delta ``Σ_t Λ_t ⊙ τ_t`` (apply it with ``sk.apply_``: no inference overhead).
* the merge method ``"atlas"`` rebuilds that delta from coefficients:
  ``sk.merge(tvs, method="atlas", coefficients=result.coefficients)``; a block without coefficients falls
  back to the per-task ``weights`` (plain task arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError
from shiftkit.merging.atlas.blocks import (
    AtlasBlocks,
    ForwardFn,
    atlas_partition,
    check_hparams,
    entropy_loss,
    split_batch,
    supervised_loss,
    to_device,
)
from shiftkit.merging.registry import register_merge

__all__ = ["AtlasResult", "atlas", "atlas_partition", "learn_atlas"]


def _coef_table(key: str, value: Any, n_tasks: int) -> Tensor:
    try:
        table = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ShiftkitError(f"atlas coefficients for {key!r} must be numbers, got {value!r}") from None
    if table.ndim == 1:
        table = table[:, None]
    if table.ndim != 2 or table.shape[0] != n_tasks or table.shape[1] < 1:
        raise ShiftkitError(
            f"atlas coefficients for {key!r} must be {n_tasks} numbers (one per task vector) or {n_tasks} "
            f"lists of K per-partition numbers; got shape {tuple(table.shape)}"
        )
    if not bool(torch.isfinite(table).all()):
        raise ShiftkitError(f"atlas coefficients for {key!r} must be finite, got {table.tolist()}")
    return table


@register_merge("atlas")
def atlas(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    coefficients: Mapping[str, Sequence[float] | Sequence[Sequence[float]]] | None = None,
    partition_seed: int = 0,
) -> dict[str, Tensor]:
    """Block-wise weighted sum ``τ_b = Σ_t λ_{t,b} τ_{t,b}`` (or ``Σ_t Σ_k λ_{t,b,k} M_{b,k} ⊙ τ_{t,b}``).

    Args:
        tensors: T aligned float32 tensor dicts (any shapes, equal across t).
        weights: T weights, used only for the blocks that ``coefficients`` does not list (there the
            method is task arithmetic with these weights; the weights do not multiply listed blocks).
        coefficients: block name → T coefficients, or T lists of K per-partition coefficients (as
            :attr:`AtlasResult.coefficients` stores them). Names not among ``tensors`` are ignored, so the
            same mapping serves the per-tensor streaming merge.
        partition_seed: seed of the random partitions, for K > 1 (must match the learning run's).

    Returns:
        Merged tensors, same keys and shapes.

    Raises:
        ShiftkitError: a coefficient entry has the wrong length or a non-finite value.

    Example:
        >>> res = sk.learn_atlas(model, [tv1, tv2], batches)
        >>> merged = sk.merge([tv1, tv2], method="atlas", coefficients=res.coefficients)
        >>> sk.apply_(model, merged)
    """
    n_tasks = len(tensors)
    coefs = coefficients or {}
    out: dict[str, Tensor] = {}
    for k in tensors[0]:
        table = _coef_table(k, coefs[k] if k in coefs else [float(w) for w in weights], n_tasks)
        part = (
            atlas_partition(k, tensors[0][k].shape, table.shape[1], partition_seed)
            .to(tensors[0][k].device)
            .long()
            if table.shape[1] > 1
            else None
        )
        acc: Tensor | None = None
        for t in range(n_tasks):
            tau = tensors[t][k]
            coef = table[t, 0] if part is None else table[t].to(tau.device)[part]
            term = coef.to(tau.device) * tau
            acc = term if acc is None else acc + term
        assert acc is not None
        out[k] = acc
    return out


@dataclass(frozen=True)
class AtlasResult:
    """What :func:`learn_atlas` learned.

    Attributes:
        coefficients: block name → T coefficients λ_{t,b} (``partitions == 1``) or T lists of K
            per-partition coefficients; with ``blockwise=False`` every block lists the same T values.
        shift: the merged delta ``Σ_t Λ_t ⊙ τ_t`` (a ``Shift(method="delta")`` in the task vectors' dtype),
            ready for ``sk.apply_(model, result.shift)``.
        history: the loss (objective + regulariser) at every optimisation step.
        partitions: K.
        partition_seed: seed of the random partitions (needed to rebuild the merge when K > 1).
        blockwise: whether Λ had one coefficient per block (else one per task).

    Example:
        >>> res = sk.learn_atlas(model, [tv1, tv2], batches, epochs=5)
        >>> sk.apply_(model, res.shift)
        >>> res.to_shift([tv1, tv2]).allclose(res.shift)
    """

    coefficients: dict[str, list[Any]]
    shift: Shift
    history: list[float] = field(default_factory=list)
    partitions: int = 1
    partition_seed: int = 0
    blockwise: bool = True

    @property
    def merge_params(self) -> dict[str, Any]:
        """Keyword arguments that make ``sk.merge(tvs, method="atlas", **params)`` rebuild :attr:`shift`.

        Example:
            >>> merged = sk.merge(tvs, method="atlas", **res.merge_params)
        """
        return {"coefficients": self.coefficients, "partition_seed": self.partition_seed}

    def to_shift(self, task_vectors: Sequence[Shift]) -> Shift:
        """The merged delta ``Σ_t Λ_t ⊙ τ_t`` of these task vectors (missing tensors count as zero).

        Args:
            task_vectors: the T delta shifts Λ was learned for, in the same order.

        Returns:
            A delta Shift with the task vectors' floating keys.

        Example:
            >>> merged = res.to_shift([tv1, tv2])
            >>> sk.apply_(model, merged)
        """
        from shiftkit.merging.in_memory import merge

        return merge(task_vectors, method="atlas", on_missing="zero", **self.merge_params)


def _steps(batches: Iterable[Any], epochs: int) -> int | None:
    return epochs * len(batches) if isinstance(batches, Sized) else None


def learn_atlas(
    model: nn.Module,
    task_vectors: Sequence[Shift],
    batches: Iterable[Any],
    *,
    objective: str = "supervised",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    blockwise: bool = True,
    partitions: int = 1,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    grad_clip: float | None = 1.0,
    reg_gamma: float = 0.0,
    reg_p: int = 1,
    partition_seed: int = 0,
    forward: ForwardFn | None = None,
    progress: bool = True,
) -> AtlasResult:
    """Learn aTLAS coefficients Λ (zeros at the start) that combine ``task_vectors`` on ``model``.

    The model runs functionally with ``p_b = θ0_b + Σ_t λ_{t,b} τ_{t,b}`` (``torch.func.functional_call``;
    blocks are the parameters, buffers keep their base values) in eval mode (dropout off, BatchNorm
    statistics frozen; each module's mode is restored afterwards); its parameters, buffers and ``.grad``
    are left untouched. The T task vectors stay resident on the model's device in its dtype; Δ is
    accumulated in float32. Optimiser: AdamW (weight decay 0.1, the paper's), gradient-norm clipping at
    1.0; no lr schedule and no fp16 autocast (the paper uses both). A step costs a forward/backward of the
    model plus T fused passes over the shifted parameters (memory: T task vectors + one parameter set).

    Objectives: ``"supervised"`` minimises cross-entropy (or ``loss_fn(logits, labels)``) as in the paper's
    task-addition and few-shot settings. ``"entropy"`` minimises the mean Shannon entropy of
    ``softmax(logits)`` and ignores labels: a simple unsupervised (test-time) objective. The paper's own
    unsupervised variant is FixMatch-style self-training on confident pseudo-labels (fredzzhang/atlas
    ``src/learn_ufm.py``), not this.

    Args:
        model: the base model ``θ0`` (not modified; no shift may be attached). Its tensor names key
            the task vectors.
        task_vectors: T delta shifts ``τ_t`` (``sk.task_vector``); a tensor missing from some τ_t counts as
            zero there and its coefficient stays 0.
        batches: an iterable (re-iterable when ``epochs > 1``) of ``(inputs, labels)`` pairs, of dicts
            (their ``"labels"`` entry is split off, as :func:`shiftkit.recipes.learn.text_batches` makes
            them) or of bare inputs. Inputs are a tensor (``model(x)``) or a dict (``model(**x)``), moved to
            the model's device. Logits ``(N, C)`` or ``(N, L, C)``; labels ``(N,)`` or ``(N, L)``.
        objective: ``"supervised"`` or ``"entropy"``.
        loss_fn: ``loss_fn(logits, labels) -> scalar`` replacing cross-entropy (supervised only).
        blockwise: one coefficient per (task, block) (aTLAS) instead of per task (learned task arithmetic).
        partitions: K random partitions per block (aTLAS × K); 1 = plain blockwise.
        epochs: passes over ``batches``.
        lr: AdamW learning rate (1e-3: the paper's task-addition setting; its few-shot runs use 0.1).
        weight_decay: AdamW weight decay on Λ (0.1, the paper's).
        grad_clip: maximum gradient norm of Λ (1.0, the paper's); None disables clipping.
        reg_gamma: γ of the optional regulariser ``γ · mean_b ‖Λ_{:,b}‖_p`` (0 = off; the paper tries 0.5).
        reg_p: p of that norm, 1 or 2.
        partition_seed: seed of the random partitions.
        forward: ``forward(model_callable, inputs) -> logits`` for models whose output is not logits (the
            callable runs the model with the current parameters); default: ``.logits`` if present.
        progress: show a tqdm bar with the loss.

    Returns:
        An :class:`AtlasResult` with the coefficients, the merged delta and the loss history.

    Raises:
        ShiftMismatchError: a task vector has a tensor the model lacks, or a different shape (named).
        ShiftkitError: NaN/Inf in a task vector (named), a non-delta input, a bad setting, missing labels.

    Example:
        >>> tvs = [sk.task_vector(base, ft1), sk.task_vector(base, ft2)]
        >>> res = sk.learn_atlas(base, tvs, [(x, y)], epochs=20, lr=1e-2)
        >>> sk.apply_(base, res.shift)
    """
    check_hparams(objective, epochs, lr, reg_gamma, reg_p)
    if loss_fn is not None and objective != "supervised":
        raise ShiftkitError(
            "loss_fn replaces the supervised loss: it cannot be used with objective='entropy'"
        )
    if epochs > 1 and iter(batches) is batches:
        raise ShiftkitError("epochs > 1 needs re-iterable batches (a list or DataLoader), not an iterator")
    blocks = AtlasBlocks(
        model, task_vectors, blockwise=blockwise, partitions=partitions, partition_seed=partition_seed
    )
    device = blocks.lam.device
    opt = torch.optim.AdamW([blocks.lam], lr=lr, weight_decay=weight_decay)
    history: list[float] = []
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    bar = tqdm(total=_steps(batches, epochs), desc="aTLAS", disable=not progress, leave=False)
    try:
        for _ in range(epochs):
            for batch in batches:
                inputs, labels = split_batch(batch)
                logits = blocks.call(model, to_device(inputs, device), forward)
                if objective == "entropy":
                    loss = entropy_loss(logits)
                else:
                    if labels is None:
                        raise ShiftkitError(
                            "objective='supervised' needs labels: give (inputs, labels) pairs or a "
                            "'labels' entry, or use objective='entropy'"
                        )
                    labels = to_device(labels, device)
                    loss = loss_fn(logits, labels) if loss_fn is not None else supervised_loss(logits, labels)
                if reg_gamma > 0:
                    loss = loss + reg_gamma * blocks.regularizer(reg_p)
                if not math.isfinite(float(loss.detach())):
                    raise ShiftkitError(
                        f"aTLAS loss became {float(loss.detach())} at step {len(history)}; lower lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_([blocks.lam], grad_clip)
                opt.step()
                history.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]:.4f}")
    finally:
        bar.close()
        for m, was_training in modes:
            m.training = was_training
    if not history:
        raise ShiftkitError("learn_atlas got no batches")
    result = AtlasResult(
        coefficients=blocks.coefficients(),
        shift=Shift(DELTA, None, {}),  # placeholder: to_shift below needs the coefficients
        history=history,
        partitions=partitions,
        partition_seed=partition_seed,
        blockwise=blockwise,
    )
    return replace(result, shift=result.to_shift(task_vectors))
