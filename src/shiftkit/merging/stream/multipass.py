"""Streaming plans: how a merge method whose output depends on whole-model statistics runs tensor by tensor.

Most merge methods are *tensor-local* (spec §0.5): the merged tensor ``k`` depends only on the inputs'
tensors ``k`` (task arithmetic, mergekit/peft TIES, DARE, SLERP, soups). The streaming merge
(``shiftkit merge recipe.yaml OUT``) calls the registered merge function once per tensor for them.

A *global* method (original-paper TIES trimming over the whole model, PCB's per-task quantiles and
min–max) needs statistics over every tensor first. It registers a plan factory with :func:`register_plan`
(stored in its :class:`~shiftkit.merging.registry.MergeSpec` as ``plan``);
the factory returns a :class:`StreamPlan` (or ``None`` when the given parameters make the method
tensor-local, e.g. ``ties`` with ``semantics="mergekit"``). The streaming engine then

1. for ``p`` in ``range(plan.n_passes)``: calls ``plan.observe(p, key, tensors, weights)`` for every key
   (sorted order, the flatten order of the reference code, spec §0.1), then ``plan.end_pass(p)``;
2. calls ``plan.apply(key, tensors, weights)`` for every key and writes the result.

``tensors`` are the T inputs' float32 shifts for that key (aligned, finite, same shape). A plan keeps only
O(T) scalars or small histograms between passes, never a ``T × d`` matrix, so peak memory stays at a few
tensors whatever the model size. The in-memory :func:`shiftkit.merging.in_memory.merge` may instead run the
materialised reference math; tests check that both agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from shiftkit.merging.registry import set_plan

__all__ = ["PlanFactory", "StreamPlan", "register_plan", "run_plan_in_memory"]


class StreamPlan(Protocol):
    """A multi-pass streaming computation of one merge (see the module docstring)."""

    #: number of statistics passes before :meth:`apply`
    n_passes: int

    def observe(self, pass_index: int, key: str, tensors: list[Tensor], weights: list[float]) -> None:
        """Accumulate statistics of pass ``pass_index`` from the T float32 shifts of tensor ``key``."""

    def end_pass(self, pass_index: int) -> None:
        """Finish pass ``pass_index`` (e.g. turn a histogram into a threshold)."""

    def apply(self, key: str, tensors: list[Tensor], weights: list[float]) -> Tensor:
        """Return the merged float32 tensor ``key`` (the inputs' shape) given the collected statistics."""


#: ``factory(weights: list[float], **params) -> StreamPlan | None`` (None: tensor-local for these params)
PlanFactory = Callable[..., "StreamPlan | None"]


def register_plan(name: str) -> Callable[[PlanFactory], PlanFactory]:
    """Decorator registering the streaming-plan factory of the (already registered) merge method ``name``.

    Example:
        >>> @register_plan("ties")
        ... def ties_plan(weights, *, semantics="mergekit", **params):
        ...     return TiesPaperPlan(...) if semantics == "paper" else None
    """

    def deco(factory: PlanFactory) -> PlanFactory:
        set_plan(name, factory)
        return factory

    return deco


def run_plan_in_memory(
    plan: StreamPlan, tensors: list[dict[str, Tensor]], weights: list[float]
) -> dict[str, Tensor]:
    """Run ``plan`` over in-memory aligned shifts exactly as the streaming engine does (used by tests).

    Args:
        plan: the plan to run.
        tensors: T aligned float32 tensor dicts.
        weights: T weights.

    Returns:
        The merged tensors, keyed like the inputs.

    Example:
        >>> plan = get_merge_method("pcb").plan([1.0, 1.0], ratio=0.1)
        >>> merged = run_plan_in_memory(plan, [tv1.tensors, tv2.tensors], [1.0, 1.0])
        >>> torch.equal(merged["w"], sk.merge([tv1, tv2], method="pcb", ratio=0.1).tensors["w"])
    """
    keys = sorted(tensors[0])
    for p in range(plan.n_passes):
        for k in keys:
            plan.observe(p, k, [t[k] for t in tensors], weights)
        plan.end_pass(p)
    return {k: plan.apply(k, [t[k] for t in tensors], weights) for k in keys}
