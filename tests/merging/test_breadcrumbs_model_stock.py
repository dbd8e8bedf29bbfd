"""Model Breadcrumbs and Model Stock: hand-computed masks and ratios (formulas in the module docstrings)."""

from __future__ import annotations

import math

import pytest
import torch

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError
from shiftkit.merging.breadcrumbs import breadcrumbs_mask
from shiftkit.merging.model_stock import model_stock_ratio
from shiftkit.merging.sparsify import topk_magnitude

# spec §1.1 worked vectors
T1 = [0.5, -0.2, 0.1, 0.0]
T2 = [-0.4, -0.3, 0.05, 0.2]
T3 = [0.3, 0.1, -0.6, 0.1]


def delta(**tensors: object) -> Shift:
    ts = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    return Shift(DELTA, None, ts, {k: tuple(v.shape) for k, v in ts.items()})


def test_breadcrumbs_mask_band_of_ranks() -> None:
    # n = 4, γ = 0.25 → drop rank 0; density 0.5 → keep ranks 1, 2
    assert breadcrumbs_mask(torch.tensor([4.0, -3.0, 2.0, 1.0]), 0.5, 0.25).tolist() == [
        False,
        True,
        True,
        False,
    ]
    x = torch.tensor([(-1.0) ** i * i for i in range(1, 11)])  # |x| = 1..10
    kept = x[breadcrumbs_mask(x, 0.5, 0.1)].abs().sort().values
    assert kept.tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]  # 10 dropped as outlier, 1..4 as negligible
    # density + γ > 1: fewer outliers dropped so that exactly ⌊0.9·10⌋ = 9 entries survive
    assert breadcrumbs_mask(x, 0.9, 0.2).tolist() == [True] * 9 + [False]
    # ties: ranks by index among equal magnitudes
    assert breadcrumbs_mask(torch.ones(4), 0.5, 0.25).tolist() == [False, True, True, False]
    assert breadcrumbs_mask(x, 1.0, 0.5).all()
    y = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.where(breadcrumbs_mask(y, 0.3, 0.0), y, 0.0), topk_magnitude(y, 0.3))


def test_breadcrumbs_merge_hand_numbers() -> None:
    shifts = [delta(w=T1), delta(w=T2), delta(w=T3)]
    # masked (density .5, γ .25): [0,-.2,.1,0], [0,-.3,0,.2], [.3,.1,0,0]
    out = sk.merge(shifts, method="breadcrumbs", density=0.5, gamma=0.25)
    torch.testing.assert_close(out["w"], torch.tensor([0.3, -0.4, 0.1, 0.2]))
    weighted = sk.merge(shifts, method="breadcrumbs", weights=[2, 1, 1], density=0.5, gamma=0.25, lambda_=0.5)
    torch.testing.assert_close(weighted["w"], 0.5 * torch.tensor([0.3, -0.6, 0.2, 0.2]))
    ties = sk.merge(shifts, method="breadcrumbs_ties", density=0.5, gamma=0.25)
    torch.testing.assert_close(ties["w"], torch.tensor([0.3, -0.5, 0.1, 0.2]))  # +0.1 at index 1 disagrees
    mean = sk.merge(shifts, method="breadcrumbs_ties", density=0.5, gamma=0.25, normalize=True)
    torch.testing.assert_close(mean["w"], torch.tensor([0.3, -0.25, 0.1, 0.2]))
    with pytest.raises(ShiftkitError, match="gamma"):
        sk.merge(shifts, method="breadcrumbs", gamma=1.5)


def test_model_stock_two_vectors_at_60_degrees() -> None:
    a, b = [1.0, 0.0], [0.5, math.sqrt(3) / 2]
    out = sk.merge([delta(w=a), delta(w=b)], method="model_stock")
    t = 2 * 0.5 / (1 + 0.5)  # k·cos / (1 + (k−1)·cos) = 2/3
    torch.testing.assert_close(out["w"], t * torch.tensor([0.75, math.sqrt(3) / 4]))


def test_model_stock_three_vectors_mean_pairwise_cosine() -> None:
    s = 1 / math.sqrt(2)
    vs = [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [s, s, 0.0]]  # pairwise cosines 0, 1/√2, 1/√2
    c = (0 + 2 * s) / 3
    t = 3 * c / (1 + 2 * c)
    out = sk.merge([delta(w=v) for v in vs], method="model_stock")
    torch.testing.assert_close(out["w"], t * torch.tensor(vs).mean(0))
    # θ = t·θ_avg + (1 − t)·θ0 in weight space
    theta0 = torch.tensor([0.1, -0.2, 0.3])
    want = t * (theta0 + torch.tensor(vs)).mean(0) + (1 - t) * theta0
    torch.testing.assert_close(theta0 + out["w"], want)


def test_model_stock_filter_wise_and_guards() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 0.0]])  # row 0 orthogonal (t = 0), row 1 parallel (t = 1)
    rows = sk.merge([delta(w=a), delta(w=b)], method="model_stock", filter_wise=True)
    torch.testing.assert_close(rows["w"], torch.tensor([[0.0, 0.0], [1.5, 0.0]]))
    whole = sk.merge([delta(w=a), delta(w=b)], method="model_stock")
    c = 2.0 / (math.sqrt(2) * math.sqrt(5))
    torch.testing.assert_close(whole["w"], 2 * c / (1 + c) * (a + b) / 2)
    zero = sk.merge([delta(w=[0.0, 0.0]), delta(w=[1.0, 2.0])], method="model_stock")
    assert torch.equal(zero["w"], torch.zeros(2))  # zero vector: cos = 0 → t = 0, no NaN
    opposite = model_stock_ratio([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])])
    assert opposite.item() == 0.0  # singular 1 + (k−1)·cos = 0 → t = 0
    with pytest.raises(ShiftkitError, match="2 or more shifts, got 1"):
        sk.merge([delta(w=[1.0, 2.0])], method="model_stock")
    with pytest.raises(ShiftkitError, match="weights"):
        sk.merge([delta(w=[1.0]), delta(w=[2.0])], method="model_stock", weights=[2, 1])
