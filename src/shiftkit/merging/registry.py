"""Registry of merge methods: one :class:`MergeSpec` per name, registered by :func:`register_merge_method`.

A merge function receives the inputs' tensors already aligned (same keys, shapes; float32, finite) and the
per-shift weights, and returns the merged tensors: ``fn(tensors, weights, **params) -> dict[str, Tensor]``
with ``tensors[t][key]`` the t-th shift's tensor ``key``. See :func:`shiftkit.merging.in_memory.merge`.

The spec also says how the method reads in a mergekit-shaped recipe (``shiftkit merge``), where mergekit's
meaning applies: its defaults (``recipe_defaults``, where they differ from the function's own paper
defaults), the keys it requires (``recipe_required``: mergekit's ``weight`` and ``t`` have no default),
parameters it accepts without effect (``recipe_ignored``) and whether the base model is one of the inputs
(``base_is_input``: mergekit's ``linear`` averages it with the models, ``slerp`` starts from it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from shiftkit.core.registry import Registry
from shiftkit.errors import ShiftkitError

__all__ = [
    "MERGE_METHODS",
    "WEIGHTINGS",
    "MergeFn",
    "MergeSpec",
    "get_merge_method",
    "list_merge_methods",
    "register_merge",
    "register_merge_method",
]

#: how a method's per-shift weights act (see :class:`MergeSpec`)
WEIGHTINGS = ("normalized", "linear", "none")

#: ``fn(tensors: list[dict[str, Tensor]], weights: list[float], **params) -> dict[str, Tensor]``
MergeFn = Callable[..., dict[str, Tensor]]


@dataclass(frozen=True)
class MergeSpec:
    """What the registry knows about a merge method.

    Attributes:
        name: registry name, equal to the method's file name (``"ties"``).
        fn: the merge function ``fn(tensors, weights, **params)``.
        multipass: multi-pass factory for whole-model statistics (``factory(weights, **params) ->
            MultiPass | None``; ``None`` from it means tensor-local for those parameters), or ``None``
            when the method is always tensor-local (:mod:`shiftkit.merging.stream.multipass`).
        kernel: ``kernel(params) -> fn | None``: an in-place streaming kernel that computes the method exactly
            for these parameters (:mod:`~shiftkit.merging.stream.kernels`), ``None`` where the general
            per-tensor path must run; the streaming merge prefers it (less memory, same values).
        needs_base: a recipe must name ``base_model`` (every method but a plain weighted average).
        base_is_input: in a recipe the base model is one of the merged inputs (mergekit's ``linear`` and
            ``slerp``), not only the origin of the shifts.
        recipe_defaults: mergekit's default of a parameter where it differs from ``fn``'s default
            (``ties``: ``density`` 1.0, no trim; ``sk.merge`` keeps the paper's 0.2).
        recipe_required: recipe keys mergekit requires (``"weight"``, ``"t"``): missing is an error.
        recipe_ignored: recipe parameters mergekit accepts without effect for this method.
        per_input: parameters that may take one value per input (``fn`` then gets a list, in input order):
            TIES's and DARE's ``density``, breadcrumbs' ``gamma``; a recipe may set them per model, and a
            gradient or filter may make them differ. Every other parameter is one value per tensor.
        min_inputs: the fewest shifts the method merges (2 for ``slerp`` and ``model_stock``).
        max_inputs: the most (2 for ``slerp``), or ``None``.
        weighting: how the per-shift weights act: ``"normalized"`` (only their ratios matter: scaling them
            all changes nothing), ``"linear"`` (the result scales with them) or ``"none"`` (the method has
            no weights; anything but 1 is an error).
        lossless: parameter values under which the method keeps every entry (no trim, drop or clamp): one
            shift merged alone with weight 1, or copies of it, give it back. Used by the conformance tests.
        drops_entries: even at ``lossless`` settings the method zeroes some entries (PCB's min–max
            normalisation zeroes each task's least-balanced one): merging one shift then gives it back
            where it keeps an entry and 0 elsewhere.
    """

    name: str
    fn: MergeFn
    multipass: Callable[..., Any] | None = None
    kernel: Callable[[Mapping[str, Any]], Any] | None = None
    min_inputs: int = 1
    max_inputs: int | None = None
    weighting: str = "linear"
    lossless: Mapping[str, Any] = field(default_factory=dict)
    drops_entries: bool = False
    needs_base: bool = True
    base_is_input: bool = False
    recipe_defaults: Mapping[str, Any] = field(default_factory=dict)
    recipe_required: tuple[str, ...] = ()
    recipe_ignored: tuple[str, ...] = ()
    per_input: tuple[str, ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        """The function's parameters (beyond tensors and weights) and their defaults (``inspect.Parameter
        .empty`` when there is none)."""
        sig = inspect.signature(self.fn).parameters
        return {n: p.default for n, p in sig.items() if n not in ("tensors", "weights")}

    @property
    def takes_base(self) -> bool:
        """Whether ``fn`` accepts the base tensors θ0 (``base=``: weight-space slerp and linear)."""
        return "base" in self.params

    def recipe_default(self, name: str) -> Any:
        """The value a recipe that omits parameter ``name`` gets (mergekit's default, else ``fn``'s)."""
        return self.recipe_defaults.get(name, self.params.get(name, inspect.Parameter.empty))


MERGE_METHODS: Registry[MergeSpec] = Registry("merge method", package="shiftkit.merging")


def register_merge_method(
    name: str,
    *,
    needs_base: bool = True,
    base_is_input: bool = False,
    recipe_defaults: Mapping[str, Any] | None = None,
    recipe_required: tuple[str, ...] = (),
    recipe_ignored: tuple[str, ...] = (),
    kernel: Callable[[Mapping[str, Any]], Any] | None = None,
    min_inputs: int = 1,
    max_inputs: int | None = None,
    weighting: str = "linear",
    lossless: Mapping[str, Any] | None = None,
    drops_entries: bool = False,
    per_input: tuple[str, ...] = (),
) -> Callable[[MergeFn], MergeFn]:
    """Decorator registering a merge function under ``name`` (from any module, yours included).

    Example:
        >>> @sk.register_merge_method("first")
        ... def first(tensors, weights): return dict(tensors[0])
        >>> sk.merge([a, b], method="first")
    """

    if weighting not in WEIGHTINGS:
        raise ShiftkitError(
            f"merge method {name!r}: weighting must be one of {WEIGHTINGS}, got {weighting!r}"
        )

    def deco(fn: MergeFn) -> MergeFn:
        MERGE_METHODS.add(
            name,
            MergeSpec(
                name=name,
                fn=fn,
                needs_base=needs_base,
                base_is_input=base_is_input,
                recipe_defaults=dict(recipe_defaults or {}),
                recipe_required=tuple(recipe_required),
                recipe_ignored=tuple(recipe_ignored),
                kernel=kernel,
                min_inputs=min_inputs,
                max_inputs=max_inputs,
                weighting=weighting,
                lossless=dict(lossless or {}),
                drops_entries=drops_entries,
                per_input=tuple(per_input),
            ),
        )
        return fn

    return deco


#: the name the merge functions have registered under so far
register_merge = register_merge_method


def set_multipass(name: str, factory: Callable[..., Any]) -> None:
    """Attach a multi-pass factory to the registered method ``name`` (see :mod:`~.stream.multipass`)."""
    MERGE_METHODS.update(name, replace(MERGE_METHODS.get(name), multipass=factory))


def get_merge_method(name: str) -> MergeSpec:
    """The :class:`MergeSpec` registered as ``name`` (``UnknownMethodError`` listing the known names)."""
    return MERGE_METHODS.get(name)


def list_merge_methods() -> list[str]:
    """Names of the registered merge methods, sorted.

    Example:
        >>> sk.list_merge_methods()
        ['arcee_fusion', 'atlas', 'breadcrumbs', 'breadcrumbs_ties', 'dare_linear', 'dare_ties', 'della',
         'della_linear', 'karcher', 'linear', 'model_stock', 'multislerp', 'nearswap', 'nuslerp',
         'passthrough', 'pcb', 'ram', 'ramplus_tl', 'sce', 'slerp', 'task_arithmetic', 'ties']
    """
    return MERGE_METHODS.names()
