"""shiftkit.merging: combine shifts into one, or route between them.

* ``sk.merge(shifts, method=..., weights=..., **params)`` (:mod:`~shiftkit.merging.in_memory`): one file per
  method, each registering a :class:`~shiftkit.merging.registry.MergeSpec` — ``linear`` (soups),
  ``task_arithmetic``, ``ties`` (mergekit / paper / peft semantics), ``dare_linear``, ``dare_ties``,
  ``della``, ``della_linear``, ``sce``, ``slerp``, ``breadcrumbs``, ``breadcrumbs_ties``, ``model_stock``,
  ``pcb``, ``atlas``, ``passthrough``,
  ``arcee_fusion``, ``nearswap``, ``ram``, ``ramplus_tl``, ``nuslerp``, ``multislerp``, ``karcher``;
  ``sk.list_merge_methods()`` lists them and ``sk.register_merge_method`` adds one (from any module).
  Shifts that define their changes alone (LoRA) merge exactly in ΔW space; ``sk.merge_lora`` returns a
  LoRA again (:mod:`~shiftkit.merging.lowrank`).
* ``sk.learn_atlas``: learned block-wise coefficients (:mod:`~shiftkit.merging.atlas`).
* ``sk.merge_recipe`` / ``shiftkit merge``: streaming checkpoint merges (:mod:`~shiftkit.merging.stream`).
* ``sk.ShiftPool`` and per-sample routers (:mod:`~shiftkit.merging.routing`).

Importing any module of this package first runs this file, which registers every built-in method.
"""

from __future__ import annotations

# one import per built-in method: importing the module registers it
from shiftkit.merging import (  # noqa: F401
    arcee_fusion,
    atlas,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    pcb,
    ram,
    ramplus_tl,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from shiftkit.merging.atlas import AtlasResult, learn_atlas
from shiftkit.merging.in_memory import merge
from shiftkit.merging.lowrank import LoraMergeResult, lora_to_delta, merge_lora
from shiftkit.merging.registry import (
    MERGE_METHODS,
    MergeSpec,
    get_merge_method,
    list_merge_methods,
    register_merge,
    register_merge_method,
)
from shiftkit.merging.routing import (
    ConstantRouter,
    KeyQueryRouter,
    LearnedRouter,
    Router,
    ShiftPool,
    attach_router_,
    compute_queries,
    detach_router_,
    extract_pool,
    fedins_key_loss,
    hf_mean_pool_query,
    routing_weights,
    train_router,
)
from shiftkit.merging.stream import MergeSummary, merge_recipe

__all__ = [
    "MERGE_METHODS",
    "AtlasResult",
    "ConstantRouter",
    "KeyQueryRouter",
    "LearnedRouter",
    "LoraMergeResult",
    "MergeSpec",
    "MergeSummary",
    "Router",
    "ShiftPool",
    "attach_router_",
    "compute_queries",
    "detach_router_",
    "extract_pool",
    "fedins_key_loss",
    "get_merge_method",
    "hf_mean_pool_query",
    "learn_atlas",
    "list_merge_methods",
    "lora_to_delta",
    "merge",
    "merge_lora",
    "merge_recipe",
    "register_merge",
    "register_merge_method",
    "routing_weights",
    "train_router",
]
