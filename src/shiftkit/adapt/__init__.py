"""Test-time adaptation: keep a deployed model accurate while its input drifts, without labels.

Example:
    >>> from shiftkit import adapt
    >>> tta = adapt.make("tent", model, lr=1e-3)   # adapt.list_methods() -> ['norm', 'source', 'tent']
    >>> logits = tta(x); tta.reset()

Methods follow the online protocol of :class:`~shiftkit.adapt.base.TTAMethod` (predict, adapt, return the
pre-update outputs; ``episodic`` resets before each batch). The model is adapted in place.
"""

from __future__ import annotations

from shiftkit.adapt.base import TTAMethod
from shiftkit.adapt.norm import Norm
from shiftkit.adapt.registry import list_methods, make, register_adapt
from shiftkit.adapt.source import Source
from shiftkit.adapt.tent import Tent, softmax_entropy

__all__ = ["Norm", "Source", "TTAMethod", "Tent", "list_methods", "make", "register_adapt", "softmax_entropy"]
