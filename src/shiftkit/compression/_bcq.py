"""Binary-coding quantisation (BCQ) math, after ShiftAddLLM (You et al., NeurIPS 2024) and LUT-GEMM:
``W ≈ Σ_k α_k ⊙ B_k`` with ``B_k ∈ {−1, +1}`` and one scale vector per row and group of input columns.

* :func:`fit_bcq`: greedy residual initialisation, then alternating refinement: least-squares scales
  ``(BᵀB) α = Bᵀw``, ``|α|`` sorted, optionally snapped to three-term powers of two (APoT), and the optimal
  codes (the nearest of the ``2^q`` values ``Σ ±α_k``, by binary search).
* :func:`quantize_weight`: the weight-error objective, or with a Hessian ``H = XᵀX/n`` of calibration inputs
  the output-error objective (``‖WX − ŴX‖``), GPTQ-style: columns swept in order, each group's scales fitted
  on the error-corrected columns when the sweep reaches it, the rounding error of every column pushed onto
  the columns not yet quantised through the Cholesky factor of ``H⁻¹``.
* :func:`lut_matmul`: ``x Ŵᵀ`` without weight multiplications: per 8 inputs a 256-entry table of all signed
  sums (built with additions only), a lookup per code byte, sums per group, then one scale per row, group
  and bit-plane.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "allocate_bits",
    "apot",
    "dequantize",
    "fit_bcq",
    "hessian_factor",
    "layer_score",
    "lut_index",
    "lut_matmul",
    "nearest_codes",
    "pack_codes",
    "quantize_weight",
    "rtn_quantize",
    "unpack_codes",
]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread: the column sweep is thousands of ops on vectors of a few
    hundred entries, which threads only slow down (on 2 busy cores, 100x)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def apot(alpha: Tensor, terms: int = 3) -> Tensor:
    """``alpha`` snapped to sums of ``terms`` signed powers of two, each fitted greedily to the residual, the
    power rounded in the log domain (``2^round(log2|r|)``): multiplying by the result is ``terms`` shifts."""
    out = torch.zeros_like(alpha)
    r = alpha.clone()
    for _ in range(terms):
        mag = r.abs()
        p = torch.where(
            mag > 0, torch.exp2(torch.round(torch.log2(mag.clamp_min(1e-30)))), torch.zeros_like(r)
        )
        step = torch.sign(r) * p
        out += step
        r -= step
    return out


def _sign_table(q: int, dtype: torch.dtype) -> Tensor:
    """``(2^q, q)``: row ``p`` holds the signs ``2·bit_k(p) − 1``."""
    p = torch.arange(1 << q)
    return (((p[:, None] >> torch.arange(q)) & 1) * 2 - 1).to(dtype)


def _nearest_pattern(w: Tensor, alpha: Tensor, signs: Tensor) -> Tensor:
    """Index into ``signs`` (``(rows, n)``) of the value ``Σ_k α_k s_k`` nearest each entry of ``w``: the
    candidates sorted per row, an entry's rank among the midpoints picks its nearest."""
    vals, order = torch.sort(alpha @ signs.T, dim=-1)  # (rows, 2^q)
    mids = (vals[:, 1:] + vals[:, :-1]) / 2
    rank = torch.zeros(w.shape, dtype=torch.int64)
    for j in range(mids.shape[1]):
        rank += w > mids[:, j : j + 1]
    return torch.gather(order, 1, rank)


def nearest_codes(w: Tensor, alpha: Tensor) -> Tensor:
    """The codes (``(rows, n, q)`` of ±1) whose value ``Σ_k α_k b_k`` is nearest each entry of ``w``."""
    signs = _sign_table(alpha.shape[-1], alpha.dtype)
    return signs[_nearest_pattern(w, alpha, signs)].to(w.dtype)


def fit_bcq(w: Tensor, bits: int, *, rounds: int = 20, use_apot: bool = False) -> tuple[Tensor, Tensor]:
    """Fit ``w (rows, n) ≈ Σ_k α[:, k, None] · B[:, :, k]``: ``(alpha (rows, q), codes (rows, n, q))``.

    Greedy init (``b_k = sign(r)``, sign(0) = +1, ``α_k = mean|r|``), then ``rounds`` of least-squares
    scales, ``|α|`` sorted descending, optional APoT, and optimal codes. The last step is the codes, so the
    returned pair is consistent; the weight error never grows over a round in exact arithmetic. The codes
    are kept as one pattern index per entry: ``BᵀB`` and ``Bᵀw`` come from per-pattern counts and sums.
    Float32 but the ``q × q`` solves (float64).
    """
    w = w.to(torch.float32)
    signs = _sign_table(bits, torch.float32)
    m = signs.shape[0]
    r = w.clone()
    pattern = torch.zeros(w.shape, dtype=torch.int64)
    alpha = torch.empty(w.shape[0], bits, dtype=w.dtype)
    for k in range(bits):
        pos = r >= 0
        a = r.abs().mean(-1)
        alpha[:, k] = a
        pattern += pos.to(torch.int64) << k
        r -= a[:, None] * torch.where(pos, 1.0, -1.0)
    outer = torch.einsum("pk,pj->pkj", signs, signs).reshape(m, bits * bits).to(torch.float64)
    eye = torch.eye(bits, dtype=torch.float64)
    for _ in range(rounds):
        counts = torch.zeros(w.shape[0], m, dtype=torch.float64).scatter_add_(
            1, pattern, torch.ones_like(w, dtype=torch.float64)
        )
        sums = torch.zeros(w.shape[0], m, dtype=torch.float64).scatter_add_(1, pattern, w.to(torch.float64))
        btb = (counts @ outer).reshape(-1, bits, bits)
        btw = sums @ signs.to(torch.float64)
        sol = torch.linalg.solve(btb + 1e-9 * eye, btw.unsqueeze(-1)).squeeze(-1)
        alpha = torch.sort(sol.abs(), dim=-1, descending=True).values.to(w.dtype)
        if use_apot:
            alpha = apot(alpha)
        pattern = _nearest_pattern(w, alpha, signs)
    if use_apot and rounds == 0:
        alpha = apot(alpha)
        pattern = _nearest_pattern(w, alpha, signs)
    return alpha, signs[pattern]


def _fit_groups(w: Tensor, bits: int, g: int, rounds: int, use_apot: bool) -> tuple[Tensor, Tensor]:
    """BCQ of ``w (out, n)`` in groups of ``g`` columns: ``alpha (out, n/g, q)``, ``codes (out, n, q)``."""
    out, n = w.shape
    alpha, codes = fit_bcq(w.reshape(out * (n // g), g), bits, rounds=rounds, use_apot=use_apot)
    return alpha.reshape(out, n // g, bits), codes.reshape(out, n, bits)


def dequantize(alpha: Tensor, codes: Tensor, g: int) -> Tensor:
    """``Ŵ[o, i] = Σ_k alpha[o, i // g, k] · codes[o, i, k]`` (float32)."""
    a = alpha.to(torch.float32).repeat_interleave(g, dim=1)  # (out, n, q)
    return (a * codes.to(torch.float32)).sum(-1)


def layer_score(w: Tensor, u_diag: Tensor | None = None) -> float:
    """ShiftAddLLM's sensitivity ``‖W̃‖_F · std(W̃)²`` with ``W̃ = W / diag(U)`` (column-wise; ``U`` the
    Cholesky factor of ``H⁻¹``; the plain weights when there is no calibration)."""
    wn = w.to(torch.float64)
    if u_diag is not None:
        wn = wn / u_diag.to(torch.float64)[None, :]
    return float(wn.norm() * wn.std() ** 2)


def allocate_bits(
    scores: dict[str, float], sizes: dict[str, int], choices: list[int], budget: float
) -> dict[str, int]:
    """Bits per layer under a parameter-weighted average of ``budget``: every layer starts at the fewest
    bits, then layers are raised one choice at a time, most sensitive first, while the average allows."""
    choices = sorted(choices)
    total = sum(sizes.values())
    out = {k: choices[0] for k in scores}
    used = choices[0] * total
    for level in choices[1:]:
        for name in sorted(scores, key=lambda k: -scores[k]):
            extra = (level - out[name]) * sizes[name]
            if out[name] < level and used + extra <= budget * total + 1e-9:
                out[name] = level
                used += extra
    return out


def hessian_factor(h: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the dampened ``H⁻¹`` (dead inputs, ``H_ii = 0``, get
    ``H_ii = 1``) and the mask of those dead inputs (whose weight columns the sweep zeroes)."""
    h = h.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True), dead


def quantize_weight(
    w: Tensor,
    bits: int,
    group_size: int,
    *,
    hessian: Tensor | None = None,
    rounds: int = 20,
    use_apot: bool = False,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[Tensor, Tensor]:
    """BCQ of a weight ``w (out, in)``: ``(alpha (out, in/g, q) float32, codes (out, in, q) ±1 int8)``.

    Without ``hessian`` the weight error ``‖W − Ŵ‖`` is minimised group by group. With ``hessian``
    (``XᵀX/n`` of the layer's calibration inputs, ``(in, in)``) the output error: see the module docstring.
    """
    out, n = w.shape
    g = n if group_size == -1 else group_size
    w64 = w.detach().to(torch.float64)
    if hessian is None:
        alpha, codes = _fit_groups(w64.to(torch.float32), bits, g, rounds, use_apot)
        return alpha.to(torch.float32), codes.to(torch.int8)
    u64, dead = hessian_factor(hessian, damp)
    u, work = u64.to(torch.float32), w64.to(torch.float32)
    work[:, dead] = 0
    alpha = torch.empty(out, n // g, bits, dtype=torch.float32)
    codes = torch.empty(out, n, bits, dtype=torch.float32)
    signs = _sign_table(bits, torch.float32)
    step = max(g, (block // g) * g) if g < n else n
    vals = order = mids = torch.empty(0)
    for b0 in range(0, n, step):
        b1 = min(n, b0 + step)
        with one_thread():
            wb = work[:, b0:b1].clone()
            err = torch.zeros_like(wb)
            for i in range(b1 - b0):
                col = b0 + i
                if col % g == 0:  # fit this group's scales on its error-corrected columns
                    a, _ = fit_bcq(wb[:, i : i + g], bits, rounds=rounds, use_apot=use_apot)
                    alpha[:, col // g] = a
                    vals, order = torch.sort(a @ signs.T, dim=-1)  # (out, 2^q) values a code can take
                    mids = (vals[:, 1:] + vals[:, :-1]) / 2
                w_col = wb[:, i]
                rank = (w_col[:, None] > mids).sum(-1, keepdim=True)
                codes[:, col] = signs[torch.gather(order, 1, rank)[:, 0]]
                e = (w_col - torch.gather(vals, 1, rank)[:, 0]) / u[col, col]
                wb[:, i + 1 :] -= e[:, None] * u[col, col + 1 : b1][None, :]
                err[:, i] = e
        work[:, b1:] -= err @ u[b0:b1, b1:]
    return alpha.to(torch.float32), codes.to(torch.int8)


def pack_codes(codes: Tensor) -> Tensor:
    """``codes (out, in, q)`` of ±1 as bit-planes ``(q, out, ⌈in/8⌉)`` uint8; bit ``j`` of byte ``c`` is
    input ``8c + j`` (the lookup-table index order)."""
    bits = (codes > 0).permute(2, 0, 1).contiguous().numpy()
    return torch.from_numpy(np.packbits(bits, axis=-1, bitorder="little"))


def unpack_codes(packed: Tensor, n: int) -> Tensor:
    """The inverse of :func:`pack_codes`: ``(out, n, q)`` of ±1 (float32)."""
    bits = np.unpackbits(packed.numpy(), axis=-1, count=n, bitorder="little")
    return torch.from_numpy(bits).permute(1, 2, 0).to(torch.float32) * 2 - 1


def _tables(xc: Tensor) -> Tensor:
    """``T[..., c, p] = Σ_j (2·bit_j(p) − 1) · x[..., c, j]`` for every byte ``p``, with additions only."""
    t = -xc.sum(-1, keepdim=True)
    for j in range(8):
        xj = xc[..., j : j + 1]
        t = torch.cat([t, t + (xj + xj)], dim=-1)  # entries with bit j set: index + 2^j
    return t


def lut_index(packed: Tensor) -> Tensor:
    """``(q, out, C)`` int64 positions of each code byte in the flattened ``(C·256)`` tables (computed once
    per layer: :class:`~shiftkit.compression.bcq.BCQLinear` keeps it)."""
    chunks = packed.shape[-1]
    return packed.long() + (torch.arange(chunks, device=packed.device) * 256)[None, None, :]


def lut_matmul(
    x: Tensor, packed: Tensor, alpha: Tensor, group_size: int, in_features: int, index: Tensor | None = None
) -> Tensor:
    """``x Ŵᵀ`` by table look-ups: ``x (..., in)``, ``packed (q, out, C)`` codes, ``alpha (q, out, G)``.

    Equals ``x @ dequantize(...)ᵀ`` up to float summation order. Weight multiplications: none; scale
    multiplications: one per (token, output, group, bit-plane).
    """
    lead = x.shape[:-1]
    xf = x.reshape(-1, in_features).to(torch.float32)
    q, out, chunks = packed.shape
    pad = chunks * 8 - in_features
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    groups = alpha.shape[-1]
    per_group = chunks // groups if group_size != -1 else chunks
    flat_idx = lut_index(packed) if index is None else index  # (q, out, C) into the flattened tables
    y = torch.empty(xf.shape[0], out, dtype=torch.float32)
    rows = max(1, (1 << 22) // max(1, out * chunks))  # tokens per tile: ~16 MB of gathered sums
    for s in range(0, xf.shape[0], rows):
        tables = _tables(xf[s : s + rows].view(-1, chunks, 8)).reshape(-1, chunks * 256)
        acc = torch.zeros(tables.shape[0], out, dtype=torch.float32)
        for k in range(q):
            sums = tables[:, flat_idx[k]]  # (tokens, out, C)
            per = sums.view(tables.shape[0], out, groups, per_group).sum(-1)
            acc += (per * alpha[k][None]).sum(-1)
        y[s : s + rows] = acc
    return y.reshape(*lead, out).to(x.dtype)


def rtn_quantize(w: Tensor, bits: int, group_size: int) -> Tensor:
    """Round-to-nearest baseline: asymmetric min–max uniform quantisation per row and group (dequantised)."""
    out, n = w.shape
    g = n if group_size == -1 else group_size
    wg = w.to(torch.float32).reshape(out, n // g, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    qv = torch.clamp(torch.round((wg - lo) / scale), 0, levels)
    return (qv * scale + lo).reshape(out, n)
