"""The registry of test-time adaptation methods: ``adapt.make(name, model, **params)``.

A method is a :class:`~shiftkit.adapt.base.TTAMethod` subclass registered with :func:`register_method`
(from any module, yours included), which records an :class:`AdaptSpec`: what the method adapts, whether it
needs gradients, which normalisation layers it runs on, whether it wraps another method. Suites, the CLI
and the tests read the spec, never a method's name. ``make`` checks the keyword arguments against the class
signature so a typo is an error, not a silently ignored option.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from shiftkit.adapt.base import TTAMethod
from shiftkit.core.registry import Registry
from shiftkit.errors import ShiftkitError

__all__ = [
    "ADAPTS",
    "ADAPT_METHODS",
    "AdaptSpec",
    "get_method",
    "list_methods",
    "make",
    "register_adapt",
    "register_method",
]

#: what a method changes, in the order suites list them
ADAPTS = ("nothing", "norm_statistics", "norm_affine", "outputs", "inner")
#: normalisation layers: BatchNorm, LayerNorm, GroupNorm
NORM_KINDS = ("batch", "layer", "group")


@dataclass(frozen=True)
class AdaptSpec:
    """What the registry knows about a test-time adaptation method.

    Attributes:
        name: registry name, equal to the method's file name (``"tent"``).
        cls: the :class:`TTAMethod` subclass.
        adapts: ``"nothing"`` (the source model), ``"norm_statistics"`` (BatchNorm statistics),
            ``"norm_affine"`` (the norm layers' γ, β by gradient steps), ``"outputs"`` (a correction of the
            outputs, model untouched) or ``"inner"`` (corrects another registered method: see ``wraps``).
        needs_grad: the method takes optimizer steps (backward passes).
        norms: the normalisation layers it needs (``("batch",)``: BatchNorm only; ``()``: none needed).
        wraps: the option that names an inner registered method it runs on (``label_shift``'s
            ``"method"``), or ``None``.
        source_data: the option that takes labelled source batches (EATA's ``"fisher_data"``), or ``None``.
    """

    name: str
    cls: type[TTAMethod]
    adapts: str
    needs_grad: bool
    norms: tuple[str, ...] = ()
    wraps: str | None = None
    source_data: str | None = None

    @property
    def options(self) -> list[str]:
        """The keyword options of the method (what :func:`make` accepts)."""
        sig = inspect.signature(self.cls.__init__)
        return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


ADAPT_METHODS: Registry[AdaptSpec] = Registry("adapt method", package="shiftkit.adapt")

M = TypeVar("M", bound=type[TTAMethod])


def register_method(
    name: str,
    *,
    adapts: str,
    needs_grad: bool,
    norms: tuple[str, ...] = (),
    wraps: str | None = None,
    source_data: str | None = None,
) -> Callable[[M], M]:
    """Class decorator registering a :class:`TTAMethod` subclass under ``name``, with its :class:`AdaptSpec`.

    Works from any module: ``adapt.make(name, ...)``, ``shiftkit adapt --plugin your.module --method name``
    and the test suite's reliability checks then take the method like a built-in one.

    Returns:
        The decorator (it returns the class unchanged, with ``cls.name = name``).

    Raises:
        ShiftkitError: an unknown ``adapts`` or ``norms`` value.

    Example:
        >>> @adapt.register_method("mine", adapts="norm_affine", needs_grad=True, norms=("batch",))
        ... class Mine(NormAffineMethod):
        ...     def loss(self, outputs): return softmax_entropy(outputs).mean()
        >>> "mine" in adapt.list_methods()
        True
    """
    if adapts not in ADAPTS:
        raise ShiftkitError(f"adapt method {name!r}: adapts must be one of {ADAPTS}, got {adapts!r}")
    if not set(norms) <= set(NORM_KINDS):
        raise ShiftkitError(f"adapt method {name!r}: norms must come from {NORM_KINDS}, got {norms!r}")

    def deco(cls: M) -> M:
        cls.name = name
        ADAPT_METHODS.add(
            name,
            AdaptSpec(name, cls, adapts, bool(needs_grad), tuple(norms), wraps, source_data),
        )
        return cls

    return deco


#: the decorator's earlier name
register_adapt = register_method


def get_method(name: str) -> AdaptSpec:
    """The :class:`AdaptSpec` registered as ``name`` (``UnknownMethodError`` listing the known names)."""
    return ADAPT_METHODS.get(name)


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
    spec = ADAPT_METHODS.get(name)
    accepted = spec.options
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ShiftkitError(
            f"adapt method {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or '(none)'}"
        )
    return spec.cls(model, **params)


def list_methods(
    *, adapts: str | None = None, needs_grad: bool | None = None, norm: str | None = None
) -> list[str]:
    """The registered adaptation method names, in suite order (by what they adapt, then by name).

    Args:
        adapts: keep the methods that adapt this (see :class:`AdaptSpec`).
        needs_grad: keep the methods that do (True) or do not (False) take gradient steps.
        norm: keep the methods that run on models with this normalisation (``"batch"``, ``"layer"``,
            ``"group"``; a method that needs no norm layer runs on any).

    Example:
        >>> from shiftkit import adapt
        >>> adapt.list_methods(needs_grad=True)
        ['eata', 'sar', 'tent']
    """
    specs = [s for _, s in ADAPT_METHODS.items()]
    specs = [
        s
        for s in specs
        if (adapts is None or s.adapts == adapts)
        and (needs_grad is None or s.needs_grad == needs_grad)
        and (norm is None or not s.norms or norm in s.norms)
    ]
    return [s.name for s in sorted(specs, key=lambda s: (ADAPTS.index(s.adapts), s.name))]
