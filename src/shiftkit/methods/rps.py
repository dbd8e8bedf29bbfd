"""STABLE-RPS: randomised parameter sharing (Desai & Shrivastava, ICLR 2024): every targeted weight is a
hashed view into ONE shared array ``M`` of a chosen budget.

With ``n`` the total size of the targeted weights (Linear, Conv2d and Embedding modules of at least
``module_limit_size`` entries) and ``c = compression``, ``M ∈ R^m``, ``m = ⌊c·n⌋``. Weight position ``p``
(positions run over the targeted weights flattened in model order) reads

    ``W[p] = s_j · g(p) · M[h(p)]``

with ``g(p) = ±1`` fixed and random, ``s_j = σ_j / a`` per module (``σ_j`` the std of its pretrained
weight, ``a = init_bound``) and, for the default ``mapper="pareto"`` (RANDOMFOLD), ``h(p) = (H(⌊p/m⌋) +
p mod m) mod m``: the flattened weights are cut into pieces of length ``m`` and each piece laid over the
memory with its own random rotation (``H(q) = ((a₀q + a₁q² + a₂) mod P) mod m``, P = 2038074743, seeded
odd coefficients). So ``m ≥ n`` maps every weight to its own slot (the model is the dense one, re-indexed:
Pareto-continuity) and ``m < n`` loads every slot with ⌊n/m⌋ or ⌈n/m⌉ weights. ``mapper="hashednet"``
hashes every position independently (HashedNet, the paper's baseline).

Two modes:

* ``mode="shift"`` (default; a design extension the paper suggests): the view is a *change*,
  ``W = W0 + s·g ⊙ M[h]``, ``M = 0`` at attach (an exact no-op). A hash-compressed fine-tuning shift whose
  file is one array of ``m`` numbers.
* ``mode="weights"`` (the paper): the view *is* the weight. ``M`` starts as the least-squares fit of the
  pretrained weights (each slot the mean of ``W0[p] / (s g(p))`` over the positions that share it), so at
  ``compression=1`` the model is reproduced exactly.

Gradient scaling (the paper's "v1", ``grad_scaling=True``): ``∇M[k] ← ∇M[k] / (S_k²/c_k + 1e-6)`` with
``c_k`` the number of positions sharing slot ``k`` and ``S_k`` the sum of their module scales, applied by a
gradient hook: an SGD step on ``M`` then moves each weight by ``−η`` times the mean gradient of the weights
it shares its slot with, whatever ``a`` and the module scales are.

Fold: exact (the dense weights are materialised).

Example:
    >>> sk.attach_(model, sk.RPSConfig(compression=0.01, target_modules="all-linear"))
    >>> sk.extract(model).numel   # one array: 1 % of the Linear weights
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from shiftkit.core.config import ShiftConfig
from shiftkit.core.registry import register_method
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError

__all__ = ["MAPPERS", "RPSConfig", "RPSLayer", "RPSMemory", "hashed_positions"]

MAPPERS = ("pareto", "hashednet")
MODES = ("shift", "weights")
_PRIME = 2038074743


@dataclass(frozen=True, kw_only=True)
class RPSConfig(ShiftConfig):
    """Randomised-parameter-sharing settings.

    Attributes:
        compression: the memory's size as a fraction of the targeted weights' (``0 < c ≤ 1``; above 1 the
            budget is the full size).
        mode: ``"shift"`` (``W0 + view``, starts at 0) or ``"weights"`` (the view is the weight).
        mapper: ``"pareto"`` (STABLE-RPS's RANDOMFOLD) or ``"hashednet"`` (independent hashes).
        grad_scaling: the paper's gradient scaling of the shared memory (mode v1).
        init_bound: ``a``, the uniform bound the module scales ``s_j = σ_j / a`` refer to (0.05 as the
            reference's command line).
        module_limit_size: modules with fewer weight entries keep their own weights (not shared).
        seed: seeds the hashes and signs; with ``M`` it defines the shift.
    """

    compression: float = 0.1
    mode: str = "shift"
    mapper: str = "pareto"
    grad_scaling: bool = True
    init_bound: float = 0.05
    module_limit_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.compression
        if isinstance(c, bool) or not isinstance(c, int | float) or not c > 0 or not math.isfinite(c):
            raise ShiftkitError(f"RPSConfig.compression must be a number > 0, got {c!r}")
        if self.mode not in MODES:
            raise ShiftkitError(f"RPSConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.mapper not in MAPPERS:
            raise ShiftkitError(f"RPSConfig.mapper must be one of {MAPPERS}, got {self.mapper!r}")
        if not isinstance(self.init_bound, int | float) or not self.init_bound > 0:
            raise ShiftkitError(f"RPSConfig.init_bound must be > 0, got {self.init_bound!r}")
        for name in ("module_limit_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ShiftkitError(f"RPSConfig.{name} must be an integer >= 0, got {v!r}")


def _coefficients(seed: int, count: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(v) | 1 for v in torch.randint(1, _PRIME, (count,), generator=gen)]


def hashed_positions(start: int, count: int, m: int, mapper: str, seed: int) -> tuple[Tensor, Tensor]:
    """``(slot h(p), sign g(p))`` for the global positions ``p = start .. start+count−1`` (int64, int8)."""
    a0, a1, a2, b0, b1, b2, c0, c1, c2 = _coefficients(seed, 9)

    def universal(x: Tensor, k0: int, k1: int, k2: int) -> Tensor:
        # ((k0 x + k1 x² + k2) mod P), every product below 2^62
        return (k0 * (x % _PRIME) + ((k1 * (x % _PRIME)) % _PRIME) * (x % _PRIME) + k2) % _PRIME

    p = torch.arange(start, start + count, dtype=torch.int64)
    if mapper == "pareto":
        h = (universal(p // m, a0, a1, a2) % m + p % m) % m
    else:
        h = universal(p, b0, b1, b2) % m
    g = 1 - 2 * ((universal(p, c0, c1, c2) >> 7) & 1)
    return h, g.to(torch.int8)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward divides the gradient by ``scaler + 1e-6`` (per memory slot)."""

    @staticmethod
    def forward(ctx: Any, memory: Tensor, scaler: Tensor) -> Tensor:
        ctx.save_for_backward(scaler)
        return memory.view_as(memory)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (scaler,) = ctx.saved_tensors
        return grad / (scaler.to(grad.dtype) + 1e-6), None


class RPSMemory(nn.Module):
    """The shared array ``M (m,)`` and, with gradient scaling, its per-slot gradient divisor."""

    def __init__(self, m: int, like: Tensor) -> None:
        super().__init__()
        self.memory = nn.Parameter(torch.zeros(m, dtype=like.dtype, device=like.device))
        self.register_buffer(
            "scaler", torch.ones(m, dtype=torch.float32, device=like.device), persistent=False
        )
        self.scaling = False

    def read(self) -> Tensor:
        """``M``, through the gradient scaling when it is on (every wrapper reads it this way)."""
        if self.scaling and torch.is_grad_enabled() and self.memory.requires_grad:
            out: Tensor = _ScaleGrad.apply(self.memory, self.scaler)
            return out
        return self.memory

    def extra_repr(self) -> str:
        return f"m={self.memory.numel()}, grad_scaling={self.scaling}"


class RPSLayer(ShiftWrapper):
    """A targeted Linear / Conv2d / Embedding whose weight reads ``s · g ⊙ M[h]`` (``W0 +`` that: shift mode).

    ``rps`` is the memory shared by every wrapper of the attach (shift parameter ``rps.memory``).
    """

    def __init__(
        self, base: nn.Module, memory: RPSMemory, slots: Tensor, signs: Tensor, scale: float, mode: str
    ):
        super().__init__(base)
        self.rps = memory
        self.slots: Tensor
        self.signs: Tensor
        self.register_buffer("slots", slots, persistent=False)
        self.register_buffer("signs", signs, persistent=False)
        self.scale = scale
        self.mode = mode

    def _base_weight(self) -> Tensor:
        w = self.base.weight
        assert isinstance(w, Tensor)
        return w

    def view(self) -> Tensor:
        """``s · g ⊙ M[h]`` in the weight's shape and dtype."""
        w = self._base_weight()
        m = self.rps.read()
        flat = m[self.slots] * self.signs.to(m.dtype) * self.scale
        return flat.view(w.shape).to(w.dtype)

    def effective_params(self) -> dict[str, Tensor]:
        v = self.view()
        return {"weight": self._base_weight() + v if self.mode == "shift" else v}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.base, self.effective_params(), args, kwargs)


@register_method(
    "rps",
    config=RPSConfig,
    targets=(nn.Linear, nn.Conv2d, nn.Embedding),
    foldable=True,
    zero_init={"mode": "shift"},
    default_targets="all-linear",
    group=True,
)
def wrap_group(
    root: nn.Module, targets: list[tuple[str, nn.Module]], config: ShiftConfig
) -> list[RPSLayer | None]:
    """One shared memory over the targets' weights (model order) and one wrapper per target."""
    assert isinstance(config, RPSConfig)
    weights: list[Tensor] = []
    for _, m in targets:
        w = m.weight
        assert isinstance(w, Tensor)
        weights.append(w)
    keep = [w.numel() >= config.module_limit_size for w in weights]
    sizes = [w.numel() for w, k in zip(weights, keep, strict=True) if k]
    if not sizes:
        raise ShiftkitError(
            f"rps: no targeted module has >= module_limit_size={config.module_limit_size} weight entries"
        )
    n = sum(sizes)
    m_size = max(1, min(n, math.floor(config.compression * n)))
    like = next(w for w, k in zip(weights, keep, strict=True) if k)
    memory = RPSMemory(m_size, like)
    wrappers: list[RPSLayer | None] = []
    counts = torch.zeros(m_size, dtype=torch.float64)
    sums = torch.zeros(m_size, dtype=torch.float64)
    fit = torch.zeros(m_size, dtype=torch.float64)
    offset = 0
    for (_, module), weight, k in zip(targets, weights, keep, strict=True):
        if not k:
            wrappers.append(None)
            continue
        w = weight.detach()
        numel = w.numel()
        sigma = float(w.double().std()) if numel > 1 else float(w.double().abs().mean())
        scale = (sigma if sigma > 0 else 1.0) / config.init_bound
        slots, signs = hashed_positions(offset, numel, m_size, config.mapper, config.seed)
        counts.index_add_(0, slots, torch.ones(numel, dtype=torch.float64))
        sums.index_add_(0, slots, torch.full((numel,), scale, dtype=torch.float64))
        if config.mode == "weights":  # least-squares start: each slot the mean of W0[p] / (s g(p))
            fit.index_add_(0, slots, w.reshape(-1).double().cpu() / (scale * signs.double()))
        wrappers.append(RPSLayer(module, memory, slots.to(w.device), signs.to(w.device), scale, config.mode))
        offset += numel
    used = counts > 0
    with torch.no_grad():
        if config.mode == "weights":
            start = torch.where(used, fit / counts.clamp_min(1), torch.zeros_like(fit))
            memory.memory.copy_(start.to(memory.memory.dtype))
        if config.grad_scaling:
            scaler = torch.where(used, sums.square() / counts.clamp_min(1), torch.ones_like(sums))
            memory.get_buffer("scaler").copy_(scaler.to(torch.float32))
    memory.scaling = config.grad_scaling
    return wrappers
