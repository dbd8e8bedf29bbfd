"""The registry of continual-learning strategies: one :class:`ContinualSpec` per name.

A strategy is one file in this package with one decorator on its class::

    @register_method("mine", uses=("reference_data",))
    class Mine: ...

The class plugs into the ``learn`` recipe's training loop through its hooks (an extra loss term, a step
after each optimizer step, an end-of-task step); what a strategy needs beyond the task's own batches is
declared in ``uses`` so suites and the CLI can supply it without knowing the strategy's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from shiftkit.core.registry import Registry
from shiftkit.errors import ShiftkitError

__all__ = ["CONTINUAL_METHODS", "USES", "ContinualSpec", "get_method", "list_methods", "register_method"]

#: what a strategy may need besides the current task's batches
USES = ("reference_data", "old_task_data", "initial_model", "snapshots")

C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class ContinualSpec:
    """What the registry knows about a continual-learning strategy.

    Attributes:
        name: registry name, equal to the strategy's file name (``"zscl"``).
        cls: the strategy class.
        uses: what it needs besides the task's batches (from :data:`USES`).
    """

    name: str
    cls: type[Any]
    uses: tuple[str, ...] = ()


CONTINUAL_METHODS: Registry[ContinualSpec] = Registry("continual strategy", package="shiftkit.continual")


def register_method(name: str, *, uses: tuple[str, ...] = ()) -> Callable[[C], C]:
    """Class decorator registering a continual-learning strategy (from any module, yours included).

    Raises:
        ShiftkitError: ``uses`` names something outside :data:`USES`.

    Example:
        >>> @register_method("finetune")
        ... class Finetune: ...
    """
    if not set(uses) <= set(USES):
        raise ShiftkitError(f"continual strategy {name!r}: uses must come from {USES}, got {uses!r}")

    def deco(cls: C) -> C:
        CONTINUAL_METHODS.add(name, ContinualSpec(name, cls, tuple(uses)))
        return cls

    return deco


def get_method(name: str) -> ContinualSpec:
    """The :class:`ContinualSpec` registered as ``name``."""
    return CONTINUAL_METHODS.get(name)


def list_methods() -> list[str]:
    """Names of the registered strategies, sorted (``continual.list_methods()``)."""
    return CONTINUAL_METHODS.names()
