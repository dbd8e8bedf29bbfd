"""SSF numbers pinned against the paper's formulas: ``SSF(z) = γ ⊙ z + β`` and its exact folds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from shiftkit.methods.ssf import SSFModule


def _attach(module: nn.Module, **kwargs: object) -> tuple[nn.Sequential, SSFModule]:
    model = nn.Sequential(module)
    sk.attach_(model, sk.SSFConfig(target_modules=["0"], **kwargs))  # type: ignore[arg-type]
    wrapper = model[0]
    assert isinstance(wrapper, SSFModule)
    with torch.no_grad():  # well away from the identity so a wrong axis or formula shows
        wrapper.scale.copy_(torch.rand(wrapper.scale.shape) + 0.5)
        wrapper.shift.copy_(torch.randn(wrapper.shift.shape))
    return model, wrapper


def _fold_and_check(model: nn.Module, x: Tensor, expected: Tensor, atol: float = 1e-5) -> nn.Module:
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=atol, rtol=1e-5)
    sk.fold_(model)
    assert not isinstance(model[0], SSFModule)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=atol, rtol=1e-5)
    return model[0]


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias: bool) -> None:
    lin = nn.Linear(5, 4, bias=bias)
    w, b = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    model, ssf = _attach(lin)
    g, h = ssf.scale.detach().clone(), ssf.shift.detach().clone()
    x = torch.randn(3, 2, 5)
    z = x @ w.T + (b if b is not None else 0)
    folded = _fold_and_check(model, x, g * z + h)
    assert folded is lin
    torch.testing.assert_close(lin.weight, g[:, None] * w)  # W' = diag(γ) W
    assert lin.bias is not None  # created where the base had none
    torch.testing.assert_close(lin.bias, (g * b if b is not None else 0) + h)  # b' = γ ⊙ b + β
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d(bias: bool) -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
    w = conv.weight.detach().clone()
    b = torch.zeros(4) if conv.bias is None else conv.bias.detach().clone()
    model, ssf = _attach(conv)
    g, h = ssf.scale.detach().clone(), ssf.shift.detach().clone()
    x = torch.randn(2, 3, 5, 5)
    z = torch.nn.functional.conv2d(x, w, b, padding=1)
    _fold_and_check(model, x, g[None, :, None, None] * z + h[None, :, None, None])
    torch.testing.assert_close(conv.weight, g[:, None, None, None] * w)
    torch.testing.assert_close(conv.bias, g * b + h)


def test_conv1d_channel_axis_batched_and_unbatched() -> None:
    conv = nn.Conv1d(3, 4, 2)
    model, ssf = _attach(conv)
    g, h = ssf.scale.detach(), ssf.shift.detach()
    for x in (torch.randn(2, 3, 6), torch.randn(3, 6)):
        with torch.no_grad():
            torch.testing.assert_close(model(x), g[:, None] * conv(x) + h[:, None])


def _layer_norm_by_hand(x: Tensor, g: Tensor | None, h: Tensor | None, eps: float, dims: int) -> Tensor:
    axes = tuple(range(-dims, 0))
    mean = x.mean(axes, keepdim=True)
    var = x.var(axes, unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y * (1 if g is None else g) + (0 if h is None else h)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(affine: bool) -> None:
    ln = nn.LayerNorm(6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-1, 1)
    gn = None if ln.weight is None else ln.weight.detach().clone()
    hn = None if ln.bias is None else ln.bias.detach().clone()
    model, ssf = _attach(ln)
    g, h = ssf.scale.detach().clone(), ssf.shift.detach().clone()
    x = torch.randn(3, 4, 6) * 3 + 1
    _fold_and_check(model, x, g * _layer_norm_by_hand(x, gn, hn, ln.eps, 1) + h)
    torch.testing.assert_close(ln.weight, g * (gn if gn is not None else 1))  # g' = γ ⊙ g
    torch.testing.assert_close(ln.bias, h + (g * hn if hn is not None else 0))  # h' = γ ⊙ h + β
    assert ln.elementwise_affine


def test_layer_norm_over_two_axes() -> None:
    ln = nn.LayerNorm((3, 4))
    model, ssf = _attach(ln)
    assert ssf.scale.shape == (3, 4)
    x = torch.randn(2, 3, 4)
    expected = ssf.scale.detach() * _layer_norm_by_hand(x, ln.weight, ln.bias, ln.eps, 2) + ssf.shift.detach()
    _fold_and_check(model, x, expected.detach())


def _bn_by_hand(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    view = (1, -1, *([1] * (x.dim() - 2)))
    return (x - mean.reshape(view)) / torch.sqrt(var.reshape(view) + eps)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_2d_eval(affine: bool) -> None:
    bn = nn.BatchNorm2d(4, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    gn = bn.weight.detach().clone() if affine else torch.ones(4)
    hn = bn.bias.detach().clone() if affine else torch.zeros(4)
    model, ssf = _attach(bn)
    model.eval()
    g, h = ssf.scale.detach().clone(), ssf.shift.detach().clone()
    x = torch.randn(2, 4, 3, 3)
    v = (1, -1, 1, 1)
    z = _bn_by_hand(x, bn.running_mean, bn.running_var, bn.eps) * gn.reshape(v) + hn.reshape(v)
    _fold_and_check(model, x, g.reshape(v) * z + h.reshape(v))
    torch.testing.assert_close(bn.weight, g * gn)
    torch.testing.assert_close(bn.bias, g * hn + h)
    assert bn.affine


def test_batch_norm_without_affine_in_train_mode() -> None:
    bn = nn.BatchNorm1d(3, affine=False)
    model, ssf = _attach(bn)
    model.train()
    g, h = ssf.scale.detach().clone(), ssf.shift.detach().clone()
    x = torch.randn(8, 3) * 2 + 1
    batch = _bn_by_hand(x, x.mean(0), x.var(0, unbiased=False), bn.eps)
    expected = g * batch + h
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    sk.fold_(model)  # batch statistics do not depend on the running ones: the same formula holds
    assert bn.affine and bn.weight is not None and bn.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_group_norm() -> None:
    gnorm = nn.GroupNorm(2, 4)
    with torch.no_grad():
        gnorm.weight.uniform_(0.5, 1.5)
        gnorm.bias.uniform_(-1, 1)
    gw, gb = gnorm.weight.detach().clone(), gnorm.bias.detach().clone()
    model, ssf = _attach(gnorm)
    g, h = ssf.scale.detach().clone(), ssf.shift.detach().clone()
    x = torch.randn(2, 4, 3, 3)
    groups = x.reshape(2, 2, -1)
    normed = (groups - groups.mean(-1, keepdim=True)) / torch.sqrt(
        groups.var(-1, unbiased=False, keepdim=True) + gnorm.eps
    )
    v = (1, -1, 1, 1)
    z = normed.reshape_as(x) * gw.reshape(v) + gb.reshape(v)
    _fold_and_check(model, x, g.reshape(v) * z + h.reshape(v))
    torch.testing.assert_close(gnorm.weight, g * gw)
    torch.testing.assert_close(gnorm.bias, g * gb + h)


def test_reference_init_statistics() -> None:
    n = 40_000
    model = nn.Sequential(nn.Linear(1, n))
    sk.attach_(model, sk.SSFConfig(target_modules="all"))
    scale, shift = model[0].scale.detach(), model[0].shift.detach()
    std = 0.02
    se = std / math.sqrt(n)  # standard error of the sample mean
    assert abs(float(scale.mean()) - 1.0) < 6 * se
    assert abs(float(shift.mean())) < 6 * se
    assert float(scale.std()) == pytest.approx(std, rel=0.03)
    assert float(shift.std()) == pytest.approx(std, rel=0.03)


def test_init_std_is_honoured() -> None:
    model = nn.Sequential(nn.Linear(1, 20_000))
    sk.attach_(model, sk.SSFConfig(target_modules="all", init_std=0.1))
    assert float(model[0].scale.detach().std()) == pytest.approx(0.1, rel=0.05)


def test_identity_init_is_exact() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.BatchNorm1d(5)).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        y = model(x)
    sk.attach_(model, sk.SSFConfig(target_modules="all", identity_init=True))
    for wrapper in model:
        assert torch.equal(wrapper.scale, torch.ones_like(wrapper.scale))
        assert torch.equal(wrapper.shift, torch.zeros_like(wrapper.shift))
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_effective_weight_is_differentiable() -> None:
    _, ssf = _attach(nn.Linear(3, 2))
    ssf.weight.sum().backward()  # code that reads .weight (e.g. attention) must train the shift
    assert ssf.scale.grad is not None
    torch.testing.assert_close(ssf.scale.grad, ssf.base.weight.detach().sum(1))
