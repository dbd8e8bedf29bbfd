"""Behaviour of the ``norm`` (test-batch BN statistics) and ``tent`` (entropy minimisation) methods."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit import adapt
from shiftkit.errors import ShiftkitError
from tiny_models import make as make_tiny


class TinyNormNet(nn.Module):
    """``x (N, 6) -> (N, 3)`` with a LayerNorm, a GroupNorm and a BatchNorm1d (optional)."""

    def __init__(self, with_bn: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm1d(8) if with_bn else nn.Identity()
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            for m in (self.ln, self.gn):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(self.bn, nn.BatchNorm1d):
                assert self.bn.running_mean is not None and self.bn.running_var is not None
                self.bn.running_mean.uniform_(-0.5, 0.5)
                self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gn(F.relu(self.ln(self.fc1(x))))
        return self.head(F.relu(self.bn(h)))


def _net(with_bn: bool = False) -> TinyNormNet:
    torch.manual_seed(3)
    return TinyNormNet(with_bn)


def _shifted(x: Tensor) -> Tensor:
    return 2.0 * x + 1.0


def _manual_bn(h: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    dims = [0, *range(2, h.dim())]
    mean = h.mean(dims, keepdim=True)
    var = ((h - mean) ** 2).mean(dims, keepdim=True)  # biased, as in BN training mode
    y = (h - mean) / torch.sqrt(var + eps)
    shape = [1, -1] + [1] * (h.dim() - 2)
    if weight is not None and bias is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y


def test_norm_uses_batch_statistics() -> None:
    model, x = make_tiny("cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _shifted(torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        h = F.relu(_manual_bn(model.conv1(x), model.bn1.weight, model.bn1.bias, model.bn1.eps))
        h = F.relu(_manual_bn(model.conv2(h), None, None, model.bn2.eps))
        expected = model.head(F.adaptive_avg_pool2d(h, 1).flatten(1))
        source = model.eval()(x)
    tta = adapt.make("norm", model)
    out = tta(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, source, atol=1e-3)  # the source statistics would give other outputs
    for k, v in model.state_dict().items():  # γ, β and running buffers untouched
        assert torch.equal(v, before[k]), k
    assert tta.adapted_parameters() == []


def test_norm_needs_batchnorm_even_with_layernorm() -> None:
    with pytest.raises(ShiftkitError, match=r"'norm'.*BatchNorm1d, BatchNorm2d, BatchNorm3d.*TinyNormNet"):
        adapt.make("norm", _net())


def test_norm_batch_size_one_falls_back_to_source_statistics() -> None:
    model = _net(with_bn=True)
    x = torch.randn(1, 6)
    with torch.no_grad():
        source = model.eval()(x)
    out = adapt.make("norm", model)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, source, rtol=0, atol=0)
    # a conv net with batch 1 still has spatial values: batch statistics over H×W, finite
    cnn, _ = make_tiny("cnn")
    assert torch.isfinite(adapt.make("norm", cnn)(torch.randn(1, 3, 6, 6))).all()


def test_softmax_entropy_formula() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -1.0, 0.5]])
    p = torch.softmax(logits, -1)
    expected = torch.stack([-(p[i] * p[i].log()).sum() for i in range(2)])
    torch.testing.assert_close(adapt.softmax_entropy(logits), expected)
    assert adapt.softmax_entropy(logits)[0].item() == pytest.approx(math.log(4))


def _entropy(out: Tensor) -> float:
    return float(adapt.softmax_entropy(out).mean())


@pytest.mark.parametrize("kind", ["cnn", "layernorm"])
def test_tent_lowers_entropy(kind: str) -> None:
    if kind == "cnn":
        model: nn.Module = make_tiny("cnn")[0]
        x = _shifted(torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1)))
    else:
        model = _net()
        x = _shifted(torch.randn(16, 6, generator=torch.Generator().manual_seed(1)))
    tta = adapt.make("tent", model, lr=5e-2)
    entropies = [_entropy(tta(x)) for _ in range(20)]
    # the tiny CNN adapts only 8 BN parameters ahead of a fixed head, so its entropy can fall only a little
    margin = 0.003 if kind == "cnn" else 0.05
    assert entropies[-1] < entropies[0] - margin
    assert entropies[-1] < entropies[10] < entropies[1]
    assert all(math.isfinite(e) for e in entropies)


def test_tent_first_output_is_pre_update_batch_statistics() -> None:
    model, _ = make_tiny("cnn")
    reference, _ = make_tiny("cnn")
    x = _shifted(torch.randn(8, 3, 6, 6))
    expected = adapt.make("norm", reference)(x)  # same γ, β, batch statistics, no update yet
    # norm computes the statistics by one-pass moments (no autograd), tent with the native kernel: float32
    # rounding apart, the outputs agree
    torch.testing.assert_close(adapt.make("tent", model)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cnn", "norms"])
def test_tent_changes_only_norm_affine(kind: str) -> None:
    if kind == "cnn":
        model: nn.Module = make_tiny("cnn")[0]
        x = _shifted(torch.randn(8, 3, 6, 6))
        adapted = {"bn1.weight", "bn1.bias"}  # bn2 has affine=False
    else:
        model = _net(with_bn=True)
        x = _shifted(torch.randn(8, 6))
        adapted = {f"{m}.{p}" for m in ("ln", "gn", "bn") for p in ("weight", "bias")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tta = adapt.make("tent", model, lr=1e-2, steps=3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in tta.adapted_parameters()} == adapted
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapted
    tta(x)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == adapted


def test_tent_batch_size_one_is_finite() -> None:
    for model, x in ((make_tiny("cnn")[0], torch.randn(1, 3, 6, 6)), (_net(with_bn=True), torch.randn(1, 6))):
        tta = adapt.make("tent", model, steps=2)
        out = tta(x)
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p).all() for p in tta.adapted_parameters())


def test_tent_without_affine_norms() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 2))
    with pytest.raises(ShiftkitError, match=r"'tent'.*affine.*LayerNorm, GroupNorm"):
        adapt.make("tent", model)


def test_adam_moves_every_parameter_by_about_lr_whatever_its_gradient() -> None:
    """The documented step size: Adam's first step is lr·g/(|g| + eps) per parameter (Kingma & Ba, Alg. 1),
    ≈ lr even where the entropy's gradient is tiny; an SGD step would be in proportion to the gradient."""
    tta = adapt.make("tent", _net(with_bn=True), lr=1e-3)
    params = tta.adapted_parameters()
    before = [p.detach().clone() for p in params]
    x = _shifted(torch.randn(16, 6, generator=torch.Generator().manual_seed(4)))
    with torch.enable_grad():
        grads = torch.autograd.grad(tta.loss(tta.model(x)), params)  # the gradient tta(x) will use
    tta(x)
    for p, b, g in zip(params, before, grads, strict=True):
        torch.testing.assert_close(p.detach() - b, -1e-3 * g / (g.abs() + 1e-8), atol=2e-7, rtol=1e-3)
    mags = torch.cat([g.reshape(-1) for g in grads]).abs()
    moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before, strict=True)]).abs()
    small = (mags > 1e-7) & (mags < 1e-2 * mags.max())  # gradients 100x smaller than the largest...
    assert bool(small.any())
    assert float(moved[small].min()) > 0.9e-3  # ...still move their parameter by 0.9·lr or more
