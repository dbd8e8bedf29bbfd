"""``eata``: efficient anti-forgetting test-time adaptation (ETA when no Fisher data is given).

As TENT, the affine (γ, β) of every BatchNorm/LayerNorm/GroupNorm layer are adapted, BatchNorm uses the
test batch's statistics and the model stays in ``eval()``. Per batch, with per-sample entropies
``E_i = H(softmax(f(x_i)))`` and ``p_i = softmax(f(x_i))``:

* reliable: ``E_i < E0`` (``E0 = e_margin``, default ``0.4·ln C`` with ``C`` the number of outputs);
* non-redundant: ``|cos(p_i, m)| < d_margin`` where ``m`` is the moving mean probability vector;
* kept = reliable ∩ non-redundant, weights ``w_i = exp(−(E_i − E0))`` (constants, no gradient);
* ``L = (1/|kept|) Σ_kept w_i·E_i + β·Σ_k F_k (θ_k − θ⁰_k)²``, one optimizer step (none if nothing kept);
* ``m ← 0.9·m + 0.1·mean_kept(p_i)``.

Choices, checked against the EATA reference (mr-eggplant/EATA ``eata.py``/``main.py``) and mariodoebler
``methods/eata.py``: the cosine is computed for the *reliable* samples against ``m``; while ``m`` is undefined
the redundancy filter is skipped and ``m`` is initialised with the mean probability of the first batch's
kept (= reliable) samples; ``m`` moves only when a sample is kept, and is updated from the pre-update
probabilities whether or not a step is taken; ``m`` is method state cleared by :meth:`reset`. The counters
``num_reliable`` / ``num_updated`` (samples passing the first / both filters) are cumulative reporting
counters that :meth:`reset` does not clear (episodic mode resets before every batch). The Fisher ``F`` is
computed once at construction, under the test-time configuration (BatchNorm on batch statistics), as the
average over the ``fisher_data`` batches of the *squared batch gradient* of the cross-entropy with the
model's own argmax pseudo-labels, and ``θ⁰`` is the source value of the adapted parameters — exactly what
both references do (note: this is not the per-sample empirical Fisher). Without
``fisher_data`` the method is ETA (``fisher_alpha`` unused).

Defaults are the CIFAR configuration of mariodoebler: ``d_margin = 0.4``, ``fisher_alpha = 1`` (ImageNet:
``d_margin=0.05``, ``fisher_alpha=2000`` with 2000 source images); optimizer Adam with lr 1e-3 as our
``tent`` (``optimizer="sgd"``, ``lr=2.5e-4`` is the ImageNet reference).

Reference: Niu et al., "Efficient Test-Time Model Adaptation without Forgetting", ICML 2022,
https://arxiv.org/abs/2204.02610.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from shiftkit.adapt.base import NormAffineMethod, check_positive, default_entropy_margin, softmax_entropy
from shiftkit.adapt.registry import register_method
from shiftkit.errors import ShiftkitError

__all__ = ["EATA"]

#: Momentum of the moving mean probability vector ``m`` (0.9 in both references).
PROB_MOMENTUM = 0.9


def _first_tensor(batch: object) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]  # a (x, y, ...) batch from a labelled loader: the labels are not used
    raise ShiftkitError(
        f"adapt method 'eata': fisher_data must yield input tensors (or (x, ...) tuples), got "
        f"{type(batch).__name__}"
    )


@register_method(
    "eata",
    adapts="norm_affine",
    needs_grad=True,
    norms=("batch", "layer", "group"),
    source_data="fisher_data",
)
class EATA(NormAffineMethod):
    """Entropy minimisation on reliable, non-redundant samples with an optional Fisher anti-forgetting term.

    Args:
        model: a model mapping a batch to ``(N, C)`` logits, with affine BatchNorm/LayerNorm/GroupNorm
            layers (modified in place).
        episodic: reset before every batch.
        steps: optimizer steps per batch.
        lr: learning rate (1e-3 with Adam, as our ``tent``; the ImageNet reference is SGD 2.5e-4).
        optimizer: ``"adam"`` (β = (0.9, 0.999)) or ``"sgd"`` (momentum 0.9, Nesterov), as ``tent``.
        e_margin: entropy margin ``E0`` in nats; ``None`` = ``0.4·ln C`` (both references), ``C`` read
            from the first batch's outputs.
        d_margin: redundancy threshold ε on ``|cos(p_i, m)|`` (0.4, the CIFAR configuration; the ImageNet
            reference uses 0.05).
        fisher_data: unlabeled source batches (tensors, or tuples whose first item is the input) used once,
            at construction, to estimate the Fisher ``F``; ``None`` gives ETA (no anti-forgetting term).
        fisher_alpha: β, the weight of ``Σ F (θ − θ⁰)²`` (1.0, CIFAR configuration; ImageNet uses 2000).
        collapse_entropy: collapse guard threshold in nats (``None`` = off), see
            :class:`~shiftkit.adapt.base.TTAMethod`.

    Attributes:
        num_reliable: samples that passed the entropy filter (cumulative, not cleared by ``reset``).
        num_updated: samples that passed both filters and were used in an update (cumulative).
        moving_probs: ``m``, the ``(C,)`` moving mean probability vector (``None`` until the first kept
            sample and after ``reset``).

    Raises:
        ShiftkitError: no affine normalisation layer, bad ``lr`` / margins / ``fisher_alpha`` /
            ``fisher_data``, outputs that are not ``(N, C)``.

    Example:
        >>> tta = adapt.make("eata", model, fisher_data=source_batches, fisher_alpha=1.0)
        >>> logits = tta(x)       # (N, C) pre-update outputs; γ, β updated on the kept samples
        >>> tta.num_reliable, tta.num_updated
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        episodic: bool = False,
        steps: int = 1,
        lr: float = 1e-3,
        optimizer: str = "adam",
        e_margin: float | None = None,
        d_margin: float = 0.4,
        fisher_data: Iterable[Tensor | Sequence[Tensor]] | None = None,
        fisher_alpha: float = 1.0,
        collapse_entropy: float | None = None,
    ) -> None:
        self.set_optimizer_options(lr, optimizer)
        self.e_margin = None if e_margin is None else check_positive("eata", "e_margin", e_margin)
        self.d_margin = check_positive("eata", "d_margin", d_margin)
        if (
            isinstance(fisher_alpha, bool)
            or not isinstance(fisher_alpha, int | float)
            or not math.isfinite(fisher_alpha)
            or fisher_alpha < 0
        ):
            raise ShiftkitError(
                f"adapt method 'eata': fisher_alpha must be a finite number >= 0, got {fisher_alpha!r}"
            )
        self.fisher_alpha = float(fisher_alpha)
        self.num_reliable = 0
        self.num_updated = 0
        self.moving_probs: Tensor | None = None
        super().__init__(model, episodic=episodic, steps=steps, collapse_entropy=collapse_entropy)
        self.fisher: list[Tensor] | None = None
        if fisher_data is not None:
            self.fisher = self._estimate_fisher(fisher_data)

    # --- TTAMethod hooks --------------------------------------------------------------------------
    def reset_state(self) -> None:
        """Forget the moving mean probability vector ``m`` (the counters are kept)."""
        self.moving_probs = None

    # --- EATA -------------------------------------------------------------------------------------
    def _estimate_fisher(self, batches: Iterable[Tensor | Sequence[Tensor]]) -> list[Tensor]:
        """``F_k = (1/B) Σ_b (∂ CE(f(x_b), argmax f(x_b)) / ∂θ_k)²`` over the ``B`` source batches."""
        sums = [torch.zeros_like(p) for p in self._params]
        count = 0
        with torch.enable_grad():
            for batch in batches:
                outputs = self.model(_first_tensor(batch))
                loss = F.cross_entropy(outputs, outputs.detach().argmax(-1))
                grads = torch.autograd.grad(loss, self._params, allow_unused=True)
                for s, g in zip(sums, grads, strict=True):
                    if g is not None:  # a parameter the loss does not reach has zero Fisher
                        s.add_(g.detach() ** 2)
                count += 1
        if count == 0:
            raise ShiftkitError("adapt method 'eata': fisher_data yielded no batch")
        return [s / count for s in sums]

    def entropy_margin(self, num_classes: int) -> float:
        """``E0``: ``e_margin`` if given, else ``0.4·ln num_classes``.

        Example:
            >>> adapt.make("eata", model).entropy_margin(10)
            0.921...
        """
        return self.e_margin if self.e_margin is not None else default_entropy_margin(num_classes)

    def anti_forgetting_loss(self) -> Tensor:
        """``β·Σ_k F_k (θ_k − θ⁰_k)²`` (a zero scalar without Fisher data).

        Example:
            >>> tta = adapt.make("eata", model, fisher_data=batches, fisher_alpha=2000.0)
            >>> tta.anti_forgetting_loss()   # 0 before the first update
        """
        total = torch.zeros((), device=self._params[0].device)
        if self.fisher is None:
            return total
        for p, f, p0 in zip(self._params, self.fisher, self._param_snapshot, strict=True):  # θ⁰: the source
            total = total + (f * (p - p0) ** 2).sum()
        return self.fisher_alpha * total

    def select(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """Return the ``(N,)`` boolean masks of reliable and kept (reliable, non-redundant) samples.

        Uses the current ``moving_probs``; does not change any state.

        Example:
            >>> reliable, kept = tta.select(logits)   # logits (N, C)
            >>> bool((kept & ~reliable).any())
            False
        """
        entropy = softmax_entropy(outputs.detach())
        reliable = entropy < self.entropy_margin(outputs.shape[-1])
        if self.moving_probs is None:
            return reliable, reliable.clone()  # no m yet: the redundancy filter is skipped
        cos = F.cosine_similarity(outputs.detach().softmax(-1), self.moving_probs.unsqueeze(0), dim=-1)
        return reliable, reliable & (cos.abs() < self.d_margin)

    def _adapt(self, outputs: Tensor) -> None:
        if outputs.dim() != 2:
            raise ShiftkitError(f"adapt method 'eata' needs (N, C) outputs, got shape {tuple(outputs.shape)}")
        e0 = self.entropy_margin(outputs.shape[-1])
        reliable, kept = self.select(outputs)
        self.num_reliable += int(reliable.sum())
        n_kept = int(kept.sum())
        self.num_updated += n_kept
        if n_kept == 0:
            return  # nothing survives the filters: no step, m unchanged (both references)
        with torch.no_grad():
            mean_p = outputs[kept].softmax(-1).mean(0)
            m = self.moving_probs
            self.moving_probs = mean_p if m is None else PROB_MOMENTUM * m + (1.0 - PROB_MOMENTUM) * mean_p
        entropy = softmax_entropy(outputs[kept])
        weights = torch.exp(-(entropy.detach() - e0))  # w_i = 1 / exp(E_i − E0), a constant
        loss = (weights * entropy).mean() + self.anti_forgetting_loss()
        assert self.optimizer is not None
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def forward(self, x: Tensor) -> Tensor:
        """Predict on ``x`` and take ``steps`` EATA updates on it (predict-before-update).

        Args:
            x: one unlabeled batch, e.g. ``(N, C_in, H, W)`` images.

        Returns:
            ``(N, C)`` outputs of the forward pass made before the last update.

        Example:
            >>> for x in stream:
            ...     logits = tta(x)
            >>> tta.num_updated
        """
        if self.episodic:
            self.reset()
        outputs: Tensor | None = None
        with torch.enable_grad():
            for _ in range(self.steps):
                outputs = self.model(x)
                self._adapt(outputs)
        assert outputs is not None
        outputs = outputs.detach()
        self.guard_collapse(softmax_entropy(outputs).mean())
        return outputs

    def extra_repr(self) -> str:
        e0 = "0.4·ln C" if self.e_margin is None else f"{self.e_margin}"
        fisher = "none (ETA)" if self.fisher is None else f"{self.fisher_alpha}"
        return (
            f"{super().extra_repr()}, lr={self.lr}, e_margin={e0}, d_margin={self.d_margin}, fisher={fisher}"
        )
