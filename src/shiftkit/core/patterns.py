"""Per-module values keyed by name patterns, with PEFT's matching (``rank_pattern`` / ``alpha_pattern``): the
look-up, and the two ways to write such a mapping back so that it means exactly the given values."""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["exact_patterns", "module_patterns", "pattern_lookup"]


def pattern_lookup(pattern: Mapping[str, float], fqn: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", fqn)``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", fqn):
            return value
    return default


def module_patterns(values: Mapping[str, float], default: float) -> dict[str, float]:
    """A ``rank_pattern`` giving each module of ``values`` its value, others ``default``.

    Keys are the module names (what PEFT and mergekit write), longest first, so that a name that ends
    another one's (``fc`` and ``block.fc``) cannot take its value; a module with the default value that a
    shorter key would still match gets its own entry.

    Example:
        >>> module_patterns({"a.q": 4, "a.v": 8}, 8)
        {'a.q': 4}
    """
    chosen = {k: v for k, v in values.items() if v != default}
    while True:
        ordered = dict(sorted(chosen.items(), key=lambda kv: (-len(kv[0]), kv[0])))
        wrong = [k for k, v in values.items() if pattern_lookup(ordered, k, default) != v]
        if not wrong:
            return ordered
        chosen.update({k: values[k] for k in wrong})


def exact_patterns(values: Mapping[str, float], names: list[str], default: float) -> dict[str, float]:
    """Pattern keys for the modules of ``values`` whose value differs from ``default``, that mean the same in
    any key order (PEFT's files sort their keys): a module's plain name, or ``^name$`` (escaped) when another
    of ``names`` ends with ``"." + name`` and would match the plain one too.

    Example:
        >>> exact_patterns({"fc": 4, "block.fc": 8}, ["fc", "block.fc"], 8)
        {'^fc$': 4}
    """
    out = {}
    for name, v in values.items():
        if v == default:
            continue
        clash = any(other != name and other.endswith("." + name) for other in names)
        out[f"^{re.escape(name)}$" if clash else name] = v
    return out
