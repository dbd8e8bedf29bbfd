"""Dense parameter deltas: task vectors, the delta of an attached shift, and adding a delta in place."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from shiftkit.core.attach import attached_wrappers
from shiftkit.core.shift import DELTA, Shift
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError, ShiftMismatchError

__all__ = ["apply_", "base_tensors", "task_vector", "to_delta"]


def base_tensors(model: nn.Module, *, buffers: bool = True) -> dict[str, Tensor]:
    """The model's own floating tensors (parameters, and persistent buffers) by their plain names.

    Shift wrappers are looked through: ``q.base.weight`` is reported as ``q.weight``. A tensor shared by
    several modules (tied weights) is reported once, under its first name.
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        mod = module.base if isinstance(module, ShiftWrapper) else module
        items: list[tuple[str, Tensor | None]] = list(mod._parameters.items())
        if buffers:
            items += [(n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        for n, t in items:
            if t is None or not t.is_floating_point() or id(t) in seen:
                continue
            seen.add(id(t))
            out[prefix + n] = t
        for n, child in mod._modules.items():
            if child is not None:
                walk(child, f"{prefix}{n}.")

    walk(model, "")
    return out


def _as_state(obj: nn.Module | Mapping[str, Tensor], role: str) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        if attached_wrappers(obj):
            raise ShiftkitError(
                f"the {role} model has a shift attached; fold it (sk.fold_) or use sk.to_delta for its delta"
            )
        return base_tensors(obj)
    if isinstance(obj, Mapping):
        return {k: v for k, v in obj.items() if isinstance(v, Tensor) and v.is_floating_point()}
    raise ShiftkitError(f"the {role} must be an nn.Module or a state dict, got {type(obj).__name__}")


@torch.no_grad()
def task_vector(base: nn.Module | Mapping[str, Tensor], tuned: nn.Module | Mapping[str, Tensor]) -> Shift:
    """``tuned - base`` over every floating tensor, as a ``Shift(method="delta")``.

    Raises:
        ShiftMismatchError: the two have different keys, shapes or dtypes (the first ones are named).

    Example:
        >>> tv = sk.task_vector(pretrained, finetuned)
        >>> sk.apply_(other_copy_of_pretrained, tv, scale=0.5)
    """
    a, b = _as_state(base, "base"), _as_state(tuned, "tuned")
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
    tensors = {k: (b[k].detach() - a[k].detach().to(b[k].device)) for k in a}
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


@torch.no_grad()
def to_delta(model: nn.Module) -> Shift:
    """The dense delta of the shift attached to ``model`` (parameter name → ΔW), as a Shift.

    Example:
        >>> tv = sk.to_delta(model_with_lora)
        >>> merged = sk.merge([tv, other_tv], method="ties", density=0.2)
    """
    wrappers = attached_wrappers(model)
    if not wrappers:
        raise ShiftkitError("cannot compute a delta: no shift is attached to this model")
    tensors: dict[str, Tensor] = {}
    for fqn, w in wrappers:
        for name, d in w.delta().items():
            tensors[f"{fqn}.{name}"] = d.detach().clone()
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


@torch.no_grad()
def apply_(model: nn.Module, delta: Shift, scale: float = 1.0) -> nn.Module:
    """Add ``scale · delta`` to the model's tensors in place.

    Raises:
        ShiftMismatchError: a delta key is not a tensor of the model, or its shape differs.

    Example:
        >>> sk.apply_(model, sk.task_vector(base, tuned), scale=0.7)
    """
    if not isinstance(delta, Shift) or delta.method != DELTA:
        got = delta.method if isinstance(delta, Shift) else type(delta).__name__
        raise ShiftkitError(f"apply_ adds dense deltas (method 'delta'); got {got!r}: use sk.attach_ instead")
    own = base_tensors(model)
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
    for k, d in delta.tensors.items():
        t = own[k]
        t.add_(d.to(device=t.device, dtype=t.dtype), alpha=scale)
    return model
