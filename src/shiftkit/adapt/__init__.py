"""Test-time adaptation: keep a deployed model accurate while its input drifts, without labels.

Example:
    >>> from shiftkit import adapt
    >>> tta = adapt.make("tent", model, lr=1e-3)   # adapt.list_methods(): every registered method
    >>> logits = tta(x); tta.reset()

Methods follow the online protocol of :class:`~shiftkit.adapt.base.TTAMethod` (predict, adapt, return the
pre-update outputs; ``episodic`` resets before each batch). The model is adapted in place.
"""

from __future__ import annotations

from shiftkit.adapt.alpha_bn import AlphaBN
from shiftkit.adapt.base import TTAMethod
from shiftkit.adapt.bn_ema import BNEMA
from shiftkit.adapt.eata import EATA
from shiftkit.adapt.evaluate import TTARun, evaluate
from shiftkit.adapt.label_shift import LabelShift
from shiftkit.adapt.lame import Lame
from shiftkit.adapt.norm import Norm
from shiftkit.adapt.registry import AdaptSpec, get_method, list_methods, make, register_adapt, register_method
from shiftkit.adapt.sar import SAR
from shiftkit.adapt.source import Source
from shiftkit.adapt.tent import Tent, softmax_entropy

__all__ = [
    "BNEMA",
    "EATA",
    "SAR",
    "AdaptSpec",
    "AlphaBN",
    "LabelShift",
    "Lame",
    "Norm",
    "Source",
    "TTAMethod",
    "TTARun",
    "Tent",
    "evaluate",
    "get_method",
    "list_methods",
    "make",
    "register_adapt",
    "register_method",
    "softmax_entropy",
]
