"""RAM, Reinforced Agent Merging (mergekit ``ram``; https://arxiv.org/abs/2601.13572), entry by entry.

An entry of shift ``τ_i`` *contributes* when ``|τ_i| > ε``. With ``c`` the number of shifts contributing to
an entry, the merged entry is

``τ = Σ_i [|τ_i| > ε] · τ_i / max(c, 1)``:

an entry changed by one shift alone is taken whole (no dilution by the shifts that left it alone, unlike a
plain average), one changed by several is their mean over the contributors only, and entries no shift
changes by more than ``ε`` stay at the base (changes of at most ``ε`` are dropped). The shifts are
``θ_i − θ0``; the base model itself is not an input. ``ε = 0`` keeps every nonzero change.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError
from shiftkit.merging.registry import register_merge

__all__ = ["ram", "ram_tensor"]


def ram_tensor(taus: list[Tensor], epsilon: float = 1e-5) -> Tensor:
    """RAM of same-shape shifts: each entry the mean of the shifts that change it by more than ``epsilon``.

    Args:
        taus: one or more same-shape shift tensors ``θ_i − θ0``.
        epsilon: the largest change that does not count as one (mergekit's default 1e-5).

    Returns:
        Tensor of the inputs' shape and dtype.

    Example:
        >>> ram_tensor([torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])])
        tensor([2., 2., 0.])
    """
    total = torch.zeros_like(taus[0])
    count = torch.zeros_like(taus[0])
    for tau in taus:
        hit = tau.abs() > epsilon
        total += torch.where(hit, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
        count += hit
    return total / count.clamp(min=1.0)


@register_merge("ram", min_inputs=1, weighting="none", lossless={"epsilon": 0.0})
def ram(
    tensors: list[dict[str, Tensor]], weights: list[float], *, epsilon: float = 1e-5
) -> dict[str, Tensor]:
    """RAM: per entry, the mean of the shifts that change it by more than ``epsilon``.

    Args:
        tensors: T aligned float tensor dicts (the fine-tunes' shifts; the base is not an input).
        weights: ignored (must be the default all-ones).
        epsilon: changes of at most this magnitude count as none (default 1e-5, mergekit's).

    Returns:
        Merged tensors, same keys, shapes and dtypes.

    Example:
        >>> merged = sk.merge([tv_math, tv_code, tv_tools], method="ram", epsilon=1e-5)
        >>> sk.apply_(base, merged)
    """
    if not tensors:
        raise ShiftkitError("ram merges 1 or more shifts, got none")
    if any(w != 1.0 for w in weights):
        raise ShiftkitError(f"ram takes no weights (got {weights}); every contributing shift counts once")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or math.isnan(epsilon):
        raise ShiftkitError(f"ram epsilon must be a number, got {epsilon!r}")
    with torch.no_grad():
        return {k: ram_tensor([t[k] for t in tensors], float(epsilon)) for k in tensors[0]}
