"""The ``rows`` encoding of a delta that changes few rows: only the changed rows are stored, and where every
changed row of a tensor is a multiple of one vector (a rank-1, row-sparse edit such as Model Surgery's
``ΔW = α · 1_S vᵀ``) only the row indices, one coefficient per row and the vector.

Payload of each tensor ``P`` of the delta (a 1-D tensor is read as a column, one element per row):

- ``P.rows``: int64 indices of the changed rows, ascending;
- either ``P.coef`` (one value per changed row) and ``P.vec`` (the shared row vector): row ``i`` of the
  delta is ``coef[i] * vec``;
- or ``P.values``: the changed rows themselves.

Decoding is exact: :func:`encode_rows` keeps the factored form only where ``coef[i] * vec`` reproduces
every row bit for bit. The format lives here, below the verbs, because two of them write it:
``shiftkit.compression`` registers it as the ``rows`` compressor and ``shiftkit.edit`` writes Model
Surgery's edits in it directly (:func:`rows_delta`), without building the dense delta.

Example:
    >>> small = rows_delta({"gate.weight": (1536, 576)}, {"gate.weight": torch.tensor([3, 9])}, v, 1.0)
    >>> decode_rows_tensor(small, "gate.weight")[3].equal(v)
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from shiftkit.core.encoding import dtype_name, encoded_layout
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import CorruptFileError, ShiftkitError

__all__ = ["ROWS", "decode_rows", "decode_rows_tensor", "encode_rows", "rows_delta"]

#: the encoding's (and compressor's) name
ROWS = "rows"


def _as_rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 1 else t.reshape(1, 1)


def _encoded(
    base: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
    payload: dict[str, Tensor],
    atol: float,
) -> Shift:
    table = {name: {"shape": list(shape), "dtype": dtype_name(dtypes[name])} for name, shape in base.items()}
    encoding = {"method": ROWS, "params": {"atol": atol}, "tensors": table}
    return Shift(DELTA, None, payload, dict(base), encoding)


def _factor(rows: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(coef, vec)`` with ``coef[i] * vec == rows[i]`` bit for bit, or ``None`` if none is found.

    ``vec`` is one of the rows (the first, the smallest and the largest are tried): its own coefficient is
    exactly 1, and a row that is an exact power-of-two multiple of the others reproduces them exactly.
    """
    peaks = rows.abs().amax(dim=1)
    for c in dict.fromkeys([0, int(peaks.argmin()), int(peaks.argmax())]):
        vec = rows[c]
        j = int(vec.abs().argmax())
        if float(vec[j]) == 0.0:
            continue
        coef = rows[:, j] / vec[j]
        coef[c] = 1.0
        if torch.equal(coef[:, None] * vec[None, :], rows):
            return coef.contiguous(), vec.clone()
    return None


@torch.no_grad()
def encode_rows(delta: Shift, *, atol: float = 0.0) -> Shift:
    """Encode a dense delta keeping only its changed rows (those with an entry of magnitude above ``atol``).

    With ``atol=0`` the encoding is lossless; a larger ``atol`` also drops rows whose every entry is that
    small. A 1-D tensor's rows are its elements.

    Raises:
        ShiftkitError: ``delta`` is not a dense delta, or ``atol`` is negative.
    """
    if delta.method != DELTA or delta.encoding is not None:
        raise ShiftkitError(f"the rows encoding takes a dense delta (method 'delta'), got {delta.method!r}")
    if not atol >= 0:
        raise ShiftkitError(f"rows: atol is a magnitude, >= 0; got {atol!r}")
    payload: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for name, t in delta.tensors.items():
        dtypes[name] = t.dtype
        flat = _as_rows(t)
        changed = (flat.abs() > atol).any(dim=1).nonzero().flatten()
        payload[f"{name}.rows"] = changed.to(torch.int64)
        kept = flat[changed]
        pair = _factor(kept) if kept.shape[0] > 1 else None
        if pair is None:
            payload[f"{name}.values"] = kept.contiguous()
        else:
            payload[f"{name}.coef"], payload[f"{name}.vec"] = pair
    base = {name: tuple(t.shape) for name, t in delta.tensors.items()}
    return _encoded(base, dtypes, payload, float(atol))


def rows_delta(
    base: Mapping[str, tuple[int, ...]],
    rows: Mapping[str, Tensor],
    vec: Tensor,
    coef: float,
    *,
    dtype: torch.dtype = torch.float32,
) -> Shift:
    """The encoded delta that adds ``coef · vec`` to the given rows of each tensor and changes nothing else.

    Args:
        base: tensor name → its shape (2-D, rows of width ``len(vec)``).
        rows: tensor name → indices of the rows to change (any order; stored ascending, without repeats).
        vec: the row vector every changed row receives (shared: stored once in the file).
        coef: its coefficient.
        dtype: the dtype the delta decodes to.

    Raises:
        ShiftkitError: a tensor is not 2-D of width ``len(vec)``, or an index is out of range.
    """
    vec = vec.detach().reshape(-1).to(dtype).clone()
    payload: dict[str, Tensor] = {}
    for name, shape in base.items():
        if len(shape) != 2 or shape[1] != vec.numel():
            raise ShiftkitError(
                f"rows_delta: {name} has shape {tuple(shape)}; rows of width {vec.numel()} needed"
            )
        idx = torch.unique(torch.as_tensor(rows.get(name, []), dtype=torch.int64))
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= shape[0]):
            raise ShiftkitError(f"rows_delta: row index out of range for {name} with {shape[0]} rows")
        payload[f"{name}.rows"] = idx
        payload[f"{name}.coef"] = torch.full((idx.numel(),), float(coef), dtype=dtype)
        payload[f"{name}.vec"] = vec
    return _encoded({k: tuple(v) for k, v in base.items()}, dict.fromkeys(base, dtype), payload, 0.0)


def decode_rows_tensor(shift: Shift, name: str) -> Tensor:
    """One dense tensor of a ``rows``-encoded delta.

    Raises:
        CorruptFileError: the payload lacks the tensor's parts or they disagree in size.
    """
    layout = encoded_layout(shift)
    if name not in layout:
        raise ShiftkitError(f"rows-encoded delta has no tensor {name!r}")
    shape, dtype = layout[name]
    part = shift.tensors.get
    idx, values, coef, vec = (part(f"{name}.{role}") for role in ("rows", "values", "coef", "vec"))
    out = torch.zeros(shape, dtype=dtype)
    flat = _as_rows(out)
    if idx is None or (values is None and (coef is None or vec is None)):
        raise CorruptFileError(f"rows-encoded delta: the payload of {name!r} is incomplete")
    idx = idx.to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= flat.shape[0]):
        raise CorruptFileError(f"rows-encoded delta: a row index of {name!r} is out of range")
    try:
        if values is not None:
            flat[idx] = values.to(dtype).reshape(idx.numel(), flat.shape[1])
        else:
            assert coef is not None and vec is not None
            flat[idx] = coef.to(dtype)[:, None] * vec.to(dtype).reshape(1, flat.shape[1])
    except RuntimeError as err:
        raise CorruptFileError(
            f"rows-encoded delta: the payload of {name!r} has the wrong size ({err})"
        ) from None
    return out


def decode_rows(shift: Shift) -> Shift:
    """The dense delta a ``rows``-encoded shift stands for."""
    tensors = {name: decode_rows_tensor(shift, name) for name in encoded_layout(shift)}
    return Shift(DELTA, None, tensors, dict(shift.base))
