"""Shift modules: a wrapper holds ``self.base`` (the untouched original module) and adds parameters.

"Is a shift module" is the :class:`ShiftModule` protocol. :class:`ShiftWrapper` is a small helper that
implements the common parts once: attribute forwarding to the base (so ``layer.in_features`` still works)
and *effective* ``weight``/``bias`` properties, so code that reads ``module.weight`` directly (for example
``nn.MultiheadAttention`` reading ``out_proj.weight``) sees the shifted weights instead of silently
bypassing the shift.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["ShiftModule", "ShiftWrapper", "TrainableCopy", "is_shift_module"]


@runtime_checkable
class ShiftModule(Protocol):
    """What every shift module provides."""

    base: nn.Module
    shift_method: str

    def delta(self) -> dict[str, Tensor]:
        """Dense change of each base parameter (``{"weight": ΔW, "bias": Δb}``); absent = unchanged."""
        ...

    def folded_params(self) -> dict[str, Tensor]:
        """The base parameters that make the plain base module compute what the wrapper computes.

        Fresh tensors owned by the caller (``fold_`` installs them as the base's storage).
        """
        ...

    def named_shift_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable shift parameters by role (``"lora_A"``, ``"scale"``, ...)."""
        ...

    def named_shift_buffers(self) -> dict[str, Tensor]:
        """Non-trainable tensors saved with the shift (e.g. a trained copy's running statistics)."""
        ...


def is_shift_module(module: nn.Module) -> bool:
    """True if ``module`` is a shift wrapper attached by shiftkit.

    The same test the attach/fold machinery uses, so target matching and folding never disagree about
    which modules are wrappers.
    """
    return isinstance(module, ShiftWrapper)


class ShiftWrapper(nn.Module):
    """Common behaviour of shift wrappers.

    Subclasses define ``forward`` and at least one of ``delta`` / ``effective_params``.
    """

    shift_method: str = ""
    base: nn.Module

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self._modules["base"], name)

    # --- effective parameters -------------------------------------------------------------------
    # A subclass defines ``delta`` (LoRA: the update is what it learns) or ``effective_params``
    # (SSF: the scaled weight is what it computes); each default is derived from the other.
    def effective_params(self) -> dict[str, Tensor]:
        """Differentiable values of the changed base parameters (``base + delta``)."""
        out: dict[str, Tensor] = {}
        for name, d in self.delta().items():
            current = getattr(self.base, name, None)
            out[name] = d if current is None else current + d.to(current.dtype)
        return out

    def delta(self) -> dict[str, Tensor]:
        """Dense change of each base parameter (``effective - base``); absent means unchanged."""
        out: dict[str, Tensor] = {}
        for name, value in self.effective_params().items():
            current = getattr(self.base, name, None)
            out[name] = value if current is None else value - current
        return out

    def _effective(self, name: str) -> Tensor | None:
        value = self.effective_params().get(name)
        return getattr(self.base, name, None) if value is None else value

    @property
    def weight(self) -> Tensor | None:
        """The weight the wrapper effectively computes with (base weight plus the shift)."""
        return self._effective("weight")

    @property
    def bias(self) -> Tensor | None:
        """The bias the wrapper effectively computes with (base bias plus the shift)."""
        return self._effective("bias")

    # --- protocol -------------------------------------------------------------------------------
    def folded_params(self) -> dict[str, Tensor]:
        """Base parameter values with the shift baked in, detached."""
        with torch.no_grad():
            return {n: v.detach().clone() for n, v in self.effective_params().items()}

    def named_shift_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable shift parameters by role; every parameter not under ``base``."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}

    def named_shift_buffers(self) -> dict[str, Tensor]:
        """Non-trainable tensors that belong to the shift and are saved with it (none by default)."""
        return {}

    # --- optional hooks -------------------------------------------------------------------------
    def on_attach(self, root: nn.Module, name: str) -> None:
        """Called once all wrappers of an attach are in place; ``name`` is this wrapper's path in ``root``.

        A method that must act outside its module (prompt tuning rewrites the inputs of the transformers
        model that owns the embedding) installs its hooks here and removes them in :meth:`on_detach`.
        Store hook ids rather than handles, so deep copies of the model stay independent.
        """

    def on_detach(self, root: nn.Module, name: str) -> None:
        """Undo :meth:`on_attach`; called before the wrapper is removed by ``fold_`` or ``detach_``."""

    def regularization_loss(self) -> Tensor | None:
        """This wrapper's term of the training regulariser (PEGO's orthogonality loss); ``None`` if none."""
        return None

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_shift_parameters().items())
        return f"method={self.shift_method}, {shapes}"


class TrainableCopy(ShiftWrapper):
    """A module trained in full beside a shift (PEFT's ``modules_to_save``).

    The original stays in ``base`` untouched; ``saved`` is a trainable deep copy used in the forward pass.
    """

    shift_method = "modules_to_save"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.saved = copy.deepcopy(base)
        for p in self.saved.parameters():
            p.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.saved(*args, **kwargs)

    def effective_params(self) -> dict[str, Tensor]:
        """Every parameter of the trained copy (dotted names for nested modules)."""
        return dict(self.saved.named_parameters())

    def _effective(self, name: str) -> Tensor | None:
        return getattr(self.saved, name, None)

    def named_shift_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter of the trained copy, keyed ``saved.<name>``."""
        return {f"saved.{n}": p for n, p in self.saved.named_parameters()}

    def named_shift_buffers(self) -> dict[str, torch.Tensor]:
        """Persistent floating buffers of the trained copy (BatchNorm running stats), ``saved.<name>``."""
        return {f"saved.{n}": b for n, b in _persistent_float_buffers(self.saved).items()}

    def folded_params(self) -> dict[str, Tensor]:
        """The trained copy's parameters and running statistics, detached."""
        with torch.no_grad():
            out = {n: p.detach().clone() for n, p in self.saved.named_parameters()}
            out.update({n: b.detach().clone() for n, b in _persistent_float_buffers(self.saved).items()})
        return out


def _persistent_float_buffers(module: nn.Module) -> dict[str, Tensor]:
    state = module.state_dict(keep_vars=True)
    params = {n for n, _ in module.named_parameters()}
    return {n: t for n, t in state.items() if n not in params and t.is_floating_point()}


@torch.no_grad()
def write_params_(module: nn.Module, values: dict[str, Tensor]) -> None:
    """Overwrite (or create) the parameters of ``module`` named in ``values`` (dotted names allowed)."""
    for dotted, value in values.items():
        owner_name, _, name = dotted.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        _write_one(owner, name, value)


def _write_one(module: nn.Module, name: str, value: Tensor) -> None:
    current = getattr(module, name, None)
    if isinstance(current, torch.Tensor):  # a parameter or a buffer (running stats of a trained copy)
        # rebind the storage instead of copying into it: folded values are fresh tensors (folded_params
        # clones), the Parameter object (and any tying) is kept, and a weight memory-mapped from a
        # checkpoint is not faulted in page by page (3-5x faster on MiniLM's FFN weights)
        current.data = value.detach().to(device=current.device, dtype=current.dtype)
        return
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    dtype = next((t.dtype for t in own if t.is_floating_point()), value.dtype)
    setattr(module, name, nn.Parameter(value.detach().to(dtype).clone(), requires_grad=False))
    # a norm that had no affine has one now; keep its flags truthful
    for flag in ("elementwise_affine", "affine"):
        if hasattr(module, flag):
            setattr(module, flag, True)
