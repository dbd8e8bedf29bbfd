"""Replay for continued training (Ibrahim et al. 2024, arXiv:2403.08763; spec: combine-compress.md §9.1):
a fixed fraction of the rows comes from earlier data, replacing new rows, so the budget of rows (tokens)
per step stays what it was.

:class:`ReplayMixer` wraps two batch sources. Each batch of ``new`` (a tensor, or a mapping of tensors
whose first dimension is the batch) keeps its first ``B − r`` rows and gets ``r`` rows from ``old``, with
``r`` its share of ``fraction`` times the rows so far, rounded down with the remainder carried over: over
a run the old share is ``fraction`` to within one row even when ``fraction·B`` is below one (5 % of
batches of 8 is one old row in every 2 or 3 batches), and every batch gets ``⌊fraction·B⌋`` or
``⌈fraction·B⌉`` old rows. They are taken in order from ``old``'s batches, cycling through it (a
shuffling DataLoader reshuffles at each pass). Sequences of different lengths are right-padded to the
longer: ``attention_mask`` with 0, ``labels`` with -100 (ignored by the usual cross-entropy), anything
else with ``pad_values[key]`` (default 0). The mixer is re-iterable and has ``len(new)`` batches, so it
drops into :func:`shiftkit.recipes.learn.train` or any loop.

Example:
    >>> mixed = ReplayMixer(new_batches, old_batches, fraction=0.25)
    >>> for batch in mixed: ...   # a quarter of every batch is old text
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from shiftkit.errors import ShiftkitError

__all__ = ["ReplayMixer"]

_PADS = {"attention_mask": 0, "labels": -100}


def _rows(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping) and batch:
        sizes = {int(v.shape[0]) for v in batch.values() if isinstance(v, Tensor)}
        if len(sizes) == 1:
            return sizes.pop()
    raise ShiftkitError(
        "ReplayMixer: a batch must be a tensor or a mapping of tensors with one batch size, "
        f"got {type(batch).__name__}"
    )


def _pad_cat(parts: list[Tensor], pad: float) -> Tensor:
    if parts[0].dim() >= 2:
        width = max(p.shape[1] for p in parts)
        parts = [F.pad(p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1]), value=pad) for p in parts]
    return torch.cat(parts, 0)


class ReplayMixer:
    """Batches of ``new`` with a ``fraction`` of their rows replaced by rows of ``old``.

    Args:
        new: the current data's batches (sized and re-iterable, e.g. a DataLoader).
        old: earlier data's batches (re-iterable; cycled through as needed).
        fraction: the share of each batch taken from ``old``, in [0, 1).
        pad_values: padding value per mapping key for sequences of different lengths.

    Raises:
        ShiftkitError: ``fraction`` outside [0, 1), an empty ``old`` source, or batches whose keys differ.
    """

    def __init__(
        self,
        new: Iterable[Any],
        old: Iterable[Any],
        fraction: float,
        *,
        pad_values: Mapping[str, float] | None = None,
    ) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
            raise ShiftkitError(f"ReplayMixer: fraction must be in [0, 1), got {fraction!r}")
        self.new, self.old, self.fraction = new, old, float(fraction)
        self.pad_values = {**_PADS, **(pad_values or {})}
        self._old_iter: Iterator[Any] | None = None
        self._left: Any = None  # rows of the current old batch not yet used
        self._owed = 0.0  # old rows due but not yet given (the fraction's remainder, carried over)

    def __len__(self) -> int:
        if not isinstance(self.new, Sized):
            raise TypeError("ReplayMixer: the new batch source has no length")
        return len(self.new)

    def _next_old(self) -> Any:
        for _ in range(2):
            if self._old_iter is None:
                self._old_iter = iter(self.old)
            try:
                return next(self._old_iter)
            except StopIteration:
                self._old_iter = None
        raise ShiftkitError("ReplayMixer: the old data source yields no batch")

    def _take_old(self, r: int) -> list[Any]:
        out: list[Any] = []
        while r > 0:
            if self._left is None or _rows(self._left) == 0:
                self._left = self._next_old()
            have = _rows(self._left)
            k = min(r, have)
            out.append(_slice(self._left, slice(0, k)))
            self._left = _slice(self._left, slice(k, have))
            r -= k
        return out

    def _mix(self, batch: Any) -> Any:
        b = _rows(batch)
        due = self._owed + self.fraction * b
        r = min(math.floor(due + 1e-9), b)
        self._owed = due - r
        if r == 0:
            return batch
        parts = [_slice(batch, slice(0, b - r)), *self._take_old(r)]
        if isinstance(batch, Tensor):
            return _pad_cat(parts, 0)
        keys = set(batch)
        for p in parts[1:]:
            if set(p) != keys:
                raise ShiftkitError(
                    f"ReplayMixer: old batches have keys {sorted(p)}, new ones {sorted(keys)}"
                )
        return {k: _pad_cat([p[k] for p in parts], self.pad_values.get(k, 0)) for k in batch}

    def __iter__(self) -> Iterator[Any]:
        for batch in self.new:
            yield self._mix(batch)


def _slice(batch: Any, s: slice) -> Any:
    if isinstance(batch, Tensor):
        return batch[s]
    return {k: v[s] for k, v in batch.items()}
