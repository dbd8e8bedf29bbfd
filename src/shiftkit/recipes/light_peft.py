"""Light-PEFT's two stages (Gu et al., Findings ACL 2024; spec: learn.md §8.1): a short estimation run that
learns which attention heads, FFN neurons, LoRA modules and LoRA ranks matter, then the structural pruning
of the base and of the LoRA, leaving a smaller model to fine-tune.

Stage 1 (:func:`light_peft`): LoRA is attached to the model and Light-PEFT's masks (all 1) to its
transformer layers; both train for ``estimate_steps`` steps with the loss ``task + λ₁ Σ (‖m^att‖₁ +
‖m^ffn‖₁)`` while :class:`~shiftkit.compression.light_peft.LoRAImportance` records the module and rank
scores. Then the masks come off (the base is unchanged: only the masks and the shift were trained), the
heads and neurons at or below their quantiles are removed from the base
(:func:`~shiftkit.compression.prune.prune_`), the LoRA loses its weakest modules and ranks and is sliced to
the smaller base (:func:`~shiftkit.compression.light_peft.prune_lora`), and it is attached again.

Stage 2 is ordinary training of the returned model (:func:`shiftkit.recipes.learn.train`).

The reference trains the masks with learning-rate multipliers whose effective value in its shipped scripts
is 1 (spec §8.1); here the masks share the shift's learning rate.

Example:
    >>> model, tok = text_classifier("minilm")
    >>> res = light_peft(model, sk.LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear",
    ...                  exclude_modules=["head"], modules_to_save=("head",)), batches,
    ...                  LightPEFTSettings(estimate_steps=100), TrainConfig(lr=3e-4))
    >>> train(res.model, sk.shift_parameters(res.model), batches, None, TrainConfig(lr=3e-4))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from torch import Tensor, nn

import shiftkit as sk
from shiftkit.compression.light_peft import LoRAImportance, prune_lora, select_lora
from shiftkit.compression.prune import (
    PruneMasks,
    attach_masks_,
    check_head_pruning,
    find_layers,
    prune_,
    select_units,
)
from shiftkit.core.attach import attached_method, named_shift_parameters
from shiftkit.core.shift import Shift
from shiftkit.errors import ShiftkitError
from shiftkit.methods.lora.config import LoRAConfig
from shiftkit.recipes.learn import Batches, TrainConfig, TrainHooks, TrainResult, train

__all__ = ["LightPEFTResult", "LightPEFTSettings", "light_peft"]


@dataclass(frozen=True, kw_only=True)
class LightPEFTSettings:
    """Light-PEFT's estimation and pruning settings (the paper's script values by default).

    Attributes:
        estimate_steps: training steps of the estimation run (800 in the paper's SST-2 script; a short
            fraction of the full training is the point).
        l1: λ₁, the weight of the masks' L1 term.
        head_ratio: per layer, the quantile of head-mask values at or below which heads are removed (1/3).
        ffn_ratio: global quantile of FFN-mask values at or below which neurons are removed (1/3).
        module_ratio: global quantile of LoRA module scores at or below which modules are removed (0.75).
        rank_ratio: global quantile of LoRA rank scores at or below which ranks are removed (0.5).
    """

    estimate_steps: int = 800
    l1: float = 1e-4
    head_ratio: float = 1 / 3
    ffn_ratio: float = 1 / 3
    module_ratio: float = 0.75
    rank_ratio: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.estimate_steps, bool) or not isinstance(self.estimate_steps, int):
            raise ShiftkitError(f"estimate_steps must be a positive integer, got {self.estimate_steps!r}")
        if self.estimate_steps < 2:
            raise ShiftkitError("estimate_steps must be at least 2 (scores average the second half)")
        if not self.l1 >= 0:
            raise ShiftkitError(f"l1 must be ≥ 0, got {self.l1!r}")
        for name in ("head_ratio", "ffn_ratio", "module_ratio", "rank_ratio"):
            r = getattr(self, name)
            if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r < 1:
                raise ShiftkitError(f"{name} must be in [0, 1), got {r!r}")


@dataclass
class LightPEFTResult:
    """What the estimation found and the pruned model.

    Attributes:
        model: the pruned base with the pruned LoRA attached (trainable: stage 2 trains it).
        shift: the pruned stage-1 LoRA shift (what is attached to ``model``).
        heads / neurons: per layer prefix, the heads and FFN neurons removed from the base.
        modules: LoRA modules removed; ranks: per module, the rank indices removed.
        base_params: parameters of the base before and after pruning.
        shift_params: trainable LoRA parameters (factors only) before and after pruning.
        estimate: the estimation run's :class:`TrainResult`.
    """

    model: nn.Module
    shift: Shift
    heads: dict[str, list[int]]
    neurons: dict[str, list[int]]
    modules: list[str]
    ranks: dict[str, list[int]]
    base_params: tuple[int, int]
    shift_params: tuple[int, int]
    estimate: TrainResult = field(repr=False)


class _Estimation(TrainHooks):
    def __init__(self, masks: PruneMasks, importance: LoRAImportance, l1: float) -> None:
        self.masks, self.importance, self.l1 = masks, importance, l1

    def on_batch(self, inputs: Mapping[str, Tensor]) -> None:
        self.importance.token_mask = inputs.get("attention_mask")

    def extra_loss(self, logits: Tensor) -> Tensor | float:
        return self.l1 * self.masks.l1() if self.l1 else 0.0

    def after_backward(self) -> None:
        self.importance.step()


def _factor_params(shift: Shift) -> int:
    return sum(t.numel() for k, t in shift.tensors.items() if k.endswith((".lora_A", ".lora_B")))


def light_peft(
    model: nn.Module,
    lora: LoRAConfig,
    train_batches: Batches,
    settings: LightPEFTSettings | None = None,
    train_config: TrainConfig | None = None,
    *,
    progress: bool | None = None,
) -> LightPEFTResult:
    """Run Light-PEFT's estimation on ``model`` and return it pruned, with the pruned LoRA attached.

    Args:
        model: a plain model (no shift attached) with BERT- or Llama-family transformer layers whose forward
            takes the batch's inputs and returns logits (as :func:`~shiftkit.recipes.learn.train` wants).
            It is changed in place: the result's ``model`` is this object.
        lora: the LoRA to estimate with (the paper: r=8, α=16 on query, key, value, attention output and
            intermediate dense, plus the new head in ``modules_to_save``).
        train_batches: the training batches (a DataLoader of dicts with ``labels``).
        settings: estimation and pruning settings.
        train_config: optimiser settings of the estimation run (its ``max_steps`` is set to
            ``settings.estimate_steps``).
        progress: show a progress bar.

    Returns:
        The pruned model and what was removed.

    Raises:
        ShiftkitError: a shift is already attached, the LoRA targets no Linear, no transformer layer is
            recognised, or heads are to be pruned under grouped-query attention (checked before training).
    """
    settings = settings or LightPEFTSettings()
    if attached_method(model) is not None:
        raise ShiftkitError("light_peft wants a plain model; detach the attached shift first")
    layers = find_layers(model)
    if settings.head_ratio > 0:  # before any training, not after it
        for ly in layers:
            check_head_pruning(model, ly)
    if len(train_batches) == 0:
        raise ShiftkitError("light_peft: the training set has no batches")
    # the estimation runs exactly estimate_steps steps, over as many epochs as that takes
    epochs = -(-settings.estimate_steps // len(train_batches))
    config = replace(train_config or TrainConfig(), max_steps=settings.estimate_steps, epochs=epochs)
    base_before = sum(p.numel() for p in model.parameters())
    sk.attach_(model, lora)
    masks: PruneMasks | None = None
    importance: LoRAImportance | None = None
    try:
        importance = LoRAImportance(model)
        masks = attach_masks_(model)
        params = [*sk.shift_parameters(model), *masks.parameters()]
        estimate = train(
            model,
            params,
            train_batches,
            None,
            config,
            progress=progress,
            desc="light-peft estimate",
            hooks=_Estimation(masks, importance, settings.l1),
        )
        heads, neurons = select_units(masks, head_ratio=settings.head_ratio, ffn_ratio=settings.ffn_ratio)
        modules, ranks = select_lora(
            importance, module_ratio=settings.module_ratio, rank_ratio=settings.rank_ratio
        )
    except BaseException:
        sk.detach_(model)  # the model as it was given
        raise
    finally:
        if masks is not None:
            masks.remove()
        if importance is not None:
            importance.remove()
    shift = sk.extract(model)
    sk.detach_(model)
    prune_(model, heads, neurons)
    small = prune_lora(shift, modules=modules, ranks=ranks, layers=layers, heads=heads, neurons=neurons)
    sk.attach_(model, small)
    own = {id(p) for p in named_shift_parameters(model).values()}
    base_after = sum(p.numel() for p in model.parameters() if id(p) not in own)
    return LightPEFTResult(
        model=model,
        shift=small,
        heads={k: v for k, v in heads.items() if v},
        neurons={k: v for k, v in neurons.items() if v},
        modules=modules,
        ranks=ranks,
        base_params=(base_before, base_after),
        shift_params=(_factor_params(shift), _factor_params(small)),
        estimate=estimate,
    )
