"""Light-PEFT's PEFT side (Gu et al., Findings ACL 2024; spec: learn.md §8.1): which LoRA modules and ranks
matter, estimated in the first steps of training, and the LoRA shift cut down to what survives.

* :class:`LoRAImportance` watches the LoRA modules of a model during the estimation steps:

  - *module level*: at every training forward, the mean over (non-padding) tokens of ``‖Δh‖₂ / ‖h‖₂``,
    Δh the LoRA branch's output and h the base layer's;
  - *rank level* (first-order Taylor), after every backward:
    ``I[k] = |mean_j (A ⊙ ∇A)[k, j]| + |mean_i (B ⊙ ∇B)[i, k]|``;

  each score is the mean over the **second half** of the recorded steps (the first half is the LoRA
  still moving away from its zero start).
* :func:`select_lora`: the modules at or below the global ``module_ratio`` quantile of the module scores
  (0.75 in the paper's scripts), then the ranks at or below the global ``rank_ratio`` quantile of the rank
  scores of the modules that stay (0.5); a module that loses every rank goes too.
* :func:`prune_lora`: the LoRA shift without those modules and ranks, and sliced to a base whose heads and
  FFN neurons :func:`shiftkit.compression.prune.prune_` removed (the rows of B for query/key/value and the
  FFN inputs, the columns of A for the attention output and the FFN output). Each module keeps its
  scaling: with ``r'`` ranks left its ``lora_alpha`` becomes ``s·r'`` (``s·√r'`` with rsLoRA), stored
  per module in ``rank_pattern`` / ``alpha_pattern`` as PEFT does, so the pruned shift computes exactly
  the kept part of the original one.

The whole two-stage recipe (estimate with masks, prune, train the small model) is
:func:`shiftkit.recipes.light_peft.light_peft`.

Example:
    >>> imp = LoRAImportance(model)          # LoRA attached
    >>> ...                                   # train; after each backward: imp.step()
    >>> modules, ranks = select_lora(imp)
    >>> small = prune_lora(sk.extract(model), modules=modules, ranks=ranks)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.compression.prune import TransformerLayer
from shiftkit.core.attach import attached_wrappers
from shiftkit.core.shift import Shift
from shiftkit.errors import ShiftkitError
from shiftkit.methods.lora.config import LoRAConfig, module_patterns
from shiftkit.methods.lora.dense import adapted_modules, lora_kind, require_lora
from shiftkit.methods.lora.layers import LoRALinear

__all__ = ["LoRAImportance", "prune_lora", "select_lora"]


def _second_half_mean(values: list[Tensor]) -> Tensor:
    return torch.stack(values[len(values) // 2 :]).mean(0)


class LoRAImportance:
    """Module- and rank-level importance of the LoRA modules of ``model`` (attached with ``sk.attach_``).

    Call :meth:`step` after every backward of the estimation run (before the optimiser zeroes the
    gradients); set :attr:`token_mask` to the batch's attention mask ``(batch, seq)`` so padding tokens do
    not count in the module scores (``None``: every token counts). :meth:`remove` takes the hooks off.

    Raises:
        ShiftkitError: no LoRA module on Linear layers is attached.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules: dict[str, LoRALinear] = {
            fqn: w for fqn, w in attached_wrappers(model) if isinstance(w, LoRALinear)
        }
        if not self.modules:
            raise ShiftkitError(
                "LoRAImportance needs LoRA attached to Linear layers (sk.attach_ a LoRAConfig)"
            )
        self.token_mask: Tensor | None = None
        self._ratio: dict[str, list[Tensor]] = {fqn: [] for fqn in self.modules}
        self._pending: dict[str, list[Tensor]] = {fqn: [] for fqn in self.modules}
        self._rank: dict[str, list[Tensor]] = {fqn: [] for fqn in self.modules}
        self._base_out: dict[str, Tensor] = {}
        self._handles = []
        for fqn, w in self.modules.items():
            self._handles.append(w.base.register_forward_hook(self._base_hook(fqn)))
            self._handles.append(w.register_forward_hook(self._hook(fqn)))

    def _base_hook(self, fqn: str) -> Any:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
            self._base_out[fqn] = out.detach()

        return hook

    def _hook(self, fqn: str) -> Any:
        def hook(module: LoRALinear, args: tuple[Any, ...], out: Tensor) -> None:
            h = self._base_out.pop(fqn, None)
            if h is None or not (module.training and torch.is_grad_enabled()):
                return
            with torch.no_grad():
                delta = out.detach() - h  # the branch that ran (its dropout included)
                ratio = delta.norm(dim=-1) / (h.norm(dim=-1) + 1e-12)  # (..., tokens)
                mask = self.token_mask
                if mask is not None and tuple(mask.shape) == tuple(ratio.shape):
                    keep = mask.to(ratio.device).bool()
                    value = ratio[keep].mean() if keep.any() else ratio.new_zeros(())
                else:
                    value = ratio.mean()
                self._pending[fqn].append(value.float().cpu())

        return hook

    @torch.no_grad()
    def step(self) -> None:
        """Record this step's scores: the module ratios of its forwards and the rank scores of its
        gradients."""
        for fqn, w in self.modules.items():
            if self._pending[fqn]:
                self._ratio[fqn].append(torch.stack(self._pending[fqn]).mean())
                self._pending[fqn] = []
            a, b = w.lora_A, w.lora_B
            if a.grad is None or b.grad is None:
                self._rank[fqn].append(torch.zeros(a.shape[0]))
                continue
            score = (a * a.grad).float().mean(1).abs() + (b * b.grad).float().mean(0).abs()
            self._rank[fqn].append(score.cpu())

    @property
    def steps(self) -> int:
        """How many steps were recorded."""
        return max((len(v) for v in self._rank.values()), default=0)

    def module_scores(self) -> dict[str, float]:
        """``‖Δh‖/‖h‖`` of each module, averaged over the second half of the recorded steps."""
        if self.steps == 0:
            raise ShiftkitError("no step recorded: call LoRAImportance.step() after each backward")
        return {fqn: float(_second_half_mean(v)) if v else 0.0 for fqn, v in self._ratio.items()}

    def rank_scores(self) -> dict[str, Tensor]:
        """The Taylor score ``(r,)`` of each module's ranks, averaged over the second half of the steps."""
        if self.steps == 0:
            raise ShiftkitError("no step recorded: call LoRAImportance.step() after each backward")
        return {fqn: _second_half_mean(v) for fqn, v in self._rank.items()}

    def remove(self) -> None:
        """Take the hooks off the model (the recorded scores stay)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _check_ratio(name: str, r: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r < 1:
        raise ShiftkitError(f"{name} must be in [0, 1), got {r!r}")


def select_lora(
    importance: LoRAImportance | tuple[Mapping[str, float], Mapping[str, Tensor]],
    *,
    module_ratio: float = 0.75,
    rank_ratio: float = 0.5,
) -> tuple[list[str], dict[str, list[int]]]:
    """``(modules, ranks)`` to remove: modules at or below the global ``module_ratio`` quantile of the module
    scores, and per surviving module the ranks at or below the global ``rank_ratio`` quantile of their rank
    scores (a module that would lose every rank is removed whole). At least one module is kept.

    Args:
        importance: a :class:`LoRAImportance` after the estimation steps, or ``(module_scores,
            rank_scores)`` as it returns them.
        module_ratio: quantile of module scores at or below which a module goes (the paper's 0.75).
        rank_ratio: quantile of rank scores at or below which a rank goes (the paper's 0.5).

    Example:
        >>> modules, ranks = select_lora(imp, module_ratio=0.5, rank_ratio=0.5)
    """
    _check_ratio("module_ratio", module_ratio)
    _check_ratio("rank_ratio", rank_ratio)
    mod: Mapping[str, float]
    rank: Mapping[str, Tensor]
    if isinstance(importance, LoRAImportance):
        mod, rank = importance.module_scores(), importance.rank_scores()
    else:
        mod, rank = importance
    names = sorted(mod)
    if not names:
        raise ShiftkitError("select_lora: no module scores")
    drop: list[str] = []
    if module_ratio > 0:
        values = torch.tensor([mod[n] for n in names], dtype=torch.float64)
        thr = torch.quantile(values, module_ratio)
        drop = [n for n in names if mod[n] <= thr]
        if len(drop) == len(names):  # keep the most important module
            drop.remove(max(names, key=lambda n: mod[n]))
    kept = [n for n in names if n not in drop]
    ranks: dict[str, list[int]] = {}
    if rank_ratio > 0 and kept:
        thr = torch.quantile(torch.cat([rank[n].double().reshape(-1) for n in kept]), rank_ratio)
        for n in kept:
            gone = [int(k) for k in torch.nonzero(rank[n].double() <= thr).reshape(-1)]
            if len(gone) == rank[n].numel():
                drop.append(n)
            elif gone:
                ranks[n] = gone
        if len(drop) == len(names):  # every rank of every module at the threshold (all-zero scores)
            best = max(names, key=lambda n: float(rank[n].max()))
            drop.remove(best)
            ranks[best] = [k for k in range(rank[best].numel()) if k != int(torch.argmax(rank[best]))]
    return sorted(drop), ranks


def _unit_slices(
    layers: Iterable[TransformerLayer] | None,
    heads: Mapping[str, Iterable[int]] | None,
    neurons: Mapping[str, Iterable[int]] | None,
    shift: Shift,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rows of B (outputs) and columns of A (inputs) each module keeps after head / neuron pruning."""
    rows: dict[str, Tensor] = {}
    cols: dict[str, Tensor] = {}
    if not heads and not neurons:
        return rows, cols
    if layers is None:
        raise ShiftkitError("prune_lora: heads= / neurons= need layers= (prune.find_layers of the model)")
    by_prefix = {ly.prefix: ly for ly in layers}

    def layer(prefix: str) -> TransformerLayer:
        if prefix not in by_prefix:
            raise ShiftkitError(f"prune_lora: no transformer layer {prefix!r} in layers=")
        return by_prefix[prefix]

    for prefix, drop in (heads or {}).items():
        gone = set(drop)
        if not gone:
            continue
        ly = layer(prefix)
        keep = torch.cat(
            [torch.arange(h * ly.head_dim, (h + 1) * ly.head_dim) for h in range(ly.heads) if h not in gone]
        )
        for name in (ly.q, ly.k, ly.v):
            rows[name] = keep
        cols[ly.attn_out] = keep
    for prefix, drop in (neurons or {}).items():
        gone = set(drop)
        if not gone:
            continue
        ly = layer(prefix)
        if ly.ffn_out in shift.base:
            width = shift.base[ly.ffn_out][-1]
        else:
            shapes = [shift.base[n][0] for n in ly.ffn_in if n in shift.base]
            if not shapes:
                continue  # no LoRA touches this FFN
            width = shapes[0]
        keep = torch.tensor([n for n in range(int(width)) if n not in gone], dtype=torch.long)
        for name in ly.ffn_in:
            rows[name] = keep
        cols[ly.ffn_out] = keep
    return rows, cols


@torch.no_grad()
def prune_lora(
    shift: Shift,
    *,
    modules: Iterable[str] = (),
    ranks: Mapping[str, Iterable[int]] | None = None,
    layers: Iterable[TransformerLayer] | None = None,
    heads: Mapping[str, Iterable[int]] | None = None,
    neurons: Mapping[str, Iterable[int]] | None = None,
) -> Shift:
    """A LoRA shift without the given modules and ranks, sliced to a base pruned of ``heads`` / ``neurons``.

    Args:
        shift: a LoRA shift (``sk.extract`` of the estimation model).
        modules: adapted modules to remove entirely.
        ranks: per module, the rank indices to remove (row k of A, column k of B).
        layers: :func:`shiftkit.compression.prune.find_layers` of the (unpruned) model the shift was
            extracted from; needed with ``heads`` / ``neurons``.
        heads: per layer prefix, the heads :func:`~shiftkit.compression.prune.prune_` removes.
        neurons: per layer prefix, the FFN neurons it removes.

    Returns:
        The pruned LoRA shift (per-module ranks in ``rank_pattern``, each module's scaling unchanged);
        other tensors of the shift (``modules_to_save``) are kept as they are.

    Raises:
        ShiftkitError: not a LoRA shift, an unknown module, a rank index out of range, or every module
            removed.

    Example:
        >>> small = prune_lora(shift, modules=["enc.layer.0.attention.self.key"], ranks={"enc.q": [0, 3]})
    """
    config = require_lora(shift)
    adapted = adapted_modules(shift)
    gone = set(modules)
    unknown = sorted((gone | set(ranks or {})) - set(adapted))
    if unknown:
        raise ShiftkitError(f"prune_lora: the shift does not adapt {unknown[:5]}")
    rows, cols = _unit_slices(layers, heads, neurons, shift)
    factors = {f"{m}.lora_{p}" for m in adapted for p in "AB"}
    tensors = {k: v for k, v in shift.tensors.items() if k not in factors}
    base = {k: v for k, v in shift.base.items() if k not in adapted}
    new_rank: dict[str, int] = {}
    new_alpha: dict[str, float] = {}
    for fqn in adapted:
        if fqn in gone:
            continue
        a, b = shift.tensors[f"{fqn}.lora_A"], shift.tensors[f"{fqn}.lora_B"]
        r = a.shape[0]
        drop = set((ranks or {}).get(fqn, ()))
        if any(not 0 <= k < r for k in drop):
            raise ShiftkitError(f"prune_lora: {fqn}: rank index out of range 0..{r - 1}: {sorted(drop)}")
        keep = [k for k in range(r) if k not in drop]
        if not keep:
            continue
        a, b = a[keep], b[:, keep]
        if fqn in rows or fqn in cols:
            if lora_kind(shift, fqn) != "linear":
                raise ShiftkitError(
                    f"prune_lora: {fqn} is not a Linear's LoRA; it cannot follow unit pruning"
                )
            if fqn in rows:
                b = b[rows[fqn]]
            if fqn in cols:
                a = a[:, cols[fqn]]
        tensors[f"{fqn}.lora_A"], tensors[f"{fqn}.lora_B"] = a.contiguous(), b.contiguous()
        old = tuple(shift.base[fqn])
        base[fqn] = (b.shape[0], a.shape[1]) if fqn in rows or fqn in cols else old
        new_rank[fqn] = len(keep)
        s = config.scaling_of(fqn)
        new_alpha[fqn] = s * (math.sqrt(len(keep)) if config.use_rslora else len(keep))
    if not new_rank:
        raise ShiftkitError("prune_lora: every LoRA module would be removed")
    ranks_seen = list(new_rank.values())
    r0 = max(set(ranks_seen), key=ranks_seen.count)  # the most common rank, so the patterns stay short
    alpha0 = next(new_alpha[f] for f in new_rank if new_rank[f] == r0)
    rank_pattern = module_patterns(new_rank, r0)
    alpha_pattern = module_patterns(new_alpha, alpha0)
    kept = tuple(sorted(new_rank))
    pruned = LoRAConfig(
        r=r0,
        lora_alpha=alpha0,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        init_lora_weights=config.init_lora_weights,
        target_modules=kept,
        exclude_modules=None,
        target_types=None,
        modules_to_save=config.modules_to_save,
        rank_pattern={k: int(v) for k, v in rank_pattern.items()},
        alpha_pattern=alpha_pattern,
    )
    return Shift("lora", pruned, tensors, base)
