"""shiftkit.continual: learn task after task without losing zero-shot skill (ZSCL, FPF, weight ensembles,
LR re-warming, replay), one file per strategy, each registered by one decorator
(:mod:`~shiftkit.continual.registry`). Importing this package registers the built-in strategies (none yet:
the continual-learning issue adds them)."""

from __future__ import annotations

from shiftkit.continual.registry import (
    CONTINUAL_METHODS,
    ContinualSpec,
    get_method,
    list_methods,
    register_method,
)

__all__ = ["CONTINUAL_METHODS", "ContinualSpec", "get_method", "list_methods", "register_method"]
