"""(IA)³: learned rescaling of inner activations (Liu et al., NeurIPS 2022, arXiv:2205.05638).

A vector ``l`` (PEFT's ``ia3_l``, initialised to ones) rescales one side of each targeted layer:

- output side (attention keys and values): ``y = (x Wᵀ + b) ⊙ l``, ``l`` of shape ``(out, 1)``;
  PEFT scales the whole output, bias included;
- input side (``feedforward_modules``, the FFN down-projection, i.e. the hidden activation after the
  nonlinearity): ``y = (x ⊙ l) Wᵀ + b``, ``l`` of shape ``(1, in)``.

Fold (exact): output side ``W' = diag(l) W``, ``b' = l ⊙ b``; input side ``W' = W diag(l)``, bias unchanged.
Convolutions (2-D, 3-D) scale channels with ``l`` of shape ``(1, C, 1, 1[, 1])``; a grouped input-side
fold scales each group's slice of input channels.

Parameter names, shapes, init and forward follow PEFT 0.21.2 (``peft.tuners.ia3``), so a shift and a PEFT
adapter differ only by a key rename: ``<module>.ia3_l`` ↔ ``base_model.model.<module>.ia3_l``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.registry import register_method
from shiftkit.core.targets import iter_base_modules, match_names
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError

__all__ = ["IA3Config", "IA3Conv", "IA3Linear"]


class _Family(NamedTuple):
    name: str
    targets: tuple[str, ...]
    feedforward: tuple[str, ...]


# PEFT's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING for these families (bert and
# roberta share the first; llama, mistral and qwen2-style decoders the second). Recognised by module names,
# so a TextClassifier around a BertModel is recognised too.
_FAMILIES = (
    _Family("BERT-like", ("key", "value", "output.dense"), ("output.dense",)),
    _Family("Llama-like", ("k_proj", "v_proj", "down_proj"), ("down_proj",)),
)
# target_modules=None: the union of the families' targets; wrap_group checks a family was recognised
_DEFAULT_TARGETS = r"(?:.*\.)?(?:" + "|".join(re.escape(t) for f in _FAMILIES for t in f.targets) + ")"


def _patterns(value: object, field_name: str) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ShiftkitError(f"IA3Config.{field_name} must be a string, a list of strings or None; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class IA3Config(ShiftConfig):
    """(IA)³ settings, in PEFT's vocabulary.

    Attributes:
        feedforward_modules: targeted modules whose *input* is scaled (the FFN down-projection) instead
            of their output; same matching rules as ``target_modules`` (a list matches a name or a
            ``.name`` suffix, a string is a full regex). A list must be a subset of a list
            ``target_modules``, as in PEFT. ``None``: the recognised architecture's default
            (``output.dense`` for BERT-like models, ``down_proj`` for Llama-like ones), otherwise none.
        init_ia3_weights: ``True`` = ones (an exact no-op at start); ``False`` = standard normal, as
            PEFT (for tests).

    ``target_modules=None`` uses PEFT's defaults for the recognised families: ``key``, ``value`` and
    ``output.dense`` (BERT, RoBERTa: the attention-output and FFN-output ``dense`` layers both match), or
    ``k_proj``, ``v_proj``, ``down_proj`` (Llama, Mistral). Other models need explicit ``target_modules``.
    PEFT's ``fan_in_fan_out`` (GPT-2 ``Conv1D``) has no counterpart: only ``nn.Linear`` and Conv2d/3d are
    wrapped.

    Example:
        >>> sk.attach_(bert, sk.IA3Config())   # key/value outputs, FFN down-projection input
        >>> sk.attach_(net, sk.IA3Config(target_modules=["k", "v", "fc2"], feedforward_modules=["fc2"]))
        >>> opt = torch.optim.AdamW(sk.shift_parameters(bert), lr=3e-3, weight_decay=0.0)
    """

    feedforward_modules: str | Sequence[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ff = _patterns(self.feedforward_modules, "feedforward_modules")
        object.__setattr__(self, "feedforward_modules", ff)
        if not isinstance(self.init_ia3_weights, bool):
            raise ShiftkitError(f"IA3Config.init_ia3_weights must be a bool, got {self.init_ia3_weights!r}")
        targets = self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple):
            extra = sorted(set(ff) - set(targets))
            if extra:
                raise ShiftkitError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules; "
                    f"{extra} are not in target_modules {list(targets)}"
                )


def _init(shape: tuple[int, ...], like: Tensor, config: IA3Config) -> nn.Parameter:
    value = torch.ones(shape, dtype=like.dtype, device=like.device)
    if not config.init_ia3_weights:
        value.normal_()  # PEFT draws torch.randn when init_ia3_weights=False
    return nn.Parameter(value)


class IA3Linear(ShiftWrapper):
    """(IA)³ around an ``nn.Linear`` (or subclass).

    Parameter ``ia3_l``: ``(out, 1)`` scaling the output, or ``(1, in)`` scaling the input when
    ``is_feedforward``.
    """

    def __init__(self, base: nn.Linear, config: IA3Config, is_feedforward: bool) -> None:
        super().__init__(base)
        self.is_feedforward = is_feedforward
        shape = (1, base.in_features) if is_feedforward else (base.out_features, 1)
        self.ia3_l = _init(shape, base.weight, config)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base(x * scale.to(x.dtype))
        y = self.base(x)
        return y * scale.to(y.dtype)

    def effective_params(self) -> dict[str, Tensor]:
        """Input side ``{"weight": W diag(l)}``; output side ``{"weight": diag(l) W, "bias": l ⊙ b}``."""
        lin: nn.Linear = self.base  # type: ignore[assignment]
        w, b = lin.weight, lin.bias
        scale = self.ia3_l.to(w.dtype)
        if self.is_feedforward:
            return {"weight": w * scale}  # (1, in) broadcasts over the columns
        out = {"weight": w * scale}  # (out, 1) broadcasts over the rows
        if b is not None:
            out["bias"] = b * scale.flatten()
        return out


class IA3Conv(ShiftWrapper):
    """(IA)³ around an ``nn.Conv2d`` or ``nn.Conv3d``.

    Parameter ``ia3_l`` of shape ``(1, C, 1, 1[, 1])``: ``C = out_channels`` (output side) or
    ``in_channels`` (input side, ``is_feedforward``), as in PEFT.
    """

    def __init__(self, base: nn.Conv2d | nn.Conv3d, config: IA3Config, is_feedforward: bool) -> None:
        super().__init__(base)
        self.is_feedforward = is_feedforward
        channels = base.in_channels if is_feedforward else base.out_channels
        self._spatial = base.weight.dim() - 2
        self.ia3_l = _init((1, channels, *([1] * self._spatial)), base.weight, config)

    def _channel_scale(self, dtype: torch.dtype) -> Tensor:
        # (C, 1, ..., 1) broadcasts on axis 1 of a batched input and axis 0 of an unbatched one
        return self.ia3_l.reshape(-1, *([1] * self._spatial)).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, C_in, *spatial)`` (or unbatched) ``-> (N, C_out, *spatial')``."""
        if self.is_feedforward:
            return self.base(x * self._channel_scale(x.dtype))
        y = self.base(x)
        return y * self._channel_scale(y.dtype)

    def effective_params(self) -> dict[str, Tensor]:
        """Input side ``{"weight": W scaled per input channel}``; output side ``diag(l) W`` and ``l ⊙ b``."""
        conv: nn.Conv2d = self.base  # type: ignore[assignment]
        w, b = conv.weight, conv.bias
        scale = self.ia3_l.to(w.dtype).reshape(-1)
        ones = [1] * self._spatial
        if self.is_feedforward:
            # kernel (out, in/g, k...): output channel o of group g reads input channels g·in/g + j
            g = conv.groups
            per_in, per_out = conv.in_channels // g, conv.out_channels // g
            cols = scale.reshape(g, 1, per_in).expand(g, per_out, per_in).reshape(conv.out_channels, per_in)
            return {"weight": w * cols.reshape(conv.out_channels, per_in, *ones)}
        out = {"weight": w * scale.reshape(-1, 1, *ones)}
        if b is not None:
            out["bias"] = b * scale
        return out


def _family(root: nn.Module) -> _Family | None:
    names = [n for n, _ in iter_base_modules(root)]
    for family in _FAMILIES:
        if all(match_names(names, (t,)) for t in family.targets):
            return family
    return None


@register_method(
    "ia3",
    config=IA3Config,
    targets=(nn.Linear, nn.Conv2d, nn.Conv3d),
    foldable=True,
    zero_init={},  # ones: x·1 is exact, the attached model equals the base bit for bit
    default_targets=_DEFAULT_TARGETS,
    group=True,  # not for shared state: deciding "feedforward" needs each module's name and the model
)
def wrap_group(
    root: nn.Module, targets: list[tuple[str, nn.Module]], config: ShiftConfig
) -> list[ShiftWrapper]:
    """Wrap every target; a module matching ``feedforward_modules`` gets input-side scaling."""
    assert isinstance(config, IA3Config)
    family = _family(root)
    if config.target_modules is None and family is None:
        known = "; ".join(f"{f.name}: {list(f.targets)}" for f in _FAMILIES)
        raise ShiftkitError(
            "IA3Config.target_modules is required for this model: its module names match no known "
            f"architecture ({known})"
        )
    ff = config.feedforward_modules
    if ff is None and family is not None:
        ff = family.feedforward
    out: list[ShiftWrapper] = []
    for fqn, module in targets:
        is_ff = ff is not None and bool(match_names([fqn], ff))
        if isinstance(module, nn.Conv2d | nn.Conv3d):
            out.append(IA3Conv(module, config, is_ff))
        elif isinstance(module, nn.Linear):
            out.append(IA3Linear(module, config, is_ff))
        else:
            raise ShiftkitError(f"(IA)³ cannot wrap {fqn!r} ({type(module).__name__})")
    return out
