"""The pruning steps of the merge methods (TIES's trim, DARE's drop, breadcrumbs' band) and mergekit's
rescale: each keeps part of a tensor and optionally scales the kept part back to the original's L1 norm.

Everything works on float32 tensors; callers upcast first (no magnitude ranking in fp16/bf16). The per-tensor
seed of DARE depends on (seed, tensor name, input index) only, so results do not depend on streaming order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from shiftkit.core.functional import abs_sum64, topk_mask
from shiftkit.errors import ShiftkitError

__all__ = [
    "dare_keep_mask",
    "dare_rescale",
    "key_seed",
    "l1_rescaled",
    "per_input",
    "rescale_pruned",
    "topk_magnitude",
]


def per_input(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """One value of parameter ``name`` per input: a scalar repeated ``n`` times, or a list of length ``n``.

    A recipe may set a per-model parameter (mergekit's ``density``, ``gamma``, ``epsilon``) differently for
    each model; the merge function then receives a list in input order.

    Example:
        >>> per_input(0.5, 3, "density")
        [0.5, 0.5, 0.5]
        >>> per_input([0.2, 0.8], 2, "density")
        [0.2, 0.8]
    """
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ShiftkitError(f"{name} has {len(values)} values for {n} inputs: give one, or one per input")
    return values


def topk_magnitude(x: Tensor, density: float, min_keep: int = 0) -> Tensor:
    """Keep exactly ``k = max(min_keep, ⌊density·numel⌋)`` largest-|x| entries of ``x``, zero the rest.

    Ties are broken by flattened index (stable ``"exact_k"``; peft/mergekit break them arbitrarily): the
    result equals keeping the first ``k`` entries of ``argsort(|x|, descending=True, stable=True)``, computed
    faster with :func:`topk_mask`. ``density >= 1`` returns ``x`` unchanged and ``k = 0`` returns zeros.

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


def key_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed from ``(seed, tensor name, shift index)`` (so masks do not depend on streaming order).

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
    """Drop entries where ``keep`` is False and rescale the rest (DARE, Yu et al. 2023).

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
