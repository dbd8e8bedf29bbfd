"""LoRA's settings, in PEFT's vocabulary (the math is in :mod:`~shiftkit.methods.lora.layers` and
:mod:`~shiftkit.methods.lora.dense`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from shiftkit.core.config import FrozenMap, ShiftConfig
from shiftkit.core.patterns import exact_patterns, module_patterns, pattern_lookup
from shiftkit.errors import ShiftkitError

__all__ = ["LoRAConfig", "exact_patterns", "module_patterns"]

_INITS = (True, False, "gaussian")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(ShiftConfig):
    """LoRA settings, in PEFT's vocabulary.

    Attributes:
        r: rank of the update. 8 is PEFT's default: enough for most single-task adaptation.
        lora_alpha: α; the update is scaled by α/r so changing r does not change the learning rate scale.
            PEFT's default is 8 (scale 1 at r=8).
        lora_dropout: dropout on the LoRA branch's input; 0 keeps the branch deterministic (PEFT default).
        use_rslora: scale by α/√r instead (rank-stabilised LoRA), better for large r.
        init_lora_weights: ``True`` = PEFT's init (Kaiming-uniform A, zero B: exact no-op at start);
            ``"gaussian"`` = A ~ N(0, 1/r²) as in the LoRA paper, B zero; ``False`` = B random too (the
            shift is non-zero from the start; for tests).
        rank_pattern: per-module ranks, as in PEFT: ``{key: r}`` where a module whose name matches the
            regular expression ``(.*\\.)?key$`` gets rank ``r`` (the first matching key, in order); others
            get ``r``. Light-PEFT's rank pruning and ``shiftkit extract-lora --energy`` write one.
        alpha_pattern: per-module ``lora_alpha``, with the same matching.
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: Mapping[str, int] = field(default_factory=FrozenMap)
    alpha_pattern: Mapping[str, float] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, kind in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise ShiftkitError(
                    f"LoRAConfig.{name} must map module-name patterns to numbers, got {value!r}"
                )
            for k, v in value.items():
                if kind == "rank":
                    ok = isinstance(v, int) and v >= 1
                else:
                    ok = isinstance(v, int | float) and math.isfinite(v)
                if isinstance(v, bool) or not ok:
                    raise ShiftkitError(f"LoRAConfig.{name}[{k!r}] must be a {kind}, got {v!r}")
                try:
                    re.compile(k)
                except re.error as err:
                    raise ShiftkitError(
                        f"LoRAConfig.{name} key {k!r} is not a regular expression: {err}"
                    ) from None
            frozen = FrozenMap({k: float(v) if kind == "alpha" else v for k, v in value.items()})
            object.__setattr__(self, name, frozen)
        if not isinstance(self.r, int) or self.r < 1:
            raise ShiftkitError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int | float):
            raise ShiftkitError(f"LoRAConfig.lora_alpha must be a number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, int | float) or not 0.0 <= self.lora_dropout < 1.0:
            raise ShiftkitError(f"LoRAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in _INITS:
            raise ShiftkitError(f"LoRAConfig.init_lora_weights must be one of {_INITS}")

    @property
    def scaling(self) -> float:
        """``α/r``, or ``α/√r`` with rsLoRA (of the modules no pattern names; see :meth:`scaling_of`)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_of(self, fqn: str) -> int:
        """The rank of module ``fqn``: its ``rank_pattern`` entry (PEFT's matching), else ``r``."""
        return int(pattern_lookup(self.rank_pattern, fqn, self.r))

    def alpha_of(self, fqn: str) -> float:
        """The ``lora_alpha`` of module ``fqn``: its ``alpha_pattern`` entry, else ``lora_alpha``."""
        return float(pattern_lookup(self.alpha_pattern, fqn, self.lora_alpha))

    def scaling_of(self, fqn: str) -> float:
        """The scaling of module ``fqn``'s update, with its own rank and α."""
        r = self.rank_of(fqn)
        return self.alpha_of(fqn) / (math.sqrt(r) if self.use_rslora else r)

    def for_module(self, fqn: str) -> LoRAConfig:
        """The plain config module ``fqn`` is wrapped with (its rank and α, no patterns)."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        return LoRAConfig(
            r=self.rank_of(fqn),
            lora_alpha=self.alpha_of(fqn),
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            init_lora_weights=self.init_lora_weights,
        )
