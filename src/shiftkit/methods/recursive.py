"""Relaxed Recursive Transformers: tie a layer stack into K shared blocks, relax it with depth-wise LoRA.

Bae et al., ICLR 2025, arXiv:2410.20672. A stack of ``L`` layers becomes ``K = L/N`` shared blocks run
``N`` times (``num_loops``). Original layer ``ℓ`` uses slot ``k(ℓ) = ℓ mod K`` (``"cycle"``: the block of K
layers repeats) or ``k(ℓ) = ⌊ℓ/N⌋`` (``"sequence"``: each block runs N times in a row). For each position
``(ℓ, P)`` (``P`` = a projection such as ``q_proj``)::

    y = x W_sharedᵀ_{k(ℓ),P} + b_shared + (x A_{ℓ,P}ᵀ) B_{ℓ,P}ᵀ
    W_shared[k] = mean_{ℓ: k(ℓ)=k} W_ℓ                          ("average" init; "stepwise" selects a layer)
    B A = U_r Σ_r V_rᵀ  (truncated SVD of the residual R = W_ℓ − W_shared[k(ℓ)], LoRA scale 1)

so ``r = min(in, out)`` reproduces the original model exactly and ``r = 0`` is the strict recursive model.
Both the shared weights (one ``nn.Parameter`` per slot, shared by every wrapper tied to it and stored once
in the shift file) and the LoRAs train. Fold un-ties the stack: each Linear gets ``W_shared + B A``, a
vanilla-shaped model that computes what the relaxed model computes (no fold into one shared block exists).

Scope and limits:
- The stack is the largest ``nn.ModuleList`` of structurally identical children (``model.layers`` in
  Llama, ``encoder.layer`` in BERT), or the module named by ``RecursiveConfig.layers``.
- ``L`` must be divisible by ``num_loops``. The reference first drops layers to ``round(linspace(0, L−1,
  K·N))`` when it is not; that changes the architecture (it is not a shift of the same model): out of scope.
- Only Linear projections are tied. Norm gains stay per layer, as trained: the reference code averages
  (or selects) them at init and ties them with ``ln_share``; the paper's choice was not verified, and
  keeping them is what makes full rank exact. They count among the untied parameters.
- ``nn.MultiheadAttention`` is not supported: its q/k/v are one packed ``in_proj_weight`` parameter, so its
  ``out_proj`` is never targeted (no half-tied attention).
- With ``target_modules="all"`` the Linears outside the stack (an LM head, a classifier) are kept as they
  are (left unwrapped); naming one explicitly is an error.
- The original Linears stay in memory inside the wrappers (``detach_`` restores them bit for bit). What a
  saved recursive model needs is the shift file plus the untied base parameters: see
  :func:`recursive_parameter_count`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.core.attach import attached_wrappers
from shiftkit.core.config import ShiftConfig
from shiftkit.core.functional import truncated_svd
from shiftkit.core.registry import register_method
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError, TargetNotFoundError

__all__ = [
    "RecursiveConfig",
    "RecursiveLinear",
    "SharedLinear",
    "find_layer_stack",
    "recursive_parameter_count",
    "slot_sources",
    "tie_slots",
]

_SHARING = ("cycle", "sequence")
_INITS = ("average", "stepwise", "lower", "upper")


@dataclass(frozen=True, kw_only=True)
class RecursiveConfig(ShiftConfig):
    """Relaxed recursive settings.

    Attributes:
        num_loops: N, how many times each shared block runs; the stack's depth L must be divisible by it.
            2 halves the tied parameters (the mildest tying). ``num_loops=1`` ties
            nothing (every slot is its own layer, the residuals are zero): an exact no-op.
        sharing: ``"cycle"`` (k = ℓ mod K; the block of K layers repeats: the looped model) or
            ``"sequence"`` (k = ⌊ℓ/N⌋). Cycle is the default, as the looped form the paper starts from
            [unverified which one its final models use].
        init: ``"average"`` (mean of the tied layers; recommended for relaxed models because the SVD
            residuals are small and balanced), ``"stepwise"`` (slot k takes layer round(linspace(0, L−1,
            K))[k]; recommended for strict r=0 models), ``"lower"`` (layers 0..K−1), ``"upper"`` (the
            last K layers).
        r: rank of each depth-wise LoRA, capped at ``min(in, out)`` per projection (a rank that large
            reproduces the original model). 0 gives the strict recursive model. 64 is the smallest rank
            of the paper's relaxed 1B models (they go up to 512 at hidden 2048). On SmolLM2-135M (hidden
            576) it keeps a 25 % parameter reduction but captures only a third of the tying residual's
            energy (pretrained layers are nearly uncorrelated: averaging two leaves half the energy), so
            a converted model needs up-training, as in the paper.
        layers: name of the layer stack (an ``nn.ModuleList``, e.g. ``"model.layers"``); ``None`` finds
            it: the largest ModuleList of structurally identical children.

    Example:
        >>> model, tok = zoo.load_model("smollm2-135m")
        >>> sk.attach_(model, sk.RecursiveConfig(num_loops=2, r=64))   # 30 layers -> 15 shared blocks
        >>> recursive_parameter_count(model)["reduction"]              # 0.249
    """

    num_loops: int = 2
    sharing: str = "cycle"
    init: str = "average"
    r: int = 64
    layers: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_loops, bool) or not isinstance(self.num_loops, int) or self.num_loops < 1:
            raise ShiftkitError(
                f"RecursiveConfig.num_loops must be a positive integer, got {self.num_loops!r}"
            )
        if self.sharing not in _SHARING:
            raise ShiftkitError(f"RecursiveConfig.sharing must be one of {_SHARING}, got {self.sharing!r}")
        if self.init not in _INITS:
            raise ShiftkitError(f"RecursiveConfig.init must be one of {_INITS}, got {self.init!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ShiftkitError(f"RecursiveConfig.r must be an integer >= 0, got {self.r!r}")
        if self.layers is not None and (not isinstance(self.layers, str) or not self.layers):
            raise ShiftkitError(f"RecursiveConfig.layers must be a module name or None, got {self.layers!r}")


def tie_slots(num_layers: int, num_loops: int, sharing: str = "cycle") -> list[int]:
    """The shared slot ``k(ℓ)`` of every layer ``ℓ``.

    Raises:
        ShiftkitError: ``num_layers`` is not divisible by ``num_loops``.

    Example:
        >>> tie_slots(6, 2, "cycle"), tie_slots(6, 2, "sequence")
        ([0, 1, 2, 0, 1, 2], [0, 0, 1, 1, 2, 2])
    """
    if num_loops < 1 or num_layers % num_loops:
        raise ShiftkitError(
            f"a stack of {num_layers} layers cannot run as {num_loops} loops of shared blocks: L must be "
            f"divisible by num_loops (divisors of {num_layers}: "
            f"{[d for d in range(1, num_layers + 1) if num_layers % d == 0]}). Dropping layers first, as "
            "the reference does, changes the architecture and is not supported"
        )
    k = num_layers // num_loops
    if sharing == "cycle":
        return [ell % k for ell in range(num_layers)]
    if sharing == "sequence":
        return [ell // num_loops for ell in range(num_layers)]
    raise ShiftkitError(f"sharing must be one of {_SHARING}, got {sharing!r}")


def slot_sources(slots: list[int], init: str) -> list[list[int]]:
    """For each slot, the original layers its shared weights are initialised from (averaged if several).

    Example:
        >>> slot_sources([0, 1, 0, 1], "average"), slot_sources([0, 1, 0, 1], "stepwise")
        ([[0, 2], [1, 3]], [[0], [3]])
    """
    n, k = len(slots), max(slots) + 1
    if init == "average":
        return [[ell for ell in range(n) if slots[ell] == s] for s in range(k)]
    if init == "stepwise":  # keeps the first and the last layer, the rest evenly spaced
        # numpy's linspace arithmetic (i·step, last point exact), rounded half to even like the reference:
        # for L=30, K=15 point 7 is 14.500000000000002, layer 15 (an exact 14.5 would round to 14)
        step = (n - 1) / max(1, k - 1)
        return [[round(i * step)] for i in range(k - 1)] + [[n - 1 if k > 1 else 0]]
    if init == "lower":
        return [[s] for s in range(k)]
    if init == "upper":
        return [[n - k + s] for s in range(k)]
    raise ShiftkitError(f"init must be one of {_INITS}, got {init!r}")


def _signature(module: nn.Module) -> tuple[object, ...]:
    return (type(module), *((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()))


def find_layer_stack(root: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList]:
    """The transformer's repeated layer stack: ``(name, module_list)``.

    Args:
        root: the model.
        name: the stack's module name; ``None`` picks the ``nn.ModuleList`` with the most (at least two)
            children that all have the same type and parameter shapes.

    Raises:
        TargetNotFoundError: no such stack (or ``name`` is not a module of ``root``).
        ShiftkitError: ``name`` is not an ``nn.ModuleList``, or two stacks are equally large.

    Example:
        >>> name, layers = find_layer_stack(llama)
        >>> name, len(layers)
        ('model.layers', 30)
    """
    if name is not None:
        try:
            stack = root.get_submodule(name)
        except AttributeError:
            raise TargetNotFoundError(f"the model has no module {name!r} (RecursiveConfig.layers)") from None
        if not isinstance(stack, nn.ModuleList):
            raise ShiftkitError(f"{name!r} is a {type(stack).__name__}, not an nn.ModuleList of layers")
        return name, stack
    found = [
        (n, m)
        for n, m in root.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({_signature(c) for c in m}) == 1
    ]
    if not found:
        raise TargetNotFoundError(
            "found no layer stack (an nn.ModuleList of at least two identical layers) to tie; "
            "name it with RecursiveConfig(layers=...)"
        )
    most = max(len(m) for _, m in found)
    best = [(n, m) for n, m in found if len(m) == most]
    if len(best) > 1:
        raise ShiftkitError(
            f"several layer stacks of {most} layers ({', '.join(n for n, _ in best)}); pick one with "
            "RecursiveConfig(layers=...)"
        )
    return best[0]


class SharedLinear(nn.Module):
    """The weights of one shared slot and projection: ``weight (out, in)`` and ``bias (out,)`` or None.

    Example:
        >>> slot = model.model.layers[0].self_attn.q_proj.shared
        >>> slot is model.model.layers[15].self_attn.q_proj.shared   # cycle sharing, K = 15
        True
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)


class RecursiveLinear(ShiftWrapper):
    """A Linear of layer ``ℓ`` computing with its slot's shared weights plus its own depth-wise LoRA.

    Parameters: ``shared.weight (out, in)`` and ``shared.bias (out,)`` (the same objects in every wrapper
    of the slot), ``lora_A (r, in)`` and ``lora_B (out, r)`` when ``r > 0``.

    Example:
        >>> sk.attach_(model, RecursiveConfig(num_loops=2, r=64))
        >>> q = model.model.layers[3].self_attn.q_proj
        >>> q.slot, q.lora_A.shape                                 # (3, torch.Size([64, 576]))
    """

    def __init__(
        self,
        base: nn.Linear,
        shared: SharedLinear,
        lora_a: Tensor | None,
        lora_b: Tensor | None,
        layer: int,
        slot: int,
    ) -> None:
        super().__init__(base)
        self.shared = shared
        self.layer, self.slot = layer, slot
        self.rank = 0 if lora_a is None else lora_a.shape[0]
        if lora_a is not None and lora_b is not None:
            self.lora_A = nn.Parameter(lora_a)
            self.lora_B = nn.Parameter(lora_b)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        y = F.linear(x, self.shared.weight, self.shared.bias)
        if self.rank:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y

    def effective_params(self) -> dict[str, Tensor]:
        """``{"weight": W_shared + B A (out, in), "bias": b_shared (out,)}`` (no bias without a base bias)."""
        w: Tensor = self.shared.weight
        if self.rank:
            w = w + self.lora_B @ self.lora_A
        out: dict[str, Tensor] = {"weight": w}
        if self.shared.bias is not None:
            out["bias"] = self.shared.bias
        return out

    def extra_repr(self) -> str:
        return f"layer={self.layer}, slot={self.slot}, rank={self.rank}"


def _compute_dtype(t: Tensor) -> torch.dtype:
    # SVD needs fp32 at least; fp64 models keep fp64 so the full-rank reconstruction is exact to ~1e-15
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _mean(tensors: list[Tensor]) -> Tensor:
    """Mean of equally shaped tensors, computed in fp32/fp64 and returned in their dtype."""
    cd = _compute_dtype(tensors[0])
    return torch.stack([t.to(cd) for t in tensors]).mean(0).to(tensors[0].dtype)


def _svd_factors(residual: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``B = U_r Σ_r (out, r)``, ``A = V_rᵀ (r, in)`` of the best rank-r approximation (Eckart–Young)."""
    return truncated_svd(residual, rank)


@contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    """Run CPU LAPACK single-threaded. Measured on a busy 2-core machine: a 1536×576 SVD took 1–23 s with
    two threads (every one of gesdd's many parallel regions waits for a descheduled thread) and 0.1 s with
    one, which is also about as fast as two on an idle machine."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _not_packed_attention(module: nn.Module) -> bool:
    # nn.MultiheadAttention's out_proj: its q/k/v live in one packed parameter we cannot tie alongside it
    return not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _split_targets(
    targets: list[tuple[str, nn.Module]], stack_name: str, num_layers: int
) -> tuple[dict[tuple[int, str], nn.Linear], list[str]]:
    prefix = f"{stack_name}." if stack_name else ""
    inside: dict[tuple[int, str], nn.Linear] = {}
    outside: list[str] = []
    for fqn, module in targets:
        idx, _, rel = fqn[len(prefix) :].partition(".") if fqn.startswith(prefix) else ("", "", "")
        if idx.isdigit() and int(idx) < num_layers and rel and isinstance(module, nn.Linear):
            inside[int(idx), rel] = module
        else:
            outside.append(fqn)
    return inside, outside


@register_method(
    "recursive",
    config=RecursiveConfig,
    targets=(nn.Linear,),
    foldable=True,
    zero_init={"num_loops": 1},  # one loop: every slot is its own layer, residuals and LoRAs are zero
    accepts=_not_packed_attention,
    group=True,
)
@torch.no_grad()
def wrap_group(
    root: nn.Module, targets: list[tuple[str, nn.Module]], config: ShiftConfig
) -> list[ShiftWrapper | None]:
    """Tie the targeted Linears of the layer stack into shared slots with SVD-initialised depth-wise LoRAs."""
    assert isinstance(config, RecursiveConfig)
    stack_name, stack = find_layer_stack(root, config.layers)
    num_layers = len(stack)
    slots = tie_slots(num_layers, config.num_loops, config.sharing)
    inside, outside = _split_targets(targets, stack_name, num_layers)
    if outside and config.target_modules not in (None, "all", "all-linear"):
        raise ShiftkitError(
            f"target_modules selects {len(outside)} module(s) outside the layer stack {stack_name!r}, which "
            f"cannot be tied: {outside[:5]}"
        )
    if not inside:
        raise TargetNotFoundError(f"no targeted Linear lies inside the layer stack {stack_name!r}")
    rels = sorted({rel for _, rel in inside})
    missing = [f"{ell}.{rel}" for ell in range(num_layers) for rel in rels if (ell, rel) not in inside]
    if missing:
        raise ShiftkitError(
            f"recursive ties the same projections in every layer of {stack_name!r}; target_modules selects "
            f"{rels} but misses {missing[:5]}"
        )
    shared: dict[tuple[int, str], SharedLinear] = {}
    for s, layers in enumerate(slot_sources(slots, config.init)):
        for rel in rels:
            tied = [inside[ell, rel] for ell in range(num_layers) if slots[ell] == s]
            if len({(m.weight.shape, m.bias is None) for m in tied}) != 1:
                raise ShiftkitError(f"the layers tied to slot {s} have different {rel!r} shapes or biases")
            src = [inside[ell, rel] for ell in layers]
            biases: list[Tensor] = [m.bias for m in src if m.bias is not None]
            shared[s, rel] = SharedLinear(
                _mean([m.weight.data for m in src]), _mean(biases) if biases else None
            )
    wrappers: dict[str, ShiftWrapper] = {}
    prefix = f"{stack_name}." if stack_name else ""
    with _single_thread(next(iter(inside.values())).weight.device):
        for (ell, rel), module in inside.items():
            slot = shared[slots[ell], rel]
            rank = min(config.r, *module.weight.shape)
            a = b_ = None
            if rank:
                cd = _compute_dtype(module.weight)
                b_, a = _svd_factors(module.weight.to(cd) - slot.weight.to(cd), rank)
                a, b_ = a.to(module.weight.dtype).contiguous(), b_.to(module.weight.dtype).contiguous()
            wrappers[f"{prefix}{ell}.{rel}"] = RecursiveLinear(module, slot, a, b_, ell, slots[ell])
    return [wrappers.get(fqn) for fqn, _ in targets]  # None: outside the stack, left unwrapped


def recursive_parameter_count(model: nn.Module) -> dict[str, float]:
    """Parameters of the original model and of the recursive model a saved shift describes.

    ``recursive = shared + lora + untied``: ``shared`` = K × the tied parameters of one layer, ``lora`` =
    Σ r·(in + out) over positions, ``untied`` = every base parameter not in a tied Linear (embeddings,
    norms, the head). This is what a saved recursive model needs (shift file + untied base parameters); the
    attached model still holds the original Linears as well, for ``detach_``.

    Returns:
        ``{"original", "recursive", "shared", "lora", "untied", "tied_original", "reduction"}`` (counts;
        ``reduction`` = 1 − recursive / original).

    Raises:
        ShiftkitError: no recursive shift is attached.

    Example:
        >>> sk.attach_(model, RecursiveConfig(num_loops=2, r=64))      # SmolLM2-135M
        >>> round(recursive_parameter_count(model)["reduction"], 3)
        0.249
    """
    tied = [w for _, w in attached_wrappers(model) if isinstance(w, RecursiveLinear)]
    if not tied:
        raise ShiftkitError("recursive_parameter_count: no recursive shift is attached to this model")
    shared_ids = {id(p) for w in tied for p in w.shared.parameters()}
    lora_ids = {id(p) for w in tied for n, p in w.named_parameters(recurse=False)}
    tied_base = {id(p) for w in tied for p in w.base.parameters()}
    params = {id(p): p.numel() for p in model.parameters()}  # unique parameters (tied embeddings once)
    shift = shared_ids | lora_ids
    original = sum(n for i, n in params.items() if i not in shift)
    untied = sum(n for i, n in params.items() if i not in shift and i not in tied_base)
    shared = sum(params[i] for i in shared_ids)
    lora = sum(params[i] for i in lora_ids)
    recursive = shared + lora + untied
    return {
        "original": original,
        "recursive": recursive,
        "shared": shared,
        "lora": lora,
        "untied": untied,
        "tied_original": original - untied,
        "reduction": 1.0 - recursive / original,
    }
