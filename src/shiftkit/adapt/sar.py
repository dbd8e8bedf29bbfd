"""``sar``: sharpness-aware and reliable entropy minimisation with model recovery.

The affine (γ, β) of the BatchNorm/LayerNorm/GroupNorm layers (minus those under ``exclude``) are adapted;
BatchNorm uses the test batch's statistics; the model stays in ``eval()``. One step on a batch ``x``:

1. ``E = H(softmax(f_θ(x)))`` per sample, reliable mask ``M1 = E < E0`` (``E0 = 0.4·ln C``),
   ``L1 = mean(E[M1])``, ``g = ∇_θ L1``;
2. SAM ascent ``ε = ρ·g / ‖g‖₂`` (one global norm over all adapted parameters), ``θ̃ = θ + ε``;
3. ``E′ = H(softmax(f_θ̃(x)))[M1]``, ``M2 = E′ < E0``, ``L2 = mean(E′[M2])``, ``g̃ = ∇_θ̃ L2``;
4. back to ``θ`` and a base-optimizer step (SGD, momentum 0.9) with ``g̃``;
5. model recovery: ``ema ← 0.9·ema + 0.1·L2`` (NaN skipped); if ``ema < e_m`` the model and optimizer are
   reset to the source state and ``ema`` is cleared.

Checked against the SAR reference (mr-eggplant/SAR ``sar.py``) and mariodoebler ``methods/sar.py``: the ema
uses the *second* loss ``L2`` (entropies at the perturbed point, restricted to ``M1`` then ``M2``); the
recovery check runs after the update; the returned outputs are those of the first forward;
``‖g‖`` gets ``+1e-12``; the base SGD has momentum 0.9, no Nesterov, no weight decay. Recovery is the
base-class collapse guard fed with ``L2``: ``collapse_entropy`` *is* SAR's ``e_m`` (default 0.2; ``None``
turns recovery off). Deviations: when ``M1`` (or ``M2``) is empty the reference still steps with a zero
gradient (which moves the parameters by the momentum alone); shiftkit skips the step, as EATA does when no
sample survives. The reference's ``reset`` after recovery does not clear its ema (a bug mariodoebler fixed);
ours clears it.

Excluded layers (``exclude``): the SAR reference code (``collect_params`` in mr-eggplant/SAR ``sar.py``) does
not adapt the top of the network, with name tests written for two families: ResNet's ``layer4``, and
ViT-Base's ``blocks.9``–``blocks.11`` plus its final ``norm``. shiftkit offers that rule per family:

* ``"auto"`` (default): ResNet (a module named ``layer4``) → its ``layer4`` is excluded; ViT (a
  ``blocks`` list of numbered blocks beside a final ``norm``) → ``blocks.9``–``11`` and ``norm`` are
  excluded, literally as the reference does (written for ViT-Base's 12 blocks); a model of another
  family (EfficientNet, ConvNeXt, your own) matches neither rule, and **every** affine norm layer is
  adapted. ``tta.excluded`` lists the norm layers left out and ``tta.exclude_rule`` the family found.
* ``"resnet"`` / ``"vit"``: that family's rule, whatever the model.
* ``"reference"``: the reference's own substring tests, verbatim (``"layer4"``, ``"blocks.9"``,
  ``"blocks.10"``, ``"blocks.11"`` or ``"norm."`` in the name, or the name ``"norm"``). On other
  architectures they can match by accident: EfficientNet-Lite0's ``_blocks.9``–``11`` contain
  ``"blocks.9"``–``"blocks.11"`` and would be frozen.
* ``()`` or ``"none"``: adapt every affine norm layer; a list of regular expressions: a norm layer is
  frozen when one fullmatches its name or a parent's name.

Learning rate: 2.5e-4 is the ResNet-50-BN setting at batch 64; the references use 1e-3 for ViT/Swin.

Reference: Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023,
https://arxiv.org/abs/2302.12400.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from shiftkit.adapt.base import (
    NormAffineMethod,
    check_positive,
    default_entropy_margin,
    norm_affine_params,
    softmax_entropy,
)
from shiftkit.adapt.registry import register_method
from shiftkit.errors import ShiftkitError

__all__ = ["EXCLUDE_RULES", "PAPER_EXCLUDE", "SAR", "reference_excluded"]

#: The reference's frozen top layers per architecture family, as regular expressions that fullmatch a
#: module name or one of its parents' names (a leading path is allowed: a wrapped model works too).
EXCLUDE_RULES: dict[str, tuple[str, ...]] = {
    "resnet": (r"(.*\.)?layer4",),
    "vit": (r"(.*\.)?blocks\.(9|10|11)", r"(.*\.)?norm"),
}
#: Both families' layers at once (the reference applies its tests to every model).
PAPER_EXCLUDE: tuple[str, ...] = (*EXCLUDE_RULES["resnet"], *EXCLUDE_RULES["vit"])


def reference_excluded(name: str) -> bool:
    """The SAR reference's own test of a module name (``collect_params``), verbatim.

    Example:
        >>> reference_excluded("_blocks.9._bn0"), reference_excluded("layer3.0.bn1")
        (True, False)
    """
    tests = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")
    return any(t in name for t in tests) or name == "norm"


def detect_family(model: nn.Module) -> str | None:
    """``"resnet"``, ``"vit"`` or ``None``: which of the reference's architecture families ``model`` is.

    ResNet: a module named ``layer4`` (torchvision, timm). ViT: numbered modules ``blocks.<i>`` and a
    module ``norm`` that is not inside a block (timm's final norm).
    """
    names = [n for n, _ in model.named_modules()]
    if any(re.fullmatch(EXCLUDE_RULES["resnet"][0], n) for n in names):
        return "resnet"
    has_blocks = any(re.fullmatch(r"(.*\.)?blocks\.\d+", n) for n in names)
    final_norm = any(re.fullmatch(r"(.*\.)?norm", n) and not re.search(r"blocks\.\d+\.", n) for n in names)
    return "vit" if has_blocks and final_norm else None


#: Added to the gradient norm before dividing (SAM reference) so a zero gradient gives ε = 0, not NaN.
_NORM_EPS = 1e-12


def _resolve_exclude(model: nn.Module, exclude: str | Sequence[str]) -> tuple[str | None, list[str]]:
    """The rule's name and its regular expressions for the ``exclude`` argument."""
    if isinstance(exclude, str):
        if exclude == "auto":
            family = detect_family(model)
            return family, list(EXCLUDE_RULES[family]) if family else []
        if exclude in EXCLUDE_RULES:
            return exclude, list(EXCLUDE_RULES[exclude])
        if exclude == "reference":
            return "reference", []
        if exclude == "none":
            return None, []
        return "custom", [exclude]  # one regular expression
    patterns = list(exclude)
    return ("custom" if patterns else None), patterns


def _excluded(name: str, patterns: list[re.Pattern[str]]) -> bool:
    """True if a pattern fullmatches ``name`` or one of its dotted prefixes (a parent module's name)."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))] if name else []
    return any(p.fullmatch(q) for p in patterns for q in prefixes)


@register_method("sar", adapts="norm_affine", needs_grad=True, norms=("batch", "layer", "group"))
class SAR(NormAffineMethod):
    """Sharpness-aware minimisation of the reliable samples' entropy, with model recovery.

    Args:
        model: a model mapping a batch to ``(N, C)`` logits, with affine BatchNorm/LayerNorm/GroupNorm
            layers (modified in place). LN and GN models are the ones SAR is designed for.
        episodic: reset before every batch.
        steps: SAR steps per batch (1).
        lr: SGD learning rate (2.5e-4: ResNet-50-BN at batch 64; use 1e-3 for ViT/Swin).
        rho: SAM neighbourhood radius ρ (0.05, the reference).
        e_margin: entropy margin ``E0`` in nats; ``None`` = ``0.4·ln C``, ``C`` from the first batch.
        exclude: which norm layers stay frozen: ``"auto"`` (default: the reference's rule for the model's
            family, ResNet or ViT; every layer adapted on other models), ``"resnet"``, ``"vit"``,
            ``"reference"`` (the reference's substring tests verbatim), ``"none"``, or regular
            expressions fullmatching a layer's or a parent's name (see the module docstring).
        collapse_entropy: SAR's recovery threshold ``e_m`` (0.2): reset to the source when the moving
            average of ``L2`` falls below it; ``None`` disables recovery.

    Attributes:
        collapse_resets: number of model recoveries so far.
        excluded: names of the affine norm layers left frozen by ``exclude``.
        exclude_rule: the rule applied (``"resnet"``, ``"vit"``, ``"reference"``, ``"custom"`` or ``None``
            when nothing is excluded).

    Raises:
        ShiftkitError: no adaptable norm layer (none, or all excluded), bad ``lr`` / ``rho`` / ``e_margin``
            / ``exclude`` pattern, outputs that are not ``(N, C)``.

    Example:
        >>> tta = adapt.make("sar", vit, lr=1e-3)   # blocks 9-11 and the final norm stay frozen
        >>> tta.excluded[:2]
        >>> logits = tta(x)        # (N, C) outputs of the first forward; θ updated by one SAM step
        >>> tta.collapse_resets    # model recoveries so far
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        episodic: bool = False,
        steps: int = 1,
        lr: float = 2.5e-4,
        rho: float = 0.05,
        e_margin: float | None = None,
        exclude: str | Sequence[str] = "auto",
        collapse_entropy: float | None = 0.2,
    ) -> None:
        self.set_optimizer_options(lr, "sgd")
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not math.isfinite(rho) or rho < 0:
            raise ShiftkitError(f"adapt method 'sar': rho must be a finite number >= 0, got {rho!r}")
        self.rho = float(rho)
        self.e_margin = None if e_margin is None else check_positive("sar", "e_margin", e_margin)
        self.exclude_rule, patterns = _resolve_exclude(model, exclude)
        self.exclude = exclude if isinstance(exclude, str) else tuple(exclude)
        self._exclude_re: list[re.Pattern[str]] = []
        for p in patterns:
            if not isinstance(p, str):
                raise ShiftkitError(f"adapt method 'sar': exclude must hold regex strings, got {p!r}")
            try:
                self._exclude_re.append(re.compile(p))
            except re.error as e:
                raise ShiftkitError(f"adapt method 'sar': exclude pattern {p!r} is not a regex: {e}") from e
        self.excluded: list[str] = []
        super().__init__(model, episodic=episodic, steps=steps, collapse_entropy=collapse_entropy)

    # --- TTAMethod hooks --------------------------------------------------------------------------
    def collect_params(self) -> list[nn.Parameter]:
        """Weight and bias of every affine norm layer not matched by ``exclude``, in module order."""
        self.excluded = []

        def frozen(name: str) -> bool:
            out = (
                reference_excluded(name)
                if self.exclude_rule == "reference"
                else _excluded(name, self._exclude_re)
            )
            if out:
                self.excluded.append(name)
            return out

        return norm_affine_params(self.model, self.name, frozen)

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The base optimizer of SAM: SGD with momentum 0.9 (no Nesterov, no weight decay; reference)."""
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9)

    # --- SAR ----------------------------------------------------------------------------------------
    def entropy_margin(self, num_classes: int) -> float:
        """``E0``: ``e_margin`` if given, else ``0.4·ln num_classes``.

        Example:
            >>> adapt.make("sar", model).entropy_margin(1000)
            2.763...
        """
        return self.e_margin if self.e_margin is not None else default_entropy_margin(num_classes)

    def _step(self, x: Tensor) -> tuple[Tensor, float]:
        """One SAR step; returns the first forward's outputs and ``L2`` (NaN when no step was taken)."""
        outputs = self.model(x)
        if outputs.dim() != 2:
            raise ShiftkitError(f"adapt method 'sar' needs (N, C) outputs, got shape {tuple(outputs.shape)}")
        e0 = self.entropy_margin(outputs.shape[-1])
        entropy = softmax_entropy(outputs)
        m1 = entropy < e0
        if not bool(m1.any()):
            return outputs, math.nan  # no reliable sample: nothing to learn from (reference: zero-grad step)
        params = self._params
        grads = torch.autograd.grad(entropy[m1].mean(), params, allow_unused=True)
        present = [g for g in grads if g is not None]
        if not present:
            return outputs, math.nan  # the loss does not reach any adapted parameter
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
        scale = self.rho / (norm + _NORM_EPS)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.add_(g * scale)  # θ̃ = θ + ρ g / ‖g‖ (ascent to the neighbourhood's worst point)
        entropy2 = softmax_entropy(self.model(x))[m1]
        m2 = entropy2 < e0
        loss2 = entropy2[m2].mean() if bool(m2.any()) else None
        grads2 = torch.autograd.grad(loss2, params, allow_unused=True) if loss2 is not None else None
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)  # back to θ bit for bit (not θ̃ − ε, which rounds)
        if grads2 is None or loss2 is None:
            return outputs, math.nan
        assert self.optimizer is not None
        for p, g in zip(params, grads2, strict=True):
            p.grad = g  # the gradient at θ̃ drives the step from θ
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return outputs, float(loss2.detach())

    def forward(self, x: Tensor) -> Tensor:
        """Predict on ``x`` and take ``steps`` SAR steps on it (predict-before-update).

        Args:
            x: one unlabeled batch, e.g. ``(N, C_in, H, W)`` images.

        Returns:
            ``(N, C)`` outputs of the first forward pass of the last step.

        Example:
            >>> for x in stream:
            ...     logits = tta(x)
            >>> tta.collapse_resets
        """
        if self.episodic:
            self.reset()
        outputs: Tensor | None = None
        with torch.enable_grad():
            for _ in range(self.steps):
                outputs, loss2 = self._step(x)
                self.guard_collapse(loss2)  # model recovery on the ema of L2 (NaN skipped)
        assert outputs is not None
        return outputs.detach()

    def extra_repr(self) -> str:
        e0 = "0.4·ln C" if self.e_margin is None else f"{self.e_margin}"
        return (
            f"{super().extra_repr()}, lr={self.lr}, rho={self.rho}, e_margin={e0}, exclude={self.exclude!r} "
            f"({self.exclude_rule}: {len(self.excluded)} norm layers frozen)"
        )
