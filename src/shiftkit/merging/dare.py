"""DARE — Drop And REscale (Yu et al., https://arxiv.org/abs/2311.03099; code yule-BUAA/MergeLM).

Each shift tensor keeps each entry with probability ``density = 1 − p`` and rescales the survivors:
``rescale="l1"`` (default, mergekit since 2024) ``τ̃ = (m ⊙ τ)·‖τ‖₁/‖m ⊙ τ‖₁``; ``rescale="inverse"``
(paper, peft) ``τ̃ = m ⊙ τ / (1 − p)``. Then ``dare_linear`` = task arithmetic on the ``τ̃``,
``dare_ties`` = TIES sign election + disjoint merge on the ``τ̃`` (mergekit: no weight normalisation;
peft: count-normalised). Masks are drawn per tensor from ``(seed, tensor name, shift index)``, so
results do not depend on key order. ``density = 0`` gives zeros, ``density >= 1`` no drop.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from shiftkit.errors import ShiftkitError
from shiftkit.merging.consensus import ties_disjoint_merge
from shiftkit.merging.registry import register_merge
from shiftkit.merging.sparsify import dare_keep_mask, dare_rescale, key_seed, per_input
from shiftkit.merging.stream.kernels import dare_ties_kernel
from shiftkit.merging.task_arithmetic import task_arithmetic

__all__ = ["dare_drop", "dare_linear", "dare_ties"]


def dare_drop(
    tensors: list[dict[str, Tensor]], *, density: float | Sequence[float], rescale: str, seed: int
) -> list[dict[str, Tensor]]:
    """Randomly drop and rescale every tensor of every shift.

    Args:
        tensors: T dicts of float32 tensors (any shapes).
        density: keep probability ``1 − p`` in [0, 1], or one per shift.
        rescale: ``"l1"``, ``"inverse"`` or ``"none"``.
        seed: base seed; tensor ``key`` of shift ``t`` uses ``key_seed(seed, key, t)``.

    Returns:
        T dicts with the same keys and shapes.

    Example:
        >>> out = dare_drop([{"w": torch.ones(3, 3)}], density=0.5, rescale="inverse", seed=0)
        >>> set(out[0]["w"].unique().tolist()) <= {0.0, 2.0}
        True
    """
    densities = per_input(density, len(tensors), "DARE density")
    if any(d < 0.0 for d in densities):
        raise ShiftkitError(f"DARE density must be >= 0, got {density}")
    if rescale not in ("l1", "inverse", "none"):
        raise ShiftkitError(f"unknown rescale {rescale!r}; use 'l1', 'inverse' or 'none'")
    out: list[dict[str, Tensor]] = []
    for i, (shift, density) in enumerate(zip(tensors, densities)):
        if density >= 1.0:
            out.append(dict(shift))
            continue
        dropped: dict[str, Tensor] = {}
        for k, v in shift.items():
            if density == 0.0:
                dropped[k] = v * 0.0
                continue
            keep = dare_keep_mask(v.shape, density, key_seed(seed, k, i))
            dropped[k] = dare_rescale(v, keep, density, rescale)
        out.append(dropped)
    return out


@register_merge(
    "dare_linear",
    recipe_defaults={"density": 1.0},
    recipe_required=("weight",),
    lossless={"density": 1.0},
    per_input=("density",),
)
def dare_linear(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    density: float | Sequence[float] = 0.1,
    rescale: str = "l1",
    seed: int = 0,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> dict[str, Tensor]:
    """DARE then task arithmetic: ``λ · Σ_t w_t τ̃_t`` (divided by ``Σ w`` if ``normalize``).

    Args:
        tensors: T aligned float32 tensor dicts; weights: T weights.
        density: keep probability (default 0.1, i.e. the paper's typical drop rate p = 0.9; a recipe that
            omits it gets mergekit's 1.0, no drop).
        rescale: ``"l1"`` (default, mergekit), ``"inverse"`` (paper/peft 1/(1−p)) or ``"none"``.
        seed: mask seed. lambda_: global scale. normalize: divide by ``Σ w`` (default False, as mergekit).

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2], method="dare_linear", density=0.3, seed=1)
        >>> classic = sk.merge([tv1, tv2], method="dare_linear", density=0.3, rescale="inverse")
        >>> sk.apply_(base, merged)
    """
    dropped = dare_drop(tensors, density=density, rescale=rescale, seed=seed)
    return task_arithmetic(dropped, weights, lambda_=lambda_, normalize=normalize)


@register_merge(
    "dare_ties",
    recipe_defaults={"density": 1.0},
    recipe_required=("weight",),
    kernel=dare_ties_kernel,
    lossless={"density": 1.0},
    per_input=("density",),
)
def dare_ties(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    density: float | Sequence[float] = 0.1,
    rescale: str = "l1",
    seed: int = 0,
    semantics: str = "mergekit",
    lambda_: float = 1.0,
    consensus: str = "sum",
    normalize: bool = False,
) -> dict[str, Tensor]:
    """DARE then TIES election and disjoint merge (``semantics="mergekit"`` or ``"peft"``).

    Args:
        tensors: T aligned float32 tensor dicts; weights: T weights.
        density: keep probability (default 0.1, p = 0.9; recipes: mergekit's 1.0). rescale: ``"l1"``,
            ``"inverse"`` or ``"none"``.
        seed: mask seed. semantics: ``"mergekit"`` (vote on weighted shifts) or ``"peft"`` (unweighted
            vote, count-normalised). lambda_: final scale. consensus: ``"sum"`` or ``"count"``.
        normalize: mergekit only; default False as mergekit's ``dare_ties``.

    Returns:
        Merged tensors, same keys and shapes.

    Example:
        >>> merged = sk.merge([tv1, tv2], method="dare_ties", density=0.2, seed=0)
        >>> peft_like = sk.merge([tv1, tv2], method="dare_ties", semantics="peft", rescale="inverse")
        >>> sk.apply_(base, merged)
    """
    if semantics not in ("mergekit", "peft"):
        raise ShiftkitError(f"dare_ties semantics must be 'mergekit' or 'peft', got {semantics!r}")
    dropped = dare_drop(tensors, density=density, rescale=rescale, seed=seed)
    mixed = ties_disjoint_merge(
        dropped, weights, semantics=semantics, consensus=consensus, normalize=normalize, zero_sign="positive"
    )
    return {k: v * lambda_ for k, v in mixed.items()}
