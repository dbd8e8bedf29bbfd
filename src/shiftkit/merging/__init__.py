"""shiftkit.merging: combine dense shifts (task vectors) into one (see DESIGN.md section 2).

``sk.merge(shifts, method=..., weights=..., **params)`` with methods ``linear`` (soups),
``task_arithmetic``, ``ties`` (mergekit / paper / peft semantics), ``dare_linear``, ``dare_ties`` and
``slerp``; ``sk.list_merge_methods()`` lists them and ``register_merge`` adds more.
"""

from __future__ import annotations

from shiftkit.merging import dare, linear, slerp, task_arithmetic, ties  # noqa: F401  (register methods)
from shiftkit.merging.api import merge
from shiftkit.merging.registry import MERGE_METHODS, list_merge_methods, register_merge

__all__ = ["MERGE_METHODS", "list_merge_methods", "merge", "register_merge"]
