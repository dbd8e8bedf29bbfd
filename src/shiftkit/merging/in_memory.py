"""``sk.merge``: combine several dense shifts (task vectors) into one.

Every method works in shift space: given ``τ_t = θ_t − θ0`` it returns a merged ``τ`` so that
``θ = θ0 + τ`` (apply it with ``sk.apply_``). A shift whose method defines its weight changes alone (LoRA:
``ΔW = s·B A``, the method's dense hook) is turned into its exact dense delta first; other methods must be
converted with ``sk.to_delta(model)`` on a model they are attached to.
Inputs are aligned by a key policy (``on_missing=``):

* ``"error"`` (default): the same keys, shapes and dtypes in every shift, or :class:`ShiftMismatchError`;
* ``"zero"``: a missing tensor is an all-zero shift (right for sums and TIES, wrong for averages);
* ``"skip"``: a shift without a tensor does not take part in that tensor's merge: the method runs once per
  group of keys with the same participating shifts, on their tensors and weights only, so every normaliser
  (``Σ w``, counts) covers the participants only — a soup of two where one lacks ``k`` gives the other's
  ``k``. Methods needing whole-model statistics (paper-TIES, PCB) refuse ``"skip"`` when groups differ.

Arithmetic runs in float32 and the result is cast back to the inputs' dtype (never in bf16/fp16).
Non-floating tensors carry no shift and are left out (as the Ilharco task-vector code skips integer buffers).
References: task arithmetic https://arxiv.org/abs/2212.04089, TIES https://arxiv.org/abs/2306.01708,
DARE https://arxiv.org/abs/2311.03099, soups https://arxiv.org/abs/2203.05482.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from shiftkit.core.delta import to_delta
from shiftkit.core.encoding import decoded
from shiftkit.core.registry import get_method
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.registry import MERGE_METHODS, MergeSpec

__all__ = ["merge"]


_ON_MISSING = ("error", "zero", "skip")


def _as_deltas(shifts: Sequence[Shift]) -> list[Shift]:
    """The inputs as dense deltas: LoRA shifts converted exactly, other methods refused."""
    if isinstance(shifts, Shift) or not isinstance(shifts, Sequence) or not shifts:
        raise ShiftkitError("merge needs a non-empty list of Shift values")
    out = []
    for i, s in enumerate(shifts):
        if not isinstance(s, Shift):
            raise ShiftkitError(f"merge input {i} is a {type(s).__name__}, not a Shift")
        s = decoded(s)  # a compressed input is decoded first
        if s.method != DELTA:
            if get_method(s.method).dense is None:
                raise ShiftkitError(
                    f"merge input {i} is a {s.method!r} shift, whose weight changes need the base weights: "
                    "attach it and convert with sk.to_delta(model) first"
                )
            s = to_delta(s)  # exact dense ΔW from the method's own dense hook (LoRA: s·B A)
        out.append(s)
    return out


def _check_inputs(shifts: Sequence[Shift], on_missing: str) -> list[str]:
    if on_missing not in _ON_MISSING:
        raise ShiftkitError(f"unknown on_missing {on_missing!r}; use one of {list(_ON_MISSING)}")
    keys = [k for k, t in shifts[0].tensors.items() if t.is_floating_point()]
    seen = set(keys)
    for i, s in enumerate(shifts[1:], start=1):
        mine = {k for k, t in s.tensors.items() if t.is_floating_point()}
        if mine != seen and on_missing == "error":
            raise ShiftMismatchError(
                f"merge inputs 0 and {i} have different tensors: only in 0 {sorted(seen - mine)[:5]}, "
                f"only in {i} {sorted(mine - seen)[:5]} (on_missing='zero' treats missing as zero, "
                "'skip' merges each tensor over the shifts that have it)"
            )
        keys += sorted(mine - seen)
        seen |= mine
    for k in keys:
        present = [(i, s.tensors[k]) for i, s in enumerate(shifts) if k in s.tensors]
        i0, t0 = present[0]
        for i, t in present[1:]:
            if t.shape != t0.shape:
                raise ShiftMismatchError(
                    f"merge inputs {i0} and {i} differ in shape for {k!r}: "
                    f"{tuple(t0.shape)} vs {tuple(t.shape)}"
                )
            if t.dtype != t0.dtype:
                raise ShiftMismatchError(
                    f"merge inputs {i0} and {i} differ in dtype for {k!r}: {t0.dtype} vs {t.dtype}"
                )
        for i, t in present:
            if not bool(torch.isfinite(t).all()):
                raise ShiftkitError(f"merge input {i} has NaN or Inf in {k!r}")
    return keys


def _common_aliases(shifts: Sequence[Shift], keys: list[str]) -> dict[str, str]:
    """Names that hold the same tensor as an earlier name in every input (tied weights): merged once.

    A task vector of a model with tied weights names the shared tensor under each module; when every input
    ties the same names, the merge computes the tensor once and names it the same way (a seeded method such
    as DARE would otherwise draw different masks for the two names and untie them).
    """
    per = [s.aliases() for s in shifts]
    out: dict[str, str] = {}
    for k in keys:
        head = next(a.get(k) for s, a in zip(shifts, per) if k in s.tensors)
        if head is not None and all(
            (k in s.tensors) == (head in s.tensors) and (k not in s.tensors or a.get(k) == head)
            for s, a in zip(shifts, per)
        ):
            out[k] = head
    return out


def _tensor_local(spec: MergeSpec, weights: list[float], params: dict[str, Any]) -> bool:
    """True if merged tensor ``k`` depends on the inputs' tensors ``k`` only (*tensor-local*)."""
    if spec.multipass is None:
        return True
    try:
        return spec.multipass(list(weights), **params) is None
    except ShiftkitError:  # whole-model statistics that no multi-pass computation covers
        return False


def _merge_skip(
    spec: MergeSpec, shifts: list[Shift], keys: list[str], ws: list[float], params: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Run ``fn`` once per group of keys with the same participating shifts, on those shifts only."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for k in keys:
        groups.setdefault(tuple(i for i, s in enumerate(shifts) if k in s.tensors), []).append(k)
    if len(groups) > 1 and not _tensor_local(spec, ws, params):
        raise ShiftkitError(
            f"on_missing='skip' needs a tensor-local method; {spec.name!r} with {params} uses whole-model "
            "statistics, which differ between the groups of shifts: use on_missing='zero'"
        )
    out: dict[str, torch.Tensor] = {}
    for idx, group in groups.items():
        tensors = [{k: shifts[i].tensors[k].to(torch.float32) for k in group} for i in idx]
        out.update(spec.fn(tensors, [ws[i] for i in idx], **params))
    return out


def _check_params(spec: MergeSpec, params: dict[str, Any]) -> None:
    accepted = list(spec.params)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ShiftkitError(
            f"merge method {spec.name!r} has no parameter(s) {unknown}; it accepts {accepted}"
        )


def merge(
    shifts: Sequence[Shift],
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    *,
    on_missing: str = "error",
    **params: Any,
) -> Shift:
    """Merge dense shifts (``Shift(method="delta")``) or LoRA shifts into one delta with a merge method.

    Args:
        shifts: T delta shifts, tensors keyed by parameter name (each tensor any shape), or LoRA shifts
            (turned into their exact dense ``ΔW`` first; see :func:`merge_lora` for factored results).
        method: a name from ``sk.list_merge_methods()``: ``"linear"``, ``"task_arithmetic"``, ``"ties"``,
            ``"dare_linear"``, ``"dare_ties"``, ``"slerp"``, ``"breadcrumbs"``, ``"breadcrumbs_ties"``,
            ``"model_stock"``, ``"pcb"``, ``"atlas"``.
        weights: one finite number per shift; default 1.0 each.
        on_missing: ``"error"`` (default), ``"zero"`` (a missing tensor counts as an all-zero shift) or
            ``"skip"`` (a shift without the tensor does not take part in its merge; see module docstring).
        **params: the method's parameters (``lambda_``, ``density``, ``semantics``, ``seed``, ``t`` ...).

    Returns:
        A delta Shift with the inputs' floating keys; each tensor has the inputs' shape and dtype.

    Raises:
        ShiftMismatchError: keys (with ``on_missing="error"``), shapes or dtypes differ between inputs.
        ShiftkitError: a non-delta, non-LoRA input, NaN/Inf, bad weights or an unknown parameter.
        UnknownMethodError: ``method`` is not registered.

    Example:
        >>> tv1, tv2 = sk.task_vector(base, ft1), sk.task_vector(base, ft2)
        >>> merged = sk.merge([tv1, tv2], method="ties", density=0.2)
        >>> sk.apply_(base, merged)
    """

    spec = MERGE_METHODS.get(method)
    _check_params(spec, params)
    n = len(shifts) if isinstance(shifts, Sequence) and not isinstance(shifts, Shift) else 0
    if n and (n < spec.min_inputs or (spec.max_inputs is not None and n > spec.max_inputs)):
        want = (
            f"exactly {spec.min_inputs}"
            if spec.max_inputs == spec.min_inputs
            else f"{spec.min_inputs} or more"
        )
        if spec.max_inputs not in (None, spec.min_inputs):
            want = f"{spec.min_inputs} to {spec.max_inputs}"
        raise ShiftkitError(f"merge method {method!r} merges {want} shifts, got {n}")
    deltas = _as_deltas(shifts)
    keys = _check_inputs(deltas, on_missing)
    if weights is None:
        ws = [1.0] * len(shifts)
    else:
        ws = [float(w) for w in weights]
        if len(ws) != len(shifts):
            raise ShiftkitError(f"got {len(ws)} weights for {len(shifts)} shifts")
        if not all(math.isfinite(w) for w in ws):
            raise ShiftkitError(f"merge weights must be finite, got {ws}")
        if spec.weighting == "none" and any(w != 1.0 for w in ws):
            raise ShiftkitError(f"merge method {method!r} has no per-shift weights; leave weights at 1")
    ref = {k: next(s.tensors[k] for s in deltas if k in s.tensors) for k in keys}
    aliases = _common_aliases(deltas, keys)
    own = [k for k in keys if k not in aliases]
    if on_missing == "skip":
        out = _merge_skip(spec, deltas, own, ws, params)
    else:
        tensors = [
            {k: (s.tensors[k] if k in s.tensors else torch.zeros_like(ref[k])).to(torch.float32) for k in own}
            for s in deltas
        ]
        out = spec.fn(tensors, ws, **params)
    merged = {k: out[k].to(ref[k].dtype) for k in own}
    merged = {k: merged[aliases.get(k, k)] for k in keys}
    return Shift(DELTA, None, merged, {k: tuple(v.shape) for k, v in merged.items()})
