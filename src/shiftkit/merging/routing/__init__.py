"""Shift pools and per-input routing: :class:`~shiftkit.merging.routing.pool.ShiftPool` (named shifts over one
base), routers (:mod:`~shiftkit.merging.routing.routers`: FedIns key-query, PSEC learned), the routed modules
that mix members per sample (:mod:`~shiftkit.merging.routing.routed_modules`) and ``attach_router_`` /
``detach_router_`` / ``train_router`` (:mod:`~shiftkit.merging.routing.attach`)."""

from __future__ import annotations

from shiftkit.merging.routing.attach import (
    attach_router_,
    compute_queries,
    detach_router_,
    extract_pool,
    routing_weights,
    train_router,
)
from shiftkit.merging.routing.pool import ShiftPool
from shiftkit.merging.routing.queries import hf_mean_pool_query
from shiftkit.merging.routing.routers import (
    ConstantRouter,
    KeyQueryRouter,
    LearnedRouter,
    Router,
    fedins_key_loss,
)

__all__ = [
    "ConstantRouter",
    "KeyQueryRouter",
    "LearnedRouter",
    "Router",
    "ShiftPool",
    "attach_router_",
    "compute_queries",
    "detach_router_",
    "extract_pool",
    "fedins_key_loss",
    "hf_mean_pool_query",
    "routing_weights",
    "train_router",
]
