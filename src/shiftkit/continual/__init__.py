"""shiftkit.continual: learn task after task without losing zero-shot skill (ZSCL, LwF, FPF / k-FPF,
WiSE-FT, replay, weight ensembles, LR re-warming), one file per strategy, each registered by one decorator
(:mod:`~shiftkit.continual.registry`). Importing this package registers the built-in strategies.

A strategy (:class:`Strategy`) plugs into a training loop through the hooks of
:class:`shiftkit.core.training.TrainHooks` plus the task boundaries; :func:`shiftkit.recipes.continual
.run_sequence` runs a task sequence with one and fills the accuracy matrix. The building blocks are here
too: :func:`mtil_metrics` (Transfer / Avg / Last / forgetting of an accuracy matrix), :class:`WeightEnsemble`
(ZSCL's weight averaging), the continued pre-training schedules :class:`RewarmCosine` and
:class:`InfiniteLR`, and :class:`ReplayMixer`.

Example:
    >>> from shiftkit import continual
    >>> continual.list_methods()
    ['finetune', 'fpf', 'k_fpf', 'lwf', 'replay', 'wise_ft', 'zscl']
    >>> strategy = continual.make("zscl", avg_freq=10)
"""

from __future__ import annotations

from typing import Any

from shiftkit.continual import finetune as finetune
from shiftkit.continual import fpf as fpf
from shiftkit.continual import k_fpf as k_fpf
from shiftkit.continual import lwf as lwf
from shiftkit.continual import replay as replay
from shiftkit.continual import wise_ft as wise_ft
from shiftkit.continual import zscl as zscl
from shiftkit.continual.base import Memory, Strategy, TaskContext
from shiftkit.continual.ensemble import WeightEnsemble
from shiftkit.continual.metrics import mtil_metrics
from shiftkit.continual.mixer import ReplayMixer
from shiftkit.continual.registry import (
    CONTINUAL_METHODS,
    ContinualSpec,
    get_method,
    list_methods,
    register_method,
)
from shiftkit.continual.schedules import InfiniteLR, RewarmCosine
from shiftkit.errors import ShiftkitError

__all__ = [
    "CONTINUAL_METHODS",
    "ContinualSpec",
    "InfiniteLR",
    "Memory",
    "ReplayMixer",
    "RewarmCosine",
    "Strategy",
    "TaskContext",
    "WeightEnsemble",
    "get_method",
    "list_methods",
    "make",
    "mtil_metrics",
    "register_method",
]


def make(name: str, **options: Any) -> Strategy:
    """A registered strategy built with its options (``continual.make("zscl", avg_freq=10)``).

    Raises:
        UnknownMethodError: no strategy of that name.
        ShiftkitError: an option the strategy does not take, or a bad value (named).
    """
    spec = get_method(name)
    try:
        strategy = spec.cls(**options)
    except TypeError as err:
        raise ShiftkitError(f"continual strategy {name!r}: {err}") from None
    if not isinstance(strategy, Strategy):
        raise ShiftkitError(f"continual strategy {name!r} is not a shiftkit.continual.Strategy")
    return strategy
