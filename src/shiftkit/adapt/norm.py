"""``norm``: test-time BatchNorm statistics (BN-1 / AdaBN / "norm" in the TENT code).

Every BatchNorm layer normalises with the current test batch's statistics instead of the source running
ones: ``y = γ (x − μ_B) / sqrt(σ²_B + ε) + β`` with ``μ_B`` and the biased ``σ²_B`` computed per channel
over the batch (and spatial) dimensions. No gradients; γ, β and the running buffers are unchanged.

Choices (reference: tent ``norm.py``): the rest of the model stays in eval mode (dropout off, like
mariodoebler ``BNTest``); running buffers are not updated (they are unused, and untouched buffers make
``reset`` trivial); a channel with a single value in the batch (batch size 1, no spatial extent) falls back to
the source statistics instead of raising or producing NaN. LayerNorm/GroupNorm already normalise per sample,
so ``norm`` needs BatchNorm layers and raises :class:`~shiftkit.errors.ShiftkitError` without.

References: Schneider et al., NeurIPS 2020, https://arxiv.org/abs/2006.16971; Li et al. (AdaBN),
https://arxiv.org/abs/1603.04779.
"""

from __future__ import annotations

from torch import nn

from shiftkit.adapt.base import TTAMethod
from shiftkit.adapt.norm_stats import batch_norms, use_batch_statistics
from shiftkit.adapt.registry import register_method

__all__ = ["Norm"]


@register_method("norm", adapts="norm_statistics", needs_grad=False, norms=("batch",))
class Norm(TTAMethod):
    """Normalise every BatchNorm layer with the test batch's statistics.

    Args:
        model: a model with BatchNorm1d/2d/3d layers (modified in place: eval mode, BN batch statistics).
        episodic: accepted for a uniform interface; nothing accumulates between batches.
        steps: accepted for a uniform interface; unused.

    Raises:
        ShiftkitError: the model has no BatchNorm layer.

    Example:
        >>> tta = adapt.make("norm", model)
        >>> logits = tta(x)   # (N, K), BN layers use x's mean and variance
        >>> tta.reset()       # no-op (nothing is updated)
    """

    def __init__(self, model: nn.Module, *, episodic: bool = False, steps: int = 1) -> None:
        super().__init__(model, episodic=episodic, steps=steps)

    def configure_model(self) -> None:
        """Eval mode, no gradients, BatchNorm layers on batch statistics."""
        super().configure_model()
        self._handles = use_batch_statistics(batch_norms(self.model, self.name))
