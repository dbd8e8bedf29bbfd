"""``finetune``: sequential fine-tuning, task after task with nothing added (the lower bound every
continual strategy is measured against)."""

from __future__ import annotations

from shiftkit.continual.base import Strategy
from shiftkit.continual.registry import register_method

__all__ = ["Finetune"]


@register_method("finetune")
class Finetune(Strategy):
    """Train each task in turn; no regulariser, no memory.

    Example:
        >>> strategy = continual.make("finetune")
    """
