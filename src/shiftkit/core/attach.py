"""The walker: attach a shift to a model in place, extract it, fold it, detach it.

``attach_`` wraps each targeted module (``parent.child = Wrapper(base=child)``), freezes every base
parameter and remembers the previous ``requires_grad`` flags on the root, so ``detach_`` restores the
model bit for bit and ``fold_`` leaves a plain model with the original architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.encoding import decoded
from shiftkit.core.registry import MethodSpec, get_method
from shiftkit.core.shift import DELTA, Shift
from shiftkit.core.targets import iter_base_modules, match_names, match_targets
from shiftkit.core.tying import model_names, set_parameter_, split_tied, tied_message, warn_untied
from shiftkit.core.wrapper import ShiftWrapper, TrainableCopy, write_params_
from shiftkit.errors import (
    NotFoldableError,
    ShiftkitError,
    ShiftMismatchError,
    TargetNotFoundError,
    TiedWeightsError,
)

__all__ = [
    "attach_",
    "attached_wrappers",
    "detach_",
    "extract",
    "fold_",
    "module_shape",
    "named_shift_parameters",
    "regularization_loss",
    "shift_parameters",
]

_STATE = "_shiftkit_state"


def attached_wrappers(model: nn.Module) -> list[tuple[str, ShiftWrapper]]:
    """``(name, wrapper)`` for every shift module in ``model``, in model order."""
    return [(n, m) for n, m in iter_base_modules(model) if isinstance(m, ShiftWrapper)]


def _state(model: nn.Module) -> dict[str, Any] | None:
    return model.__dict__.get(_STATE)


def module_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape recorded for a module in a shift's ``base``: its weight's, else its bias's, else ``()``."""
    for name in ("weight", "bias"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor):
            return tuple(t.shape)
    return ()


def _set_child(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new


def _resolve(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    modules = dict(iter_base_modules(model))
    missing = [n for n in names if n not in modules]
    if missing:
        raise ShiftMismatchError(
            f"the shift targets {len(missing)} module(s) this model does not have, first: {missing[:5]}; "
            f"the model has e.g. {list(modules)[:5]}"
        )
    return [(n, modules[n]) for n in names]


def attach_(model: nn.Module, shift: ShiftConfig | Shift) -> nn.Module:
    """Attach a new shift (from a config) or a learned one (a :class:`Shift`) to ``model`` in place.

    The base is frozen: afterwards only the shift parameters (and ``modules_to_save``) require grad.

    Args:
        model: any ``nn.Module``.
        shift: a method config (fresh, initialised shift) or a Shift to re-attach (shapes are checked).

    Returns:
        ``model`` itself, for chaining.

    Raises:
        ShiftkitError: the model already carries a shift, or the config is invalid.
        TargetNotFoundError: ``target_modules`` matched nothing.
        ShiftMismatchError: a Shift's modules, shapes or tensors do not fit the model.

    Example:
        >>> sk.attach_(model, sk.LoRAConfig(r=8, target_modules=["query", "value"]))
        >>> opt = torch.optim.AdamW(sk.shift_parameters(model), lr=1e-3)
    """
    existing = attached_wrappers(model)
    if existing or _state(model) is not None:
        st = _state(model) or {}
        raise ShiftkitError(
            f"model already has a {st.get('method', existing[0][1].shift_method if existing else '?')!r} "
            f"shift attached on {len(existing)} module(s); call sk.detach_(model) or sk.fold_(model) first"
        )
    if isinstance(shift, Shift):
        shift = decoded(shift)  # a compressed shift attaches as the shift it encodes
        if shift.method == DELTA:
            raise ShiftkitError("a dense delta is added with sk.apply_(model, delta), not attached")
        if shift.config is None:
            raise ShiftMismatchError(f"shift {shift.method!r} has no config")
        config, spec = shift.config, get_method(shift.method)
        if get_method(config) is not spec:
            raise ShiftMismatchError(
                f"shift says method {shift.method!r} but its config is a {type(config).__name__}"
            )
        saved_names = [n for n in shift.base if any(k.startswith(f"{n}.saved.") for k in shift.tensors)]
        method_names = [n for n in shift.base if n not in saved_names]
        targets = _resolve(model, method_names)
        saved = _resolve(model, saved_names)
        bad = [
            f"{n}: shift {shift.base[n]} vs model {module_shape(m)}"
            for n, m in targets + saved
            if tuple(shift.base[n]) != module_shape(m)
        ]
        if bad:
            raise ShiftMismatchError(f"shift does not fit this model's shapes: {'; '.join(bad[:5])}")
        wrong_type = [f"{n} ({type(m).__name__})" for n, m in targets if not isinstance(m, spec.targets)]
        if wrong_type:
            raise ShiftMismatchError(f"{spec.name} cannot wrap {', '.join(wrong_type[:5])}")
    elif isinstance(shift, ShiftConfig):
        config, spec = shift, get_method(shift)
        targets = match_targets(model, config, spec.targets, spec.default_targets, spec.accepts)
        saved = []
        if config.modules_to_save:
            all_mods = [(n, m) for n, m in iter_base_modules(model)]
            hit = set(match_names([n for n, _ in all_mods], config.modules_to_save))
            saved = [(n, m) for n, m in all_mods if n in hit]
            if not saved:
                raise TargetNotFoundError(
                    f"modules_to_save {list(config.modules_to_save)} matched no module of the model"
                )
    else:
        raise ShiftkitError(f"attach_ expects a method config or a Shift, got {type(shift).__name__}")

    # every name, tied aliases included: an alias that fold_ unties gets back its own flag
    flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    done: list[tuple[str, nn.Module]] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for fqn, wrapper in _build_wrappers(model, spec, targets, config):
            wrapper.shift_method = spec.name
            wrapper.train(wrapper.base.training)  # a new module starts in train mode: follow the base's
            _set_child(model, fqn, wrapper)
            done.append((fqn, wrapper.base))
        for fqn, module in saved:
            _set_child(model, fqn, TrainableCopy(module).train(module.training))
            done.append((fqn, module))
        model.__dict__[_STATE] = {"method": spec.name, "config": config, "requires_grad": flags}
        for fqn, wrapper in attached_wrappers(model):
            wrapper.on_attach(model, fqn)
        if isinstance(shift, Shift):
            _load_tensors(model, shift)
    except BaseException:
        _remove_hooks(model)
        for fqn, module in done:
            _set_child(model, fqn, module)
        model.__dict__.pop(_STATE, None)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        raise
    return model


def _build_wrappers(
    model: nn.Module, spec: MethodSpec, targets: list[tuple[str, nn.Module]], config: ShiftConfig
) -> list[tuple[str, ShiftWrapper]]:
    if spec.wrap_group is not None:
        try:
            wrappers = spec.wrap_group(model, targets, config)
        except ShiftkitError as err:
            raise type(err)(f"{spec.name}: {err}") from None
        if len(wrappers) != len(targets):
            raise ShiftkitError(f"{spec.name} built {len(wrappers)} wrappers for {len(targets)} targets")
        # ``None`` declines a target (prompt tuning keeps only the input embedding among the embeddings)
        kept = [(fqn, w) for (fqn, _), w in zip(targets, wrappers, strict=True) if w is not None]
        if not kept:
            raise TargetNotFoundError(f"{spec.name} declined every selected module")
        return kept
    out = []
    for fqn, module in targets:
        try:
            out.append((fqn, spec.wrap(module, config.for_module(fqn))))
        except ShiftkitError as err:
            raise type(err)(f"{spec.name} on {fqn!r}: {err}") from None
    return out


def _remove_hooks(model: nn.Module) -> None:
    for fqn, wrapper in attached_wrappers(model):
        wrapper.on_detach(model, fqn)


@torch.no_grad()
def _load_tensors(model: nn.Module, shift: Shift) -> None:
    expected = _named_shift_tensors(model)
    missing = sorted(set(expected) - set(shift.tensors))
    unexpected = sorted(set(shift.tensors) - set(expected))
    if missing or unexpected:
        raise ShiftMismatchError(
            "shift tensors do not match the attached modules: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    bad = [
        f"{k}: {tuple(shift.tensors[k].shape)} vs {tuple(p.shape)}"
        for k, p in expected.items()
        if shift.tensors[k].shape != p.shape
    ]
    if bad:
        raise ShiftMismatchError(f"shift tensor shapes differ from the model's: {'; '.join(bad[:5])}")
    for k, p in expected.items():
        p.copy_(shift.tensors[k])


def _require_attached(model: nn.Module, verb: str) -> tuple[dict[str, Any], list[tuple[str, ShiftWrapper]]]:
    st = _state(model)
    wrappers = attached_wrappers(model)
    if st is None or not wrappers:
        raise ShiftkitError(f"cannot {verb}: no shift is attached to this model (use sk.attach_ first)")
    return st, wrappers


def _named_shift_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a shift file stores: shift parameters and shift buffers, keyed ``<module>.<role>``."""
    out: dict[str, torch.Tensor] = dict(named_shift_parameters(model))
    seen = {id(t) for t in out.values()}
    for fqn, wrapper in attached_wrappers(model):
        for role, b in wrapper.named_shift_buffers().items():
            if id(b) not in seen:  # a buffer shared by several wrappers is stored once
                seen.add(id(b))
                out[f"{fqn}.{role}"] = b
    return out


def named_shift_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable shift parameters keyed ``<module name>.<role>`` (the keys of the shift file).

    A parameter shared by several wrappers (a subspace vector, a shared recursive block) appears once,
    under the first wrapper that holds it.
    """
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for fqn, wrapper in attached_wrappers(model):
        for role, p in wrapper.named_shift_parameters().items():
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{fqn}.{role}"] = p
    return out


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """The attached shift's training regulariser (e.g. PEGO's orthogonality loss), to add to the task loss.

    Zero (a scalar tensor) for methods without one, so training loops can always add it.

    Example:
        >>> loss = F.cross_entropy(model(x), y) + sk.regularization_loss(model)
    """
    terms = [t for _, w in attached_wrappers(model) if (t := w.regularization_loss()) is not None]
    if not terms:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), device=None if p is None else p.device)
    total = terms[0]
    for t in terms[1:]:
        total = total + t.to(total.device)
    return total


def shift_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable shift parameters of ``model``, for the optimiser.

    Example:
        >>> opt = torch.optim.AdamW(sk.shift_parameters(model), lr=1e-3)
    """
    return list(named_shift_parameters(model).values())


def extract(model: nn.Module) -> Shift:
    """The attached shift as a :class:`Shift` value (tensors copied; no reference to the model).

    On a model sharded over several processes (FSDP2) the shift's tensors are gathered whole, so every rank
    must call it (rank 0 then saves).

    Example:
        >>> shift = sk.extract(model)
        >>> sk.save(shift, "lora.safetensors")
    """
    st, wrappers = _require_attached(model, "extract")
    tensors = {k: _full(p.detach()).clone() for k, p in _named_shift_tensors(model).items()}
    base = {fqn: module_shape(w.base) for fqn, w in wrappers}
    return Shift(st["method"], st["config"], tensors, base)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter sharded over processes (FSDP2's DTensor; a collective), else ``t``."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _restore_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(flags.get(n, True))


def fold_(model: nn.Module, *, untie: bool = False) -> nn.Module:
    """Bake the attached shift into the base weights and remove the wrappers, in place.

    Afterwards the model has its original architecture and computes what the shifted model computed.

    Tied weights (an LM whose ``lm_head`` shares ``embed_tokens``' weight): folding a shift of one of them
    into the shared tensor would change the other, so ``fold_`` refuses with :class:`TiedWeightsError`
    unless ``untie=True``, which gives each targeted module its own weight (one more weight tensor each,
    stated in a warning; a transformers config's ``tie_word_embeddings`` is set to False to match).

    Args:
        model: a model with a shift attached.
        untie: give a targeted module whose weight is shared with another module its own copy.

    Raises:
        NotFoldableError: the method cannot be folded (nothing is changed).
        TiedWeightsError: the shift targets a tied weight and ``untie`` is False (nothing is changed).

    Example:
        >>> sk.fold_(model)   # zero inference overhead from here on
        >>> sk.fold_(smollm2_with_lora_on_lm_head, untie=True)
    """
    st, wrappers = _require_attached(model, "fold")
    spec: MethodSpec = get_method(st["method"])
    if not spec.foldable:
        raise NotFoldableError(
            f"{spec.name} shifts cannot be folded into the base weights; use sk.detach_ or keep them attached"
        )
    values = {fqn: w.folded_params() for fqn, w in wrappers}  # compute all before mutating anything
    names = model_names(model)
    own = split_tied(names, {f"{fqn}.{p}": v for fqn, vs in values.items() for p, v in vs.items()})
    if own and not untie:
        raise TiedWeightsError(tied_message("sk.fold_", own, names))
    untied = [n for group in own.values() for n in group]
    _remove_hooks(model)
    for fqn, w in wrappers:
        mine = {p for p in values[fqn] if f"{fqn}.{p}" in untied}
        write_params_(w.base, {p: v for p, v in values[fqn].items() if p not in mine})
        _set_child(model, fqn, w.base)
        for p in mine:
            set_parameter_(model, f"{fqn}.{p}", values[fqn][p])
    model.__dict__.pop(_STATE, None)
    _restore_flags(model, st["requires_grad"])
    warn_untied(untied, names, model)
    return model


def detach_(model: nn.Module) -> nn.Module:
    """Remove the attached shift; the base model is restored bit for bit.

    Example:
        >>> sk.detach_(model)
    """
    st, wrappers = _require_attached(model, "detach")
    _remove_hooks(model)
    for fqn, w in wrappers:
        _set_child(model, fqn, w.base)
    model.__dict__.pop(_STATE, None)
    _restore_flags(model, st["requires_grad"])
    return model


def attached_method(model: nn.Module) -> str | None:
    """The registry name of the shift attached to ``model``, or ``None``."""
    st = _state(model)
    return None if st is None else str(st["method"])
