"""``alpha_bn``: BatchNorm with a mix of the source and the test batch's statistics (BN-α, α-BN).

Every BatchNorm layer normalises with

    μ = (1 − a)·μ_src + a·μ_B,    σ² = (1 − a)·σ²_src + a·σ²_B,

where ``μ_B`` and the biased ``σ²_B`` are the current batch's per-channel statistics and **``a =
target_weight`` is the weight of the test statistics**: ``a = 0`` is the source model, ``a = 1`` is
``norm`` (BN-1). No gradients, nothing accumulates between batches.

Direction of the weight (the references disagree): robusta's ``AlphaBatchNorm`` and mariodoebler's
``BN.ALPHA`` weight the *test* statistics (default 0.1), which is what ``target_weight`` means here; the
α-BN paper's α is read by us as the weight of the *source* statistics, i.e. ``target_weight = 1 − α``
(we could not check the paper's PDF, hence the explicit name). TTAB's ``bn_adapt`` prior N/(N+n) on the
source statistics (Schneider et al.) is ``target_weight = n / (N + n)`` for batch size n.

Default ``target_weight=0.1`` (the robusta/mariodoebler default, used there down to batch size 1). A batch
of one sample never uses more than :data:`~shiftkit.adapt.norm_stats.SINGLE_SAMPLE_TARGET_WEIGHT` (0.1).

References: You, Li & Zhao, "Test-time Batch Statistics Calibration for Covariate Shift",
https://arxiv.org/abs/2110.04065; Schneider et al., NeurIPS 2020, https://arxiv.org/abs/2006.16971.
"""

from __future__ import annotations

from torch import nn

from shiftkit.adapt.base import TTAMethod
from shiftkit.adapt.norm_stats import SINGLE_SAMPLE_TARGET_WEIGHT, batch_norms, mix_batch_statistics
from shiftkit.adapt.registry import register_method

__all__ = ["AlphaBN"]


@register_method("alpha_bn", adapts="norm_statistics", needs_grad=False, norms=("batch",))
class AlphaBN(TTAMethod):
    """Normalise every BatchNorm layer with a weighted mix of the source and the test batch statistics.

    Args:
        model: a model with BatchNorm1d/2d/3d layers (modified in place: eval mode, mixed statistics).
        target_weight: weight of the test batch's statistics in ``[0, 1]`` (0 = source, 1 = ``norm``).
        episodic: accepted for a uniform interface; nothing accumulates between batches.
        steps: accepted for a uniform interface; unused.

    Raises:
        ShiftkitError: the model has no BatchNorm layer, or ``target_weight`` is outside ``[0, 1]``.

    Example:
        >>> tta = adapt.make("alpha_bn", model, target_weight=0.1)
        >>> logits = tta(x)   # (N, K); BN uses 0.9·source + 0.1·batch statistics
        >>> tta.reset()
    """

    def __init__(
        self, model: nn.Module, *, target_weight: float = 0.1, episodic: bool = False, steps: int = 1
    ) -> None:
        self.target_weight = target_weight
        super().__init__(model, episodic=episodic, steps=steps)

    def configure_model(self) -> None:
        """Eval mode, no gradients, BatchNorm layers on mixed statistics."""
        super().configure_model()
        self._handles = mix_batch_statistics(
            batch_norms(self.model, self.name),
            self.target_weight,
            single_sample_weight=SINGLE_SAMPLE_TARGET_WEIGHT,
        )

    def extra_repr(self) -> str:
        return f"target_weight={self.target_weight}, " + super().extra_repr()
