"""alpha_bn, bn_ema, the BatchNorm statistics mixing, batch size 1 and the collapse guard."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shiftkit import adapt
from shiftkit.adapt.norm_stats import mix_batch_statistics
from shiftkit.errors import ShiftkitError
from tiny_models import make as make_tiny


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        bn.weight.copy_(torch.tensor([1.5, 0.7, -0.3]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    return nn.Sequential(bn).eval()


def _reference(x: torch.Tensor, bn: nn.BatchNorm2d, a: float) -> torch.Tensor:
    """The BN-α formula written out with float64 statistics."""
    xd = x.double()
    mu_b = xd.mean(dim=(0, 2, 3))
    var_b = xd.var(dim=(0, 2, 3), unbiased=False)
    mu = (1 - a) * bn.running_mean.double() + a * mu_b
    var = (1 - a) * bn.running_var.double() + a * var_b
    y = (xd - mu[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    return (y * bn.weight.double()[None, :, None, None] + bn.bias.double()[None, :, None, None]).float()


@pytest.mark.parametrize("a", [0.0, 0.1, 0.5, 1.0])
def test_alpha_bn_matches_formula(a: float) -> None:
    model = _bn_model()
    bn = model[0]
    x = torch.randn(6, 3, 4, 4) * 3 + 1
    expected = _reference(x, bn, a)
    out = adapt.make("alpha_bn", model, target_weight=a)(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_alpha_bn_endpoints_are_source_and_norm() -> None:
    x = torch.randn(8, 3, 8, 8) * 2 - 1
    model, _ = make_tiny("cnn")
    src = model(x).detach()
    model2, _ = make_tiny("cnn")
    torch.testing.assert_close(adapt.make("alpha_bn", model2, target_weight=0.0)(x), src)
    model3, _ = make_tiny("cnn")
    model4, _ = make_tiny("cnn")
    torch.testing.assert_close(
        adapt.make("alpha_bn", model3, target_weight=1.0)(x),
        adapt.make("norm", model4)(x),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_alpha_bn_rejects_bad_weight(bad: object) -> None:
    model, _ = make_tiny("cnn")
    with pytest.raises(ShiftkitError, match="target_weight"):
        adapt.make("alpha_bn", model, target_weight=bad)


def test_mixed_statistics_are_differentiable() -> None:
    model = _bn_model()
    bn = model[0]
    mix_batch_statistics([("0", bn)], 0.5)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    model(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert bn.weight.grad is not None


def test_batch_size_one_uses_source_mixed_statistics() -> None:
    """One image: the test weight drops to 0.1 (source-mixed), whatever the method asked for."""
    model = _bn_model()
    x = torch.randn(1, 3, 5, 5) * 4
    expected = _reference(x, model[0], 0.1)
    out = adapt.make("norm", model)(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["norm", "alpha_bn", "bn_ema", "tent"])
def test_batch_size_one_no_spatial_is_finite(method: str) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    tta = adapt.make(method, model)
    for _ in range(3):
        out = tta(torch.randn(1, 4))
        assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_bn_ema_matches_recursion() -> None:
    model = _bn_model()
    bn = model[0]
    mu, var = bn.running_mean.clone().double(), bn.running_var.clone().double()
    tta = adapt.make("bn_ema", model, momentum=0.2, tau=3.0, min_momentum=0.05)
    torch.manual_seed(1)
    for t in range(6):
        x = torch.randn(5, 3, 4, 4) * (1 + t) + t
        eta = max(0.05, 0.2 * math.exp(-t / 3.0))
        mu = (1 - eta) * mu + eta * x.double().mean(dim=(0, 2, 3))
        var = (1 - eta) * var + eta * x.double().var(dim=(0, 2, 3), unbiased=True)
        out = tta(x)
        y = (x.double() - mu[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
        y = y * bn.weight.double()[None, :, None, None] + bn.bias.double()[None, :, None, None]
        torch.testing.assert_close(out, y.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean.double(), mu, atol=1e-5, rtol=1e-5)


def test_bn_ema_reset_and_constant_momentum() -> None:
    model, _ = make_tiny("cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tta = adapt.make("bn_ema", model, tau=None)
    assert tta.current_momentum() == 0.1
    x = torch.randn(8, *make_tiny("cnn")[1].shape[1:]) + 3
    first = tta(x)
    tta(x)
    assert tta.current_momentum() == 0.1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    tta.reset()
    assert tta.batches_seen == 0
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    torch.testing.assert_close(tta(x), first)


@pytest.mark.parametrize(
    ("opts", "match"),
    [({"momentum": 0.0}, "momentum"), ({"tau": -1.0}, "tau"), ({"min_momentum": 0.5}, "min_momentum")],
)
def test_bn_ema_errors(opts: dict[str, float], match: str) -> None:
    model, _ = make_tiny("cnn")
    with pytest.raises(ShiftkitError, match=match):
        adapt.make("bn_ema", model, **opts)


def test_bn_ema_needs_running_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ShiftkitError, match="running statistics"):
        adapt.make("bn_ema", model)


def test_collapse_guard_resets_tent() -> None:
    """A threshold above any reachable entropy average resets after every batch: the model stays source."""
    model, x = make_tiny("cnn")
    x = torch.randn(16, *x.shape[1:])
    params = {k: v.clone() for k, v in model.named_parameters()}
    tta = adapt.make("tent", model, lr=1e-2, collapse_entropy=100.0)
    for _ in range(3):
        tta(x)
    assert tta.collapse_resets == 3
    for k, v in model.named_parameters():
        assert torch.equal(params[k], v), k


def test_collapse_guard_off_and_low_threshold_do_not_reset() -> None:
    model, x = make_tiny("cnn")
    x = torch.randn(16, *x.shape[1:])
    tta = adapt.make("tent", model, lr=1e-2, collapse_entropy=1e-9)
    for _ in range(3):
        tta(x)
    assert tta.collapse_resets == 0
    assert tta.guard_collapse(float("nan")) is False


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), True])
def test_collapse_guard_rejects_bad_threshold(bad: object) -> None:
    model, _ = make_tiny("cnn")
    with pytest.raises(ShiftkitError, match="collapse_entropy"):
        adapt.make("tent", model, collapse_entropy=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_uses_the_native_statistics(dtype: torch.dtype) -> None:
    """One-pass moments would cancel in 16-bit floats (mean 10, std 1): the native kernel must be used."""
    model = _bn_model().to(dtype)
    x = (torch.randn(8, 3, 6, 6) + 10.0).to(dtype)
    out = adapt.make("norm", model)(x).float()
    ref = _reference(x.float(), model[0].float(), 1.0)
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)


def test_large_mean_falls_back_to_the_two_pass_kernel() -> None:
    """mean/std = 1e3 in float32: the one-pass formula would lose the variance; the result stays exact."""
    model = _bn_model()
    x = torch.randn(8, 3, 6, 6) * 0.01 + 10.0
    out = adapt.make("norm", model)(x)
    torch.testing.assert_close(out, _reference(x, model[0], 1.0), atol=1e-3, rtol=1e-3)
