"""The intrinsic-dimension recipe: the d_int90 crossing rule, and a tiny end-to-end sweep."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shiftkit as sk
from shiftkit.recipes import IntrinsicDimResult, intrinsic_dimension
from shiftkit.recipes.intrinsic import crossing
from shiftkit.recipes.learn import TrainConfig, tensor_batches


def test_crossing_takes_the_first_grid_point_and_interpolates_linearly() -> None:
    # 0.8 lies between (100, 0.7) and (1000, 0.95): 100 + (0.8 - 0.7) / (0.95 - 0.7) · 900 = 460
    assert crossing([10, 100, 1000], [0.5, 0.7, 0.95], 0.8) == (1000, pytest.approx(460.0))
    assert crossing([10, 100], [0.9, 0.95], 0.8) == (10, 10.0)  # nothing below the grid to interpolate to
    assert crossing([10, 100], [0.1, 0.2], 0.8) == (None, None)
    # not monotone: the smallest passing dim counts, bracketed by its own predecessor
    dim, interp = crossing([1, 2, 3, 4], [0.5, 0.9, 0.6, 0.95], 0.85)
    assert dim == 2 and interp == pytest.approx(1 + 0.35 / 0.4)
    assert crossing([5], [0.85], 0.85) == (5, 5.0)  # reaching the target exactly passes


def _blobs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 3
    centres = torch.randn(3, 6, generator=g) * 3
    return centres[y] + torch.randn(96, 6, generator=g), y


def test_sweep_on_separable_blobs() -> None:
    x, y = _blobs()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lines: list[str] = []
    cfg = TrainConfig(epochs=4, lr=0.1, batch_size=32, warmup_ratio=0.0, eval_every=3)
    res = intrinsic_dimension(
        net,
        tensor_batches(x[:64], y[:64], 32),
        list(tensor_batches(x[64:], y[64:], 32, shuffle=False)),
        dims=[40, 2, 40],
        train_config=cfg,
        projection="dense",
        progress=False,
        log=lines.append,
    )
    assert isinstance(res, IntrinsicDimResult)
    assert res.dims == [2, 40]  # sorted, de-duplicated
    assert res.num_params == 6 * 8 + 8 + 8 * 3 + 3
    assert len(res.accuracy) == len(res.seconds) == 2 and all(0 <= a <= 1 for a in res.accuracy)
    assert res.p_full > 0.9  # three well-separated blobs
    assert (res.d_int90, res.d_int90_interpolated) == crossing(res.dims, res.accuracy, 0.9 * res.p_full)
    assert res.to_dict()["target"] == pytest.approx(0.9 * res.p_full)
    assert len(lines) == 3 and lines[0].startswith("full: 83 parameters")
    for k, v in net.state_dict().items():  # θ0 is copied for every run, never trained in place
        assert torch.equal(v, before[k]), k


def test_factory_and_argument_checks() -> None:
    x, y = _blobs()

    def factory() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 3))

    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=48, warmup_ratio=0.0)
    res = intrinsic_dimension(
        factory,
        tensor_batches(x, y, 48),
        list(tensor_batches(x, y, 96)),
        [3],
        train_config=cfg,
        progress=False,
    )
    assert res.num_params == 21 and res.projection == "fastfood" and res.threshold == 0.9
    with pytest.raises(sk.ShiftkitError, match="dims"):
        intrinsic_dimension(factory, tensor_batches(x, y, 48), [], [0])
    with pytest.raises(sk.ShiftkitError, match="threshold"):
        intrinsic_dimension(factory, tensor_batches(x, y, 48), [], [3], threshold=1.5)
