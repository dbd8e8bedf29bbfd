"""Name registries: learnable methods now, merge methods, compressors and test-time methods later.

A registry maps a name (the file name of the method) to an entry. Look-ups of unknown names raise
:class:`~shiftkit.errors.UnknownMethodError` listing the close matches and every known name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from torch import nn

from shiftkit.errors import ShiftkitError, UnknownMethodError

if TYPE_CHECKING:
    from shiftkit.core.config import ShiftConfig
    from shiftkit.core.wrapper import ShiftWrapper

T = TypeVar("T")

__all__ = [
    "METHODS",
    "GroupWrapFn",
    "MethodSpec",
    "Registry",
    "get_method",
    "list_methods",
    "register_method",
]


class Registry(Generic[T]):
    """A named collection of entries with helpful errors for unknown names.

    Example:
        >>> reg: Registry[int] = Registry("demo thing")
        >>> reg.add("one", 1); reg.get("one")
        1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name``; a name can be registered once."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def update(self, name: str, entry: T) -> None:
        """Replace the entry of an already registered ``name`` (e.g. a spec gaining its streaming plan)."""
        if name not in self._entries:
            raise UnknownMethodError(f"unknown {self.kind} {name!r}: register it before updating it")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        """Return the entry registered as ``name`` or raise :class:`UnknownMethodError`."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            known = ", ".join(sorted(self._entries)) or "(none registered)"
            raise UnknownMethodError(f"unknown {self.kind} {name!r}.{hint} Known: {known}.") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs sorted by name."""
        return [(n, self._entries[n]) for n in self.names()]


WrapFn = Callable[[nn.Module, "ShiftConfig"], "ShiftWrapper"]
GroupWrapFn = Callable[
    [nn.Module, "list[tuple[str, nn.Module]]", "ShiftConfig"], "Sequence[ShiftWrapper | None]"
]


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about a learnable method.

    Attributes:
        name: registry name, equal to the method's file name (``"lora"``).
        config_cls: the frozen ``<Method>Config`` dataclass.
        targets: module types the method can wrap (subclasses match too).
        foldable: whether ``fold_`` can bake the shift into the base weights exactly.
        wrap: ``wrap(module, config) -> wrapper`` building the shift module around one base module.
        zero_init: config overrides that make the freshly attached shift an exact no-op (``{}`` when the
            default already is), or ``None`` when the method has no zero initialisation.
        default_targets: what ``target_modules=None`` means (``"all"`` or ``"all-linear"``).
        accepts: optional finer filter on a module of a supported type (BitFit: "has a bias").
        wrap_group: for methods whose wrappers share state (one subspace vector, shared recursive
            blocks): ``wrap_group(root, [(name, module), ...], config) -> [wrapper, ...]`` builds every
            wrapper at once, in target order; ``None`` in place of a wrapper declines that target.
            Used instead of ``wrap`` when set.
    """

    name: str
    config_cls: type[ShiftConfig]
    targets: tuple[type[nn.Module], ...]
    foldable: bool
    wrap: WrapFn
    zero_init: Mapping[str, Any] | None = field(default_factory=dict)
    default_targets: str = "all"
    accepts: Callable[[nn.Module], bool] | None = None
    wrap_group: GroupWrapFn | None = None


METHODS: Registry[MethodSpec] = Registry("shift method")
_NO_OVERRIDES: Mapping[str, Any] = {}
_BY_CONFIG: dict[type, MethodSpec] = {}


def register_method(
    name: str,
    *,
    config: type[ShiftConfig],
    targets: tuple[type[nn.Module], ...],
    foldable: bool,
    zero_init: Mapping[str, Any] | None = _NO_OVERRIDES,
    default_targets: str = "all",
    accepts: Callable[[nn.Module], bool] | None = None,
    group: bool = False,
) -> Callable[[Any], Any]:
    """Register a learnable method; decorates its ``wrap(module, config)`` factory.

    With ``group=True`` the decorated function is ``wrap_group(root, targets, config) -> wrappers``,
    building all wrappers of one attach at once (for wrappers that share parameters).

    Example:
        >>> @register_method("mine", config=MineConfig, targets=(nn.Linear,), foldable=True)
        ... def wrap(module, config):
        ...     return MineLinear(module, config)
    """

    def decorator(fn: Any) -> Any:
        spec = MethodSpec(
            name=name,
            config_cls=config,
            targets=targets,
            foldable=foldable,
            wrap=_group_only(name) if group else fn,
            wrap_group=fn if group else None,
            zero_init=None if zero_init is None else dict(zero_init),
            default_targets=default_targets,
            accepts=accepts,
        )
        METHODS.add(name, spec)
        _BY_CONFIG[config] = spec
        config.method = name
        return fn

    return decorator


def _group_only(name: str) -> WrapFn:
    def wrap(module: nn.Module, config: ShiftConfig) -> ShiftWrapper:
        raise ShiftkitError(f"{name} wrappers share state; attach them with sk.attach_(model, config)")

    return wrap


def get_method(name_or_config: str | ShiftConfig | type[ShiftConfig]) -> MethodSpec:
    """Look up a method by registry name, config instance or config class."""
    if isinstance(name_or_config, str):
        return METHODS.get(name_or_config)
    cls = name_or_config if isinstance(name_or_config, type) else type(name_or_config)
    try:
        return _BY_CONFIG[cls]
    except KeyError:
        raise UnknownMethodError(
            f"{cls.__name__} is not registered with a shift method; known: {', '.join(METHODS.names())}"
        ) from None


def list_methods() -> list[str]:
    """Names of the registered learnable methods (``"bitfit"``, ``"lora"``, ``"ssf"``, ...).

    Example:
        >>> import shiftkit as sk
        >>> "lora" in sk.list_methods()
        True
    """
    return METHODS.names()
