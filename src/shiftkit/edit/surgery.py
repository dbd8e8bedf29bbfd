"""Model Surgery (Wang et al., NAACL 2025; spec learn.md §11.2–11.5): add ``α · v`` to the ``k`` rows of the
chosen weights (the MLP gate projections by default) that are most anti-aligned with a behaviour probe's
direction ``v``, ranked globally over every layer by cosine.

For a hidden state that shows the behaviour (``h · v > 0``) each edited gate neuron's pre-activation rises by
``α (h · v)``, which opens the gate and pushes the output away from the behaviour; nothing else changes. The
edit is returned as a delta :class:`~shiftkit.core.shift.Shift` in the ``rows`` encoding (row indices, ``v``
and ``α``: kilobytes), so ``sk.apply_`` applies it and ``sk.save`` stores it small. Floating-point addition is
not exactly invertible, so ``sk.apply_(model, shift, scale=-1)`` restores the weights only to within one
rounding per entry; :func:`apply_` keeps the touched rows and restores them bit for bit.

Example:
    >>> probe = edit.train_probe(model, tok, texts, labels)
    >>> shift = edit.surgery(model, probe.direction, k=0.02, alpha=1.0)
    >>> with edit.apply_(model, shift):          # edited inside the block, bit-exact original after it
    ...     out = model.generate(**batch)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import shiftkit.core.delta as delta_ops
from shiftkit.core.encoding import encoded_layout
from shiftkit.core.rows import ROWS, rows_delta
from shiftkit.core.shift import DELTA, Shift
from shiftkit.core.targets import iter_base_modules, match_names
from shiftkit.core.tying import model_names
from shiftkit.core.wrapper import is_shift_module
from shiftkit.edit.registry import register_method
from shiftkit.errors import ShiftkitError, TargetNotFoundError

__all__ = ["AppliedEdit", "apply_", "gate_cosines", "surgery"]


def _targets(model: nn.Module, modules: str | Sequence[str]) -> list[tuple[str, nn.Linear]]:
    patterns = (modules,) if isinstance(modules, str) else tuple(modules)
    if not patterns:
        raise ShiftkitError("surgery: modules is empty; name the weights to edit (default 'gate_proj')")
    found = dict(iter_base_modules(model))
    hits = match_names(list(found), patterns)
    if not hits:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in found.items() if isinstance(m, nn.Linear)})
        raise TargetNotFoundError(
            f"surgery: modules {list(patterns)} matched no module; this model's linear layers are named "
            f"{', '.join(linear[:12]) or '(none)'}"
        )
    wrapped = [n for n in hits if is_shift_module(found[n])]
    if wrapped:
        raise ShiftkitError(f"surgery: {wrapped[0]} has a shift attached; fold it first (sk.fold_)")
    out: list[tuple[str, nn.Linear]] = []
    for n in hits:
        module = found[n]
        if isinstance(module, nn.Linear):
            out.append((n, module))
    if not out:
        raise ShiftkitError(
            f"surgery edits nn.Linear weights; {hits[0]} is a {type(found[hits[0]]).__name__}"
        )
    return out


@torch.no_grad()
def gate_cosines(
    model: nn.Module, direction: Tensor, modules: str | Sequence[str] = "gate_proj"
) -> dict[str, Tensor]:
    """``cos(W[i], v)`` for every row ``i`` of every matched weight, keyed by parameter name (float32).

    A zero row has cosine 0.

    Raises:
        ShiftkitError: the modules match nothing, or ``direction`` is not as wide as their rows.
    """
    v = direction.detach().reshape(-1).float()
    out: dict[str, Tensor] = {}
    for name, lin in _targets(model, modules):
        w = lin.weight.detach()
        if w.shape[1] != v.numel():
            raise ShiftkitError(
                f"surgery: the direction has {v.numel()} entries but {name}'s rows have {w.shape[1]} "
                "(the probe must be trained on this model's hidden states)"
            )
        w = w.to(v.device, torch.float32)
        norms = w.norm(dim=1) * v.norm()
        out[f"{name}.weight"] = torch.where(
            norms > 0, (w @ v) / norms.clamp_min(1e-30), torch.zeros_like(norms)
        )
    return out


def _count(k: int | float, total: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k) or k <= 0:
        raise ShiftkitError(f"surgery: k is a row count (>= 1) or a fraction in (0, 1); got {k!r}")
    if isinstance(k, float) and k < 1:
        return max(1, round(k * total))
    if k != int(k):
        raise ShiftkitError(f"surgery: k is a row count (>= 1) or a fraction in (0, 1); got {k!r}")
    if int(k) > total:
        raise ShiftkitError(f"surgery: k={int(k)} but the matched weights have only {total} rows in all")
    return int(k)


@register_method("surgery", kind="edit")
def surgery(
    model: nn.Module,
    direction: Tensor,
    *,
    k: int | float,
    alpha: float = 1.0,
    modules: str | Sequence[str] = "gate_proj",
) -> Shift:
    """Model Surgery's edit: ``W[i] += α · v`` for the ``k`` rows most anti-aligned with ``v``, as a delta.

    The model is not changed. Rows are ranked over every matched weight together by ``cos(W[i], v)``
    (ascending, ties by model order), so the largest cosine among the chosen rows is at most the smallest
    among the others.

    Args:
        model: the language model (read only).
        direction: the probe's direction ``v`` (``probe.direction``), as wide as the weights' rows.
        k: how many rows to edit: a count, or a fraction in (0, 1) of all matched rows (the paper edits
            16,384 of LLaMA-2-7B's 352,256 gate rows, 4.65 %).
        alpha: step along ``v`` (1.0 as in the paper; negative to push towards the behaviour instead).
        modules: module name or suffix (``"gate_proj"``), or several.

    Returns:
        A ``Shift(method="delta")`` in the ``rows`` encoding: apply it with ``sk.apply_`` (or :func:`apply_`
        for a bit-exact undo), save it with ``sk.save``.

    Raises:
        ShiftkitError: ``modules`` matches nothing (or no ``nn.Linear``), the direction's width differs
            from the rows', ``k`` is not a positive count or fraction or exceeds the rows, ``alpha`` is
            not finite.

    Example:
        >>> shift = edit.surgery(model, probe.direction, k=4096, alpha=1.0)
        >>> sk.apply_(model, shift)
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ShiftkitError(f"surgery: alpha must be a finite number, got {alpha!r}")
    cos = gate_cosines(model, direction, modules)
    names = list(cos)
    flat = torch.cat([cos[n] for n in names])
    n_rows = _count(k, flat.numel())
    order = torch.sort(flat, stable=True).indices[:n_rows]
    starts = torch.tensor([0] + [cos[n].numel() for n in names]).cumsum(0)
    rows: dict[str, Tensor] = {}
    base: dict[str, tuple[int, ...]] = {}
    for j, name in enumerate(names):
        lo, hi = int(starts[j]), int(starts[j + 1])
        picked = order[(order >= lo) & (order < hi)] - lo
        if picked.numel():
            rows[name] = picked
            base[name] = (cos[name].numel(), direction.numel())
    return rows_delta(base, rows, direction.detach().float(), float(alpha))


class AppliedEdit:
    """A shift applied in place, with the rows it changed kept so :meth:`undo` restores them bit for bit.

    A context manager: the shift is undone when the block ends.
    """

    def __init__(self, model: nn.Module, shift: Shift, scale: float = 1.0) -> None:
        self.model = model
        own = model_names(model).tensors
        # the rows a rows-encoded shift touches; whole tensors for any other delta
        self._saved: dict[str, tuple[Tensor | None, Tensor]] = {}
        names = encoded_layout(shift) if shift.encoding is not None else shift.tensors
        for name in names:
            if name not in own:
                break  # sk.apply_ below names the problem
            t = own[name]
            idx = shift.tensors.get(f"{name}.rows") if (shift.encoding or {}).get("method") == ROWS else None
            if idx is not None:
                self._saved[name] = (idx.to(t.device), t.detach()[idx.to(t.device)].clone())
            else:
                self._saved[name] = (None, t.detach().clone())
        delta_ops.apply_(model, shift, scale)
        self.active = True

    @torch.no_grad()
    def undo(self) -> None:
        """Write the saved rows back (bit for bit). Calling it twice is harmless."""
        if not self.active:
            return
        own = model_names(self.model).tensors
        for name, (idx, values) in self._saved.items():
            if idx is None:
                own[name].copy_(values)
            else:
                own[name][idx] = values
        self.active = False

    def __enter__(self) -> AppliedEdit:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def apply_(model: nn.Module, shift: Shift, scale: float = 1.0) -> AppliedEdit:
    """Apply a delta (an edit) in place like ``sk.apply_``, keeping what it overwrites for an exact undo.

    Only the touched rows are kept for a ``rows``-encoded shift (Model Surgery's), whole tensors otherwise.

    Raises:
        ShiftkitError: ``shift`` is not a delta (``sk.apply_``'s errors otherwise).

    Example:
        >>> handle = edit.apply_(model, shift)
        >>> handle.undo()                          # the weights are bit-identical to before
    """
    if not isinstance(shift, Shift) or shift.method != DELTA:
        raise ShiftkitError("edit.apply_ applies deltas (method 'delta'), such as edit.surgery's")
    return AppliedEdit(model, shift, scale)
