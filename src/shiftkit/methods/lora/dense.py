"""LoRA's dense math on saved shifts: the exact ``ΔW`` of each adapted weight, and back to factors.

A LoRA shift stores factors, not the change itself. Its dense change of each adapted weight is
(Hu et al., https://arxiv.org/abs/2106.09685; rsLoRA, https://arxiv.org/abs/2312.03732)

* Linear ``W (out, in)``: ``ΔW = s · B A`` with ``A (r, in)``, ``B (out, r)``, ``s = α/r`` (``α/√r`` rsLoRA);
* Conv2d ``W (C_out, C_in, kh, kw)``: ``ΔW = s · reshape(B₍C_out×r₎ · A₍r×C_in·kh·kw₎)``;
* Embedding ``W (num_embeddings, dim)``: ``ΔW = (s · B A)ᵀ`` with ``A (r, num_embeddings)``, ``B (dim, r)``.

:data:`LORA_DENSE` is the method's :class:`~shiftkit.core.registry.DenseDelta` hook: every place that needs
a LoRA shift's weights changes without attaching it (``sk.merge``, ``sk.to_delta(shift)``, the streaming
merge, compression, export) asks the registry for it instead of knowing LoRA. :func:`factorise` goes the
other way: the best rank-r factors of a dense change (truncated SVD, Eckart–Young).

A square weight (``out == in``) fits both the Linear and the Embedding layout; without ``model=`` it is taken
for a Linear (embedding tables have far more rows than columns), as :func:`sk.export_peft` does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shiftkit.core import functional as skf
from shiftkit.core.shift import Shift
from shiftkit.core.targets import iter_base_modules
from shiftkit.core.wrapper import is_shift_module
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.methods.lora.config import LoRAConfig

__all__ = [
    "LORA_DENSE",
    "LoRADense",
    "adapted_modules",
    "factorise",
    "lora_delta",
    "lora_kind",
    "lora_param_names",
    "require_lora",
]


def require_lora(shift: Shift) -> LoRAConfig:
    """The config of a LoRA shift (``ShiftkitError`` for anything else).

    Example:
        >>> require_lora(sk.load("adapter.safetensors")).r
        8
    """
    if not isinstance(shift, Shift) or shift.method != "lora":
        got = shift.method if isinstance(shift, Shift) else type(shift).__name__
        raise ShiftkitError(f"expected a LoRA shift (method 'lora'), got {got!r}")
    if not isinstance(shift.config, LoRAConfig):
        raise ShiftMismatchError(
            f"this LoRA shift has a {type(shift.config).__name__} config, not a LoRAConfig: its scaling is "
            "unknown (load it with sk.load, or attach it and use sk.to_delta)"
        )
    return shift.config


def adapted_modules(shift: Shift) -> list[str]:
    """The modules a LoRA shift holds a factor pair for, sorted."""
    return sorted(m for m in shift.base if f"{m}.lora_A" in shift.tensors and f"{m}.lora_B" in shift.tensors)


def _is_embedding(model: nn.Module | None, fqn: str) -> bool | None:
    if model is None:
        return None
    module = dict(iter_base_modules(model)).get(fqn)
    if module is None:
        raise ShiftMismatchError(f"the model has no module {fqn!r} (adapted by the LoRA shift)")
    return isinstance(module.base if is_shift_module(module) else module, nn.Embedding)


def lora_kind(shift: Shift, fqn: str, *, model: nn.Module | None = None) -> str:
    """The layout of the LoRA pair on module ``fqn``: ``"linear"``, ``"conv"`` or ``"embedding"``.

    Read from the factor shapes and the recorded base shape; a square 2-D weight is a Linear unless
    ``model`` says the module is an ``nn.Embedding``.

    Args:
        shift: a LoRA shift.
        fqn: an adapted module's name.
        model: optional model with this module (only to tell square embeddings from Linears).

    Returns:
        ``"linear"``, ``"conv"`` or ``"embedding"``.

    Raises:
        ShiftMismatchError: the factors do not fit the recorded shape, or their ranks differ from ``r``.

    Example:
        >>> lora_kind(shift, "embed")
        'embedding'
    """
    config = require_lora(shift)
    if fqn not in adapted_modules(shift):
        raise ShiftMismatchError(f"the LoRA shift does not adapt module {fqn!r}")
    a, b, shape = shift.tensors[f"{fqn}.lora_A"], shift.tensors[f"{fqn}.lora_B"], tuple(shift.base[fqn])
    r = config.rank_of(fqn)
    if a.shape[0] != r or b.shape[1] != r:
        raise ShiftMismatchError(
            f"LoRA on {fqn!r} has rank {a.shape[0]}/{b.shape[1]} (A/B) but the config says r={r}"
        )
    if a.dim() == 4 and b.dim() == 4 and shape == (b.shape[0], *a.shape[1:]):
        return "conv"
    if a.dim() == 2 and b.dim() == 2:
        linear, embedding = shape == (b.shape[0], a.shape[1]), shape == (a.shape[1], b.shape[0])
        told = _is_embedding(model, fqn) if linear and embedding else None
        if embedding and (not linear or told):
            return "embedding"
        if linear:
            return "linear"
    raise ShiftMismatchError(
        f"LoRA factors of {fqn!r} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit its shape {shape}"
    )


def lora_param_names(shift: Shift) -> list[str]:
    """Names ``<module>.weight`` of the weights a LoRA shift changes, sorted (not ``modules_to_save``).

    Example:
        >>> lora_param_names(sk.extract(model))
        ['layers.0.q_proj.weight', 'layers.0.v_proj.weight']
    """
    require_lora(shift)
    return [f"{m}.weight" for m in adapted_modules(shift)]


def lora_delta(shift: Shift, param_name: str, *, model: nn.Module | None = None) -> Tensor:
    """Exact dense change ``ΔW`` of one adapted weight, in the base weight's layout, float32.

    Args:
        shift: a LoRA shift (no model needed).
        param_name: ``<module>.weight``, one of :func:`lora_param_names`.
        model: optional, only to tell a square ``nn.Embedding`` from a Linear (see :func:`lora_kind`).

    Returns:
        ``(out, in)`` (Linear), ``(C_out, C_in, kh, kw)`` (Conv2d) or ``(num_embeddings, dim)`` (Embedding).

    Example:
        >>> dw = lora_delta(shift, "layers.0.q_proj.weight")
        >>> torch.allclose(dw, sk.to_delta(model)["layers.0.q_proj.weight"])
        True
    """
    config = require_lora(shift)
    fqn, _, role = param_name.rpartition(".")
    if role != "weight" or fqn not in adapted_modules(shift):
        raise ShiftMismatchError(
            f"{param_name!r} is not a weight the LoRA shift changes; it changes {lora_param_names(shift)[:5]}"
        )
    kind = lora_kind(shift, fqn, model=model)
    a = shift.tensors[f"{fqn}.lora_A"].detach().to(torch.float32)
    b = shift.tensors[f"{fqn}.lora_B"].detach().to(torch.float32)
    if kind == "conv":
        return skf.lora_conv_delta(a, b, config.scaling_of(fqn))
    delta = skf.lora_delta(a, b, config.scaling_of(fqn))
    return delta.T.contiguous() if kind == "embedding" else delta


def factorise(delta: Tensor, kind: str, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` LoRA factors ``(A, B)`` of a dense change, in the layout of ``kind`` (scaling 1).

    Truncated SVD (Eckart–Young): ``B = U_r S_r``, ``A = V_rᵀ``; a weight thinner than the rank gets zero
    rows/columns (exact anyway).

    Args:
        delta: ``(out, in)``, ``(C_out, C_in, kh, kw)`` or ``(num_embeddings, dim)``.
        kind: ``"linear"``, ``"conv"`` or ``"embedding"``.
        rank: the factors' rank r.

    Returns:
        ``A (r, in[, kh, kw])`` and ``B (out, r[, 1, 1])`` in float32 (embedding: ``A (r, num)``,
        ``B (dim, r)``).

    Example:
        >>> a, b = factorise(torch.randn(8, 6), "linear", 2)
        >>> a.shape, b.shape
        (torch.Size([2, 6]), torch.Size([8, 2]))
    """
    m = delta.T if kind == "embedding" else delta.reshape(delta.shape[0], -1)
    us, vh = skf.truncated_svd(m.to(torch.float32), rank)
    k = us.shape[1]
    b = torch.zeros(m.shape[0], rank, dtype=torch.float32, device=m.device)
    a = torch.zeros(rank, m.shape[1], dtype=torch.float32, device=m.device)
    b[:, :k], a[:k] = us, vh
    if kind == "conv":
        return a.reshape(rank, *delta.shape[1:]), b.reshape(delta.shape[0], rank, *([1] * (delta.dim() - 2)))
    return a, b


class LoRADense:
    """LoRA's :class:`~shiftkit.core.registry.DenseDelta` hook (see the module docstring)."""

    def names(self, shift: Shift) -> list[str]:
        """The weights the shift changes (``modules_to_save`` copies are not changes: see ``sk.to_delta``)."""
        return lora_param_names(shift)

    def tensor(self, shift: Shift, name: str, model: nn.Module | None = None) -> Tensor:
        """``ΔW`` of weight ``name`` in float32 (:func:`lora_delta`)."""
        return lora_delta(shift, name, model=model)


LORA_DENSE = LoRADense()
