"""Conformance: every registered merge method × the invariants its :class:`MergeSpec` declares.

Built from ``sk.list_merge_methods()``, so a new method (one file, one decorator) is tested here without
touching this file: identity at its lossless settings, the effect of scaling every weight (``weighting``),
the input-count contract, shape mismatches and NaN as errors, and the streaming merge of real checkpoint
files equal to the in-memory merge of the same shifts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from shiftkit.merging.stream.recipe import load_recipe

METHODS = sk.list_merge_methods()
SHAPES = {"layer.weight": (6, 5), "layer.bias": (6,), "norm.weight": (5,)}


def _shift(seed: int, scale: float = 0.1) -> Shift:
    g = torch.Generator().manual_seed(seed)
    t = {k: torch.randn(s, generator=g) * scale for k, s in SHAPES.items()}
    return Shift(DELTA, None, t, {k: tuple(v.shape) for k, v in t.items()})


def _n_inputs(spec: sk.MergeSpec, want: int = 3) -> int:
    n = max(want, spec.min_inputs)
    return n if spec.max_inputs is None else min(n, spec.max_inputs)


def _close(a: Shift, b: Shift, atol: float = 1e-6) -> None:
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        torch.testing.assert_close(
            a.tensors[k], b.tensors[k], atol=atol, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_every_method_declares_a_valid_spec() -> None:
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "slerp", "pcb", "atlas"} <= set(METHODS)
    for name in METHODS:
        spec = sk.get_merge_method(name)
        assert spec.name == name and spec.weighting in ("normalized", "linear", "none")
        assert set(spec.lossless) <= set(spec.params), name
        assert set(spec.recipe_defaults) <= set(spec.params), name


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_lossless_settings(method: str) -> None:
    """One shift with weight 1 (or the fewest copies the method merges) gives it back."""
    spec = sk.get_merge_method(method)
    s = _shift(0)
    n = spec.min_inputs
    merged = sk.merge([s] * n, method=method, **spec.lossless)
    if spec.drops_entries:  # PCB: each entry is the shift's own or zero, and most are kept
        for k, t in s.tensors.items():
            m = merged.tensors[k]
            kept = torch.isclose(m, t, atol=1e-6, rtol=1e-5)
            assert torch.all((m == 0) | kept) and kept.float().mean() > 0.7, k
        return
    _close(merged, s)
    if spec.weighting == "normalized":  # copies with any positive weights average to the shift itself
        k = 3 if spec.max_inputs is None else max(spec.min_inputs, min(3, spec.max_inputs))
        _close(sk.merge([s] * k, method=method, weights=[0.5, 2.0, 1.5][:k], **spec.lossless), s)


@pytest.mark.parametrize("method", METHODS)
def test_scaling_every_weight(method: str) -> None:
    spec = sk.get_merge_method(method)
    shifts = [_shift(i) for i in range(_n_inputs(spec))]
    ws = [1.0, 0.5, 2.0][: len(shifts)]
    if spec.weighting == "none":
        with pytest.raises(sk.ShiftkitError, match="weights"):
            sk.merge(shifts, method=method, weights=[2.0] * len(shifts))
        return
    a = sk.merge(shifts, method=method, weights=ws)
    b = sk.merge(shifts, method=method, weights=[3.0 * w for w in ws])
    _close(b, a if spec.weighting == "normalized" else 3.0 * a, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_input_count_shapes_and_nan_are_errors(method: str) -> None:
    spec = sk.get_merge_method(method)
    n = _n_inputs(spec)
    if spec.min_inputs > 1:
        with pytest.raises(sk.ShiftkitError, match=f"merges .*{spec.min_inputs}"):
            sk.merge([_shift(0)], method=method)
    if spec.max_inputs is not None:
        with pytest.raises(sk.ShiftkitError, match="merges"):
            sk.merge([_shift(i) for i in range(spec.max_inputs + 1)], method=method)
    bad = _shift(1)
    bad.tensors["layer.weight"] = torch.zeros(5, 6)
    if n > 1:  # a one-input method (passthrough) has no second shape to disagree with
        with pytest.raises(sk.ShiftMismatchError, match=r"layer\.weight"):
            sk.merge([_shift(0), bad, *[_shift(i) for i in range(2, n)]][:n], method=method)
    nan = _shift(1)
    nan.tensors["norm.weight"][2] = float("nan")
    with pytest.raises(sk.ShiftkitError, match="NaN"):
        sk.merge([_shift(0), nan, *[_shift(i) for i in range(2, n)]][-n:], method=method)


def _write(folder: Path, name: str, tensors: dict[str, Tensor]) -> Path:
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("method", METHODS)
def test_streaming_equals_in_memory(method: str, tmp_path: Path) -> None:
    """The recipe merge of checkpoint files equals ``sk.merge`` of their task vectors, with the recipe's own
    resolved parameters (mergekit's defaults, the required keys given)."""
    spec = sk.get_merge_method(method)
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    n = _n_inputs(spec)
    if spec.base_is_input and spec.needs_base and spec.max_inputs is not None and n + 1 > spec.max_inputs:
        n -= 1  # the base is one of the inputs (mergekit adds it even when not listed)
    tvs = [_shift(10 + i) for i in range(n)]
    paths = [
        _write(tmp_path, f"ft{i}", {k: base[k] + tv.tensors[k] for k in base}) for i, tv in enumerate(tvs)
    ]
    recipe: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(_write(tmp_path, "base", base)),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
        "dtype": "float32",
    }
    if spec.weighting == "none":
        recipe["models"] = [{"model": str(p)} for p in paths]
    if "t" in spec.recipe_required:
        recipe["parameters"] = {"t": 0.3}
    if spec.base_is_input and "weight" in spec.recipe_required:
        recipe["parameters"] = {"weight": 0.5}  # the base is averaged in with this weight
    path = tmp_path / "r.yaml"
    alone = spec.max_inputs == 1 and not spec.needs_base  # passthrough: one model, no base (θ0 = 0)
    if alone:
        del recipe["base_model"]
    path.write_text(yaml.safe_dump(recipe))
    resolved = load_recipe(path)
    sk.merge_recipe(path, tmp_path / "out.safetensors", progress=False)
    streamed = sk.load(tmp_path / "out.safetensors")
    if alone:  # without a base the output is the weights themselves: compare their shift from the base
        streamed = streamed - Shift(DELTA, None, base, dict(streamed.base))
    # the resolved recipe's inputs, in its order (a method whose base is an input gets it first)
    by_path = {str(p): tv for p, tv in zip(paths, tvs, strict=True)}
    zero = Shift(DELTA, None, {k: torch.zeros_like(v) for k, v in base.items()}, dict(tvs[0].base))
    inputs = [by_path.get(str(m), zero) for m in resolved.models]
    extra = {"base": base} if spec.takes_base else {}
    want = sk.merge(inputs, method=method, weights=resolved.weights, **resolved.params, **extra)
    _close(streamed, want, atol=1e-6)
    assert load_file(str(tmp_path / "out.safetensors")).keys() == set(SHAPES)
