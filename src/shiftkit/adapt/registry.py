"""The registry of test-time adaptation methods: ``adapt.make(name, model, **params)``.

A method is a :class:`~shiftkit.adapt.base.TTAMethod` subclass registered with :func:`register_adapt`;
``make`` checks the keyword arguments against the class signature so a typo is an error, not a silently
ignored option.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from shiftkit.adapt.base import TTAMethod
from shiftkit.core.registry import Registry
from shiftkit.errors import ShiftkitError

__all__ = ["ADAPT_METHODS", "list_methods", "make", "register_adapt"]

ADAPT_METHODS: Registry[type[TTAMethod]] = Registry("adapt method")

M = TypeVar("M", bound=type[TTAMethod])


def register_adapt(name: str) -> Callable[[M], M]:
    """Class decorator registering a :class:`TTAMethod` subclass under ``name``.

    Args:
        name: the name used by :func:`make`.

    Returns:
        The decorator (it returns the class unchanged, with ``cls.name = name``).

    Example:
        >>> @register_adapt("mine")
        ... class Mine(TTAMethod): ...
        >>> "mine" in list_methods()
    """

    def deco(cls: M) -> M:
        cls.name = name
        ADAPT_METHODS.add(name, cls)
        return cls

    return deco


def make(name: str, model: nn.Module, **params: Any) -> TTAMethod:
    """Build the adaptation method ``name`` around ``model`` (adapted in place).

    Args:
        name: a registered method (see :func:`list_methods`).
        model: the model to adapt, e.g. an image classifier mapping ``(N, C, H, W)`` to ``(N, K)`` logits.
        **params: the method's keyword options (``episodic``, ``steps``, ``lr``, ...).

    Returns:
        The method; ``method(x)`` returns the outputs for ``x`` and adapts.

    Raises:
        UnknownMethodError: ``name`` is not registered (the message lists the known names).
        ShiftkitError: an option is not accepted by the method (the message names it and the valid ones).

    Example:
        >>> tta = make("tent", model, lr=1e-3)
        >>> logits = tta(x)
        >>> tta.reset()
    """
    cls = ADAPT_METHODS.get(name)
    sig = inspect.signature(cls.__init__)
    accepted = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ShiftkitError(
            f"adapt method {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or '(none)'}"
        )
    return cls(model, **params)


def list_methods() -> list[str]:
    """The registered adaptation method names, sorted.

    Example:
        >>> from shiftkit import adapt
        >>> adapt.list_methods()
        ['norm', 'source', 'tent']
    """
    return ADAPT_METHODS.names()
