"""Registry of merge methods: name → function combining aligned dense shifts.

A merge function receives the inputs' tensors already aligned (same keys, shapes; float32, finite) and the
per-shift weights, and returns the merged tensors: ``fn(tensors, weights, **params) -> dict[str, Tensor]``
with ``tensors[t][key]`` the t-th shift's tensor ``key``. See :func:`shiftkit.merging.api.merge`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from shiftkit.core.registry import Registry

__all__ = ["MERGE_METHODS", "MergeFn", "list_merge_methods", "register_merge"]

#: ``fn(tensors: list[dict[str, Tensor]], weights: list[float], **params) -> dict[str, Tensor]``
MergeFn = Callable[..., dict[str, Tensor]]

MERGE_METHODS: Registry[MergeFn] = Registry("merge method")


def register_merge(name: str) -> Callable[[MergeFn], MergeFn]:
    """Decorator registering a merge function under ``name``.

    Example:
        >>> @register_merge("first")
        ... def first(tensors, weights): return dict(tensors[0])
        >>> sk.merge([a, b], method="first")
    """

    def deco(fn: MergeFn) -> MergeFn:
        MERGE_METHODS.add(name, fn)
        return fn

    return deco


def list_merge_methods() -> list[str]:
    """Names of the registered merge methods, sorted.

    Example:
        >>> sk.list_merge_methods()
        ['atlas', 'breadcrumbs', 'breadcrumbs_ties', 'dare_linear', 'dare_ties', 'linear', 'model_stock',
         'pcb', 'slerp', 'task_arithmetic', 'ties']
    """
    import shiftkit.merging  # noqa: F401  (registers the built-in methods)

    return MERGE_METHODS.names()
