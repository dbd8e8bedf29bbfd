"""The hook interface of training loops: what a loop calls so that a regulariser, an importance estimate or a
continual-learning strategy can take part in its steps without owning the loop.

:func:`shiftkit.recipes.learn.train` calls them; Light-PEFT's estimation
(:mod:`shiftkit.recipes.light_peft`) and the continual strategies (:mod:`shiftkit.continual`) implement
them. It lives below every verb so that those packages can subclass it without importing the recipes.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

__all__ = ["TrainHooks"]


class TrainHooks:
    """Extension points of a training step; subclass and override what you need (each default does nothing).

    The order within one step: :meth:`on_batch` (the batch's model inputs, labels removed), the forward,
    :meth:`extra_loss` (given the forward's output), the backward, :meth:`after_backward` (gradients
    present), gradient clipping and the optimiser step, :meth:`after_step`.
    """

    def on_batch(self, inputs: Mapping[str, Tensor]) -> None:
        """Called with the model inputs of each batch before the forward."""

    def extra_loss(self, logits: Tensor) -> Tensor | float:
        """A term added to the step's loss, given the model's output on the batch (``0.0`` by default)."""
        return 0.0

    def after_backward(self) -> None:
        """Called after the backward, while the gradients are there (before clipping and the step)."""

    def after_step(self) -> None:
        """Called after the optimiser step."""
