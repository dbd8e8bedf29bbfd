"""Which modules a config targets.

Rules (PEFT's, plus two conveniences):
- a list/tuple entry matches a module whose name equals it or ends with ``"." + entry``;
- a string is a regular expression that must match the whole module name (``re.fullmatch``);
- ``"all"`` matches every module of a type the method supports;
- ``"all-linear"`` matches every ``nn.Linear`` (subclasses included) except the model's output embedding;
- ``target_types`` narrows by class name anywhere in the module's MRO;
- ``exclude_modules`` removes matches with the same rules.
A pattern that matches nothing raises :class:`TargetNotFoundError` listing similar module names.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from shiftkit.core.config import Patterns, ShiftConfig
from shiftkit.core.wrapper import is_shift_module
from shiftkit.errors import ShiftkitError, TargetNotFoundError

__all__ = [
    "find_input_embeddings",
    "input_embedding_of",
    "iter_base_modules",
    "match_names",
    "match_targets",
    "output_embedding",
]


def iter_base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not descend into shift wrappers (they are yielded themselves)."""
    for name, child in model.named_children():
        fqn = f"{prefix}.{name}" if prefix else name
        yield fqn, child
        if not is_shift_module(child):
            yield from iter_base_modules(child, fqn)


def _matches(name: str, patterns: Patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def match_names(names: Iterable[str], patterns: Patterns) -> list[str]:
    """The subset of ``names`` that ``patterns`` selects (list = exact/suffix, str = full regex)."""
    return [n for n in names if _matches(n, patterns)]


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def output_embedding(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (``get_output_embeddings()``), or ``None`` when it has none."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out = getter()
        except Exception:  # a model's own getter may not be implemented
            return None
        return out if isinstance(out, nn.Module) else None
    return None


def _similar(pattern: str, names: list[str]) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(pattern.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.5)
    close += [n for n in difflib.get_close_matches(pattern, names, n=3, cutoff=0.6) if n not in close]
    return close or leaves[:10]


def match_targets(
    model: nn.Module,
    config: ShiftConfig,
    supported: tuple[type[nn.Module], ...],
    default: str = "all",
    accepts: Callable[[nn.Module], bool] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Resolve ``config.target_modules`` against ``model``.

    Args:
        model: the root module.
        config: the method config (``target_modules``, ``exclude_modules``, ``target_types``).
        supported: module types the method can wrap.
        default: what ``target_modules=None`` means.
        accepts: optional finer filter (a module of a supported type the method still cannot use).

    Returns:
        ``(name, module)`` pairs in model order, excluding the root and anything inside a wrapper.

    Raises:
        TargetNotFoundError: a pattern matched no module.
        ShiftkitError: explicit patterns matched only modules of unsupported types.
    """
    method = type(config).method or type(config).__name__
    modules = [(n, m) for n, m in iter_base_modules(model) if not is_shift_module(m)]
    names = [n for n, _ in modules]
    patterns = config.target_modules if config.target_modules is not None else default
    kinds = ", ".join(t.__name__ for t in supported)

    if patterns in ("all", "all-linear"):
        wanted = nn.Linear if patterns == "all-linear" else supported
        out_emb = output_embedding(model) if patterns == "all-linear" else None
        picked = [(n, m) for n, m in modules if isinstance(m, wanted) and isinstance(m, supported)]
        picked = [(n, m) for n, m in picked if m is not out_emb]
    else:
        hits = [(n, m) for n, m in modules if _matches(n, patterns)]
        if not hits:
            shown = patterns if isinstance(patterns, str) else ", ".join(patterns)
            probe = patterns if isinstance(patterns, str) else patterns[0]
            raise TargetNotFoundError(
                f"{method}: target_modules {shown!r} matched no module. "
                f"Similar module names: {', '.join(_similar(probe, names))}"
            )
        if not isinstance(patterns, str):
            unmatched = [p for p in patterns if not any(_matches(n, (p,)) for n, _ in hits)]
            if unmatched:
                warnings.warn(f"{method}: target_modules entries {unmatched} matched no module", stacklevel=3)
        picked = [(n, m) for n, m in hits if isinstance(m, supported) and (accepts is None or accepts(m))]
        if not picked:
            bad = ", ".join(f"{n} ({type(m).__name__})" for n, m in hits[:5])
            raise ShiftkitError(f"{method} supports {kinds}; target_modules matched only {bad}")
    if accepts is not None:
        picked = [(n, m) for n, m in picked if accepts(m)]
    if config.target_types:
        wanted_types = set(config.target_types)
        picked = [(n, m) for n, m in picked if _type_names(m) & wanted_types]
    if config.exclude_modules is not None:
        picked = [(n, m) for n, m in picked if not _matches(n, config.exclude_modules)]
    # modules_to_save are trained in full; they never also get a method wrapper
    if config.modules_to_save:
        picked = [(n, m) for n, m in picked if not _matches(n, config.modules_to_save)]
    if not picked:
        raise TargetNotFoundError(
            f"{method}: no module of a supported type ({kinds}) is left after target_modules="
            f"{patterns!r}, target_types={config.target_types!r}, exclude_modules={config.exclude_modules!r}"
        )
    return picked


def input_embedding_of(module: nn.Module) -> nn.Module | None:
    """``module.get_input_embeddings()`` where that works (transformers models), else None."""
    getter = getattr(module, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        out = getter()
    except Exception:  # transformers base classes raise NotImplementedError for some models
        return None
    return out if isinstance(out, nn.Module) else None


def find_input_embeddings(root: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """The input embeddings of the transformers models in ``root`` (``root`` included).

    Returns:
        ``{id(embedding): (owner name, owner)}`` where the owner is the outermost module whose
        ``get_input_embeddings()`` returns that embedding (``""`` when it is ``root``).
    """
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in root.named_modules():  # pre-order: an owner is seen before its submodules
        emb = input_embedding_of(module)
        if emb is not None and id(emb) not in found:
            found[id(emb)] = (name, module)
    return found
