"""Tied weights: one tensor that several modules of a model share.

Language models often tie their input embedding and their output head (``tie_word_embeddings=True``:
SmolLM2, GPT-2, T5): ``model.embed_tokens.weight`` and ``lm_head.weight`` are one ``nn.Parameter``. A shift
attached to one of the two computes the right thing, but writing it into the weight (fold, ``apply_``)
would change the other module too. Every place in shiftkit that writes a weight asks this module which
names share the tensor it is about to change, and either changes them all on purpose or gives the
targeted module its own copy (``untie=True``), never silently both.

The rule: **a write names every parameter it changes.** A shared tensor is written in place only when
every one of its names gets the same value (a task vector of two tied models names the embedding and the
head with one tensor); a write to some of its names, or different values for its names, splits it, which
needs ``untie=True``. Hugging Face checkpoints store a tied tensor once, under its first name in model
order (``model.embed_tokens.weight``); readers fill the missing alias from it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import TiedWeightsError

__all__ = [
    "TensorNames",
    "mapping_names",
    "model_names",
    "set_parameter_",
    "split_tied",
    "storage_key",
    "tied_message",
    "untie_config_",
    "untie_note",
]


@dataclass
class TensorNames:
    """Every name of every floating tensor of a model (or state dict), grouped by the tensor they name.

    Attributes:
        tensors: name → tensor, for every name (aliases included).
        canonical: name → the canonical (first) name of its tensor.
        groups: canonical name → all names of that tensor, in model order (length 1 when not shared).
    """

    tensors: dict[str, Tensor]
    canonical: dict[str, str]
    groups: dict[str, list[str]]

    def aliases(self, name: str) -> list[str]:
        """The other names of the tensor ``name`` (empty when it is not shared)."""
        return [n for n in self.groups[self.canonical[name]] if n != name]

    def is_shared(self, name: str) -> bool:
        """True when another name of the model refers to the same tensor."""
        return len(self.groups[self.canonical[name]]) > 1

    def first(self) -> dict[str, Tensor]:
        """Canonical name → tensor: each tensor once (what HF checkpoints and ``task_vector`` store)."""
        return {c: self.tensors[c] for c in self.groups}

    def shared(self) -> dict[str, list[str]]:
        """Only the groups with more than one name."""
        return {c: names for c, names in self.groups.items() if len(names) > 1}


def _group(items: Iterable[tuple[str, Tensor, Any]]) -> TensorNames:
    tensors: dict[str, Tensor] = {}
    canonical: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    first_of: dict[Any, str] = {}
    for name, t, key in items:
        tensors[name] = t
        head = first_of.setdefault(key, name)
        canonical[name] = head
        groups.setdefault(head, []).append(name)
    return TensorNames(tensors, canonical, groups)


def model_names(model: nn.Module, *, buffers: bool = True) -> TensorNames:
    """The names of ``model``'s floating parameters (and persistent buffers), shift wrappers looked through.

    ``q.base.weight`` of an attached wrapper is reported as ``q.weight``. Unlike ``named_parameters()``,
    a tensor reachable under several names is reported under each of them.

    Example:
        >>> names = model_names(smollm2)
        >>> names.aliases("lm_head.weight")
        ['model.embed_tokens.weight']
    """

    def walk(module: nn.Module, prefix: str) -> Iterable[tuple[str, Tensor, Any]]:
        mod = module.base if isinstance(module, ShiftWrapper) else module
        items: list[tuple[str, Tensor | None]] = list(mod._parameters.items())
        if buffers:
            items += [(n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        for n, t in items:
            if t is not None and t.is_floating_point():
                yield prefix + n, t, id(t)
        for n, child in mod._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}{n}.")

    return _group(walk(model, ""))


def storage_key(t: Tensor) -> Any:
    """What identifies a tensor's memory: two views with equal keys are one tensor (tied weights)."""
    if t.device.type == "meta" or t.numel() == 0:
        return id(t)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def mapping_names(state: Mapping[str, Tensor]) -> TensorNames:
    """The floating tensors of a state dict, keys that view the same memory grouped (``state_dict()`` of a
    tied model lists the shared tensor under both names; a checkpoint file holds it once).

    Example:
        >>> mapping_names(smollm2.state_dict()).shared()
        {'model.embed_tokens.weight': ['model.embed_tokens.weight', 'lm_head.weight']}
    """
    return _group(
        (k, v, storage_key(v)) for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point()
    )


def split_tied(names: TensorNames, writes: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """The shared tensors that ``writes`` (name → new value or delta) would split between their names.

    A shared tensor is split when some of its names are written and others not, or its names get
    different values (checked by identity first, then ``torch.equal``). Unshared names never are.

    Returns:
        Canonical name → the written names of each split tensor (empty: nothing to untie).

    Example:
        >>> split_tied(model_names(smollm2), {"lm_head.weight": delta})
        {'model.embed_tokens.weight': ['lm_head.weight']}
    """
    by_group: dict[str, list[str]] = {}
    for n in writes:
        if n in names.canonical and names.is_shared(n):
            by_group.setdefault(names.canonical[n], []).append(n)
    out: dict[str, list[str]] = {}
    for head, written in by_group.items():
        first = writes[written[0]]
        same = set(written) == set(names.groups[head]) and all(
            writes[n] is first or (writes[n].shape == first.shape and torch.equal(writes[n], first))
            for n in written[1:]
        )
        if not same:
            out[head] = written
    return out


def collapse_tied(names: TensorNames, tensors: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """``tensors`` with each shared tensor under its canonical name only, for code that works per tensor.

    Raises:
        TiedWeightsError: ``tensors`` would split a shared tensor (see :func:`split_tied`).
    """
    split = split_tied(names, tensors)
    if split:
        raise TiedWeightsError(tied_message(what, split, names).split(". Pass untie")[0] + ".")
    return {k: v for k, v in tensors.items() if k not in names.canonical or names.canonical[k] == k}


def _megabytes(t: Tensor) -> str:
    return f"{t.numel() * t.element_size() / 2**20:.1f} MiB"


def tied_message(verb: str, conflicts: dict[str, list[str]], names: TensorNames) -> str:
    """The explanation of a refused write to shared tensors: which names, why, and how (``untie=True``).

    Args:
        verb: what was refused (``"sk.fold_"``).
        conflicts: canonical name → the names the operation would change differently.
        names: the model's names.
    """
    parts = []
    extra = 0
    for head, written in conflicts.items():
        group = names.groups[head]
        others = [n for n in group if n not in written]
        t = names.tensors[head]
        if others:
            parts.append(
                f"{', '.join(written)} shares its tensor with {', '.join(others)} (tied weights): writing it "
                f"would change {', '.join(o.rsplit('.', 1)[0] for o in others)} too"
            )
            extra += len(written)
        else:
            parts.append(f"{', '.join(written)} are one tied tensor but would get different values")
            extra += len(written) - 1
        shape = "×".join(map(str, t.shape))
        parts[-1] += f" ({shape}, {_megabytes(t)} each)"
    return (
        f"{verb}: {'; '.join(parts)}. Pass untie=True to give each targeted module its own weight "
        f"(the model then has {extra} more weight tensor{'s' if extra != 1 else ''}), or keep the shift "
        "attached."
    )


def untie_note(untied: list[str], names: TensorNames, config_changed: list[str]) -> str:
    """The warning after an untying write: what got its own tensor and what that costs."""
    sizes = ", ".join(f"{n} ({_megabytes(names.tensors[n])})" for n in untied)
    note = f"untied {len(untied)} weight(s) from the tensor they shared: {sizes}; one more weight tensor each"
    if config_changed:
        note += f" ({', '.join(config_changed)} set to False: save/load keep them apart)"
    return note


@torch.no_grad()
def set_parameter_(model: nn.Module, name: str, value: Tensor) -> None:
    """Give the parameter ``name`` (dotted, wrappers looked through) a new tensor of its own.

    The old tensor is left to the other names that share it; the new one keeps its dtype, device and
    ``requires_grad``.
    """
    owner_name, _, attr = name.rpartition(".")
    owner: nn.Module = model
    for part in owner_name.split(".") if owner_name else []:
        owner = owner._modules[part]  # type: ignore[assignment]
        if isinstance(owner, ShiftWrapper):
            owner = owner.base
    if isinstance(owner, ShiftWrapper):
        owner = owner.base
    current = owner._parameters.get(attr)
    if current is None:
        raise TiedWeightsError(f"cannot untie {name!r}: it is not a parameter")
    new = nn.Parameter(
        value.detach().to(device=current.device, dtype=current.dtype).clone(),
        requires_grad=current.requires_grad,
    )
    owner._parameters[attr] = new


def untie_config_(model: nn.Module) -> list[str]:
    """Set ``tie_word_embeddings=False`` on every transformers config in ``model`` whose embeddings are no
    longer one tensor (otherwise ``save_pretrained`` would drop the head and ``from_pretrained`` re-tie it).

    Returns:
        The config attributes changed (``"config.tie_word_embeddings"``), for messages.
    """
    changed: list[str] = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or not getattr(config, "tie_word_embeddings", False):
            continue
        try:
            inp, out = module.get_input_embeddings(), module.get_output_embeddings()
        except Exception:  # a model without one of the two getters cannot be tied by transformers
            continue
        w_in, w_out = getattr(inp, "weight", None), getattr(out, "weight", None)
        if isinstance(w_in, Tensor) and isinstance(w_out, Tensor) and w_in is not w_out:
            configs = [config]
            getter = getattr(config, "get_text_config", None)
            if callable(getter):
                text = getter()
                if text is not config and getattr(text, "tie_word_embeddings", False):
                    configs.append(text)
            for c in configs:
                c.tie_word_embeddings = False
            changed.append(f"{name + '.' if name else ''}config.tie_word_embeddings")
    return changed


def warn_untied(untied: list[str], names: TensorNames, model: nn.Module) -> None:
    """After an untying write: fix the transformers configs and warn what got its own tensor."""
    if untied:
        warnings.warn(untie_note(untied, names, untie_config_(model)), stacklevel=3)
