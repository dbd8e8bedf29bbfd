"""Sign consensus, shared by TIES, DARE-TIES and breadcrumbs-TIES: elect a sign per coordinate and average
the entries that agree with it (Yadav et al., https://arxiv.org/abs/2306.01708, in mergekit's, the paper's
and PEFT's variants).
"""

from __future__ import annotations

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError

__all__ = [
    "CONSENSUS",
    "SEMANTICS",
    "elect_sign",
    "elected_sign_sum",
    "ties_disjoint_merge",
]

#: TIES reference semantics: mergekit, the original paper code (prateeky2806/ties-merging), peft
SEMANTICS = ("mergekit", "paper", "peft")

#: sign-election rules: "sum" (peft "total", TIES "mass") or "count" (peft "frequency")
CONSENSUS = {"sum": "sum", "total": "sum", "count": "count", "frequency": "count"}


def elect_sign(stack: Tensor, consensus: str) -> Tensor:
    """Elected sign per coordinate of a ``(T, ...)`` stack: ``sgn(Σ_t x_t)`` or ``sgn(Σ_t sgn(x_t))``.

    A coordinate whose vote is exactly 0 gets 0 here; callers resolve it (``zero_sign``: +1 as peft/mergekit,
    or the global majority sign).

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


def elected_sign_sum(stack: Tensor, weights: list[float], *, semantics: str, consensus: str) -> Tensor:
    """Sum of the elected signs ``Σ_p γ_p`` of one tensor's pruned ``(T, ...)`` stack, as float64.

    Summed over every tensor it gives the TIES "global majority" sign (what the original TIES code gives a 0
    vote); the same per-tensor term that :func:`ties_disjoint_merge` adds up, so a streaming pass reproduces
    it exactly.

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
    """Elect a sign per coordinate and average the agreeing entries of already-pruned shifts (Yadav et al.).

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
            ``pruned`` (a multi-pass computation passes the whole-model value when ``pruned`` holds one
            tensor).

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
