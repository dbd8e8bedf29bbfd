"""Binary-coding quantisation (ShiftAddLLM, You et al., NeurIPS 2024): ``W ≈ Σ_k α_k ⊙ B_k`` with binary
``B_k ∈ {−1, +1}`` and one scale vector per row and group of ``group_size`` input columns.

Two uses:

* ``sk.compress(shift, method="bcq", bits=3)``: every 2-D (or higher) tensor of a shift stored as ``bits``
  packed bit-planes plus float16 scales (``bits + 16·bits/group_size`` bits per entry); 1-D tensors (biases,
  norms) are carried as they are. ``bits="auto"`` spreads a ``budget`` of average bits over the tensors by
  ShiftAddLLM's sensitivity score; ``calib={name: inputs}`` switches a tensor to the output-error objective.
* ``sk.quantize_(model, method="bcq", bits=3, calib=batches)``: the model's Linear layers replaced by
  :class:`BCQLinear`, whose matmul reads lookup tables of signed input sums (no weight multiplications) and
  equals the dequantised dense matmul to float tolerance. With ``calib`` the layers are quantised stage by
  stage (one stage per element of the model's layer stack), each on the inputs the already-quantised
  earlier stages produce, minimising the output error.

Example:
    >>> small = sk.compress(tv, method="bcq", bits=3, group_size=64)
    >>> sk.quantize_(model, method="bcq", bits=3, calib=[batch1, batch2])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.compression._bcq import (
    allocate_bits,
    dequantize,
    hessian_factor,
    layer_score,
    lut_index,
    lut_matmul,
    pack_codes,
    quantize_weight,
    unpack_codes,
)
from shiftkit.compression._source import Source, decode_all, resolve, source_of
from shiftkit.compression.registry import register_method
from shiftkit.core.config import Patterns
from shiftkit.core.shift import Shift
from shiftkit.core.targets import match_names, output_embedding
from shiftkit.errors import CorruptFileError, ShiftkitError

__all__ = ["BCQLinear", "bcq", "bcq_source", "decompress", "decompress_tensor", "quantize_model_"]

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _check(
    bits: int | str, group_size: int, rounds: int, budget: float | None, choices: Sequence[int]
) -> None:
    if bits == "auto":
        if budget is None or isinstance(budget, bool) or not isinstance(budget, int | float):
            raise ShiftkitError(
                "bcq bits='auto' spreads an average budget of bits: pass budget=<bits>, e.g. 2.5"
            )
        if not choices or any(
            not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= 8 for c in choices
        ):
            raise ShiftkitError(f"bcq choices must be bit counts in 1..8, got {list(choices)!r}")
        if not min(choices) <= budget <= max(choices):
            raise ShiftkitError(f"bcq budget {budget} is outside the choices {sorted(choices)}")
    elif isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ShiftkitError(
            f"bcq bits must be an integer in 1..8 (binary codes per entry) or 'auto', got {bits!r}"
        )
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or (group_size != -1 and (group_size <= 0 or group_size % 8))
    ):
        raise ShiftkitError(
            "bcq group_size must be a positive multiple of 8 (the lookup tables read 8 inputs at a time) "
            f"or -1 (one group per row), got {group_size!r}"
        )
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ShiftkitError(f"bcq rounds must be a non-negative integer, got {rounds!r}")


def _group(name: str, cols: int, group_size: int) -> int:
    """The group size used for a tensor with ``cols`` columns (a whole row when the group is wider)."""
    if group_size == -1 or cols <= group_size:
        return cols
    if cols % group_size:
        common = math.gcd(cols, group_size)
        hint = f"e.g. {common}" if common % 8 == 0 else "a multiple of 8 that divides it"
        raise ShiftkitError(
            f"bcq group_size {group_size} does not divide the {cols} columns of {name!r}: pick a divisor "
            f"({hint}) or -1"
        )
    return group_size


def _hessian(name: str, x: Tensor, cols: int) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[-1] != cols:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShiftkitError(
            f"calib[{name!r}] must be inputs of width {cols} (shape (..., {cols})), got {got}"
        )
    x = x.reshape(-1, cols).to(torch.float64)
    return x.T @ x / x.shape[0]


def _u_diag(h: Tensor, damp: float) -> Tensor:
    return torch.diag(hessian_factor(h, damp)[0])


def bcq_source(
    src: Source,
    *,
    bits: int | str = 3,
    group_size: int = 64,
    rounds: int = 20,
    apot: bool = False,
    calib: Mapping[str, Tensor] | None = None,
    budget: float | None = None,
    choices: Sequence[int] = (2, 3, 4),
    damp: float = 0.01,
    scale_dtype: str = "float16",
    as_delta: bool = False,
) -> Shift:
    """:func:`bcq` of a streamed :class:`~shiftkit.compression._source.Source` (tensors read one at a time;
    twice with ``bits="auto"``). Parameters as in :func:`bcq`."""
    _check(bits, group_size, rounds, budget, choices)
    if scale_dtype not in _SCALE_DTYPES:
        raise ShiftkitError(f"bcq scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {scale_dtype!r}")
    calib = dict(calib or {})
    unknown = sorted(set(calib) - set(src.encode))
    if unknown:
        raise ShiftkitError(f"calib names tensors the shift does not quantise: {unknown[:5]}")
    off = src.offset
    mats = [n for n in src.encode if len(src.layout[n][0]) >= 2]
    flat = [n for n in src.encode if len(src.layout[n][0]) < 2]
    if not mats:
        raise ShiftkitError("bcq quantises matrices; this shift has only 1-D tensors (biases, vectors)")

    def matrix(name: str) -> Tensor:
        t = src.read(name)
        t = t.to(torch.float32) - off if off else t
        return t.reshape(t.shape[0], -1)

    hess = {n: _hessian(n, x, math.prod(src.layout[n][0][1:])) for n, x in calib.items()}
    for n in mats:
        _group(n, math.prod(src.layout[n][0][1:]), group_size)
    if bits == "auto":
        scores = {}
        for n in mats:
            w = matrix(n)
            scores[n] = layer_score(w, _u_diag(hess[n], damp) if n in hess else None)
        sizes = {n: math.prod(src.layout[n][0]) for n in mats}
        plan = allocate_bits(scores, sizes, list(choices), float(budget or 0))
    else:
        plan = {n: int(bits) for n in mats}

    tensors: dict[str, Tensor] = {}
    info: dict[str, dict[str, int]] = {}
    for i, n in enumerate(mats):
        w = matrix(n)
        g = _group(n, w.shape[1], group_size)
        alpha, codes = quantize_weight(
            w, plan[n], g, hessian=hess.get(n), rounds=rounds, use_apot=apot, damp=damp
        )
        tensors[f"bcq.{i}.codes"] = pack_codes(codes)
        tensors[f"bcq.{i}.alpha"] = alpha.permute(2, 0, 1).contiguous().to(_SCALE_DTYPES[scale_dtype])
        info[n] = {"index": i, "bits": plan[n], "group": g, "cols": int(w.shape[1])}
    for n in flat:
        tensors["raw." + n] = src.read(n)
    for n, t in src.raw.items():
        tensors["raw." + n] = t
    params: dict[str, Any] = {
        "bits": bits,
        "group_size": group_size,
        "rounds": rounds,
        "apot": bool(apot),
        "calibrated": sorted(calib),
        "budget": budget,
        "choices": list(choices),
        "scale_dtype": scale_dtype,
        "as_delta": bool(as_delta),
    }
    sizes_all = {n: math.prod(src.layout[n][0]) for n in mats}
    avg = sum(plan[n] * sizes_all[n] for n in mats) / sum(sizes_all.values())
    encoding: dict[str, Any] = {
        "method": "bcq",
        "params": params,
        "tensors": src.table(),
        "quantized": info,
        "raw": flat + list(src.raw),
        "aliases": dict(src.aliases),
        "offset": off,
        "average_bits": avg,
    }
    return Shift(src.method, src.config, tensors, dict(src.base), encoding)


def decompress_tensor(shift: Shift, name: str) -> Tensor:
    """One tensor of a BCQ-compressed shift, decoded (``Σ_k α_k B_k`` in the input's dtype and shape)."""
    enc = shift.encoding or {}
    name, shape, dtype, carried = resolve(shift, name)
    if carried is not None:
        return carried
    try:
        meta = enc["quantized"][name]
        i, g, cols = int(meta["index"]), int(meta["group"]), int(meta["cols"])
        codes, alpha = shift.tensors[f"bcq.{i}.codes"], shift.tensors[f"bcq.{i}.alpha"]
        offset = float(enc.get("offset", 0.0))
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"bcq shift: malformed encoding for {name!r} ({err})") from None
    rows = shape[0] if shape else 0
    q = int(meta.get("bits", 0))
    if (
        codes.dtype != torch.uint8
        or tuple(codes.shape) != (q, rows, (cols + 7) // 8)
        or tuple(alpha.shape) != (q, rows, cols // max(g, 1))
        or math.prod(shape) != rows * cols
    ):
        raise CorruptFileError(f"bcq shift: the codes or scales of {name!r} do not fit its shape {shape}")
    w = dequantize(alpha.to(torch.float32).permute(1, 2, 0), unpack_codes(codes, cols), g)
    if offset:
        w += offset
    return w.reshape(shape).to(dtype)


def decompress(shift: Shift) -> Shift:
    """The shift a BCQ-compressed shift encodes (dense tensors, the input's method and config)."""
    return decode_all(shift, decompress_tensor)


@register_method(
    "bcq",
    decompress=decompress,
    decompress_tensor=decompress_tensor,
    stream=lambda src, **params: bcq_source(src, **params),
)
def bcq(
    shift: Shift,
    *,
    bits: int | str = 3,
    group_size: int = 64,
    rounds: int = 20,
    apot: bool = False,
    calib: Mapping[str, Tensor] | None = None,
    budget: float | None = None,
    choices: Sequence[int] = (2, 3, 4),
    damp: float = 0.01,
    scale_dtype: str = "float16",
    as_delta: bool = False,
) -> Shift:
    """Compress ``shift`` by binary-coding quantisation: each matrix as ``bits`` binary codes and scales.

    Args:
        shift: a delta, a LoRA (its factors, or ``ΔW`` with ``as_delta=True``) or an (IA)³ shift.
        bits: binary codes per entry (1..8), or ``"auto"``: per tensor from ``choices`` under ``budget``.
        group_size: input columns sharing one scale vector per row (a multiple of 8), ``-1`` for whole rows;
            a tensor with fewer columns uses whole rows, one whose columns it does not divide is an error.
        rounds: alternating refinement rounds of scales and codes.
        apot: snap scales to three-term powers of two (multiplying by a scale is then three shifts).
        calib: ``{tensor name: inputs (..., in)}``: the output-error objective for those tensors.
        budget: average bits per entry for ``bits="auto"``.
        choices: the bit counts ``bits="auto"`` picks from.
        damp: dampening of the calibration Hessian (fraction of its mean diagonal).
        scale_dtype: storage dtype of the scales (``float16``).
        as_delta: quantise a LoRA's dense ``ΔW`` rather than its factors.

    Raises:
        ShiftkitError: bits < 1, a group size that is not a multiple of 8 or does not divide a tensor's
            columns, calibration inputs of the wrong width, or a shift that is not a change of the weights.
    """
    return bcq_source(
        source_of(shift, as_delta=as_delta, compressor="bcq"),
        bits=bits,
        group_size=group_size,
        rounds=rounds,
        apot=apot,
        calib=calib,
        budget=budget,
        choices=choices,
        damp=damp,
        scale_dtype=scale_dtype,
        as_delta=as_delta,
    )


class BCQLinear(nn.Module):
    """A Linear layer whose weight is ``Σ_k α_k ⊙ B_k``; the matmul reads lookup tables (:func:`lut_matmul`).

    Attributes:
        codes: ``(bits, out, ⌈in/8⌉)`` uint8 bit-planes (bit ``j`` of byte ``c`` is input ``8c + j``).
        alpha: ``(bits, out, groups)`` float32 scales.
        use_lut: ``True`` (default) for the lookup-table matmul, ``False`` for a dense matmul with the
            dequantised weight (the same numbers to float tolerance; faster for long sequences on CPU).
    """

    def __init__(
        self, codes: Tensor, alpha: Tensor, group_size: int, in_features: int, bias: Tensor | None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = int(codes.shape[1])
        self.bits = int(codes.shape[0])
        self.group_size = group_size
        self.codes: Tensor
        self.alpha: Tensor
        self.register_buffer("codes", codes)
        self.register_buffer("alpha", alpha)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_lut = True
        self._dense: Tensor | None = None  # the dequantised weight, made on the first dense forward
        self._index: Tensor | None = None  # the codes' table positions, made on the first lookup forward

    def dequantize(self) -> Tensor:
        """The dense weight ``(out, in)`` the codes and scales stand for (float32)."""
        codes = unpack_codes(self.codes.cpu(), self.in_features)
        return dequantize(self.alpha.cpu().permute(1, 2, 0), codes, self.group_size).to(self.alpha.device)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_lut:
            if self._index is None or self._index.device != self.codes.device:
                self._index = lut_index(self.codes)
            y = lut_matmul(x, self.codes, self.alpha, self.group_size, self.in_features, self._index)
        else:
            if self._dense is None:
                self._dense = self.dequantize()
            y = torch.nn.functional.linear(x.to(torch.float32), self._dense).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and scales (float16 scales, as a shift file stores them)."""
        return int(self.codes.numel() + 2 * self.alpha.numel())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}"
        )


def _linear_targets(model: nn.Module, targets: Patterns, exclude: Patterns) -> list[str]:
    """The Linear layers to quantise (PEFT's matching rules, as ``target_modules``), not the output head."""
    head = output_embedding(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if targets is not None:
        names = match_names(names, targets)
    if exclude is not None:
        names = [n for n in names if n not in set(match_names(names, exclude))]
    if not names:
        raise ShiftkitError("quantize_ found no nn.Linear to quantise (the output embedding is left alone)")
    return names


def _stages(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Linear layers grouped by the element of the deepest ModuleList holding them, in model order."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    stages: dict[str, list[str]] = {}
    for name in names:
        key = name
        for ln in sorted(lists, key=len, reverse=True):
            if name.startswith(ln + "."):
                key = ln + "." + name[len(ln) + 1 :].split(".")[0]
                break
        stages.setdefault(key, []).append(name)
    return list(stages.values())


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, tuple | list):
        model(*batch)
    else:
        model(batch)


def _collect(model: nn.Module, names: list[str], calib: list[Any]) -> dict[str, Tensor]:
    """``XᵀX/n`` (float64) of every named Linear's inputs over the calibration batches."""
    mods = dict(model.named_modules())
    acc: dict[str, list[Any]] = {n: [None, 0] for n in names}
    hooks = []

    def hook(name: str) -> Any:
        def fn(_m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            h = x.T @ x
            acc[name][0] = h if acc[name][0] is None else acc[name][0] + h
            acc[name][1] += x.shape[0]

        return fn

    for n in names:
        hooks.append(mods[n].register_forward_pre_hook(hook(n)))
    try:
        with torch.no_grad():
            for i, batch in enumerate(calib):
                try:
                    _run(model, batch)
                except (RuntimeError, TypeError, ValueError, IndexError) as err:
                    raise ShiftkitError(
                        f"calibration batch {i} does not run through the model ({type(err).__name__}: "
                        f"{err}); pass batches the model takes: a tensor, a dict of keyword arguments or a "
                        "tuple"
                    ) from err
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, (h, count) in acc.items():
        if h is None:
            raise ShiftkitError(f"the calibration batches never reached {n!r}")
        out[n] = h / count
    return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def quantize_model_(
    model: nn.Module,
    *,
    bits: int | str = 3,
    group_size: int = 64,
    calib: Iterable[Any] | None = None,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    rounds: int = 20,
    apot: bool = False,
    budget: float | None = None,
    choices: Sequence[int] = (2, 3, 4),
    damp: float = 0.01,
    progress: bool = False,
) -> nn.Module:
    """Replace the model's Linear layers by :class:`BCQLinear` (``sk.quantize_(model, method="bcq")``).

    Args:
        model: any ``nn.Module``; its output embedding (``get_output_embeddings()``) is left alone.
        bits, group_size, rounds, apot, budget, choices, damp: as in :func:`bcq`.
        calib: batches the model takes (a tensor, a dict of keyword arguments, or a tuple of arguments):
            the output-error objective, stage by stage. ``None``: the weight-error objective.
        target_modules / exclude_modules: Linears to include or skip, matched as ``target_modules`` is
            (a list: exact names or ``.``-suffixes; a string: a full regular expression).
        progress: a progress bar over the layers.

    Returns:
        ``model``, changed in place.
    """
    _check(bits, group_size, rounds, budget, choices)
    names = _linear_targets(model, target_modules, exclude_modules)
    mods = dict(model.named_modules())
    for n in names:
        _group(n + ".weight", mods[n].in_features, group_size)
    batches = list(calib) if calib is not None else None
    if batches is not None and not batches:
        raise ShiftkitError("calib is empty: pass a list of batches, or None for the weight-error objective")
    if bits == "auto":
        hs = _collect(model, names, batches) if batches else {}
        scores = {n: layer_score(mods[n].weight, _u_diag(hs[n], damp) if n in hs else None) for n in names}
        plan = allocate_bits(
            scores, {n: mods[n].weight.numel() for n in names}, list(choices), float(budget or 0)
        )
        del hs
    else:
        plan = {n: int(bits) for n in names}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(names), desc="bcq", unit="layer", disable=not progress)
    made: list[BCQLinear] = []
    try:
        for stage in _stages(model, names) if batches else [names]:
            hs = _collect(model, stage, batches) if batches else {}
            for n in stage:
                lin = mods[n]
                assert isinstance(lin, nn.Linear)
                g = _group(n + ".weight", lin.in_features, group_size)
                alpha, codes = quantize_weight(
                    lin.weight.detach().cpu(),
                    plan[n],
                    g,
                    hessian=hs.get(n),
                    rounds=rounds,
                    use_apot=apot,
                    damp=damp,
                )
                dev = lin.weight.device
                new = BCQLinear(
                    pack_codes(codes).to(dev),
                    alpha.permute(2, 0, 1).contiguous().to(dev),
                    g,
                    lin.in_features,
                    lin.bias,
                )
                new.use_lut = False  # later stages calibrate through it: the dense path, same numbers, faster
                made.append(new)
                _set(model, n, new)
                bar.update(1)
    finally:
        bar.close()
        for layer in made:
            layer.use_lut = True
            layer._dense = None
    return model
