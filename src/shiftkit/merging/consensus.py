"""Per-tensor math shared by the merge methods (private).

Trim to the top-k magnitudes, sign election, disjoint mean, DARE drop-and-rescale and the per-tensor seed.
Everything works on float32 tensors; callers upcast first (spec §0.4: no magnitude ranking in fp16/bf16).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from shiftkit.core.functional import abs_sum64
from shiftkit.errors import ShiftkitError

__all__ = [
    "CONSENSUS",
    "dare_keep_mask",
    "dare_rescale",
    "elect_sign",
    "elected_sign_sum",
    "key_seed",
    "kth_smallest",
    "l1_rescaled",
    "rescale_pruned",
    "ties_disjoint_merge",
    "topk_magnitude",
    "topk_mask",
]

#: TIES reference semantics (spec §1.2): mergekit, the original paper code, peft
SEMANTICS = ("mergekit", "paper", "peft")

#: sign-election rules: "sum" (peft "total", TIES "mass") or "count" (peft "frequency")
CONSENSUS = {"sum": "sum", "total": "sum", "count": "count", "frequency": "count"}


def kth_smallest(values: Tensor, j: int) -> Tensor:
    """Exact 0-based ``j``-th smallest entry of a 1-D float tensor, as a 0-d tensor on its device.

    On CPU ``numpy.partition`` (introselect, about 2× faster than ``torch.kthvalue`` on 10⁷ floats, same
    value); elsewhere ``torch.kthvalue``.

    Example:
        >>> kth_smallest(torch.tensor([3.0, 1.0, 2.0]), 0)
        tensor(1.)
    """
    if values.device.type == "cpu" and values.dtype in (torch.float16, torch.float32, torch.float64):
        arr = values.detach().contiguous().numpy()
        return torch.tensor(np.partition(arr, j)[j], dtype=values.dtype)
    return torch.kthvalue(values, j + 1).values


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest-|x| entries of ``x``, ties broken by lower flattened index first.

    The order is total (``|x|`` descending, then index ascending), so ``topk_mask(x, a)`` ⊆
    ``topk_mask(x, b)`` for ``a <= b``. Computed without a full sort: the threshold ``thr`` is the k-th
    largest magnitude (:func:`kth_smallest` in float32), every ``|x| > thr`` is kept and, among the entries
    ``== thr``, the first ``k − #{|x| > thr}`` by flattened index (a cumulative sum of the equality mask).

    Args:
        x: any-shape float tensor.
        k: number of entries to keep; clipped to ``[0, numel]``.

    Returns:
        Bool tensor of ``x``'s shape with exactly ``min(max(k, 0), numel)`` True entries.

    Example:
        >>> topk_mask(torch.tensor([1.0, -3.0, 1.0, 1.0]), 2)
        tensor([ True,  True, False, False])
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    mag = flat.abs().to(torch.float32)
    thr = kth_smallest(mag, n - k)
    keep = mag >= thr
    extra = int(keep.sum()) - k  # > 0 only when several entries tie at the threshold
    if extra > 0:
        equal = mag == thr
        quota = int(equal.sum()) - extra
        keep = (mag > thr) | (equal & (torch.cumsum(equal, 0) <= quota))
    return keep.reshape(x.shape)


def topk_magnitude(x: Tensor, density: float, min_keep: int = 0) -> Tensor:
    """Keep exactly ``k = max(min_keep, ⌊density·numel⌋)`` largest-|x| entries of ``x``, zero the rest.

    Ties are broken by flattened index (stable, spec §0.6 ``"exact_k"``): the result equals keeping the
    first ``k`` entries of ``argsort(|x|, descending=True, stable=True)``, computed faster with
    :func:`topk_mask`. ``density >= 1`` returns ``x`` unchanged and ``k = 0`` returns zeros.

    Args:
        x: any-shape float tensor.
        density: fraction of entries to keep, ``>= 0``.
        min_keep: least number of entries kept when ``density > 0`` (mergekit keeps at least 1, so a
            32-entry norm at density 0.02 keeps its largest entry instead of nothing).

    Returns:
        Tensor of ``x``'s shape.

    Example:
        >>> topk_magnitude(torch.tensor([0.5, -0.2, 0.1, 0.0]), 0.5)
        tensor([ 0.5000, -0.2000,  0.0000,  0.0000])
    """
    if density >= 1.0:
        return x
    k = int(density * x.numel())
    if density > 0:
        k = min(max(k, min_keep), x.numel())
    if k <= 0:
        return torch.zeros_like(x)
    return torch.where(topk_mask(x, k), x, torch.zeros_like(x))


def elect_sign(stack: Tensor, consensus: str) -> Tensor:
    """Elected sign per coordinate of a ``(T, ...)`` stack: ``sgn(Σ_t x_t)`` or ``sgn(Σ_t sgn(x_t))``.

    A coordinate whose vote is exactly 0 gets 0 here; callers resolve it (spec §0.7).

    Args:
        stack: ``(T, *shape)`` float tensor.
        consensus: ``"sum"`` / ``"total"`` or ``"count"`` / ``"frequency"``.

    Returns:
        ``shape`` tensor with values in {−1, 0, +1}.

    Example:
        >>> elect_sign(torch.tensor([[1.0, -2.0], [-3.0, 1.0]]), "sum")
        tensor([-1., -1.])
    """
    rule = CONSENSUS.get(consensus)
    if rule is None:
        raise ShiftkitError(f"unknown consensus {consensus!r}; use one of {sorted(CONSENSUS)}")
    votes = stack.sum(0) if rule == "sum" else torch.sign(stack).sum(0)
    return torch.sign(votes)


def key_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed from ``(seed, tensor name, shift index)`` (spec §0.8: independent of streaming order).

    Example:
        >>> key_seed(0, "fc.weight", 1) == key_seed(0, "fc.weight", 1)
        True
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_keep_mask(shape: Sequence[int], density: float, seed: int) -> Tensor:
    """Bernoulli(``density``) keep-mask of ``shape`` drawn in float32 on CPU from ``seed``.

    Example:
        >>> m = dare_keep_mask((3, 3), 0.5, key_seed(0, "w", 0))
        >>> m.dtype
        torch.bool
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float32) < density


def dare_rescale(x: Tensor, keep: Tensor, density: float, rescale: str) -> Tensor:
    """Drop entries where ``keep`` is False and rescale the rest (spec §1.3).

    ``"inverse"``: ``keep ⊙ x / density`` (the paper's 1/(1−p)); ``"l1"``: ``(keep ⊙ x)·‖x‖₁/‖keep ⊙ x‖₁``
    (mergekit since 2024; skipped when either norm < 1e-7); ``"none"``: no rescale.

    Args:
        x: float tensor; keep: bool tensor of the same shape; density: keep probability in (0, 1).
        rescale: ``"l1"``, ``"inverse"`` or ``"none"``.

    Returns:
        Tensor of ``x``'s shape.

    Example:
        >>> dare_rescale(torch.tensor([1.0, -2, 3, -4]), torch.tensor([1, 0, 1, 0]).bool(), 0.5, "l1")
        tensor([2.5000, 0.0000, 7.5000, 0.0000])
    """
    kept = torch.where(keep.to(x.device), x, torch.zeros_like(x))
    if rescale == "inverse":
        return kept / density
    if rescale == "l1":
        return l1_rescaled(x, kept)
    if rescale == "none":
        return kept
    raise ShiftkitError(f"unknown rescale {rescale!r}; use 'l1', 'inverse' or 'none'")


def l1_rescaled(x: Tensor, kept: Tensor) -> Tensor:
    """``kept · ‖x‖₁ / ‖kept‖₁`` (mergekit's L1 rescale of a pruned tensor), norms in float64.

    Left as it is when either norm is below 1e-7 (mergekit's guard against dividing by nothing).

    Example:
        >>> l1_rescaled(torch.tensor([1.0, -3.0]), torch.tensor([0.0, -3.0]))
        tensor([ 0.0000, -4.0000])
    """
    before, after = abs_sum64(x), abs_sum64(kept)
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def rescale_pruned(x: Tensor, kept: Tensor, rescale: str) -> Tensor:
    """The pruned ``kept`` of ``x``, L1-rescaled (``"l1"``) or not (``"none"``): mergekit's ``rescale``."""
    if rescale == "l1":
        return l1_rescaled(x, kept)
    if rescale == "none":
        return kept
    raise ShiftkitError(f"unknown rescale {rescale!r}; use 'l1' or 'none' (mergekit's true / false)")


def elected_sign_sum(stack: Tensor, weights: list[float], *, semantics: str, consensus: str) -> Tensor:
    """Sum of the elected signs ``Σ_p γ_p`` of one tensor's pruned ``(T, ...)`` stack, as float64.

    Summed over every tensor it gives the TIES "global majority" sign (spec §0.7); the same per-tensor
    term that :func:`ties_disjoint_merge` adds up, so a streaming pass reproduces it exactly.

    Example:
        >>> elected_sign_sum(torch.tensor([[1.0, -2.0], [-3.0, 1.0]]), [1, 1], semantics="paper",
        ...                  consensus="sum")
        tensor(-2., dtype=torch.float64)
    """
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.dim() - 1)))
    voters = stack * w if semantics == "mergekit" else stack
    return elect_sign(voters, consensus).sum().double()


def ties_disjoint_merge(
    pruned: list[dict[str, Tensor]],
    weights: list[float],
    *,
    semantics: str,
    consensus: str,
    normalize: bool,
    zero_sign: str,
    global_sign: float | None = None,
) -> dict[str, Tensor]:
    """Elect a sign per coordinate and average the agreeing entries of already-pruned shifts (spec §1.2).

    * ``"mergekit"``: vote on the weighted ``u_t = w_t τ̂_t``; ``Σ_t m_t u_t``, divided by ``Σ_t m_t w_t``
      (zeros → 1) when ``normalize``.
    * ``"peft"``: vote on the unweighted ``τ̂_t``; ``Σ_t m_t w_t τ̂_t / max(Σ_t m_t, 1)``.
    * ``"paper"``: vote on ``τ̂_t``; ``Σ_t m_t τ̂_t / max(Σ_t m_t, 1)`` (no weights).

    ``m_t = [τ̂_t ≠ 0 and sgn(u_t) = γ]``. A zero vote becomes +1 (``zero_sign="positive"``) or the sign of
    the sum of all elected signs over every tensor (``"global_majority"``, the original code).

    Args:
        pruned: T dicts of float32 tensors (equal keys and shapes).
        weights: T weights.
        global_sign: with ``"global_majority"``, the sign to use instead of the one computed from
            ``pruned`` (a streaming plan passes the whole-model value when ``pruned`` holds one tensor).

    Returns:
        Merged tensors (before any λ), same keys and shapes.

    Example:
        >>> p = [{"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([-3.0, -1.0])}]
        >>> ties_disjoint_merge(p, [1, 1], semantics="peft", consensus="sum",
        ...                     normalize=True, zero_sign="positive")
        {'w': tensor([-3., -1.])}
    """
    if semantics not in SEMANTICS:
        raise ShiftkitError(f"unknown TIES semantics {semantics!r}; use one of {list(SEMANTICS)}")
    if zero_sign not in ("positive", "global_majority"):
        raise ShiftkitError(f"unknown zero_sign {zero_sign!r}; use 'positive' or 'global_majority'")
    stacks: dict[str, Tensor] = {}
    gammas: dict[str, Tensor] = {}
    for k in pruned[0]:
        stack = torch.stack([p[k] for p in pruned])
        w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.dim() - 1)))
        voters = stack * w if semantics == "mergekit" else stack
        stacks[k] = stack
        gammas[k] = elect_sign(voters, consensus)
    if zero_sign == "positive":
        fill = {k: torch.ones((), dtype=g.dtype) for k, g in gammas.items()}
    elif global_sign is not None:
        fill = {k: torch.tensor(float(global_sign), dtype=g.dtype) for k, g in gammas.items()}
    else:
        total = sum((g.sum().double() for g in gammas.values()), torch.zeros((), dtype=torch.float64))
        fill = {k: torch.sign(total).to(g.dtype) for k, g in gammas.items()}
    out: dict[str, Tensor] = {}
    for k, stack in stacks.items():
        gamma = torch.where(gammas[k] == 0, fill[k].to(stack.device), gammas[k])
        w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.dim() - 1)))
        u = stack * w if semantics == "mergekit" else stack
        agree = ((torch.sign(u) == gamma) & (stack != 0)).to(stack.dtype)
        if semantics == "mergekit":
            mixed = (agree * u).sum(0)
            if normalize:
                div = (agree * w).sum(0)
                mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
        else:
            num = agree * stack * w if semantics == "peft" else agree * stack
            mixed = num.sum(0) / agree.sum(0).clamp(min=1.0)
        out[k] = mixed
    return out
