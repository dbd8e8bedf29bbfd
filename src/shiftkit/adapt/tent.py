"""``tent``: test-time entropy minimisation over the normalisation layers' affine parameters.

For each batch, ``L = (1/N) Σ_i H(softmax(f(x_i)))`` with ``H(p) = −Σ_c p_c log p_c`` is minimised by
``steps`` optimizer steps on the affine weight and bias (γ, β) of every BatchNorm1d/2d/3d, LayerNorm and
GroupNorm layer (mariodoebler's extension of the BN2d-only reference); every other parameter is frozen.
BatchNorm layers normalise with the batch statistics (source running buffers are kept but unused).

Choices: the model is put in ``eval()`` with BatchNorm forced to batch statistics (mariodoebler's
test-time-adaptation collection), not ``train()`` (the TENT reference), so dropout / stochastic depth stay
off and outputs are deterministic. Defaults follow the CIFAR reference: Adam, lr 1e-3, β = (0.9, 0.999), no
weight decay; ``optimizer="sgd"`` gives the ImageNet setting (momentum 0.9, Nesterov, pass ``lr=2.5e-4``).

Step size: with Adam every γ and β moves by about ``lr`` per step whatever the size of its gradient (Adam
normalises it: the first step is ``lr·g/(|g| + 1e-8)``), so parameters on which the entropy barely depends
(``|g| < 1e-7`` for a fifth of EfficientNet-Lite0's BN parameters) move as far as the others. This is the
reference's behaviour too, not a bug; SGD (``optimizer="sgd"``) takes steps in proportion to the gradient,
and ``collapse_entropy`` resets a stream that drifts into confident collapse.
A BatchNorm channel with a single value in the batch falls back to the source statistics (no NaN).

Reference: Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021,
https://arxiv.org/abs/2006.10726.
"""

from __future__ import annotations

from torch import Tensor, nn

from shiftkit.adapt.base import NormAffineMethod, softmax_entropy
from shiftkit.adapt.registry import register_method

__all__ = ["Tent", "softmax_entropy"]  # softmax_entropy lives in base; re-exported here


@register_method("tent", adapts="norm_affine", needs_grad=True, norms=("batch", "layer", "group"))
class Tent(NormAffineMethod):
    """Adapt the normalisation layers' affine parameters by minimising the prediction entropy.

    Args:
        model: a model with affine BatchNorm/LayerNorm/GroupNorm layers (modified in place).
        episodic: reset before every batch.
        steps: optimizer steps per batch.
        lr: learning rate (1e-3, the CIFAR reference with Adam).
        optimizer: ``"adam"`` (β = (0.9, 0.999); every parameter moves by ≈ lr per step, whatever its
            gradient) or ``"sgd"`` (momentum 0.9, Nesterov; steps in proportion to the gradient).
        weight_decay: weight decay (0, as in the reference).
        collapse_entropy: reset when the average prediction entropy falls below this (nats); ``None`` = off
            (see :class:`~shiftkit.adapt.base.TTAMethod`).

    Raises:
        ShiftkitError: no affine normalisation layer, bad ``lr`` / ``steps`` / ``optimizer``.

    Example:
        >>> tta = adapt.make("tent", model, lr=1e-3)
        >>> logits = tta(x)     # (N, K) outputs before the update; γ, β updated on x
        >>> tta.reset()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        episodic: bool = False,
        steps: int = 1,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        collapse_entropy: float | None = None,
    ) -> None:
        self.set_optimizer_options(lr, optimizer, weight_decay)
        super().__init__(model, episodic=episodic, steps=steps, collapse_entropy=collapse_entropy)

    def loss(self, outputs: Tensor) -> Tensor:
        """Mean softmax entropy over the batch, ``(N, C) -> ()``."""
        return softmax_entropy(outputs).mean()
