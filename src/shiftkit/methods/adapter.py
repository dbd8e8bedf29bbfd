"""Bottleneck adapters: Houlsby et al. (ICML 2019, arXiv:1902.00751) and He et al.'s parallel adapter.

A small two-layer MLP ``A(z) = W_up · f(W_down z + b_d) + b_u`` (bottleneck ``m``, nonlinearity ``f``) is
added beside a frozen ``nn.Linear``:

* ``placement="sequential"`` (Houlsby): on the module's output ``h = base(x)``,
  ``y = h + s · A(h)``, ``W_down ∈ R^{m×out}``, ``W_up ∈ R^{out×m}``.
* ``placement="parallel"`` (He et al., ICLR 2022, "Towards a Unified View of Parameter-Efficient Transfer
  Learning", arXiv:2110.04366): on the module's input, ``y = base(x) + s · A(x)``,
  ``W_down ∈ R^{m×in}``, ``W_up ∈ R^{out×m}``.

Houlsby places two adapters per transformer layer: after the attention output projection and after the
FFN output projection, both *before* the residual add and LayerNorm. The adapter is nonlinear, so it
cannot be folded into the base weights: ``sk.fold_`` raises :class:`~shiftkit.errors.NotFoldableError`
(use ``sk.detach_`` to remove it).

Initialisation: by default the up-projection is zero (and ``W_down`` Kaiming-uniform, as He et al.'s
``"lora"`` init), so the adapter is *exactly* the identity at step 0. Houlsby's own near-identity init
(both matrices truncated-normal with std 1e-3, biases zero) is ``init_weights="houlsby"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.functional import kaiming_uniform_a_sqrt5_
from shiftkit.core.registry import register_method
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import NotFoldableError, ShiftkitError

__all__ = ["AdapterConfig", "AdapterLinear", "adapter_param_count"]

_PLACEMENTS = ("sequential", "parallel")
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
_INITS = ("zero", "houlsby")


@dataclass(frozen=True, kw_only=True)
class AdapterConfig(ShiftConfig):
    """Bottleneck adapter settings.

    ``target_modules=None`` means every ``nn.Linear`` (``"all-linear"``), which is rarely what you want:
    pass the output projections. Houlsby also trains every LayerNorm and the task head; that is a
    ``modules_to_save`` choice (suffix ``"LayerNorm"`` matches every ``*.LayerNorm`` of a BERT).

    Attributes:
        bottleneck: the hidden width ``m``. 64 is the default of the official adapter-bert code.
        placement: ``"sequential"`` (Houlsby: adapter on the module's output) or ``"parallel"`` (He et
            al.: adapter on the module's input, added to its output).
        activation: ``"gelu"`` (adapter-bert's choice, exact erf form), ``"relu"`` (He et al.'s code) or
            ``"silu"``.
        init_weights: ``"zero"`` = ``W_up = 0`` and ``W_down`` Kaiming-uniform (a=√5), biases zero: the
            adapter is exactly the identity at init and ``W_down`` starts with useful features (He et
            al.'s ``"lora"`` init); ``"houlsby"`` = both matrices truncated-normal (±2σ) with std
            ``init_std``, biases zero, near- but not exactly identity (adapter-bert).
        init_std: standard deviation of the ``"houlsby"`` init; 1e-3 in adapter-bert.
        scale: ``s`` multiplying the adapter's output. 1.0 is Houlsby's adapter and the default of He et
            al.'s code; their best "MAM" setting uses a scaled parallel adapter at the FFN with ``s=4``
            (and ``bottleneck=512``).

    Example:
        >>> cfg = sk.AdapterConfig(target_modules=["output.dense"], modules_to_save=["LayerNorm", "head"])
        >>> sk.attach_(bert_classifier, cfg)   # BERT: attention.output.dense and the FFN output.dense
        >>> sk.attach_(llama, sk.AdapterConfig(target_modules=["o_proj", "down_proj"]))
    """

    bottleneck: int = 64
    placement: str = "sequential"
    activation: str = "gelu"
    init_weights: str = "zero"
    init_std: float = 1e-3
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ShiftkitError(
                f"AdapterConfig.bottleneck must be a positive integer, got {self.bottleneck!r}"
            )
        if self.placement not in _PLACEMENTS:
            raise ShiftkitError(
                f"AdapterConfig.placement must be one of {_PLACEMENTS}, got {self.placement!r}"
            )
        if self.activation not in _ACTIVATIONS:
            raise ShiftkitError(
                f"AdapterConfig.activation must be one of {tuple(_ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.init_weights not in _INITS:
            raise ShiftkitError(
                f"AdapterConfig.init_weights must be one of {_INITS}, got {self.init_weights!r}"
            )
        if not isinstance(self.init_std, int | float) or isinstance(self.init_std, bool) or self.init_std < 0:
            raise ShiftkitError(f"AdapterConfig.init_std must be a number >= 0, got {self.init_std!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float):
            raise ShiftkitError(f"AdapterConfig.scale must be a number, got {self.scale!r}")


def adapter_param_count(d_in: int, d_out: int, bottleneck: int) -> int:
    """Parameters of one adapter: ``m·d_in + m + d_out·m + d_out``.

    Sequential adapters have ``d_in = d_out = d``, giving Houlsby's ``2md + d + m``.

    Example:
        >>> adapter_param_count(768, 768, 64)
        99136
    """
    return bottleneck * d_in + bottleneck + d_out * bottleneck + d_out


def _trunc_normal_(t: Tensor, std: float) -> None:
    # TF's truncated_normal_initializer (adapter-bert) redraws beyond two standard deviations; the draw is
    # made in float32 so that low-precision bases get the same distribution
    with torch.no_grad():
        tmp = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        nn.init.trunc_normal_(tmp, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
        t.copy_(tmp)


class AdapterLinear(ShiftWrapper):
    """A bottleneck adapter beside an ``nn.Linear`` (or subclass).

    Parameters ``down_weight (m, d)``, ``down_bias (m,)``, ``up_weight (out, m)``, ``up_bias (out,)`` with
    ``d = out`` (sequential) or ``d = in`` (parallel).

    Example:
        >>> wrapped = AdapterLinear(nn.Linear(16, 16), sk.AdapterConfig(bottleneck=4))
        >>> wrapped(torch.randn(2, 16)).shape
        torch.Size([2, 16])
    """

    def __init__(self, base: nn.Linear, config: AdapterConfig) -> None:
        super().__init__(base)
        self.placement = config.placement
        self.scale = float(config.scale)
        self.activation = config.activation
        w = base.weight
        d_in = base.out_features if config.placement == "sequential" else base.in_features
        m, d_out, dt, dev = config.bottleneck, base.out_features, w.dtype, w.device
        self.down_weight = nn.Parameter(torch.zeros(m, d_in, dtype=dt, device=dev))
        self.down_bias = nn.Parameter(torch.zeros(m, dtype=dt, device=dev))
        self.up_weight = nn.Parameter(torch.zeros(d_out, m, dtype=dt, device=dev))
        self.up_bias = nn.Parameter(torch.zeros(d_out, dtype=dt, device=dev))
        if config.init_weights == "houlsby":
            _trunc_normal_(self.down_weight, config.init_std)
            _trunc_normal_(self.up_weight, config.init_std)
        else:  # up stays zero: the branch outputs exactly 0 at init
            kaiming_uniform_a_sqrt5_(self.down_weight)

    def adapter(self, z: Tensor) -> Tensor:
        """The branch ``s · (W_up f(W_down z + b_d) + b_u)``: ``z (..., d) -> (..., out)``."""
        hidden = _ACTIVATIONS[self.activation](
            F.linear(z.to(self.down_weight.dtype), self.down_weight, self.down_bias)
        )
        out = F.linear(hidden, self.up_weight, self.up_bias)
        return out if self.scale == 1.0 else out * self.scale

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        h = self.base(x)
        branch = self.adapter(h if self.placement == "sequential" else x)
        return h + branch.to(h.dtype)

    # The adapter changes no base parameter: code that reads ``module.weight`` (dtype checks, MHA) sees
    # the base weight. The nonlinear branch has no weight-space form, so delta/fold refuse.
    def effective_params(self) -> dict[str, Tensor]:
        """``{}``: the base parameters are unchanged (the adapter is an extra branch)."""
        return {}

    def delta(self) -> dict[str, Tensor]:
        """Refused: a nonlinear adapter has no dense weight delta.

        Raises:
            NotFoldableError: always.
        """
        raise NotFoldableError("adapter shifts are nonlinear and have no dense weight delta")

    def folded_params(self) -> dict[str, Tensor]:
        """Refused: a nonlinear adapter cannot be baked into the base weights.

        Raises:
            NotFoldableError: always.
        """
        raise NotFoldableError("adapter shifts are nonlinear and cannot be folded; use sk.detach_")


def _calls_own_forward(module: nn.Module) -> bool:
    # nn.MultiheadAttention reads out_proj.weight/.bias itself and never calls out_proj.forward, so an
    # adapter there would be silently skipped; its out_proj is this (otherwise unused) Linear subclass
    return not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


@register_method(
    "adapter",
    config=AdapterConfig,
    targets=(nn.Linear,),
    foldable=False,
    zero_init={},  # the default init (zero up-projection) is already an exact no-op
    default_targets="all-linear",
    accepts=_calls_own_forward,
)
def wrap(module: nn.Module, config: ShiftConfig) -> ShiftWrapper:
    """Wrap one ``nn.Linear`` with a bottleneck adapter."""
    assert isinstance(config, AdapterConfig)
    if not isinstance(module, nn.Linear):
        raise ShiftkitError(f"adapter cannot wrap {type(module).__name__}")
    return AdapterLinear(module, config)
