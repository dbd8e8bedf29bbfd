"""Merge methods: numbers from the spec's worked examples (combine-compress.md §1) and hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError, ShiftMismatchError, UnknownMethodError
from shiftkit.merging.slerp import slerp_tensor
from shiftkit.merging.sparsify import dare_rescale

# spec §1.1 worked vectors
T1 = [0.5, -0.2, 0.1, 0.0]
T2 = [-0.4, -0.3, 0.05, 0.2]
T3 = [0.3, 0.1, -0.6, 0.1]


def delta(**tensors: object) -> Shift:
    ts = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    return Shift(DELTA, None, ts, {k: tuple(v.shape) for k, v in ts.items()})


def close(s: Shift, key: str, expected: object, atol: float = 1e-5) -> None:
    torch.testing.assert_close(s[key], torch.as_tensor(expected, dtype=s[key].dtype), atol=atol, rtol=0)


A = torch.arange(9, dtype=torch.float32).reshape(3, 3)  # 0..8
B = torch.full((3, 3), 3.0)


def test_registry_lists_methods() -> None:
    assert sk.list_merge_methods() == [
        "arcee_fusion",
        "atlas",
        "breadcrumbs",
        "breadcrumbs_ties",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
        "karcher",
        "linear",
        "model_stock",
        "multislerp",
        "nearswap",
        "nuslerp",
        "passthrough",
        "pcb",
        "ram",
        "ramplus_tl",
        "sce",
        "slerp",
        "task_arithmetic",
        "ties",
    ]


def test_linear_3x3_weighted_average() -> None:
    out = sk.merge([delta(w=A), delta(w=B)], method="linear", weights=[3, 1])
    # (3·i + 1·3) / 4 for i = 0..8
    close(out, "w", [[0.75, 1.5, 2.25], [3.0, 3.75, 4.5], [5.25, 6.0, 6.75]])
    assert out.method == DELTA


def test_task_arithmetic_3x3_and_spec_sum() -> None:
    out = sk.merge([delta(w=A), delta(w=B)], weights=[3, 1], lambda_=0.5)
    close(out, "w", [[1.5, 3.0, 4.5], [6.0, 7.5, 9.0], [10.5, 12.0, 13.5]])
    summed = sk.merge([delta(w=T1), delta(w=T2), delta(w=T3)], method="task_arithmetic")
    close(summed, "w", [0.4, -0.4, -0.45, 0.3])
    zero = sk.merge([delta(w=A)], lambda_=0.0)
    close(zero, "w", torch.zeros(3, 3), atol=0)


def test_task_arithmetic_normalize() -> None:
    out = sk.merge([delta(w=A), delta(w=B)], weights=[3, 1], normalize=True)
    close(out, "w", [[0.75, 1.5, 2.25], [3.0, 3.75, 4.5], [5.25, 6.0, 6.75]])


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_single_shift_weight_one_roundtrip(method: str) -> None:
    params = {"density": 1.0} if method.startswith(("ties", "dare")) else {}
    out = sk.merge([delta(w=A, b=[1.0, -2.0])], method=method, **params)
    assert out.allclose(delta(w=A, b=[1.0, -2.0]), atol=0, rtol=0)


@pytest.mark.parametrize("semantics", ["mergekit", "paper", "peft"])
def test_ties_single_density_one_equals_task_arithmetic(semantics: str) -> None:
    x = delta(w=A - 4.0, b=[0.5, -1.5])
    ties = sk.merge([x], method="ties", density=1.0, semantics=semantics)
    assert ties.allclose(sk.merge([x], method="task_arithmetic", lambda_=1.0))


def test_ties_spec_worked_example_three_semantics() -> None:
    shifts = [delta(w=T1), delta(w=T2), delta(w=T3)]
    for sem in ("mergekit", "peft"):
        close(sk.merge(shifts, method="ties", density=0.5, semantics=sem), "w", [0.4, -0.25, -0.6, 0.0])
    close(sk.merge(shifts, method="ties", density=0.5, semantics="paper"), "w", [0.4, -0.25, -0.6, 0.15])
    peft = sk.merge(shifts, method="ties", weights=[2, 1, 1], density=0.5, semantics="peft")
    close(peft, "w", [0.65, -0.35, -0.6, 0.0])
    mk = sk.merge(shifts, method="ties", weights=[2, 1, 1], density=0.5, semantics="mergekit")
    close(mk, "w", [1.3 / 3, -0.7 / 3, -0.6, 0.0])


def test_ties_zero_vote_sign_per_semantics() -> None:
    # coordinate 0 is a tie (+1, −1); the other votes are negative, so the global majority is −1
    shifts = [delta(w=[1.0, -2.0, -2.0]), delta(w=[-1.0, -3.0, -1.0])]
    for sem in ("mergekit", "peft"):
        close(sk.merge(shifts, method="ties", density=1.0, semantics=sem), "w", [1.0, -2.5, -1.5])
    close(sk.merge(shifts, method="ties", density=1.0, semantics="paper"), "w", [-1.0, -2.5, -1.5])
    pos = sk.merge(shifts, method="ties", density=1.0, semantics="paper", zero_sign="positive")
    close(pos, "w", [1.0, -2.5, -1.5])


def test_ties_paper_trim_is_global_over_keys() -> None:
    # one task, keys a=[4, 1], b=[3, 2]: d=4, density 0.25 → threshold = 3rd smallest |τ| = 3 → keep 4 and 3
    out = sk.merge([delta(a=[4.0, 1.0], b=[3.0, 2.0])], method="ties", density=0.25, semantics="paper")
    close(out, "a", [4.0, 0.0])
    close(out, "b", [3.0, 0.0])
    # mergekit trims per tensor: ⌊0.25·2⌋ = 0, raised to its minimum of 1 entry per tensor
    mk = sk.merge([delta(a=[4.0, 1.0], b=[3.0, 2.0])], method="ties", density=0.25)
    close(mk, "a", [4.0, 0.0])
    close(mk, "b", [3.0, 0.0])
    # peft trims per tensor to exactly ⌊0.25·2⌋ = 0 entries
    pf = sk.merge([delta(a=[4.0, 1.0], b=[3.0, 2.0])], method="ties", density=0.25, semantics="peft")
    close(pf, "a", [0.0, 0.0])


def test_ties_paper_rejects_weights() -> None:
    with pytest.raises(ShiftkitError, match="no per-task weights"):
        sk.merge([delta(w=T1), delta(w=T2)], method="ties", weights=[2, 1], semantics="paper")


def test_dare_rescale_rules_fixed_mask() -> None:
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    keep = torch.tensor([True, False, True, False])
    torch.testing.assert_close(dare_rescale(x, keep, 0.5, "l1"), torch.tensor([2.5, 0.0, 7.5, 0.0]))
    torch.testing.assert_close(dare_rescale(x, keep, 0.5, "inverse"), torch.tensor([2.0, 0.0, 6.0, 0.0]))
    torch.testing.assert_close(dare_rescale(x, keep, 0.5, "none"), torch.tensor([1.0, 0.0, 3.0, 0.0]))


def test_dare_seeded_mask_reproducible_and_keeps_density() -> None:
    x = torch.full((100, 100), 2.0)
    tv = delta(w=x)
    one = sk.merge([tv], method="dare_linear", density=0.3, rescale="inverse", seed=7)
    two = sk.merge([tv], method="dare_linear", density=0.3, rescale="inverse", seed=7)
    other = sk.merge([tv], method="dare_linear", density=0.3, rescale="inverse", seed=8)
    assert torch.equal(one["w"], two["w"]) and not torch.equal(one["w"], other["w"])
    kept = one["w"] != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02  # σ = √(0.3·0.7/10⁴) ≈ 0.0046
    torch.testing.assert_close(one["w"][kept], torch.full((int(kept.sum()),), 2.0 / 0.3))
    l1 = sk.merge([tv], method="dare_linear", density=0.3, seed=7)
    assert torch.equal(l1["w"] != 0, kept)
    assert math.isclose(l1["w"].abs().sum().item(), x.abs().sum().item(), rel_tol=1e-5)


def test_dare_mask_independent_of_key_order_and_edge_densities() -> None:
    a, b = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)), torch.ones(4)
    x = sk.merge([delta(a=a, b=b)], method="dare_linear", density=0.5, seed=3)
    y = sk.merge([delta(b=b, a=a)], method="dare_linear", density=0.5, seed=3)
    assert torch.equal(x["a"], y["a"]) and torch.equal(x["b"], y["b"])
    zero = sk.merge([delta(a=a)], method="dare_linear", density=0.0)
    assert torch.equal(zero["a"], torch.zeros(5, 5))


def test_dare_ties_density_one_mergekit_sum() -> None:
    # no drop; mergekit dare_ties does not normalise: Σ of agreeing weighted entries (tie → +1)
    shifts = [delta(w=[1.0, -2.0, -2.0]), delta(w=[-1.0, -3.0, -1.0])]
    close(sk.merge(shifts, method="dare_ties", density=1.0), "w", [1.0, -5.0, -3.0])
    close(sk.merge(shifts, method="dare_ties", density=1.0, semantics="peft"), "w", [1.0, -2.5, -1.5])


def test_slerp_formula_cases() -> None:
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    r = math.sqrt(0.5)
    torch.testing.assert_close(slerp_tensor(e0, e1, 0.5), torch.tensor([r, r]))
    c8, s8 = math.cos(math.pi / 8), math.sin(math.pi / 8)
    torch.testing.assert_close(slerp_tensor(e0, e1, 0.25), torch.tensor([c8, s8]))
    torch.testing.assert_close(slerp_tensor(2 * e0, e1, 0.5), torch.tensor([math.sqrt(2), r]))
    p0, p1 = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])
    torch.testing.assert_close(slerp_tensor(p0, p1, 0.5), torch.tensor([1.5, 3.0]))  # parallel → lerp
    for t, want in ((0.0, e0), (1.0, e1)):
        torch.testing.assert_close(slerp_tensor(e0, e1, t), want)
    # zero vector: c = 0 → Ω = π/2 → weights sin((1−t)π/2), sin(tπ/2) (not a lerp)
    torch.testing.assert_close(slerp_tensor(torch.zeros(2), e1, 0.5), torch.tensor([0.0, r]))


def test_slerp_through_merge_and_base() -> None:
    out = sk.merge([delta(w=[[1.0, 0.0]]), delta(w=[[0.0, 1.0]])], method="slerp", t=0.5)
    r = math.sqrt(0.5)
    close(out, "w", [[r, r]])
    # weights space: θ0 = [.5, .5], θ0 + τ0 = e0, θ0 + τ1 = e1 → slerp(e0, e1) − θ0
    base = {"w": torch.tensor([[0.5, 0.5]])}
    mk = sk.merge([delta(w=[[0.5, -0.5]]), delta(w=[[-0.5, 0.5]])], method="slerp", t=0.5, base=base)
    close(mk, "w", [[r - 0.5, r - 0.5]])
    with pytest.raises(ShiftkitError, match="exactly 2"):
        sk.merge([delta(w=T1)], method="slerp")


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-10, 10), min_size=4, max_size=4),
    st.lists(st.floats(-10, 10), min_size=4, max_size=4),
    st.floats(0.1, 5.0),
)
def test_weights_scale_linearly(x: list[float], y: list[float], c: float) -> None:
    shifts = [delta(w=x), delta(w=y)]
    ta = sk.merge(shifts, weights=[1.0, 2.0])
    ta_c = sk.merge(shifts, weights=[c, 2.0 * c])
    torch.testing.assert_close(ta_c["w"], c * ta["w"], atol=1e-4, rtol=1e-5)
    lin = sk.merge(shifts, method="linear", weights=[1.0, 2.0])
    lin_c = sk.merge(shifts, method="linear", weights=[c, 2.0 * c])
    torch.testing.assert_close(lin_c["w"], lin["w"], atol=1e-4, rtol=1e-5)  # normalised: invariant
    raw = sk.merge(shifts, method="linear", weights=[c, 2.0 * c], normalize=False)
    torch.testing.assert_close(raw["w"], c * ta["w"], atol=1e-4, rtol=1e-5)


def test_mismatches_raise() -> None:
    with pytest.raises(ShiftMismatchError, match="only in 1"):
        sk.merge([delta(a=T1), delta(a=T1, b=T2)])
    with pytest.raises(ShiftMismatchError, match="shape"):
        sk.merge([delta(a=T1), delta(a=[1.0, 2.0])])
    half = Shift(DELTA, None, {"a": torch.tensor(T1, dtype=torch.float16)})
    with pytest.raises(ShiftMismatchError, match="dtype"):
        sk.merge([delta(a=T1), half])
    filled = sk.merge([delta(a=T1), delta(a=T1, b=T2)], on_missing="zero")
    close(filled, "b", T2)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ShiftkitError, match="NaN"):
        sk.merge([delta(a=[1.0, float("nan")]), delta(a=[1.0, 2.0])])
    with pytest.raises(ShiftkitError, match="Inf"):
        sk.merge([delta(a=[1.0, float("inf")])])
    lora = Shift("lora", None, {"fc.lora_A": torch.ones(2, 2)})
    with pytest.raises(ShiftkitError, match="to_delta"):
        sk.merge([lora])
    with pytest.raises(ShiftkitError, match="no parameter"):
        sk.merge([delta(a=T1)], method="linear", density=0.5)
    with pytest.raises(UnknownMethodError):
        sk.merge([delta(a=T1)], method="tie")
    with pytest.raises(ShiftkitError, match="weights"):
        sk.merge([delta(a=T1)], weights=[1.0, 2.0])


def test_dtype_is_kept() -> None:
    x = Shift(DELTA, None, {"a": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)})
    out = sk.merge([x, x], method="linear")
    assert out["a"].dtype == torch.bfloat16
    torch.testing.assert_close(out["a"], x["a"])
