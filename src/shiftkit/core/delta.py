"""Dense parameter deltas: task vectors, the delta of an attached shift, and adding a delta in place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.core.attach import attached_wrappers
from shiftkit.core.encoding import decoded
from shiftkit.core.registry import get_method
from shiftkit.core.shift import DELTA, Shift
from shiftkit.core.tying import (
    TensorNames,
    mapping_names,
    model_names,
    set_parameter_,
    split_tied,
    storage_key,
    tied_message,
    warn_untied,
)
from shiftkit.errors import ShiftkitError, ShiftMismatchError, TiedWeightsError

__all__ = ["apply_", "base_tensors", "task_vector", "to_delta"]


def base_tensors(model: nn.Module, *, buffers: bool = True) -> dict[str, Tensor]:
    """The model's own floating tensors (parameters, and persistent buffers) by their plain names.

    Shift wrappers are looked through: ``q.base.weight`` is reported as ``q.weight``. A tensor shared by
    several modules (tied weights) is reported once, under its first name; :func:`model_names` has them all.
    """
    return model_names(model, buffers=buffers).first()


def _as_names(obj: nn.Module | Mapping[str, Tensor], role: str) -> TensorNames:
    if isinstance(obj, nn.Module):
        if attached_wrappers(obj):
            raise ShiftkitError(
                f"the {role} model has a shift attached; fold it (sk.fold_) or use sk.to_delta for its delta"
            )
        return model_names(obj)
    if isinstance(obj, Mapping):
        return mapping_names(obj)
    raise ShiftkitError(f"the {role} must be an nn.Module or a state dict, got {type(obj).__name__}")


def _fill_tied(mine: TensorNames, other: TensorNames) -> dict[str, Tensor]:
    """``mine``'s tensors by name, plus the names it lacks that ``other`` ties to a name it has.

    A checkpoint stores a tied tensor once (``lm_head.weight`` is absent when the head is tied to the
    embedding); the model built from it has both names. Filling the missing alias with its tied partner
    lets a file and a model be compared name by name.
    """
    out = dict(mine.tensors)
    for group in other.shared().values():
        present = [n for n in group if n in out]
        for n in group:
            if n not in out and present:
                out[n] = out[present[0]]
    return out


@torch.no_grad()
def task_vector(base: nn.Module | Mapping[str, Tensor], tuned: nn.Module | Mapping[str, Tensor]) -> Shift:
    """``tuned - base`` over every floating tensor, as a ``Shift(method="delta")``.

    Tied weights: the delta names every parameter it changes. When the two models tie ``lm_head`` to the
    embedding, both names are keys holding one tensor (computed once; saved once), so ``sk.apply_`` changes
    the shared tensor; when only the base ties them, the two names get their own deltas, and applying them
    needs ``untie=True``. A checkpoint that stores a tied tensor once is read as tied.

    Raises:
        ShiftMismatchError: the two have different keys, shapes or dtypes (the first ones are named).

    Example:
        >>> tv = sk.task_vector(pretrained, finetuned)
        >>> sk.apply_(other_copy_of_pretrained, tv, scale=0.5)
    """
    na, nb = _as_names(base, "base"), _as_names(tuned, "tuned")
    a, b = _fill_tied(na, nb), _fill_tied(nb, na)
    if set(a) != set(b):
        raise ShiftMismatchError(
            f"base and tuned have different tensors: only in base {sorted(set(a) - set(b))[:5]}, "
            f"only in tuned {sorted(set(b) - set(a))[:5]}"
        )
    shapes = [f"{k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}" for k in a if a[k].shape != b[k].shape]
    if shapes:
        raise ShiftMismatchError(f"base and tuned shapes differ: {'; '.join(shapes[:5])}")
    dtypes = [f"{k}: {a[k].dtype} vs {b[k].dtype}" for k in a if a[k].dtype != b[k].dtype]
    if dtypes:
        raise ShiftMismatchError(f"base and tuned dtypes differ: {'; '.join(dtypes[:5])}")
    tensors: dict[str, Tensor] = {}
    done: dict[tuple[Any, Any], Tensor] = {}  # tied in both: one delta tensor under every name
    for k in a:
        pair = (storage_key(a[k]), storage_key(b[k]))
        if pair not in done:
            done[pair] = b[k].detach() - a[k].detach().to(b[k].device)
        tensors[k] = done[pair]
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


@torch.no_grad()
def to_delta(
    source: nn.Module | Shift,
    *,
    base: nn.Module | Mapping[str, Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Shift:
    """The dense delta (parameter name → ΔW) of the shift attached to a model, or of a saved shift.

    * a model: the delta of its attached shift, from the wrappers (any method).
    * a :class:`Shift` whose method defines its weight changes alone (LoRA: ``s·B A``, through the method's
      ``dense`` hook in the registry): computed without a model. ``modules_to_save`` tensors are trained
      values, not changes: they become ``value − base value``, which needs ``base``.
    * a delta: returned as it is.

    The delta names the parameters of the targeted modules only: a LoRA on a tied ``lm_head`` gives
    ``lm_head.weight`` and not the embedding, so applying it to a tied model needs ``untie=True``.

    Args:
        source: a model with a shift attached, or a Shift.
        base: for a Shift: the base model (or its state dict); needed for ``modules_to_save``, and a model
            tells a square embedding from a Linear.
        dtype: for a Shift: dtype of the result (default each tensor's own); computed in float32.

    Raises:
        ShiftkitError: no shift attached, a method whose changes need the base weights (attach it and pass
            the model), or ``modules_to_save`` without ``base``.
        ShiftMismatchError: the shift does not fit ``base``.

    Example:
        >>> tv = sk.to_delta(model_with_lora)
        >>> tv = sk.to_delta(sk.load("adapter.safetensors"))   # LoRA: no model needed
        >>> merged = sk.merge([tv, other_tv], method="ties", density=0.2)
    """
    if isinstance(source, Shift):
        return _shift_delta(decoded(source), base, dtype)
    wrappers = attached_wrappers(source)
    if not wrappers:
        raise ShiftkitError("cannot compute a delta: no shift is attached to this model")
    tensors: dict[str, Tensor] = {}
    for fqn, w in wrappers:
        for name, d in w.delta().items():
            tensors[f"{fqn}.{name}"] = d.detach().clone()
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


def _shift_delta(
    shift: Shift, base: nn.Module | Mapping[str, Tensor] | None, dtype: torch.dtype | None
) -> Shift:
    if shift.method == DELTA:
        return shift if dtype is None else shift.to(dtype=dtype)
    spec = get_method(shift.method)
    if spec.dense is None:
        raise ShiftkitError(
            f"a {shift.method!r} shift's weight changes depend on the base weights: attach it to its base "
            "and call sk.to_delta(model)"
        )
    model = base if isinstance(base, nn.Module) else None
    tensors: dict[str, Tensor] = {}
    for name in spec.dense.names(shift):
        own = next(
            (t.dtype for k, t in shift.tensors.items() if k.startswith(name.rpartition(".")[0] + ".")), None
        )
        tensors[name] = spec.dense.tensor(shift, name, model).to(dtype or own or torch.float32)
    for name, (value, own_dtype) in _saved_deltas(shift, base).items():
        tensors[name] = value.to(dtype or own_dtype)
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


def _saved_deltas(
    shift: Shift, base: nn.Module | Mapping[str, Tensor] | None
) -> dict[str, tuple[Tensor, torch.dtype]]:
    """``modules_to_save`` tensors (``<module>.saved.<name>``: trained values) as ``value − base value``."""
    saved = {k: v for k, v in shift.tensors.items() if ".saved." in k and v.is_floating_point()}
    if not saved:
        return {}
    if base is None:
        mods = sorted({k.split(".saved.")[0] for k in saved})
        raise ShiftkitError(
            f"the {shift.method} shift carries modules_to_save {mods[:5]}: their tensors are trained values, "
            "not changes; pass base= (the base model or its state dict) to turn them into deltas"
        )
    own = model_names(base).tensors if isinstance(base, nn.Module) else dict(base)  # tied aliases too
    out: dict[str, tuple[Tensor, torch.dtype]] = {}
    for key, value in saved.items():
        name = key.replace(".saved.", ".", 1)
        ref = own.get(name)
        if ref is None or tuple(ref.shape) != tuple(value.shape):
            raise ShiftMismatchError(f"base has no tensor {name!r} of shape {tuple(value.shape)}")
        out[name] = (
            value.detach().to(torch.float32) - ref.detach().to(value.device, torch.float32),
            value.dtype,
        )
    return out


@torch.no_grad()
def apply_(model: nn.Module, delta: Shift, scale: float = 1.0, *, untie: bool = False) -> nn.Module:
    """Add ``scale · delta`` to the model's tensors in place.

    Tied weights: a shared tensor changes only when the delta names every module sharing it with the same
    value (a task vector of two tied models). A delta for some of the names only (a LoRA of a tied head,
    folded with ``sk.to_delta``) or with different values would change the other modules too: refused
    with :class:`TiedWeightsError`, unless ``untie=True`` gives each named module its own tensor.

    Args:
        model: any ``nn.Module`` (attached shift wrappers are looked through).
        delta: a ``Shift(method="delta")`` keyed by parameter name.
        scale: factor on the delta.
        untie: let a delta change one of several modules that share a tensor (see above).

    Raises:
        ShiftMismatchError: a delta key is not a tensor of the model, or its shape differs.
        TiedWeightsError: the delta would change tied modules differently and ``untie`` is False.

    Example:
        >>> sk.apply_(model, sk.task_vector(base, tuned), scale=0.7)
    """
    delta = decoded(delta)  # a compressed delta is decoded first
    if not isinstance(delta, Shift) or delta.method != DELTA:
        got = delta.method if isinstance(delta, Shift) else type(delta).__name__
        raise ShiftkitError(f"apply_ adds dense deltas (method 'delta'); got {got!r}: use sk.attach_ instead")
    names = model_names(model)
    own = names.tensors
    unknown = sorted(set(delta.tensors) - set(own))
    if unknown:
        raise ShiftMismatchError(
            f"delta has {len(unknown)} tensor(s) the model does not: {unknown[:5]}; "
            f"model has e.g. {list(own)[:3]}"
        )
    bad = [
        f"{k}: delta {tuple(d.shape)} vs model {tuple(own[k].shape)}"
        for k, d in delta.tensors.items()
        if d.shape != own[k].shape
    ]
    if bad:
        raise ShiftMismatchError(f"delta shapes differ from the model's: {'; '.join(bad[:5])}")
    split = split_tied(names, delta.tensors)
    if split and not untie:
        raise TiedWeightsError(tied_message("sk.apply_", split, names))
    untied = {n for group in split.values() for n in group}
    done: set[int] = set()
    for k, d in delta.tensors.items():
        if k in untied:
            continue
        t = own[k]
        if id(t) in done:  # a tied tensor named by all its modules with one value: added once
            continue
        done.add(id(t))
        t.add_(d.to(device=t.device, dtype=t.dtype), alpha=scale)
    for k in sorted(untied, key=list(delta.tensors).index):
        t, d = own[k], delta.tensors[k]
        set_parameter_(model, k, t + scale * d.to(device=t.device, dtype=t.dtype))
    warn_untied(sorted(untied), names, model)
    return model
