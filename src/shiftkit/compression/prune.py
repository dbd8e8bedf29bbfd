"""Light-PEFT's structural pruning of the base (Gu et al., Findings ACL 2024; spec: learn.md §8.1), the
part that acts on the foundation model: trainable masks on attention heads and FFN neurons, the unit
selection by quantiles of the mask values, and the structural pruning of the base.

* :func:`attach_masks_` puts masks, all 1 at start, on every transformer layer: a head mask ``m^att (H,)``
  that scales each head's attention output (the same as scaling its attention probabilities, which the
  value product is linear in) and an FFN mask ``m^ffn (d_ff,)`` on the intermediate activation. Train
  them with the shift (``masks.parameters()``) and the loss ``task + λ₁·masks.l1()`` (λ₁ = 1e-4).
* :func:`select_units`: per layer the heads whose signed mask value is at or below the ``head_ratio``
  quantile of that layer's (layer-wise, as the reference), and the FFN neurons at or below the
  ``ffn_ratio`` quantile over all layers (global). A layer always keeps one head and one neuron.
* :func:`prune_`: removes those units from the plain base model for real: query/key/value rows and the
  attention output's columns, FFN input rows and output columns. The result is an ordinary, smaller
  transformer of the same classes (BERT-family and Llama-family layers are recognised).

The PEFT side (module- and rank-level importance, pruning LoRA modules and ranks, slicing the LoRA to the
pruned base) is :mod:`shiftkit.compression.light_peft`; the two-stage recipe that runs both is
:func:`shiftkit.recipes.light_peft.light_peft`.

Example:
    >>> masks = attach_masks_(model)
    >>> opt = torch.optim.AdamW([*sk.shift_parameters(model), *masks.parameters()], lr=3e-4)
    >>> ...  # loss = task_loss + 1e-4 * masks.l1()
    >>> heads, neurons = select_units(masks)
    >>> masks.remove(); sk.detach_(model); prune_(model, heads, neurons)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.core.wrapper import is_shift_module
from shiftkit.errors import ShiftkitError

__all__ = [
    "PruneMasks",
    "TransformerLayer",
    "attach_masks_",
    "check_head_pruning",
    "find_layers",
    "prune_",
    "select_units",
]

#: (attention out, q, k, v, FFN inputs, FFN out), relative to one layer of the stack
_LAYOUTS: tuple[tuple[str, str, str, str, tuple[str, ...], str], ...] = (
    (
        "attention.output.dense",
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        ("intermediate.dense",),
        "output.dense",
    ),
    (
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj",
    ),
)


@dataclass
class TransformerLayer:
    """The prunable Linear layers of one transformer layer (full module names) and its head layout."""

    prefix: str
    attn_out: str
    q: str
    k: str
    v: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    heads: int
    head_dim: int


def _linear(model: nn.Module, name: str) -> nn.Linear:
    m = model.get_submodule(name)
    if is_shift_module(m):
        m = m.base  # type: ignore[assignment]
    if not isinstance(m, nn.Linear):
        raise ShiftkitError(f"{name} is a {type(m).__name__}, not a Linear")
    return m


def find_layers(model: nn.Module) -> list[TransformerLayer]:
    """The transformer layers of ``model`` (BERT-family or Llama-family), in order.

    Raises:
        ShiftkitError: no layer stack of a known layout.
    """
    names = dict(model.named_modules())
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    out = []
    for name, module in names.items():
        if not isinstance(module, nn.ModuleList):
            continue
        for i in range(len(module)):
            prefix = f"{name}.{i}" if name else str(i)
            for o, q, k, v, ffn_in, ffn_out in _LAYOUTS:
                parts = [o, q, k, v, *ffn_in, ffn_out]
                if all(f"{prefix}.{p}" in names for p in parts):
                    attn = names[f"{prefix}.{q.rsplit('.', 1)[0]}"]
                    h = getattr(attn, "num_attention_heads", None) or heads
                    h = h or getattr(getattr(attn, "config", None), "num_attention_heads", None)
                    if not h:
                        raise ShiftkitError(f"cannot tell the number of attention heads of {prefix}")
                    width = _linear(model, f"{prefix}.{q}").out_features
                    out.append(
                        TransformerLayer(
                            prefix,
                            f"{prefix}.{o}",
                            f"{prefix}.{q}",
                            f"{prefix}.{k}",
                            f"{prefix}.{v}",
                            tuple(f"{prefix}.{p}" for p in ffn_in),
                            f"{prefix}.{ffn_out}",
                            int(h),
                            width // int(h),
                        )
                    )
                    break
    if not out:
        raise ShiftkitError(
            "found no transformer layer to prune (BERT-style attention.self/intermediate/output or "
            "Llama-style self_attn/mlp layers in an nn.ModuleList)"
        )
    return out


class PruneMasks(nn.Module):
    """Head and FFN masks of every layer, applied by forward pre-hooks on the attention-output and FFN-output
    Linears (attach after the shift, so the hooks sit on the modules that run)."""

    def __init__(self, model: nn.Module, layers: list[TransformerLayer]) -> None:
        super().__init__()
        self.layers = layers
        like = next(model.parameters())
        self.head = nn.ParameterList(
            [nn.Parameter(torch.ones(ly.heads, dtype=like.dtype, device=like.device)) for ly in layers]
        )
        self.ffn = nn.ParameterList(
            [
                nn.Parameter(
                    torch.ones(_linear(model, ly.ffn_out).in_features, dtype=like.dtype, device=like.device)
                )
                for ly in layers
            ]
        )
        self._handles: list[Any] = []
        for i, ly in enumerate(layers):
            self._handles.append(
                model.get_submodule(ly.attn_out).register_forward_pre_hook(self._head_hook(i))
            )
            self._handles.append(model.get_submodule(ly.ffn_out).register_forward_pre_hook(self._ffn_hook(i)))

    def _head_hook(self, i: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            m = self.head[i]
            scaled = (x.unflatten(-1, (m.numel(), -1)) * m[:, None].to(x.dtype)).flatten(-2)
            return (scaled, *args[1:])

        return hook

    def _ffn_hook(self, i: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0] * self.ffn[i].to(args[0].dtype), *args[1:])

        return hook

    def l1(self) -> Tensor:
        """``Σ_layers (‖m^att‖₁ + ‖m^ffn‖₁)``, the sparsity term of the estimation loss."""
        return sum((p.abs().sum() for p in self.parameters()), torch.zeros(()))

    def remove(self) -> None:
        """Take the hooks off the model (the masks stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __iter__(self) -> Iterator[tuple[TransformerLayer, Tensor, Tensor]]:
        return iter(zip(self.layers, self.head, self.ffn, strict=True))


def attach_masks_(model: nn.Module) -> PruneMasks:
    """Put Light-PEFT's head and FFN masks (all 1: the model is unchanged) on every transformer layer."""
    return PruneMasks(model, find_layers(model))


def check_head_pruning(model: nn.Module, layer: TransformerLayer) -> None:
    """Raise unless ``layer``'s heads can be removed: under grouped-query attention keys and values are
    shared across heads, so only FFN neurons can be pruned.

    Raises:
        ShiftkitError: the layer uses grouped-query attention (named).
    """
    if _linear(model, layer.k).out_features != _linear(model, layer.q).out_features:
        raise ShiftkitError(
            f"{layer.prefix}: grouped-query attention shares keys and values across heads, so its heads "
            "cannot be pruned; prune FFN neurons only (head_ratio=0)"
        )


def _at_or_below(values: Tensor, ratio: float) -> list[int]:
    if ratio <= 0:
        return []
    thr = torch.quantile(values.detach().double(), ratio)
    return [int(i) for i in torch.nonzero(values.detach().double() <= thr).reshape(-1)]


def select_units(
    masks: PruneMasks, *, head_ratio: float = 1 / 3, ffn_ratio: float = 1 / 3
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """``(heads, neurons)`` to remove, keyed by layer prefix: heads at or below the per-layer ``head_ratio``
    quantile of the signed mask values, neurons at or below the global ``ffn_ratio`` quantile."""
    for name, r in (("head_ratio", head_ratio), ("ffn_ratio", ffn_ratio)):
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r < 1:
            raise ShiftkitError(f"{name} must be in [0, 1), got {r!r}")
    heads: dict[str, list[int]] = {}
    for layer, m_att, _ in masks:
        drop = _at_or_below(m_att, head_ratio)
        if len(drop) >= layer.heads:  # a layer keeps its strongest head
            drop.remove(int(torch.argmax(m_att.detach())))
        heads[layer.prefix] = drop
    neurons: dict[str, list[int]] = {}
    if ffn_ratio > 0:
        thr = torch.quantile(torch.cat([m.detach().double() for _, _, m in masks]), ffn_ratio)
        for layer, _, m_ffn in masks:
            drop = [int(i) for i in torch.nonzero(m_ffn.detach().double() <= thr).reshape(-1)]
            if len(drop) >= m_ffn.numel():
                drop.remove(int(torch.argmax(m_ffn.detach())))
            neurons[layer.prefix] = drop
    return heads, neurons


def _keep_rows(lin: nn.Linear, keep: Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[keep].clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[keep].clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features = int(keep.numel())


def _keep_cols(lin: nn.Linear, keep: Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[:, keep].clone(), requires_grad=lin.weight.requires_grad)
    lin.in_features = int(keep.numel())


@torch.no_grad()
def prune_(
    model: nn.Module, heads: dict[str, list[int]] | None = None, neurons: dict[str, list[int]] | None = None
) -> nn.Module:
    """Remove attention heads and FFN neurons from a plain model (no shift attached), in place.

    Raises:
        ShiftkitError: a shift is attached, a unit index out of range, or head pruning under grouped-query
            attention (keys and values shared across heads).
    """
    if any(is_shift_module(m) for m in model.modules()):
        raise ShiftkitError("prune_ changes the base weights: detach or fold the shift first")
    layers = {ly.prefix: ly for ly in find_layers(model)}
    for prefix, drop in (heads or {}).items():
        if not drop:
            continue
        ly = layers[prefix]
        if any(not 0 <= h < ly.heads for h in drop):
            raise ShiftkitError(f"{prefix}: head index out of range 0..{ly.heads - 1}: {drop}")
        check_head_pruning(model, ly)
        kept_heads = [h for h in range(ly.heads) if h not in set(drop)]
        keep = torch.cat([torch.arange(h * ly.head_dim, (h + 1) * ly.head_dim) for h in kept_heads])
        for name in (ly.q, ly.k, ly.v):
            _keep_rows(_linear(model, name), keep)
        _keep_cols(_linear(model, ly.attn_out), keep)
        attn = model.get_submodule(ly.q.rsplit(".", 1)[0])
        for attr, value in (("num_attention_heads", len(kept_heads)), ("all_head_size", keep.numel())):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, int(value))
    for prefix, drop in (neurons or {}).items():
        if not drop:
            continue
        ly = layers[prefix]
        width = _linear(model, ly.ffn_out).in_features
        if any(not 0 <= n < width for n in drop):
            raise ShiftkitError(f"{prefix}: FFN neuron index out of range 0..{width - 1}")
        keep = torch.tensor([n for n in range(width) if n not in set(drop)], dtype=torch.long)
        for name in ly.ffn_in:
            _keep_rows(_linear(model, name), keep)
        _keep_cols(_linear(model, ly.ffn_out), keep)
    return model
