"""STABLE-RPS (``sk.RPSConfig``): the RANDOMFOLD mapping's guarantees, exact reproduction at full budget,
the gradient scaling's equivalence, one shared array in the shift file, and config errors (spec §9.7)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import shiftkit as sk
from shiftkit.errors import ShiftkitError
from shiftkit.methods.rps import RPSLayer, hashed_positions
from tiny_models import make


def test_pareto_mapping_is_bijective_then_evenly_loaded() -> None:
    h, g = hashed_positions(0, 1000, 1000, "pareto", 0)
    assert torch.equal(torch.sort(h).values, torch.arange(1000))
    assert set(g.tolist()) == {-1, 1}
    h, _ = hashed_positions(0, 1000, 1500, "pareto", 0)
    assert h.unique().numel() == 1000  # m > n: injective
    for m, loads in ((333, {3, 4}), (7, {142, 143})):
        h, _ = hashed_positions(0, 1000, m, "pareto", 3)
        assert set(torch.bincount(h, minlength=m).tolist()) == loads
    h, _ = hashed_positions(0, 1000, 1000, "hashednet", 0)
    assert 580 < h.unique().numel() < 680  # plain hashing at m = n uses about 1 − 1/e of the slots


def test_full_budget_weights_mode_reproduces_the_model() -> None:
    model, x = make("mlp")
    ref = model(x)
    rps = sk.attach_(
        copy.deepcopy(model), sk.RPSConfig(compression=1.0, mode="weights", target_modules=["fc1", "fc2"])
    )
    assert torch.allclose(rps(x), ref, atol=1e-6)
    shift = sk.extract(rps)
    n = model.fc1.weight.numel() + model.fc2.weight.numel()
    assert shift.numel == n  # one array, stored once for both modules
    folded = sk.fold_(rps)
    assert torch.allclose(folded(x), ref, atol=1e-6)


def test_gradient_scaling_equals_sgd_on_the_shared_weights() -> None:
    # one Linear, 30 % budget, shift mode: an SGD step of M moves each weight by −η g(p) mean(g ∇W) over
    # the weights sharing its slot (spec §9.4), whatever init_bound is
    torch.manual_seed(0)
    lin = nn.Linear(20, 10)
    x, target = torch.randn(8, 20), torch.randn(8, 10)
    for bound in (0.05, 3.0):
        model = sk.attach_(nn.Sequential(copy.deepcopy(lin)), sk.RPSConfig(compression=0.3, init_bound=bound))
        layer = model[0]
        assert isinstance(layer, RPSLayer)
        with torch.no_grad():
            layer.rps.memory.normal_()
        w_before = layer.weight.detach().clone()
        w_req = w_before.clone().requires_grad_(True)
        nn.functional.mse_loss(nn.functional.linear(x, w_req, lin.bias), target).backward()
        grad_w = w_req.grad.reshape(-1)
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        lr = 0.1
        with torch.no_grad():
            layer.rps.memory -= lr * layer.rps.memory.grad
        slots, signs = layer.slots, layer.signs.double()
        g_grad = signs * grad_w.double()
        mean = torch.zeros(int(slots.max()) + 1, dtype=torch.float64).index_add_(0, slots, g_grad)
        mean /= torch.bincount(slots).double()
        expect = w_before.reshape(-1).double() - lr * signs * mean[slots]
        assert torch.allclose(layer.weight.detach().reshape(-1).double(), expect, atol=1e-5)


def test_shift_mode_starts_as_a_no_op_and_trains() -> None:
    model, x = make("tiny_bert")
    ref = model(x)
    rps = sk.attach_(copy.deepcopy(model), sk.RPSConfig(compression=0.05))
    assert torch.equal(rps(x), ref)
    target = torch.randn_like(ref)
    opt = torch.optim.SGD(sk.shift_parameters(rps), lr=0.1)
    loss = nn.functional.mse_loss(rps(x), target)
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert nn.functional.mse_loss(rps(x), target) < loss
    (param,) = sk.shift_parameters(rps)
    linear_numel = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert param.numel() == int(0.05 * linear_numel) or param.numel() <= 0.05 * linear_numel + 1


def test_module_limit_size_and_errors() -> None:
    model, _ = make("mlp")
    small = min(model.fc1.weight.numel(), model.fc2.weight.numel())
    rps = sk.attach_(
        copy.deepcopy(model), sk.RPSConfig(module_limit_size=small + 1, target_modules=["fc1", "fc2"])
    )
    assert sum(isinstance(m, RPSLayer) for m in rps.modules()) == 1
    for bad, match in (
        ({"compression": 0}, "compression"),
        ({"mode": "x"}, "mode"),
        ({"mapper": "x"}, "mapper"),
    ):
        with pytest.raises(ShiftkitError, match=match):
            sk.RPSConfig(**bad)
