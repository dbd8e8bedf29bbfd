"""Streaming plans: how a merge method whose output depends on whole-model statistics runs tensor by tensor.

Most merge methods are *tensor-local*: the merged tensor ``k`` depends only on the inputs'
tensors ``k`` (task arithmetic, mergekit/peft TIES, DARE, SLERP, soups). The streaming merge
(``shiftkit merge recipe.yaml OUT``) calls the registered merge function once per tensor for them.

A *global* method (original-paper TIES trimming over the whole model, PCB's per-task quantiles and
min–max) needs statistics over every tensor first. It registers a multi-pass factory with
:func:`register_multipass` (stored in its :class:`~shiftkit.merging.registry.MergeSpec` as ``multipass``); the
factory returns a :class:`MultiPass` (or ``None`` when the given parameters make the method tensor-local, e.g.
``ties`` with ``semantics="mergekit"``). The streaming engine then

1. for ``p`` in ``range(passes.n_passes)``: calls ``passes.observe(p, key, tensors, weights)`` for every key
   (sorted order, the flatten order of the TIES/PCB/ComPEFT reference code), then ``passes.end_pass(p)``;
2. calls ``passes.apply(key, tensors, weights)`` for every key and writes the result.

``tensors`` are the T inputs' float32 shifts for that key (aligned, finite, same shape). It keeps only
O(T) scalars or small histograms between passes, never a ``T × d`` matrix, so peak memory stays at a few
tensors whatever the model size. The in-memory :func:`shiftkit.merging.in_memory.merge` may instead run the
materialised reference math; tests check that both agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from shiftkit.merging.registry import set_multipass

__all__ = ["MultiPass", "MultiPassFactory", "register_multipass", "run_multipass_in_memory"]


class MultiPass(Protocol):
    """A multi-pass streaming computation of one merge (see the module docstring)."""

    #: number of statistics passes before :meth:`apply`
    n_passes: int

    def observe(self, pass_index: int, key: str, tensors: list[Tensor], weights: list[float]) -> None:
        """Accumulate statistics of pass ``pass_index`` from the T float32 shifts of tensor ``key``."""

    def end_pass(self, pass_index: int) -> None:
        """Finish pass ``pass_index`` (e.g. turn a histogram into a threshold)."""

    def apply(self, key: str, tensors: list[Tensor], weights: list[float]) -> Tensor:
        """Return the merged float32 tensor ``key`` (the inputs' shape) given the collected statistics."""


#: ``factory(weights: list[float], **params) -> MultiPass | None`` (None: tensor-local for these params)
MultiPassFactory = Callable[..., "MultiPass | None"]


def register_multipass(name: str) -> Callable[[MultiPassFactory], MultiPassFactory]:
    """Decorator registering the multi-pass factory of the (already registered) merge method ``name``.

    Example:
        >>> @register_multipass("ties")
        ... def ties_multipass(weights, *, semantics="mergekit", **params):
        ...     return TiesPaperPasses(...) if semantics == "paper" else None
    """

    def deco(factory: MultiPassFactory) -> MultiPassFactory:
        set_multipass(name, factory)
        return factory

    return deco


def run_multipass_in_memory(
    passes: MultiPass, tensors: list[dict[str, Tensor]], weights: list[float]
) -> dict[str, Tensor]:
    """Run ``passes`` over in-memory aligned shifts exactly as the streaming engine does (used by tests).

    Args:
        passes: the multi-pass computation to run.
        tensors: T aligned float32 tensor dicts.
        weights: T weights.

    Returns:
        The merged tensors, keyed like the inputs.

    Example:
        >>> passes = get_merge_method("pcb").multipass([1.0, 1.0], ratio=0.1)
        >>> merged = run_multipass_in_memory(passes, [tv1.tensors, tv2.tensors], [1.0, 1.0])
        >>> torch.equal(merged["w"], sk.merge([tv1, tv2], method="pcb", ratio=0.1).tensors["w"])
    """
    keys = sorted(tensors[0])
    for p in range(passes.n_passes):
        for k in keys:
            passes.observe(p, k, [t[k] for t in tensors], weights)
        passes.end_pass(p)
    return {k: passes.apply(k, [t[k] for t in tensors], weights) for k in keys}
