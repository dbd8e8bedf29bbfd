"""ComPEFT (Yadav et al., 2023): keep the largest ``density`` fraction of a shift's entries by magnitude
(one global top-k over the whole shift), replace each kept entry by its sign, and scale all of them by one
number ``α·σ`` (σ: the standard deviation of the whole dense shift, ddof 1).

The file really is that small: the signs are packed bits and the kept positions are Golomb–Rice coded
gaps (``b* = 1 + ⌊log2(ln(φ−1)/ln(1−p))⌋``, Sattler et al.'s STC code), or a one-bit-per-entry bitmap where
that is smaller, chosen per tensor. ``shift.nbytes`` and the file size count these bytes.

Variants in the same code path: ``alpha=-1`` keeps the kept entries' values (pruning only; with
``density=1`` the round trip is bit-exact), ``alpha=-2`` is the STC baseline (scale = mean |kept value|;
``stc_signed_mean=True`` reproduces the reference code's signed mean), and ``alpha="auto"`` picks α from
``alpha_grid`` by an ``evaluate(decoded_shift) -> score`` callback (higher is better).

Example:
    >>> small = sk.compress(tv, method="compeft", density=0.1)
    >>> small.nbytes / tv.nbytes
    0.018...
    >>> sk.apply_(model, small)          # decoded on the way in
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shiftkit.compression._bits import (
    golomb_decode,
    golomb_encode,
    golomb_parameter,
    kth_largest_magnitude,
    pack_bits,
    unpack_bits,
)
from shiftkit.compression._source import Source, decode_all, resolve, source_of
from shiftkit.compression.registry import register_method
from shiftkit.core.encoding import encoded_layout
from shiftkit.core.shift import Shift
from shiftkit.errors import CorruptFileError, ShiftkitError

__all__ = ["DEFAULT_ALPHA_GRID", "compeft", "compeft_source", "decompress", "decompress_tensor", "encode"]

#: α values ``alpha="auto"`` tries (ComPEFT tunes α per task on validation data; the paper's grid is not
#: published in its code, so this one is ours and configurable)
DEFAULT_ALPHA_GRID = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)

_GOLOMB, _BITMAP = 0, 1
# table columns: format, nnz, unary bit count, position bytes start/end, sign-or-value bytes start/end
_COLS = 7


def _check_params(density: float, alpha: float | str) -> None:
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ShiftkitError(f"compeft density is the fraction of entries kept, in (0, 1]; got {density!r}")
    if alpha == "auto":
        return
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ShiftkitError(f"compeft alpha must be a number or 'auto', got {alpha!r}")
    if alpha <= 0 and alpha not in (-1, -2):
        raise ShiftkitError(f"compeft alpha must be > 0, or -1 (pruning only) or -2 (STC); got {alpha!r}")


def _positions(pos: np.ndarray, numel: int, b: int, choice: str) -> tuple[int, bytes, int]:
    """(format, bytes, unary bit count) of one tensor's kept positions."""
    if choice != "bitmap":
        unary, ubits, rem = golomb_encode(pos, b)
        golomb = unary.tobytes() + rem.tobytes()
        if choice == "golomb" or len(golomb) <= (numel + 7) // 8:
            return _GOLOMB, golomb, ubits
    mask = np.zeros(numel, np.uint8)
    mask[pos] = 1
    return _BITMAP, pack_bits(mask).tobytes(), 0


def _with_scale(shift: Shift, alpha: float) -> Shift:
    tensors = dict(shift.tensors)
    sigmas = (shift.encoding or {})["sigmas"]
    tensors["compeft.scale"] = torch.tensor([alpha * sg for sg in sigmas], dtype=torch.float32)
    enc = dict(shift.encoding or {})
    enc["params"] = dict(enc["params"])
    return Shift(shift.method, shift.config, tensors, dict(shift.base), enc)


def _payload(shift: Shift, key: str) -> Tensor:
    try:
        return shift.tensors[key]
    except KeyError:
        raise CorruptFileError(f"compeft shift lacks its {key!r} tensor") from None


def decompress_tensor(shift: Shift, name: str) -> Tensor:
    """One tensor of a ComPEFT-compressed shift, decoded (the input's dtype and shape)."""
    enc = shift.encoding or {}
    layout = encoded_layout(shift)
    name, shape, dtype, kept_as_is = resolve(shift, name)
    if kept_as_is is not None:
        return kept_as_is
    try:
        carried, aliases = set(enc.get("raw") or []), set(enc.get("aliases") or {})
        i = [n for n in layout if n not in carried and n not in aliases].index(name)
        b, offset, values_mode = int(enc["golomb_b"]), float(enc["offset"]), bool(enc["values"])
    except (KeyError, ValueError, TypeError) as err:
        raise CorruptFileError(f"compeft shift: malformed encoding for {name!r} ({err})") from None
    table = _payload(shift, "compeft.table")
    data = _payload(shift, "compeft.data").numpy()
    if table.dim() != 2 or table.shape[1] != _COLS or i >= table.shape[0]:
        raise CorruptFileError(f"compeft shift: position table of shape {tuple(table.shape)} is malformed")
    fmt, n, ubits, p0, p1, t0, t1 = (int(v) for v in table[i])
    numel = math.prod(shape)
    if not (0 <= p0 <= p1 <= t0 <= t1 <= data.size and 0 <= n <= numel):
        raise CorruptFileError(f"compeft shift: table row for {name!r} points outside the payload")
    try:
        if fmt == _GOLOMB:
            ubytes = (ubits + 7) // 8
            pos = golomb_decode(data[p0 : p0 + ubytes], ubits, data[p0 + ubytes : p1], n, b)
        elif fmt == _BITMAP:
            pos = np.flatnonzero(unpack_bits(data[p0:p1], numel))
        else:
            raise ValueError(f"unknown position format {fmt}")
        if pos.size != n or (n and (pos[0] < 0 or pos[-1] >= numel)):
            raise ValueError("positions do not fit the tensor")
    except ValueError as err:
        raise CorruptFileError(f"compeft shift: corrupt positions for {name!r} ({err})") from None
    idx = torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64))
    if values_mode:
        raw = torch.frombuffer(bytearray(data[t0:t1].tobytes()), dtype=torch.uint8) if t1 > t0 else None
        vals = raw.view(dtype) if raw is not None else torch.zeros(0, dtype=dtype)
        if vals.numel() != n:
            raise CorruptFileError(f"compeft shift: {name!r} holds {vals.numel()} values for {n} positions")
        out = torch.full((numel,), offset, dtype=dtype)
        out[idx] = vals
        return out.reshape(shape)
    scales = _payload(shift, "compeft.scale").reshape(-1)
    if scales.numel() not in (1, table.shape[0]):
        raise CorruptFileError(f"compeft shift: {scales.numel()} scales for {table.shape[0]} tensors")
    scale = float(scales[0] if scales.numel() == 1 else scales[i])
    neg = (
        torch.from_numpy(unpack_bits(data[t0:t1], n).astype(bool)) if n else torch.zeros(0, dtype=torch.bool)
    )
    if neg.numel() != n:
        raise CorruptFileError(f"compeft shift: {name!r} has {neg.numel()} signs for {n} positions")
    q = torch.where(neg, -scale, scale).to(torch.float32)
    out32 = torch.zeros(numel, dtype=torch.float32)
    out32[idx] = q
    if offset:
        out32 += offset
    return out32.to(dtype).reshape(shape)


def decompress(shift: Shift) -> Shift:
    """The shift a ComPEFT-compressed shift encodes (dense tensors, the input's method and config)."""
    return decode_all(shift, decompress_tensor)


def encode(
    src: Source,
    *,
    density: float = 0.1,
    alpha: float | str = 1.0,
    stc_signed_mean: bool = False,
    payload: str = "auto",
    scope: str = "global",
) -> Shift:
    """ComPEFT-encode a :class:`~shiftkit.compression._source.Source`, reading each tensor four times and
    holding one at a time (σ, the two passes of the exact threshold, then the encoding). ``scope="tensor"``:
    σ, threshold and scale per tensor (the spec's per-tensor variant).

    ``alpha="auto"`` encodes with α = 1; :func:`compeft` then tries its grid. Parameters as in
    :func:`compeft`, which checks them.
    """
    off = src.offset
    groups = [list(src.encode)] if scope == "global" else [[n] for n in src.encode]

    def changes(names: list[str]) -> Iterator[Tensor]:
        for name in names:
            t = src.read(name)
            yield t.to(torch.float32) - off if off else t

    values_mode = alpha == -1
    sigmas: list[float] = []
    thresholds: list[float] = []
    d = src.numel()
    for names in groups:
        # σ over the group's dense entries (ddof 1, zeros included), summed in float64
        n = sum(math.prod(src.layout[x][0]) for x in names)
        s1 = s2 = 0.0
        for t in changes(names):
            t64 = t.to(torch.float64)
            s1 += float(t64.sum())
            s2 += float((t64 * t64).sum())
        sigma = math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1)) if n > 1 else 0.0
        k = math.floor(n * density)
        if k == 0 or (sigma == 0.0 and not values_mode):
            thr = math.inf  # keep nothing (an all-zero group, or a density below one entry)
        else:
            thr = kth_largest_magnitude(functools.partial(changes, names), k)
        sigmas.append(sigma)
        thresholds.append(thr)
    b = golomb_parameter(math.floor(d * density) / d) if d else 0  # the code's parameter: target density

    nnz = 0
    kept_abs = [0.0] * len(groups)
    kept_sum = [0.0] * len(groups)
    kept_n = [0] * len(groups)
    chunks: list[bytes] = []
    table = np.zeros((len(src.encode), _COLS), np.int64)  # stored as int32 when the offsets fit
    at = 0
    for i, name in enumerate(src.encode):
        g = 0 if scope == "global" else i
        t = src.read(name)
        change = (t.to(torch.float32) - off if off else t).reshape(-1)
        m = change.abs().to(torch.float32) >= thresholds[g]
        if not values_mode:
            m &= change != 0
        idx = torch.nonzero(m).reshape(-1)
        pos = idx.numpy()
        nnz += pos.size
        kept = change[idx]
        kept64 = kept.to(torch.float64)
        kept_abs[g] += float(kept64.abs().sum())
        kept_sum[g] += float(kept64.sum())
        kept_n[g] += pos.size
        fmt, pbytes, ubits = _positions(pos, t.numel(), b, payload)
        if values_mode:  # the entries themselves, bit for bit
            tail = t.reshape(-1)[idx].contiguous().view(torch.uint8).numpy().tobytes()
        else:
            tail = pack_bits((kept < 0).numpy()).tobytes()
        end = at + len(pbytes) + len(tail)
        table[i] = [fmt, pos.size, ubits, at, at + len(pbytes), at + len(pbytes), end]
        chunks += [pbytes, tail]
        at = end

    if values_mode:
        scales = [0.0] * len(groups)
    elif alpha == -2:
        sums = kept_sum if stc_signed_mean else kept_abs
        scales = [sm / c if c else 0.0 for sm, c in zip(sums, kept_n, strict=True)]
    else:
        scales = [float(alpha if alpha != "auto" else 1.0) * sg for sg in sigmas]
    data = (
        torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
        if at
        else torch.zeros(0, dtype=torch.uint8)
    )
    small = table.max(initial=0) < 2**31
    tensors: dict[str, Tensor] = {
        "compeft.table": torch.from_numpy(table.astype(np.int32) if small else table),
        "compeft.data": data,
    }
    if not values_mode:
        tensors["compeft.scale"] = torch.tensor(scales, dtype=torch.float32)
    for k_raw, t in src.raw.items():
        tensors["raw." + k_raw] = t
    params: dict[str, Any] = {
        "density": float(density),
        "alpha": alpha,
        "stc_signed_mean": bool(stc_signed_mean),
        "payload": payload,
        "scope": scope,
    }
    encoding: dict[str, Any] = {
        "method": "compeft",
        "params": params,
        "tensors": src.table(),
        "raw": list(src.raw),
        "aliases": dict(src.aliases),
        "offset": off,
        "golomb_b": b,
        "sigma": sigmas[0] if scope == "global" else None,
        "sigmas": sigmas,
        "nnz": nnz,
        "numel": d,
        "values": values_mode,
    }
    return Shift(src.method, src.config, tensors, dict(src.base), encoding)


@register_method(
    "compeft",
    decompress=decompress,
    decompress_tensor=decompress_tensor,
    stream=lambda src, **params: compeft_source(src, **params),
    lossless={"density": 1.0, "alpha": -1},
)
def compeft(
    shift: Shift,
    *,
    density: float = 0.1,
    alpha: float | str = 1.0,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    evaluate: Callable[[Shift], float] | None = None,
    stc_signed_mean: bool = False,
    as_delta: bool = False,
    payload: str = "auto",
    scope: str = "global",
) -> Shift:
    """Compress ``shift`` with ComPEFT: global top-``density`` by magnitude, signs, one scale ``α·σ``.

    Args:
        shift: a delta, a LoRA (its factors, or ``ΔW`` with ``as_delta=True``) or an (IA)³ shift.
        density: fraction of entries kept, in (0, 1]; ties at the threshold are all kept.
        alpha: the scale factor on σ; ``-1`` keeps values (pruning only), ``-2`` the STC scale,
            ``"auto"`` the best of ``alpha_grid`` by ``evaluate``.
        alpha_grid: the α values ``"auto"`` tries.
        evaluate: ``evaluate(decoded shift) -> score`` (higher is better), needed by ``"auto"``.
        stc_signed_mean: with ``alpha=-2``, the reference code's signed mean instead of mean |value|.
        as_delta: compress a LoRA's dense ``ΔW = s·B A`` rather than its factors (decodes to a delta).
        payload: ``"auto"`` (smaller of Golomb gaps and bitmap, per tensor), ``"golomb"`` or ``"bitmap"``.
        scope: ``"global"`` (the paper: one top-k and one σ over the whole shift) or ``"tensor"`` (each
            tensor its own top-k, σ and scale: a LoRA's A and B factors have different scales, and a global
            top-k keeps mostly the larger factor's entries).

    Returns:
        The compressed shift (``encoding["method"] == "compeft"``), which decodes to a shift of the input's
        method (a delta for ``as_delta=True``).

    Raises:
        ShiftkitError: bad parameters, or a shift whose tensors are not changes of the weights.
    """
    return compeft_source(
        source_of(shift, as_delta=as_delta, compressor="compeft"),
        density=density,
        alpha=alpha,
        alpha_grid=alpha_grid,
        evaluate=evaluate,
        stc_signed_mean=stc_signed_mean,
        as_delta=as_delta,
        payload=payload,
        scope=scope,
    )


def compeft_source(
    src: Source,
    *,
    density: float = 0.1,
    alpha: float | str = 1.0,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    evaluate: Callable[[Shift], float] | None = None,
    stc_signed_mean: bool = False,
    as_delta: bool = False,
    payload: str = "auto",
    scope: str = "global",
) -> Shift:
    """:func:`compeft` of a streamed :class:`~shiftkit.compression._source.Source` (``shiftkit compress
    --base``: a fine-tuned model's delta read tensor by tensor). Parameters as in :func:`compeft`."""
    _check_params(density, alpha)
    if payload not in ("auto", "golomb", "bitmap"):
        raise ShiftkitError(f"compeft payload must be 'auto', 'golomb' or 'bitmap', got {payload!r}")
    if alpha == "auto" and evaluate is None:
        raise ShiftkitError("compeft alpha='auto' picks α on validation data: pass evaluate=fn(shift)->score")
    if alpha == "auto" and (not alpha_grid or any(not a > 0 for a in alpha_grid)):
        raise ShiftkitError(f"compeft alpha_grid needs positive values, got {list(alpha_grid)!r}")
    if scope not in ("global", "tensor"):
        raise ShiftkitError(f"compeft scope must be 'global' or 'tensor', got {scope!r}")
    out = encode(
        src, density=density, alpha=alpha, stc_signed_mean=stc_signed_mean, payload=payload, scope=scope
    )
    enc: dict[str, Any] = out.encoding or {}
    enc["params"]["as_delta"] = bool(as_delta)
    if alpha == "auto":
        assert evaluate is not None
        scores: dict[str, float] = {}
        for cand in alpha_grid:
            trial = _with_scale(out, float(cand))
            scores[repr(float(cand))] = float(evaluate(decompress(trial)))
        best = max(alpha_grid, key=lambda c: scores[repr(float(c))])
        out = _with_scale(out, float(best))
        enc = out.encoding or {}
        enc["params"]["alpha"] = float(best)
        enc["alpha_scores"] = scores
    return out
