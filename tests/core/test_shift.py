"""The Shift value: container behaviour and delta arithmetic (+, -, * scalar, unary -)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from tiny_models import make


def _delta(**tensors: torch.Tensor) -> Shift:
    return Shift(DELTA, None, dict(tensors), {k: tuple(v.shape) for k, v in tensors.items()})


def _pair() -> tuple[Shift, Shift]:
    g = torch.Generator().manual_seed(0)
    a = _delta(w=torch.randn(3, 4, generator=g), b=torch.randn(3, generator=g))
    b = _delta(w=torch.randn(3, 4, generator=g), b=torch.randn(3, generator=g))
    return a, b


def test_add_sub_mul_neg_elementwise() -> None:
    a, b = _pair()
    for k in ("w", "b"):
        assert torch.equal((a + b)[k], a[k] + b[k])
        assert torch.equal((a - b)[k], a[k] - b[k])
        assert torch.equal((a * 2.5)[k], a[k] * 2.5)
        assert torch.equal((2.5 * a)[k], a[k] * 2.5)  # __rmul__
        assert torch.equal((a * 3)[k], a[k] * 3)  # int scalar
        assert torch.equal((-a)[k], -a[k])
        assert torch.equal((a * np.float64(0.5))[k], a[k] * 0.5)  # numpy floats are floats
    for result in (a + b, a - b, 2.0 * a, -a):
        assert result.method == DELTA and result.config is None
        assert result.base == a.base


def test_arithmetic_does_not_mutate_operands() -> None:
    a, b = _pair()
    w = a["w"].clone()
    _ = a + b
    _ = a * 3.0
    _ = -a
    assert torch.equal(a["w"], w)


def test_mismatched_keys_raise() -> None:
    a, _ = _pair()
    other = _delta(w=torch.zeros(3, 4), c=torch.zeros(3))
    for op in (lambda: a + other, lambda: a - other):
        with pytest.raises(sk.ShiftMismatchError) as info:
            op()
        assert "'b'" in str(info.value) and "'c'" in str(info.value)


def test_mismatched_shapes_raise() -> None:
    a, _ = _pair()
    other = _delta(w=torch.zeros(4, 3), b=torch.zeros(3))
    with pytest.raises(sk.ShiftMismatchError, match=r"'w'.*\(3, 4\).*\(4, 3\)"):
        _ = a + other


def test_non_numeric_operands_raise() -> None:
    a, _ = _pair()
    with pytest.raises(sk.ShiftkitError):
        _ = a * torch.tensor(2.0)
    with pytest.raises(sk.ShiftkitError):
        _ = a * True
    with pytest.raises(sk.ShiftkitError):
        _ = a * "2"
    with pytest.raises(sk.ShiftkitError):
        _ = a + 1.0


def test_arithmetic_on_a_lora_shift_raises() -> None:
    model, _ = make("mlp")
    sk.attach_(model, sk.LoRAConfig(r=2, target_modules="all"))
    lora = sk.extract(model)
    delta = _delta(**{k: torch.zeros_like(v) for k, v in lora.tensors.items()})
    for op in (
        lambda: lora + lora,
        lambda: lora - lora,
        lambda: lora * 2.0,
        lambda: 2.0 * lora,
        lambda: -lora,
        lambda: delta + lora,
        lambda: lora + delta,
    ):
        with pytest.raises(sk.ShiftkitError, match="to_delta"):
            op()


def test_container_nbytes_numel() -> None:
    s = _delta(
        w=torch.zeros(3, 4), b=torch.zeros(5, dtype=torch.float16), i=torch.zeros(2, dtype=torch.int64)
    )
    assert len(s) == 3 and list(s) == ["w", "b", "i"] and s.keys() == ["w", "b", "i"]
    assert s.numel == 12 + 5 + 2
    assert s.nbytes == 12 * 4 + 5 * 2 + 2 * 8
    with pytest.raises(sk.ShiftMismatchError, match="'nope'"):
        s["nope"]
    assert "numel=19" in repr(s)


def test_lora_shift_numel_matches_the_formula() -> None:
    model, _ = make("mlp")
    r = 3
    sk.attach_(model, sk.LoRAConfig(r=r, target_modules="all"))
    shift = sk.extract(model)
    linears = [m for m in (model.fc1, model.fc2, model.head)]
    assert shift.numel == sum(r * (m.in_features + m.out_features) for m in linears)
    assert shift.nbytes == 4 * shift.numel


def test_to_dtype_casts_floats_only_and_copies() -> None:
    s = _delta(w=torch.randn(3, 4), i=torch.arange(3))
    half = s.to(dtype=torch.bfloat16)
    assert half["w"].dtype == torch.bfloat16 and half["i"].dtype == torch.int64
    torch.testing.assert_close(half["w"].float(), s["w"], atol=1e-2, rtol=1e-2)
    assert half.base == s.base and half.method == s.method
    assert s["w"].dtype == torch.float32  # the original is a value: unchanged


def test_allclose() -> None:
    a, b = _pair()
    assert a.allclose(a * 1.0)
    assert not a.allclose(b)
    assert not a.allclose(_delta(w=a["w"]))


# --- properties -----------------------------------------------------------------------------------------
_floats = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
_shapes = hnp.array_shapes(min_dims=1, max_dims=3, max_side=5)


@st.composite
def _two_deltas(draw: st.DrawFn) -> tuple[Shift, Shift]:
    shapes = draw(st.lists(_shapes, min_size=1, max_size=3))
    left, right = {}, {}
    for i, shape in enumerate(shapes):
        left[f"t{i}"] = torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=_floats)))
        right[f"t{i}"] = torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=_floats)))
    return _delta(**left), _delta(**right)


@settings(max_examples=60, deadline=None)
@given(_two_deltas())
def test_add_then_sub_is_identity(pair: tuple[Shift, Shift]) -> None:
    a, b = pair
    back = (a + b) - b
    for k in a:
        # one rounding in the sum: the error is at most an ulp of |a| + |b|
        tol = 2 * torch.finfo(torch.float32).eps * (a[k].abs() + b[k].abs())
        assert ((back[k] - a[k]).abs() <= tol).all()


@settings(max_examples=60, deadline=None)
@given(_two_deltas())
def test_doubling_is_adding_to_itself(pair: tuple[Shift, Shift]) -> None:
    a, _ = pair
    for k in a:
        assert torch.equal((2 * a)[k], (a + a)[k])
        assert torch.equal((a - a)[k], torch.zeros_like(a[k]))
        negated = -a
        assert torch.equal((-negated)[k], a[k])


@settings(max_examples=60, deadline=None)
@given(_two_deltas(), st.floats(-10, 10), st.floats(-10, 10))
def test_scaling_is_linear(pair: tuple[Shift, Shift], s: float, t: float) -> None:
    a, b = pair
    lhs, rhs = s * (a + b), s * a + s * b
    lhs2, rhs2 = (s + t) * a, s * a + t * a
    for k in a:
        mag = (abs(s) + abs(t) + 1) * (a[k].abs() + b[k].abs() + 1)
        assert ((lhs[k] - rhs[k]).abs() <= 1e-5 * mag).all()
        assert ((lhs2[k] - rhs2[k]).abs() <= 1e-5 * mag).all()
