"""Learning-rate schedules for continued pre-training (spec: combine-compress.md §9), as PyTorch schedulers.

* :class:`RewarmCosine` (Ibrahim et al. 2024, arXiv:2403.08763; Gupta et al. 2023, arXiv:2308.04014): for
  each new dataset, a linear warm-up from 0 to the base LR over ``warmup_steps``, a cosine decay to
  ``min_lr_ratio``·base at ``total_steps``, flat after:
  ``η(t) = η_max·t/T_w`` (t ≤ T_w), ``η_min + ½(η_max − η_min)(1 + cos(π(t − T_w)/(S − T_w)))`` (T_w < t ≤ S).
* :class:`InfiniteLR` (Ibrahim et al. §7): warm-up, a cosine cool-down to a constant plateau
  ``constant_ratio``·base that later datasets continue without re-warming, and — when a releasable
  checkpoint is wanted — an exponential anneal to ``min_lr_ratio``·base over ``cooldown_steps`` from
  ``cooldown_start``: ``η = η_const·(η_min/η_const)^((t − T_ann)/T_cd)``.

Both set each parameter group's LR to ``base_lr · factor(step)``, like ``LambdaLR``; ``factor`` is also a
plain function of the step (:meth:`factor`), and the schedulers save and load their state like any other.

Example:
    >>> opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    >>> sched = RewarmCosine(opt, warmup_steps=100, total_steps=10_000, min_lr_ratio=0.1)
    >>> for batch in data: loss(batch).backward(); opt.step(); sched.step()
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from shiftkit.errors import ShiftkitError

__all__ = ["InfiniteLR", "RewarmCosine"]


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ShiftkitError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return value


def _ratio(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ShiftkitError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


class RewarmCosine(LRScheduler):
    """Linear re-warm-up from 0, then cosine decay to ``min_lr_ratio``·base at ``total_steps``; flat after.

    Args:
        optimizer: the optimiser; each group's ``lr`` at construction is its peak (``η_max``).
        warmup_steps: steps of the linear warm-up (``T_w``; the papers use 1 % of the dataset's steps).
        total_steps: the step at which the decay ends (``S``).
        min_lr_ratio: ``η_min / η_max`` (0.1 in the papers).
        last_epoch: the step to resume from (``-1``: a fresh start), as in PyTorch's schedulers.

    Raises:
        ShiftkitError: ``warmup_steps > total_steps``, negative steps, or a ratio outside [0, 1].
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps = _int("warmup_steps", warmup_steps, 0)
        self.total_steps = _int("total_steps", total_steps, 1)
        if warmup_steps > total_steps:
            raise ShiftkitError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
        self.min_lr_ratio = _ratio("min_lr_ratio", min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """``η(step) / η_max``."""
        w, s, lo = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if step <= w:
            return step / w if w else 1.0
        if step >= s:
            return lo
        return lo + 0.5 * (1.0 - lo) * (1.0 + math.cos(math.pi * (step - w) / (s - w)))

    def get_lr(self) -> list[float | Tensor]:
        """Each group's LR at the current step."""
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


class InfiniteLR(LRScheduler):
    """Warm-up, cosine cool-down to a constant, the constant for as long as data keeps coming, and an
    exponential anneal to the minimum that starts at ``cooldown_start`` (``None``: not yet decided).

    Args:
        optimizer: the optimiser; each group's ``lr`` at construction is its peak (``η_max``).
        warmup_steps: linear warm-up from 0 (``T_w``).
        cooldown_start: the step at which the anneal starts (``T_ann``); ``None`` keeps the plateau until
            :meth:`anneal_from` is called (a later dataset continues the plateau with no re-warm-up).
        cooldown_steps: the anneal's length (``T_end − T_ann``).
        constant_ratio: the plateau ``η_const / η_max`` (0.55: the cosine midpoint between 1 and 0.1).
        min_lr_ratio: ``η_min / η_max`` reached at the end of the anneal (0.1).
        plateau_start: the step where the cosine cool-down reaches the plateau (``T_cd``); default
            ``10·warmup_steps``.
        last_epoch: the step to resume from.

    Raises:
        ShiftkitError: phases out of order (the anneal starting before the plateau), negative lengths, ratios
            outside [0, 1], or ``min_lr_ratio > constant_ratio``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        cooldown_start: int | None = None,
        cooldown_steps: int = 1,
        constant_ratio: float = 0.55,
        min_lr_ratio: float = 0.1,
        plateau_start: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps = _int("warmup_steps", warmup_steps, 0)
        self.plateau_start = _int(
            "plateau_start", 10 * warmup_steps if plateau_start is None else plateau_start, warmup_steps
        )
        self.cooldown_steps = _int("cooldown_steps", cooldown_steps, 1)
        self.constant_ratio = _ratio("constant_ratio", constant_ratio)
        self.min_lr_ratio = _ratio("min_lr_ratio", min_lr_ratio)
        if self.min_lr_ratio > self.constant_ratio:
            raise ShiftkitError(f"min_lr_ratio ({min_lr_ratio}) exceeds constant_ratio ({constant_ratio})")
        self.cooldown_start: int | None = None
        if cooldown_start is not None:
            self._set_anneal(cooldown_start)
        super().__init__(optimizer, last_epoch)

    def _set_anneal(self, step: int) -> None:
        self.cooldown_start = _int("cooldown_start", step, self.plateau_start)

    def anneal_from(self, step: int) -> None:
        """Start the anneal at ``step`` (≥ the plateau's start); the LR reaches the minimum
        ``cooldown_steps`` later. Call it when a releasable checkpoint is wanted."""
        self._set_anneal(step)

    def factor(self, step: int) -> float:
        """``η(step) / η_max``."""
        w, cd, c = self.warmup_steps, self.plateau_start, self.constant_ratio
        if step <= w:
            return step / w if w else 1.0
        if step <= cd:
            x = (step - w) / (cd - w)
            return c + 0.5 * (1.0 - c) * (1.0 + math.cos(math.pi * x))
        if self.cooldown_start is None or step <= self.cooldown_start:
            return c
        x = min((step - self.cooldown_start) / self.cooldown_steps, 1.0)
        if c == 0.0:
            return 0.0
        return c * (self.min_lr_ratio / c) ** x

    def get_lr(self) -> list[float | Tensor]:
        """Each group's LR at the current step."""
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]
