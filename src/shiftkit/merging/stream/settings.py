"""Recipe parameter values that vary over the model: gradients over the layers and filters on tensor names.

A recipe parameter (mergekit 0.1.5's ``ParameterSetting``) is one of:

* a scalar (``density: 0.5``): the same everywhere;
* a list of scalars, a *gradient* (``t: [0, 0.5, 0.3, 0.7, 1]``): its points are spread evenly over the
  layers of a slice, and layer ``i`` of ``n`` takes the piecewise-linear interpolation at ``i / (n − 1)``
  (a one-layer slice: at 1; tensors outside the layers, such as embeddings and the final norm: at 0).
  A list of booleans or strings is not interpolated: position ``⌊x·(len − 1)⌋`` is taken;
* a list of conditions ``[{filter: self_attn, value: ...}, {value: ...}]``: the first whose ``filter`` is a
  substring of the tensor's name (a missing filter or ``"*"`` matches everything) gives the value, itself a
  scalar or a gradient. When none matches the parameter is unset at this level and the next level decides.

Levels, from the first consulted: the input's own ``parameters`` (per model or per slice source), the
slice's ``parameters``, the recipe's top-level ``parameters``; then the method's default.

Example:
    >>> evaluate([{"filter": "mlp", "value": [1, 0]}, {"value": 0.5}], "model.layers.3.mlp.up.weight", 0.25)
    0.75
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from shiftkit.errors import ShiftkitError

__all__ = ["UNSET", "evaluate", "is_constant", "resolve", "validate_setting"]

#: returned when no condition of a setting matches the tensor (the next level decides)
UNSET: Any = object()


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str)) or v is None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_condition(v: Any) -> bool:
    return isinstance(v, Mapping) and "value" in v and set(v) <= {"value", "filter"}


def validate_setting(name: str, setting: Any) -> None:
    """Check the shape of a setting (scalar, gradient, condition or list of conditions).

    Raises:
        ShiftkitError: anything else, naming the parameter.

    Example:
        >>> validate_setting("t", [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}])
    """
    if _is_scalar(setting):
        if isinstance(setting, float) and not math.isfinite(setting):
            raise ShiftkitError(f"parameter {name!r}: {setting} is not a finite number")
        return
    if _is_condition(setting):
        validate_setting(name, setting["value"])
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise ShiftkitError(f"parameter {name!r}: a filter is a string, got {setting['filter']!r}")
        return
    if isinstance(setting, list) and setting:
        if all(_is_scalar(v) for v in setting):
            for v in setting:
                validate_setting(name, v)
            return
        if all(_is_condition(v) for v in setting):
            for v in setting:
                validate_setting(name, v)
            return
    raise ShiftkitError(
        f"parameter {name!r}: {setting!r} is neither a value, a gradient (a list of values) nor a list of "
        "{filter: ..., value: ...} conditions"
    )


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """The value of ``setting`` for tensor ``tensor`` at depth ``t`` (``UNSET`` if no filter matches).

    Example:
        >>> evaluate([0, 0.5, 0.3, 0.7, 1], "x", 0.5)
        0.3
    """
    if _is_condition(setting):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if not isinstance(setting, list) or not setting:
        raise ShiftkitError(f"cannot evaluate parameter setting {setting!r}")
    if all(_is_scalar(v) for v in setting):
        n = len(setting)
        if not all(_is_number(v) for v in setting):
            return setting[int(t * (n - 1))]
        x = t * (n - 1)
        i0 = int(x)
        i1 = min(n - 1, i0 + 1)
        frac = x - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor and flt in tensor):
            return evaluate(cond["value"], tensor, t)
    return UNSET


def resolve(name: str, levels: Sequence[Mapping[str, Any] | None], tensor: str, t: float) -> Any:
    """The value of parameter ``name`` from the first level that sets it for ``tensor`` (else ``UNSET``).

    Example:
        >>> resolve("density", [{"density": 0.5}, {"density": 0.9}], "w", 0.0)
        0.5
    """
    for level in levels:
        if level is not None and name in level:
            value = evaluate(level[name], tensor, t)
            if value is not UNSET and value is not None:
                return value
    return UNSET


def is_constant(setting: Any) -> bool:
    """True when ``setting`` is one scalar (the same for every tensor).

    Example:
        >>> is_constant(0.5), is_constant([0, 1])
        (True, False)
    """
    return _is_scalar(setting)
