"""shiftkit.merging: combine shifts into one, or route between them (see DESIGN.md section 2).

* ``sk.merge(shifts, method=..., weights=..., **params)``: one file per method — ``linear`` (soups),
  ``task_arithmetic``, ``ties`` (mergekit / paper / peft semantics), ``dare_linear``, ``dare_ties``,
  ``slerp``, ``breadcrumbs``, ``breadcrumbs_ties``, ``model_stock``, ``pcb``, ``atlas``;
  ``sk.list_merge_methods()`` lists them and ``register_merge`` adds more. LoRA shifts merge exactly in
  ΔW space; ``sk.merge_lora`` returns a LoRA again (:mod:`~shiftkit.merging.lowrank`).
* ``sk.learn_atlas``: learned block-wise coefficients (:mod:`~shiftkit.merging.atlas`).
* ``sk.merge_recipe`` / ``shiftkit merge``: streaming checkpoint merges (:mod:`~shiftkit.merging.streaming`).
* ``sk.ShiftPool`` and per-sample routers (:mod:`~shiftkit.merging.routing`).
"""

from __future__ import annotations

from shiftkit.merging import atlas, breadcrumbs, dare, linear, model_stock, pcb, slerp, task_arithmetic, ties  # noqa: F401  (register methods)
from shiftkit.merging.api import merge
from shiftkit.merging.lowrank import LoraMergeResult, lora_to_delta, merge_lora
from shiftkit.merging.pool import ShiftPool
from shiftkit.merging.queries import hf_mean_pool_query
from shiftkit.merging.registry import MERGE_METHODS, list_merge_methods, register_merge
from shiftkit.merging.routers import (
    ConstantRouter,
    KeyQueryRouter,
    LearnedRouter,
    Router,
    fedins_key_loss,
)
from shiftkit.merging.routing import (
    attach_router_,
    compute_queries,
    detach_router_,
    extract_pool,
    routing_weights,
    train_router,
)
from shiftkit.merging.streaming import MergeSummary, merge_recipe

__all__ = [
    "MERGE_METHODS",
    "ConstantRouter",
    "KeyQueryRouter",
    "LearnedRouter",
    "LoraMergeResult",
    "MergeSummary",
    "Router",
    "ShiftPool",
    "attach_router_",
    "compute_queries",
    "detach_router_",
    "extract_pool",
    "fedins_key_loss",
    "hf_mean_pool_query",
    "list_merge_methods",
    "lora_to_delta",
    "merge",
    "merge_lora",
    "merge_recipe",
    "register_merge",
    "routing_weights",
    "train_router",
]
