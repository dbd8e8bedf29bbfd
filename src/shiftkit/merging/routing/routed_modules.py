"""Routed modules: one wrapper per targeted module mixes every pool member's shift *per sample*.

All wrappers of one routed model share a :class:`RoutingContext` whose ``alpha`` ``(B, N)`` the root's
forward pre-hook sets before the forward (see :mod:`shiftkit.merging.routing.attach`). Output-space mixing:

* LoRA (Linear / Conv2d / Embedding): ``y_b = W0 x_b + b0 + Σ_j α_bj s_j B_j (A_j x_b)``. The members'
  factors are concatenated along the rank axis (``A ∈ R^{Σr×in}``, ``B ∈ R^{out×Σr}``), so the whole
  mixture is two matmuls whatever N, and members may have different ranks.
* SSF: ``y_b = γ_b ⊙ base(x_b) + β_b`` with ``γ_b = 1 + Σ_j α_bj (γ_j − 1)`` and ``β_b = Σ_j α_bj β_j`` on
  the channel axis. For ``Σ_j α_bj = 1`` (FedIns' top-K average) this is ``Σ_j α_bj γ_j``; written around 1 it
  also gives ``α = 0 →`` the base and ``α = c`` constant ``→`` the static merge ``W0 + Σ c_j ΔW_j`` exactly.
* Modules trained in full beside a shift (``modules_to_save``, e.g. a classifier head — FedIns' classifier
  pool): ``y_b = base(x_b) + Σ_j α_bj (f_j(x_b) − base(x_b))``, exact delta mixing for linear heads.

No ``alpha`` set (a submodule called directly, or the query forward running) means the base output.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.core.functional import channel_axis, scale_shift
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError, ShiftMismatchError

__all__ = ["RoutedCopies", "RoutedLoRA", "RoutedModule", "RoutedSSF", "RoutingContext"]


class RoutingContext:
    """State shared by the routed modules of one model (a plain object, so deep copies stay consistent).

    Attributes:
        alpha: mixing weights of the running forward, ``(B, N)`` or ``(N,)`` for every sample; ``None``
            outside a routed forward.
        busy: the router is computing its query: routed modules act as the base.
        fixed: weights forced by :func:`~shiftkit.merging.routing.routing_weights` (router bypassed).
    """

    def __init__(self) -> None:
        self.alpha: Tensor | None = None
        self.busy = False
        self.fixed: Tensor | None = None


class RoutedModule(ShiftWrapper):
    """Common part of the routed wrappers: reads the per-sample weights from the shared context."""

    def __init__(self, base: nn.Module, ctx: RoutingContext, num_members: int) -> None:
        super().__init__(base)
        self.ctx = ctx
        self.num_members = num_members

    def _alpha(self, batch: int, like: Tensor) -> Tensor | None:
        ctx = self.ctx
        a = None if ctx.busy else ctx.alpha
        if a is None:
            return None
        if a.dim() == 1:
            a = a.expand(batch, -1)
        if a.shape[0] != batch:
            raise ShiftMismatchError(
                f"routing weights have {a.shape[0]} rows but this module got a batch of {batch}; "
                "routing needs batch-first inputs"
            )
        return a.to(device=like.device, dtype=like.dtype)

    def effective_params(self) -> dict[str, Tensor]:
        """Nothing fixed: the change depends on the input, so ``weight``/``bias`` read as the base's."""
        return {}

    def delta(self) -> dict[str, Tensor]:
        """Not defined for a routed module (its change depends on the input)."""
        raise ShiftkitError("a routed module has no single delta; merge the pool statically with pool.merge")

    def member_tensors(self, j: int) -> dict[str, Tensor]:
        """Member ``j``'s shift tensors by role, as the pool stores them (each subclass defines it)."""
        raise ShiftkitError(f"{type(self).__name__} does not define member_tensors")


class RoutedLoRA(RoutedModule):
    """Per-sample mixture of LoRA branches around a Linear, Conv2d (groups=1) or Embedding.

    Parameters ``lora_A (Σr, in, ...)`` and ``lora_B (out, Σr, ...)`` (the members' factors concatenated on
    the rank axis, frozen unless trained explicitly); buffers ``scaling (N,)`` and ``member (Σr,)`` (which
    member each rank column belongs to).
    """

    shift_method = "routed-lora"

    def __init__(
        self,
        base: nn.Module,
        ctx: RoutingContext,
        factors: list[tuple[Tensor, Tensor]],
        scalings: list[float],
    ) -> None:
        super().__init__(base, ctx, len(factors))
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ShiftkitError("routed LoRA supports Conv2d with groups=1 and zero padding only")
        w = base.weight
        assert isinstance(w, Tensor)
        a = torch.cat([fa for fa, _ in factors], 0)
        b = torch.cat([fb for _, fb in factors], 1)
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype).clone(), requires_grad=False)
        self.lora_B = nn.Parameter(b.to(device=w.device, dtype=w.dtype).clone(), requires_grad=False)
        self.ranks = [fa.shape[0] for fa, _ in factors]
        member = torch.repeat_interleave(torch.arange(len(factors)), torch.tensor(self.ranks))
        self.register_buffer("member", member.to(w.device), persistent=False)
        self.register_buffer(
            "scaling", torch.tensor(scalings, dtype=w.dtype, device=w.device), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, ..., in)`` (ids ``(B, ...)`` for embeddings, ``(B, C, H, W)`` for convs) ``-> out``."""
        out = self.base(x)
        alpha = self._alpha(x.shape[0], self.lora_A)
        if alpha is None:
            return out
        col = (alpha * self.scaling)[:, self.member]  # (B, Σr): α_bj s_j on each of member j's columns
        base = self.base
        if isinstance(base, nn.Conv2d):
            h = F.conv2d(x.to(self.lora_A.dtype), self.lora_A, None, base.stride, base.padding, base.dilation)
            h = h * col[:, :, None, None]
            return out + F.conv2d(h, self.lora_B).to(out.dtype)
        if isinstance(base, nn.Embedding):
            h = F.embedding(x, self.lora_A.T, base.padding_idx, base.max_norm, base.norm_type)
        else:
            h = F.linear(x.to(self.lora_A.dtype), self.lora_A)
        h = h * col.reshape(col.shape[0], *([1] * (h.dim() - 2)), -1)
        return out + F.linear(h, self.lora_B).to(out.dtype)

    def member_tensors(self, j: int) -> dict[str, Tensor]:
        """``{"lora_A": (r_j, ...), "lora_B": (out, r_j, ...)}`` of member ``j``."""
        lo = sum(self.ranks[:j])
        hi = lo + self.ranks[j]
        return {"lora_A": self.lora_A[lo:hi], "lora_B": self.lora_B[:, lo:hi]}


class RoutedSSF(RoutedModule):
    """Per-sample mixture of SSF scale/shift pairs. Parameters ``scale (N, *C)`` and ``shift (N, *C)``."""

    shift_method = "routed-ssf"

    def __init__(
        self, base: nn.Module, ctx: RoutingContext, scales: list[Tensor], shifts: list[Tensor]
    ) -> None:
        super().__init__(base, ctx, len(scales))
        # follow the base's dtype/device (a norm without affine: its running statistics tell them)
        own = [
            t
            for t in (*base.parameters(recurse=False), *base.buffers(recurse=False))
            if t.is_floating_point()
        ]
        kw: dict[str, Any] = {"dtype": own[0].dtype, "device": own[0].device} if own else {}
        self.scale = nn.Parameter(torch.stack(scales).to(**kw).clone(), requires_grad=False)
        self.shift = nn.Parameter(torch.stack(shifts).to(**kw).clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """Base output ``(B, ..., C, ...)`` scaled and shifted per sample on its channel axis."""
        y = self.base(x)
        alpha = self._alpha(y.shape[0], self.scale)
        if alpha is None:
            return y
        shape = tuple(self.scale.shape[1:])
        gamma = 1.0 + alpha @ (self.scale - 1.0).flatten(1)  # (B, C): 1 + Σ α (γ_j − 1)
        beta = alpha @ self.shift.flatten(1)
        try:  # SSF's own transform, with one (γ, β) per sample
            return scale_shift(
                y,
                gamma.reshape(-1, *shape),
                beta.reshape(-1, *shape),
                channel_axis(self.base, y.dim()),
                per_sample=True,
            )
        except ValueError:
            raise ShiftMismatchError("routed SSF needs a batch axis in front of the channel axis") from None

    def member_tensors(self, j: int) -> dict[str, Tensor]:
        """``{"scale": (*C,), "shift": (*C,)}`` of member ``j``."""
        return {"scale": self.scale[j], "shift": self.shift[j]}


class RoutedCopies(RoutedModule):
    """Per-sample mixture of fully trained copies of a module (``modules_to_save``, e.g. a head).

    Submodule ``members`` (a ModuleList of N frozen copies); the output mixes their differences to the base.
    """

    shift_method = "routed-copies"

    def __init__(self, base: nn.Module, ctx: RoutingContext, states: list[dict[str, Tensor]]) -> None:
        super().__init__(base, ctx, len(states))
        copies = []
        for j, state in enumerate(states):
            m = copy.deepcopy(base)
            own = m.state_dict()
            for key, t in state.items():
                if key not in own or own[key].shape != t.shape:
                    raise ShiftMismatchError(
                        f"member {j}: saved tensor {key!r} {tuple(t.shape)} does not fit "
                        f"{type(base).__name__}"
                    )
                with torch.no_grad():
                    own[key].copy_(t)
            for p in m.parameters():
                p.requires_grad_(False)
            copies.append(m)
        self.members = nn.ModuleList(copies)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``base(x) + Σ_j α_j (member_j(x) − base(x))`` per sample (tensor outputs, batch first)."""
        y = self.base(*args, **kwargs)
        if not isinstance(y, Tensor):
            if self.ctx.alpha is not None and not self.ctx.busy:
                raise ShiftkitError(f"routing a {type(self.base).__name__} needs a tensor output")
            return y
        alpha = self._alpha(y.shape[0], y)
        if alpha is None:
            return y
        out = y
        for j, m in enumerate(self.members):
            w = alpha[:, j].reshape(-1, *([1] * (y.dim() - 1)))
            out = out + w * (m(*args, **kwargs) - y)
        return out

    def member_tensors(self, j: int) -> dict[str, Tensor]:
        """Member ``j``'s saved parameters and floating buffers, keyed ``saved.<name>``."""
        return {f"saved.{k}": t for k, t in self.members[j].state_dict().items() if t.is_floating_point()}
