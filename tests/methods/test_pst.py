"""PST (``sk.PSTConfig``): the mask keeps exactly ``numel − ⌊s·numel⌋`` entries, the straight-through
gradient of the scores, the cubic schedule, an exact fold, and training under the schedule (spec §8.2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import shiftkit as sk
from shiftkit.errors import ShiftkitError
from shiftkit.methods.pst import PSTLinear, cubic_sparsity, set_sparsity_


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def test_mask_keeps_exactly_the_budget_even_with_ties() -> None:
    model = sk.attach_(_model(), sk.PSTConfig(target_modules=["0"]))
    layer = model[0]
    assert isinstance(layer, PSTLinear)
    with torch.no_grad():
        layer.base.weight.fill_(0.5)  # every score ties
    for s in (0.0, 0.3, 0.9):
        set_sparsity_(model, s)
        assert int(layer.mask().sum()) == 192 - math.floor(s * 192)


def test_fold_is_exact_and_sparse() -> None:
    x = torch.randn(5, 12)
    model = sk.attach_(_model(), sk.PSTConfig(sparsity=0.8))
    for p in sk.shift_parameters(model):
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    set_sparsity_(model, 0.75)
    y = model(x)
    folded = sk.fold_(model)
    assert torch.allclose(folded(x), y, atol=1e-6)
    assert int((folded[0].weight == 0).sum()) == math.floor(0.75 * 192)


def test_straight_through_gradient_of_the_scores() -> None:
    model = sk.attach_(_model(), sk.PSTConfig(target_modules=["0"], alpha2=0.5))
    layer = model[0]
    with torch.no_grad():
        layer.pst_V.normal_()
    set_sparsity_(model, 0.5)
    x = torch.randn(7, 12)
    updated = (layer.base.weight + layer.pst_U @ layer.pst_V).detach()
    w_eff = (layer.mask(updated).detach() * updated).requires_grad_(True)
    model[2](torch.relu(nn.functional.linear(x, w_eff, layer.base.bias))).square().sum().backward()
    grad_s = w_eff.grad * updated  # ∂L/∂S := ∂L/∂M = ∂L/∂(M ⊙ W̃) ⊙ W̃
    model.zero_grad()
    model(x).square().sum().backward()
    assert torch.allclose(layer.pst_R.grad, 0.5 * grad_s.sum(1), atol=1e-4)
    assert torch.allclose(layer.pst_C.grad, 0.5 * grad_s.sum(0), atol=1e-4)


def test_cubic_schedule() -> None:
    assert cubic_sparsity(5, 100, final=0.9) == 0.0
    assert cubic_sparsity(80, 100, final=0.9) == 0.9
    frac = (35 - 10) / 60
    assert cubic_sparsity(35, 100, final=0.9) == pytest.approx(0.9 - 0.9 * (1 - frac) ** 3)
    values = [cubic_sparsity(t, 100, final=0.9) for t in range(101)]
    assert values == sorted(values)


def test_trains_under_the_schedule() -> None:
    torch.manual_seed(1)
    teacher = _model()
    x = torch.randn(256, 12)
    y = teacher(x).detach()
    student = sk.attach_(copy.deepcopy(teacher), sk.PSTConfig(sparsity=0.5))
    opt = torch.optim.Adam(sk.shift_parameters(student), lr=1e-2)
    steps = 60
    for t in range(steps):
        set_sparsity_(student, cubic_sparsity(t, steps, final=0.5))
        loss = nn.functional.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pruned = copy.deepcopy(teacher)
    with torch.no_grad():  # magnitude pruning to the same sparsity, no training
        for lin in (pruned[0], pruned[2]):
            k = math.floor(0.5 * lin.weight.numel())
            idx = lin.weight.abs().reshape(-1).topk(k, largest=False).indices
            lin.weight.view(-1)[idx] = 0
        baseline = nn.functional.mse_loss(pruned(x), y)
        assert nn.functional.mse_loss(student(x), y) < baseline


def test_errors() -> None:
    with pytest.raises(ShiftkitError, match="sparsity"):
        sk.PSTConfig(sparsity=1.0)
    with pytest.raises(ShiftkitError, match="no PST"):
        set_sparsity_(_model(), 0.5)


def test_total_steps_schedules_itself_in_training_forwards() -> None:
    model = sk.attach_(_model(), sk.PSTConfig(sparsity=0.6, total_steps=10, target_modules=["0"]))
    layer = model[0]
    x = torch.randn(3, 12)
    seen = []
    for _ in range(12):
        model(x)
        seen.append(float(layer.sparsity))
    assert seen == pytest.approx([cubic_sparsity(t, 10, final=0.6) for t in range(12)])
    model.eval()
    model(x)  # evaluation forwards do not step the schedule
    assert float(layer.sparsity) == pytest.approx(0.6) and layer.steps_taken == 12
