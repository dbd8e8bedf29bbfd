"""PCB-merging: spec §2.6 sanity vectors, an independent materialised port of §2.1–2.2, coefficient search."""

from __future__ import annotations

import pytest
import torch

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError
from shiftkit.merging.pcb import search_pcb_coefficients

T1 = [0.5, -0.2, 0.1, 0.0, 0.3, -0.05, 0.2, 0.4, -0.1, 0.02]
T2 = [-0.4, -0.3, 0.05, 0.2, 0.25, 0.1, -0.2, 0.35, 0.0, 0.01]


def delta(**tensors: object) -> Shift:
    ts = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    return Shift(DELTA, None, ts, {k: tuple(v.shape) for k, v in ts.items()})


def qclamp(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Spec §2.1 on an (n, d) matrix: clamp rows to [s[⌊d·a⌋], s[⌊d(1−b)−1⌋]] of the sorted row."""
    d = x.shape[1]
    s = torch.sort(x, dim=1).values
    return torch.clamp(x, s[:, int(d * a)].unsqueeze(1), s[:, int(d * (1 - b) - 1)].unsqueeze(1))


def mm(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    return (x - lo) / (hi - lo)


def reference(t: torch.Tensor, c: float, r: float, inter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, β̃) of spec §2.2 steps 1–5, materialised on the (n, d) matrix (no guards)."""
    n = t.shape[0]
    a = qclamp(t.abs(), c, c)
    intra = torch.exp(n * mm(a) ** 2)
    if inter == "root":
        beta = intra * torch.tanh(t * t.sum(0))
    else:
        nn = torch.sign(t) * mm(a)
        beta = intra * torch.stack([torch.tanh(nn[i] * nn).sum(0) for i in range(n)])
    return torch.sign(t) * a, mm(qclamp(beta, 1 - r, 0))


def test_spec_sanity_vectors_root_and_vision() -> None:
    shifts = [delta(w=T1), delta(w=T2)]
    root = sk.merge(shifts, method="pcb", clamp=1e-4, ratio=0.5)
    want_root = [0.4, -0.2831, 0, 0.2, 0.2768, 0, 0, 0.375, 0, 0]
    torch.testing.assert_close(root["w"], torch.tensor(want_root), atol=1e-4, rtol=0)
    vision = sk.merge(shifts, method="pcb", clamp=0.01, ratio=0.5, inter="vision")
    want_vision = [0, -0.2815, 0.1, 0.2, 0.2769, 0, 0, 0.375, 0, 0]
    torch.testing.assert_close(vision["w"], torch.tensor(want_vision), atol=1e-4, rtol=0)


@pytest.mark.parametrize("inter", ["root", "vision"])
def test_matches_materialised_port_over_sorted_keys(inter: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(7, 5, generator=g) for _ in range(3)]
    b = [torch.randn(11, generator=g) for _ in range(3)]
    shifts = [delta(zb=b[i], a=a[i]) for i in range(3)]  # insertion order ≠ sorted order
    out = sk.merge(
        shifts, method="pcb", ratio=0.2, clamp=0.05, inter=inter, lambda_=1.5, lambdas=[1.0, 0.8, 1.2]
    )
    t = torch.stack([torch.cat([a[i].reshape(-1), b[i]]) for i in range(3)])  # sorted keys: a, zb
    c, scale = reference(t, 0.05, 0.2, inter)
    lams = torch.tensor([1.0, 0.8, 1.2]).unsqueeze(1)
    want = 1.5 * (c * lams * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    torch.testing.assert_close(torch.cat([out["a"].reshape(-1), out["zb"]]), want, atol=1e-6, rtol=1e-5)


def test_single_task_is_clamped_pruning() -> None:
    x = torch.randn(200, generator=torch.Generator().manual_seed(1))
    out = sk.merge([delta(w=x)], method="pcb", ratio=0.3, clamp=0.01)["w"]
    c, scale = reference(x.unsqueeze(0), 0.01, 0.3, "root")
    torch.testing.assert_close(out, (c * (scale > 0))[0], atol=1e-6, rtol=0)
    assert 0 < int((out != 0).sum()) <= 60  # β̃ > 0 only above the 70 % quantile of β


def test_zero_task_gets_no_weight_and_no_nan() -> None:
    x = torch.tensor([0.5, -0.2, 0.3, 0.1])
    out = sk.merge([delta(w=x), delta(w=torch.zeros(4))], method="pcb", ratio=0.5, clamp=0.0)["w"]
    assert torch.isfinite(out).all()
    # zero task: β = exp(0)·tanh(0) = 0, a constant row → β̃ = 0 (guarded, no NaN). Task 1: mm(|x|) =
    # [1, .25, .5, 0], β = exp(2·mm²)·tanh(x²) ≈ [1.81, .045, .148, .01]; s[⌊4·0.5⌋] = .148 → only entry 0 > 0
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, 0.0, 0.0]))
    alone = sk.merge([delta(w=x)], method="pcb", ratio=0.5, clamp=0.0)["w"]
    torch.testing.assert_close(alone, torch.tensor([0.5, 0.0, 0.0, 0.0]))


def test_lambdas_multiply_numerator_only_and_per_tensor_scope() -> None:
    shifts = [delta(w=T1), delta(w=T2)]
    base = sk.merge(shifts, method="pcb", clamp=1e-4, ratio=0.5)["w"]
    scaled = sk.merge(shifts, method="pcb", clamp=1e-4, ratio=0.5, lambdas=[2.0, 2.0])["w"]
    torch.testing.assert_close(scaled, 2 * base)
    one_key = sk.merge(shifts, method="pcb", clamp=1e-4, ratio=0.5, scope="per_tensor")["w"]
    assert torch.equal(one_key, base)  # a single tensor: per-tensor statistics are the global ones
    split = [delta(a=T1[:5], b=T1[5:]), delta(a=T2[:5], b=T2[5:])]
    per = sk.merge(split, method="pcb", clamp=1e-4, ratio=0.5, scope="per_tensor")
    c, scale = reference(torch.tensor([T1[:5], T2[:5]]), 1e-4, 0.5, "root")
    torch.testing.assert_close(
        per["a"], (c * scale).sum(0) / scale.sum(0).clamp(min=1e-12), atol=1e-6, rtol=0
    )


def test_bad_parameters_raise() -> None:
    shifts = [delta(w=T1), delta(w=T2)]
    with pytest.raises(ShiftkitError, match="ratio"):
        sk.merge(shifts, method="pcb", ratio=0.0)
    with pytest.raises(ShiftkitError, match="inter"):
        sk.merge(shifts, method="pcb", inter="nlp")
    with pytest.raises(ShiftkitError, match="lambdas"):
        sk.merge(shifts, method="pcb", lambdas=[1.0])
    with pytest.raises(ShiftkitError, match="weights"):
        sk.merge(shifts, method="pcb", weights=[2.0, 1.0])


def test_coefficient_search_finds_known_optimum() -> None:
    g = torch.Generator().manual_seed(3)
    shifts = [delta(w=torch.randn(40, generator=g), b=torch.randn(6, generator=g)) for _ in range(2)]
    target = sk.merge(shifts, method="pcb", ratio=0.5, lambdas=[1.2, 0.9])

    def score(s: Shift) -> float:
        return -float(sum((s[k] - target[k]).norm() ** 2 for k in ("w", "b")))

    lams, best = search_pcb_coefficients(shifts, score, budget=100, seed=0, ratio=0.5)
    assert lams == pytest.approx([1.2, 0.9], abs=0.02)
    assert best > -1e-3 and best >= score(sk.merge(shifts, method="pcb", ratio=0.5))
    again, _ = search_pcb_coefficients(shifts, score, budget=100, seed=0, ratio=0.5)
    assert again == lams  # seeded
    boxed, _ = search_pcb_coefficients(shifts, score, bounds=(0.8, 1.0), budget=60, ratio=0.5)
    assert boxed[0] == pytest.approx(1.0, abs=0.02) and all(0.8 <= v <= 1.0 for v in boxed)
