"""``source``: no adaptation, the model as trained (eval mode), the baseline every TTA result is read against.

Output: ``f_θ(x)`` with the source BatchNorm running statistics; nothing is ever updated.
Reference: the "Source" row of Wang et al., ICLR 2021, https://arxiv.org/abs/2006.10726.
"""

from __future__ import annotations

from torch import nn

from shiftkit.adapt.base import TTAMethod
from shiftkit.adapt.registry import register_method

__all__ = ["Source"]


@register_method("source", adapts="nothing", needs_grad=False)
class Source(TTAMethod):
    """The unadapted model in eval mode: ``Source(model)(x) == model.eval()(x)``.

    Args:
        model: the model (put in eval mode, gradients off).
        episodic: accepted for a uniform interface; there is nothing to reset.
        steps: accepted for a uniform interface; unused.

    Example:
        >>> tta = adapt.make("source", model)
        >>> logits = tta(x)   # (N, K), same as model.eval()(x)
        >>> tta.reset()       # no-op
    """

    def __init__(self, model: nn.Module, *, episodic: bool = False, steps: int = 1) -> None:
        super().__init__(model, episodic=episodic, steps=steps)
