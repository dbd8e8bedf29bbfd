"""Name registries: learnable methods now, merge methods, compressors and test-time methods later.

A registry maps a name (the file name of the method) to an entry. Look-ups of unknown names raise
:class:`~shiftkit.errors.UnknownMethodError` listing the close matches and every known name.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.errors import ShiftkitError, UnknownMethodError

if TYPE_CHECKING:
    from shiftkit.core.shift import Shift
    from shiftkit.core.wrapper import ShiftWrapper

T = TypeVar("T")

__all__ = [
    "METHODS",
    "DenseDelta",
    "GroupWrapFn",
    "MethodSpec",
    "Registry",
    "config_from_dict",
    "get_method",
    "list_methods",
    "load_plugins",
    "register_method",
]


class Registry(Generic[T]):
    """A named collection of entries with helpful errors for unknown names.

    ``package`` names the package whose import registers the built-in entries (``"shiftkit.methods"``): it
    is imported by name on the first look-up, so code anywhere can look a method up without importing the
    package that defines it (a lower layer never imports a higher one, and nothing inside a package imports
    its own ``__init__`` to trigger registration).

    Example:
        >>> reg: Registry[int] = Registry("demo thing")
        >>> reg.add("one", 1); reg.get("one")
        1
    """

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._loaded = package is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # before the import: registering during it must not recurse
            importlib.import_module(str(self.package))

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
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            known = ", ".join(sorted(self._entries)) or "(none registered)"
            raise UnknownMethodError(f"unknown {self.kind} {name!r}.{hint} Known: {known}.") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
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


class DenseDelta(Protocol):
    """How a method's saved shift turns into dense weight changes without a model (LoRA: ``s·B A``).

    Every operation that needs a shift's weight changes (``sk.merge``, ``sk.to_delta(shift)``, the streaming
    merge, compression) asks the method's spec for this hook instead of knowing the method.
    """

    def names(self, shift: Shift) -> list[str]:
        """The parameter names (``<module>.weight``) whose change the shift defines, sorted."""
        ...

    def tensor(self, shift: Shift, name: str, model: nn.Module | None = None) -> Tensor:
        """The float32 change of parameter ``name`` in its layout (``model`` may resolve ambiguities)."""
        ...


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
        dense: the method's :class:`DenseDelta` hook when a saved shift alone defines its weight changes
            (LoRA); ``None`` when they need the base weights (SSF, (IA)³: attach and use ``sk.to_delta``).
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
    dense: DenseDelta | None = None


METHODS: Registry[MethodSpec] = Registry("shift method", package="shiftkit.methods")
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
    dense: DenseDelta | None = None,
) -> Callable[[Any], Any]:
    """Register a learnable method; decorates its ``wrap(module, config)`` factory.

    With ``group=True`` the decorated function is ``wrap_group(root, targets, config) -> wrappers``,
    building all wrappers of one attach at once (for wrappers that share parameters). ``dense`` is the
    method's :class:`DenseDelta` hook, if a saved shift alone defines its weight changes.

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
            dense=dense,
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
    METHODS._load()
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


def config_from_dict(data: Any) -> ShiftConfig:
    """Rebuild a config from :func:`~shiftkit.core.config.config_to_dict` output, resolving the class through
    the registry (never through an import path).

    Raises:
        ShiftkitError: malformed input, unknown keys, or a version newer than this shiftkit knows.
        UnknownMethodError: the method is not registered.

    Example:
        >>> config_from_dict(config_to_dict(LoRAConfig(r=4))).r
        4
    """
    import dataclasses

    if not isinstance(data, dict) or set(data) != {"method", "version", "config"}:
        raise ShiftkitError(f"a config must be a dict with keys method, version, config; got {data!r}")
    spec = get_method(str(data["method"]))
    cls = spec.config_cls
    version = data["version"]
    if not isinstance(version, int) or version > cls.version:
        raise ShiftkitError(
            f"{cls.__name__} version {version!r} is newer than this shiftkit supports ({cls.version}); "
            "upgrade shiftkit"
        )
    body = data["config"]
    if not isinstance(body, dict):
        raise ShiftkitError(f"{cls.__name__}: 'config' must be a mapping, got {type(body).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ShiftkitError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; known: {sorted(known)}")
    try:
        return cls(**body)
    except TypeError as err:
        raise ShiftkitError(f"invalid {cls.__name__}: {err}") from None


def load_plugins(modules: Sequence[str]) -> None:
    """Import the user modules ``modules`` (dotted names), whose decorators register their own methods.

    How a recipe's ``plugins:`` key and ``shiftkit adapt --plugin`` reach a method defined outside shiftkit:
    importing the module runs its ``@sk.register_method`` / ``@sk.register_merge_method`` /
    ``@adapt.register_method`` decorators. A module already imported is not imported again.

    Raises:
        ShiftkitError: a name that is not a string, or a module that cannot be imported (the cause named).

    Example:
        >>> load_plugins(["my_project.merges"])   # registers its merge methods
    """
    for name in modules:
        if not isinstance(name, str) or not name:
            raise ShiftkitError(f"a plugin is a module name (dotted string), got {name!r}")
        try:
            importlib.import_module(name)
        except Exception as err:  # any error while importing the user's module: say which and why
            raise ShiftkitError(
                f"cannot import plugin module {name!r}: {type(err).__name__}: {err}"
            ) from None
