"""The config base class shared by every method, and its registry-resolved serialisation.

Configs are frozen, keyword-only dataclasses. They serialise as
``{"method": <registry name>, "version": <int>, "config": {...fields}}`` and are resolved through the
registry (:func:`shiftkit.core.registry.config_from_dict`), never through an import path, so a file can only
ever instantiate a registered config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from shiftkit.errors import ShiftkitError

__all__ = ["FrozenMap", "ShiftConfig", "config_to_dict"]

V = TypeVar("V")

Patterns = str | Sequence[str] | None


def _as_patterns(value: Any, field_name: str) -> Patterns:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ShiftkitError(f"{field_name} must be a string, a list of strings or None; got {value!r}")


class FrozenMap(Mapping[str, V]):
    """An immutable, hashable ``str -> value`` mapping, for config fields that are dicts in PEFT's files
    (``rank_pattern``): configs stay hashable and compare equal after a JSON round trip. Insertion order is
    kept (PEFT's pattern look-ups take the first matching key)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, V] | None = None) -> None:
        self._items: tuple[tuple[str, V], ...] = tuple((items or {}).items())

    def __getitem__(self, key: str) -> V:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        # order-sensitive: PEFT's look-up takes the first matching key, so the order is part of the meaning
        return isinstance(other, Mapping) and self._items == tuple(other.items())

    def __repr__(self) -> str:
        return repr(dict(self._items))


@dataclass(frozen=True, kw_only=True)
class ShiftConfig:
    """Fields every method config has (PEFT's vocabulary).

    Attributes:
        target_modules: which modules get a shift. A list matches a module whose name equals an entry or
            ends with ``"." + entry`` (as in PEFT); a string is a regular expression that must match the
            whole module name; ``"all"`` is every module the method supports; ``"all-linear"`` is every
            ``nn.Linear`` except the model's output embedding; ``None`` uses the method's default.
        exclude_modules: modules to leave alone, with the same matching rules.
        target_types: optional class names (``"Linear"``, ``"LayerNorm"``); a module matches if any class
            in its MRO has one of these names, so user subclasses of ``nn.Linear`` match ``"Linear"``.
        modules_to_save: modules trained in full beside the shift (e.g. a new classification head);
            they are stored in the shift file and restored by ``detach_``.
    """

    version: ClassVar[int] = 1
    method: ClassVar[str] = ""

    # users pass lists (PEFT style); __post_init__ stores tuples so configs stay hashable and comparable
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    target_types: Sequence[str] | None = None
    modules_to_save: Sequence[str] = ()

    def __post_init__(self) -> None:
        # lists from users or JSON become tuples so configs stay hashable and round-trip equal
        object.__setattr__(self, "target_modules", _as_patterns(self.target_modules, "target_modules"))
        object.__setattr__(self, "exclude_modules", _as_patterns(self.exclude_modules, "exclude_modules"))
        tt = _as_patterns(self.target_types, "target_types")
        object.__setattr__(self, "target_types", (tt,) if isinstance(tt, str) else tt)
        mts = _as_patterns(self.modules_to_save, "modules_to_save") or ()
        object.__setattr__(self, "modules_to_save", (mts,) if isinstance(mts, str) else mts)

    def replace(self, **changes: Any) -> ShiftConfig:
        """A copy with ``changes`` applied (configs are frozen)."""
        return dataclasses.replace(self, **changes)

    def for_module(self, fqn: str) -> ShiftConfig:
        """The settings module ``fqn`` is wrapped with: the config itself, unless the method has per-module
        settings (LoRA's ``rank_pattern`` / ``alpha_pattern``)."""
        return self


def config_to_dict(config: ShiftConfig) -> dict[str, Any]:
    """Serialise ``config`` as ``{"method", "version", "config"}`` (JSON-safe).

    Example:
        >>> config_to_dict(LoRAConfig(r=4))["method"]
        'lora'
    """
    fields = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        fields[f.name] = list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, FrozenMap) else v
    return {"method": type(config).method, "version": type(config).version, "config": fields}
