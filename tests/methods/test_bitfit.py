"""BitFit: only existing biases get a learned offset ``Δb``; ``y = f(x) + Δb``, folded as ``b' = b + Δb``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shiftkit as sk
from shiftkit.core.attach import attached_wrappers
from shiftkit.methods.bitfit import BitFitModule


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.with_bias = nn.Linear(4, 5)
        self.no_bias = nn.Linear(5, 5, bias=False)
        self.norm = nn.LayerNorm(5)
        self.norm_no_bias = nn.LayerNorm(5, bias=False)
        self.conv = nn.Conv2d(1, 2, 1)
        self.conv_no_bias = nn.Conv2d(2, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.bn_plain = nn.BatchNorm2d(2, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_no_bias(self.norm(self.no_bias(self.with_bias(x))))  # (N, 5)
        img = self.bn_plain(self.bn(self.conv_no_bias(self.conv(h[:, None, :, None]))))  # (N, 2, 5, 1)
        return img.flatten(1)


def test_only_modules_with_a_bias_are_wrapped() -> None:
    net = _Net()
    sk.attach_(net, sk.BitFitConfig(target_modules="all"))
    assert [n for n, _ in attached_wrappers(net)] == ["with_bias", "norm", "conv", "bn"]
    assert all(isinstance(m, BitFitModule) for _, m in attached_wrappers(net))
    params = sk.named_shift_parameters(net)
    assert set(params) == {f"{n}.bias_delta" for n in ("with_bias", "norm", "conv", "bn")}
    assert all(bool((p == 0).all()) for p in params.values())
    assert sum(p.numel() for p in params.values()) == 5 + 5 + 2 + 2


def test_default_targets_every_bias() -> None:
    net = _Net()
    sk.attach_(net, sk.BitFitConfig())
    assert len(attached_wrappers(net)) == 4


def test_an_explicit_bias_free_target_is_an_error() -> None:
    with pytest.raises(sk.ShiftkitError, match="no_bias"):
        sk.attach_(_Net(), sk.BitFitConfig(target_modules=["no_bias"]))
    # mixed lists keep the modules that have a bias
    net = _Net()
    sk.attach_(net, sk.BitFitConfig(target_modules=["no_bias", "with_bias"]))
    assert [n for n, _ in attached_wrappers(net)] == ["with_bias"]


def test_offset_on_the_channel_axis_and_fold() -> None:
    net = _Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 4)
    with torch.no_grad():
        y0 = net(x)
    biases = {n: getattr(net, n).bias.detach().clone() for n in ("with_bias", "norm", "conv", "bn")}
    sk.attach_(net, sk.BitFitConfig(target_modules="all"))
    assert torch.equal(net(x), y0)  # Δb = 0 at start
    with torch.no_grad():
        for p in sk.shift_parameters(net):
            p.normal_()
        # a single Linear: the offset adds to every row
        lin = net.with_bias
        torch.testing.assert_close(lin(x), lin.base(x) + lin.bias_delta)
        # a conv: the offset adds per output channel (axis 1)
        img = torch.randn(2, 1, 3, 3)
        torch.testing.assert_close(
            net.conv(img), net.conv.base(img) + net.conv.bias_delta[None, :, None, None]
        )
        y = net(x)
    deltas = {n: getattr(net, n).bias_delta.detach().clone() for n in biases}
    sk.fold_(net)
    for n, b in biases.items():
        torch.testing.assert_close(getattr(net, n).bias, b + deltas[n])  # b' = b + Δb
    assert net.no_bias.bias is None and net.bn_plain.weight is None  # nothing created
    with torch.no_grad():
        torch.testing.assert_close(net(x), y, atol=1e-5, rtol=1e-5)


def test_weights_are_untouched_by_fold() -> None:
    net = _Net()
    weights = {n: p.detach().clone() for n, p in net.named_parameters() if n.endswith("weight")}
    sk.attach_(net, sk.BitFitConfig(target_modules="all"))
    with torch.no_grad():
        for p in sk.shift_parameters(net):
            p.fill_(1.0)
    sk.fold_(net)
    for n, w in weights.items():
        assert torch.equal(dict(net.named_parameters())[n], w), n
