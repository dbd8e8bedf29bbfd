"""Passthrough: one input taken as it is, optionally scaled (mergekit ``passthrough``).

Its use is in ``slices:`` recipes: every slice has one source, so the output stacks layer ranges of one or
several models into a model of another depth (a "frankenmerge": layers 0–23 of one model then 20–39 of
another make a 44-layer model). ``scale`` multiplies the input's weights (mergekit: ``θ · scale``), e.g.
``[{filter: o_proj, value: 0.5}, {value: 1}]`` to damp the output projections of duplicated layers.

Example:
    >>> sk.merge([tv], method="passthrough")["w"] is tv["w"]
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from shiftkit.merging.registry import register_merge

__all__ = ["passthrough"]


@register_merge(
    "passthrough",
    needs_base=False,
    base_is_input=True,
    min_inputs=1,
    max_inputs=1,
    weighting="none",
    per_input=("scale",),
)
def passthrough(
    tensors: list[dict[str, Tensor]],
    weights: list[float],
    *,
    scale: float | Sequence[float] | None = None,
    base: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The single input, times ``scale`` when given.

    Args:
        tensors: exactly one tensor dict (a shift ``τ = θ − θ0``; ``θ`` itself when there is no base).
        weights: ignored (mergekit's passthrough has none).
        scale: factor on the input's weights ``θ`` (one value, or a one-element list), ``None`` for none.
        base: θ0 when the input is relative to a base (the result is ``scale·(θ0 + τ) − θ0``).

    Returns:
        The input's tensors (the same objects when ``scale`` is ``None``).

    Example:
        >>> sk.merge([tv], method="passthrough", scale=0.5)
    """
    (only,) = tensors
    value = scale[0] if isinstance(scale, Sequence) else scale
    if value is None or value == 1.0:
        return dict(only)
    out = {}
    for k, t in only.items():
        theta0 = None if base is None else base.get(k)
        if theta0 is None:
            out[k] = t * value
        else:
            out[k] = (t + theta0.to(t.dtype)) * value - theta0.to(t.dtype)
    return out
