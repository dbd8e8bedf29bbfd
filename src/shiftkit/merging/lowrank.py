"""Merging LoRA shifts exactly in ΔW space, and re-factorising the result (``sk.merge_lora``).

Merging factors one by one, as PEFT's ``add_weighted_adapter`` does for ``linear``/``ties``/``dare_*``,
merges ``Σ√c_i B_i · Σ√c_j A_j``, which has cross terms ``B_i A_j``; so shiftkit merges the dense ``ΔW_i``
(LoRA's own dense math, :mod:`shiftkit.methods.lora.dense`) exactly with any merge method and only then, if
factors are wanted, re-factorises each weight: truncated SVD ``M = U S Vᵀ ≈ (U_r S_r)(V_rᵀ)``, the best
rank-r approximation in Frobenius norm (Eckart–Young), relative error ``√(Σ_{i>r} σ_i² / Σ_i σ_i²)``. For
``linear`` / ``task_arithmetic`` the merge is also exact in factor form: concatenating the factors along the
rank axis with A's rows scaled by ``c_i s_i`` gives ``B A = Σ_i c_i s_i B_i A_i`` (PEFT's ``cat``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.core import functional as skf
from shiftkit.core.delta import to_delta
from shiftkit.core.encoding import decoded
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.in_memory import merge
from shiftkit.methods.lora import LoRAConfig
from shiftkit.methods.lora.config import module_patterns
from shiftkit.methods.lora.dense import (
    adapted_modules,
    factorise,
    lora_delta,
    lora_kind,
    lora_param_names,
    require_lora,
)

__all__ = ["LoraMergeResult", "lora_delta", "lora_kind", "lora_param_names", "lora_to_delta", "merge_lora"]

#: relative Frobenius error of a re-factorised weight above which merge_lora warns: 1e-3 is below bf16's
#: relative rounding (2⁻⁸ ≈ 3.9e-3), so a smaller loss is invisible once weights are stored in half precision
WARN_ABOVE = 1e-3
_OUTPUTS = ("lora", "concat", "delta")
_EXACT_CONCAT = ("linear", "task_arithmetic")


def lora_to_delta(
    shift: Shift,
    *,
    base: nn.Module | Mapping[str, Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Shift:
    """The exact dense delta of a LoRA shift, without attaching it: ``{<module>.weight: ΔW}``.

    The same as ``sk.to_delta(shift, base=..., dtype=...)`` for a LoRA shift (the method's dense hook,
    :mod:`shiftkit.methods.lora.dense`); kept for the name users know. ``modules_to_save`` tensors
    (trained values) become ``value − base value``, which needs ``base``.

    Raises:
        ShiftkitError: not a LoRA shift, or ``modules_to_save`` without ``base``.
        ShiftMismatchError: factors that do not fit the recorded shapes, or a base that does not fit.

    Example:
        >>> tv = lora_to_delta(sk.load("adapter.safetensors"))
        >>> sk.apply_(base_model, tv)   # same weights as sk.fold_ of the attached adapter
    """
    require_lora(shift)
    return to_delta(shift, base=base, dtype=dtype)


# --- merging LoRA shifts -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraMergeResult:
    """What :func:`merge_lora` returns.

    Attributes:
        shift: the merged shift: a LoRA shift (``output="lora"`` / ``"concat"``) or a dense delta.
        errors: per merged weight ``<module>.weight``, ``‖ΔW_result − ΔW_exact‖_F / ‖ΔW_exact‖_F`` against
            the exact ΔW-space merge (0 where both are zero).
        max_error: the largest of ``errors`` (0.0 when there are none).
        rank: the rank of the LoRA result; ``None`` for a dense delta.

    Example:
        >>> res = merge_lora([lora1, lora2], method="ties", density=0.5, rank=16)
        >>> worst = max(res.errors, key=res.errors.get)
        >>> sk.attach_(base, res.shift)
    """

    shift: Shift
    errors: dict[str, float]
    max_error: float
    rank: int | None


def _rel_error(approx: Tensor, exact: Tensor) -> float:
    diff = skf.norm64(approx.to(torch.float32) - exact.to(torch.float32))  # float64 sums: a whole tensor
    norm = skf.norm64(exact)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def _concat_coeffs(method: str, ws: list[float], params: Mapping[str, Any]) -> list[float]:
    """The factor ``c_i`` of each participating shift so that ``Σ c_i ΔW_i`` is the method's merge."""
    total = sum(ws)
    if method == "linear":
        div = total if params.get("normalize", True) else 1.0
        return [w / div for w in ws]
    lam = float(params.get("lambda_", 1.0))
    div = total if params.get("normalize", False) and abs(total) >= 1e-8 else 1.0
    return [w * lam / div for w in ws]


def _concat(
    shifts: list[Shift], ws: list[float], method: str, params: Mapping[str, Any], on_missing: str, fqn: str
) -> tuple[Tensor, Tensor]:
    """``A = [c_i s_i A_i]`` stacked on the rank axis, ``B = [B_i]`` side by side (zeros where absent)."""
    present = [i for i, s in enumerate(shifts) if f"{fqn}.lora_A" in s.tensors]
    part = present if on_missing == "skip" else list(range(len(shifts)))
    coeff = dict(zip(part, _concat_coeffs(method, [ws[i] for i in part], params), strict=True))
    a_ref, b_ref = shifts[present[0]].tensors[f"{fqn}.lora_A"], shifts[present[0]].tensors[f"{fqn}.lora_B"]
    a_blocks, b_blocks = [], []
    for i, s in enumerate(shifts):
        config = require_lora(s)
        if i in present:
            a, b = s.tensors[f"{fqn}.lora_A"].to(torch.float32), s.tensors[f"{fqn}.lora_B"].to(torch.float32)
        else:
            r = config.rank_of(fqn)
            a = torch.zeros(r, *a_ref.shape[1:], dtype=torch.float32, device=a_ref.device)
            b = torch.zeros(b_ref.shape[0], r, *b_ref.shape[2:], dtype=torch.float32, device=b_ref.device)
        a_blocks.append(a * (coeff.get(i, 0.0) * config.scaling_of(fqn)))
        b_blocks.append(b)
    return torch.cat(a_blocks, 0), torch.cat(b_blocks, 1)


def merge_lora(
    shifts: Sequence[Shift],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    *,
    output: str = "lora",
    rank: int | None = None,
    on_missing: str = "error",
    model: nn.Module | None = None,
    warn_above: float | None = WARN_ABOVE,
    **params: Any,
) -> LoraMergeResult:
    """Merge LoRA shifts exactly in ΔW space; return a dense delta or LoRA factors with their error.

    * ``output="delta"``: ``sk.merge`` of the exact ``ΔW_i`` (any method); errors are 0.
    * ``output="lora"``: the same merge, then per weight the truncated SVD to ``rank`` (default the largest
      input rank): ``B = U_r S_r``, ``A = V_rᵀ``, config ``r = lora_alpha = rank`` (scaling 1), targets the
      union of the inputs' (PEFT ``svd`` / ``ties_svd`` ...). Warns when ``max_error > warn_above``.
    * ``output="concat"``: ``linear`` / ``task_arithmetic`` only: the factors side by side, rank ``Σ r_i``,
      exact up to float rounding (PEFT ``cat``; ``linear`` divides by ``Σ w`` as the linear merge does).

    Args:
        shifts: T LoRA shifts (``output="lora"`` / ``"delta"`` also take dense deltas of adapted weights).
        method: any name from ``sk.list_merge_methods()``.
        weights: one number per shift (default 1.0 each).
        output: ``"lora"``, ``"concat"`` or ``"delta"``.
        rank: rank of the SVD result (``output="lora"`` only).
        on_missing: ``"error"``, ``"zero"`` or ``"skip"`` for weights some shifts do not adapt (sk.merge).
        model: optional base model, only to tell square embeddings from Linears.
        warn_above: relative error above which a re-factorisation warns; ``None`` never warns.
        **params: the merge method's parameters (``density``, ``lambda_`` ...).

    Returns:
        A :class:`LoraMergeResult`; attach a LoRA result with ``sk.attach_``, add a delta with ``sk.apply_``.

    Raises:
        ShiftkitError: no LoRA input, ``modules_to_save`` in an input, an unknown output, ``concat`` with
            another method, or a bad ``rank``. ShiftMismatchError: inputs that do not align.

    Example:
        >>> res = merge_lora([lora1, lora2, lora3], method="ties", density=0.5, rank=16)
        >>> print(res.max_error, res.rank)
        >>> sk.attach_(base, res.shift)
    """
    if output not in _OUTPUTS:
        raise ShiftkitError(f"unknown output {output!r}; use one of {list(_OUTPUTS)}")
    if isinstance(shifts, Shift) or not isinstance(shifts, Sequence) or not shifts:
        raise ShiftkitError("merge_lora needs a non-empty list of Shift values")
    shifts = [decoded(s) for s in shifts]  # compressed LoRA shifts are decoded first
    loras = [s for s in shifts if isinstance(s, Shift) and s.method == "lora"]
    if not loras or not all(adapted_modules(s) for s in loras):
        raise ShiftkitError("merge_lora needs LoRA shifts with factors; merge dense deltas with sk.merge")
    kinds: dict[str, tuple[str, tuple[int, ...]]] = {}
    for s in loras:
        saved = sorted({k.split(".saved.")[0] for k in s.tensors if ".saved." in k})
        if saved:
            raise ShiftkitError(
                f"a LoRA input carries modules_to_save {saved[:5]} (trained values, not factors): convert it "
                "with lora_to_delta(shift, base=...) and merge the deltas with sk.merge"
            )
        for fqn in adapted_modules(s):
            found = (lora_kind(s, fqn, model=model), tuple(s.base[fqn]))
            if kinds.setdefault(fqn, found) != found:
                raise ShiftMismatchError(f"LoRA inputs disagree on {fqn!r}: {kinds[fqn]} vs {found}")
    deltas = [lora_to_delta(s, base=model, dtype=torch.float32) if s.method == "lora" else s for s in shifts]
    exact = merge(deltas, method, weights, on_missing=on_missing, **params)
    dtype = loras[0].tensors[f"{adapted_modules(loras[0])[0]}.lora_A"].dtype
    if output == "delta":
        if rank is not None:
            raise ShiftkitError("rank= applies to output='lora' only")
        out = {k: v.to(dtype) for k, v in exact.tensors.items()}
        errors = {k: _rel_error(v, exact.tensors[k]) for k, v in out.items()}
        result = Shift(DELTA, None, out, {k: tuple(v.shape) for k, v in out.items()})
        return LoraMergeResult(result, errors, max(errors.values(), default=0.0), None)
    stray = sorted(k for k in exact.tensors if not k.endswith(".weight") or k[: -len(".weight")] not in kinds)
    if stray:
        raise ShiftkitError(
            f"output={output!r} can only hold LoRA-adapted weights; these are not: {stray[:5]}"
        )
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    if output == "concat":
        if method not in _EXACT_CONCAT or len(loras) != len(shifts):
            raise ShiftkitError(
                f"output='concat' is exact for LoRA inputs merged with {list(_EXACT_CONCAT)} only "
                f"(got method {method!r}); use output='lora' (SVD) or 'delta'"
            )
        if rank is not None:
            raise ShiftkitError("output='concat' has rank Σ r_i; rank= applies to output='lora' only")
        ws = [1.0] * len(shifts) if weights is None else [float(w) for w in weights]
        for fqn in sorted(kinds):
            pairs[fqn] = _concat(loras, ws, method, params, on_missing, fqn)
        ranks = {fqn: int(a.shape[0]) for fqn, (a, _) in pairs.items()}
        r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    else:
        r = max(max(require_lora(s).rank_of(f) for f in kinds) for s in loras) if rank is None else rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ShiftkitError(f"rank must be a positive integer, got {rank!r}")
        for name in exact.tensors:
            fqn = name[: -len(".weight")]
            pairs[fqn] = factorise(exact.tensors[name], kinds[fqn][0], r)
        ranks = {fqn: r for fqn in pairs}
    first = require_lora(loras[0])
    pattern = module_patterns(ranks, r)  # scaling 1 everywhere: α = rank
    config = LoRAConfig(
        r=r,
        lora_alpha=float(r),
        lora_dropout=first.lora_dropout,
        target_modules=tuple(sorted(pairs)),
        rank_pattern={k: int(v) for k, v in pattern.items()},
        alpha_pattern=pattern,
    )
    tensors: dict[str, Tensor] = {}
    for fqn, (a, b) in sorted(pairs.items()):
        tensors[f"{fqn}.lora_A"], tensors[f"{fqn}.lora_B"] = a.to(dtype), b.to(dtype)
    result = Shift("lora", config, tensors, {fqn: kinds[fqn][1] for fqn in sorted(pairs)})
    errors = {
        name: _rel_error(lora_delta(result, name, model=model), exact.tensors[name]) for name in exact.tensors
    }
    worst = max(errors, key=lambda k: errors[k], default=None)
    max_error = errors[worst] if worst is not None else 0.0
    if output == "lora" and warn_above is not None and max_error > warn_above:
        warnings.warn(
            f"merge_lora: the rank-{r} factors differ from the exact merge by up to {max_error:.2e} "
            f"(relative Frobenius, {worst}); raise rank= or use output='delta'",
            stacklevel=2,
        )
    return LoraMergeResult(result, errors, max_error, r)
