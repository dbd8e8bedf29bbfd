"""PEGO pinned against the spec formulas: unscaled LoRA group, factored orthogonality loss vs naive d×d."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from shiftkit.methods.pego import LOSS_FORMS, PEGOLinear, pego_orthogonality


def _naive(w: Tensor, a: Tensor, b: Tensor, form: str) -> Tensor:
    """The loss written literally with dense ``ΔW_i = B_i A_i`` (``d×d`` products)."""
    deltas = [b[i] @ a[i] for i in range(a.shape[0])]

    def norm(m: Tensor) -> Tensor:
        return m.abs().sum() if form.startswith("l1") else (m**2).sum()

    rows = form.endswith("rows")
    total = sum(norm(w @ dw.T if rows else w.T @ dw) for dw in deltas)
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            total = total + norm(deltas[i] @ deltas[j].T if rows else deltas[i].T @ deltas[j])
    assert isinstance(total, Tensor)
    return total


def _group(out: int = 6, d_in: int = 5, n: int = 3, r: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, out))
    sk.attach_(model, sk.PEGOConfig(r=r, num_modules=n, target_modules=["0"]))
    return model


@pytest.mark.parametrize("form", LOSS_FORMS)
def test_factored_loss_equals_the_naive_dense_computation(form: str) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 9, generator=g, dtype=torch.float64)
    a = torch.randn(4, 3, 9, generator=g, dtype=torch.float64)
    b = torch.randn(4, 7, 3, generator=g, dtype=torch.float64)
    got, want = pego_orthogonality(w, a, b, form), _naive(w, a, b, form)
    assert abs(float(got - want)) <= 1e-6 * abs(float(want))
    # fp32 as used in training: same value up to fp32 rounding
    got32 = pego_orthogonality(w.float(), a.float(), b.float(), form)
    assert abs(float(got32) - float(want)) <= 1e-5 * abs(float(want))


def test_wrapper_loss_is_lambda_times_the_orthogonality_and_sums_over_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))
    sk.attach_(model, sk.PEGOConfig(r=2, num_modules=3, lam=0.25, loss_form="l1_cols"))
    with torch.no_grad():
        for p in sk.shift_parameters(model):
            p.normal_()
    expected = sum(0.25 * _naive(m.base.weight, m.lora_A, m.lora_B, "l1_cols") for m in (model[0], model[2]))
    torch.testing.assert_close(sk.regularization_loss(model), expected, rtol=1e-5, atol=0)
    sk.detach_(model)
    sk.attach_(model, sk.PEGOConfig(lam=0.0))  # λ = 0: nothing is computed, the total is a zero scalar
    assert model[0].regularization_loss() is None
    assert float(sk.regularization_loss(model)) == 0.0


def test_loss_is_zero_at_init_and_init_matches_the_reference() -> None:
    model = _group(out=6, d_in=5, n=3, r=2)
    pego = model[0]
    assert isinstance(pego, PEGOLinear)
    assert pego.lora_A.shape == (3, 2, 5) and pego.lora_B.shape == (3, 6, 2)
    assert torch.count_nonzero(pego.lora_B) == 0
    # Kaiming-uniform a=√5 per A_i: U(-1/√in, 1/√in) with fan_in = in (not r·in of the stack)
    bound = 1 / math.sqrt(5)
    assert pego.lora_A.abs().max() <= bound and pego.lora_A.abs().max() > 0.5 * bound
    assert float(sk.regularization_loss(model).detach()) == 0.0
    x = torch.randn(4, 5)
    torch.testing.assert_close(model(x), pego.base(x), atol=0, rtol=0)


def test_forward_is_the_unscaled_sum_of_the_group() -> None:
    model = _group(out=6, d_in=5, n=3, r=2)
    pego = model[0]
    with torch.no_grad():
        pego.lora_B.normal_()
    x = torch.randn(2, 3, 5)
    w, bias = pego.base.weight, pego.base.bias
    expected = x @ w.T + bias + sum(x @ pego.lora_A[i].T @ pego.lora_B[i].T for i in range(3))
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_orthogonal_row_spaces_give_a_zero_diversify_term() -> None:
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    a = q.T[:4].reshape(2, 2, 8)  # A_1, A_2: orthonormal rows, A_1 A_2ᵀ = 0, so ΔW_1 ΔW_2ᵀ = 0
    b = torch.randn(2, 6, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        (b[0] @ a[0]) @ (b[1] @ a[1]).T, torch.zeros(6, 6, dtype=torch.float64), atol=1e-12, rtol=0
    )
    for form in ("l1_rows", "fro2_rows"):
        zero_w = torch.zeros(6, 8, dtype=torch.float64)
        assert abs(float(pego_orthogonality(zero_w, a, b, form))) < 1e-12  # only the diversify term
        w = torch.randn(6, 8, generator=g, dtype=torch.float64)
        alone = sum(float(pego_orthogonality(w, a[i : i + 1], b[i : i + 1], form)) for i in range(2))
        assert math.isclose(float(pego_orthogonality(w, a, b, form)), alone, rel_tol=1e-12)


def test_merged_equals_unmerged() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4, bias=False))
    original = copy.deepcopy(model)
    sk.attach_(model, sk.PEGOConfig())
    with torch.no_grad():
        for p in sk.shift_parameters(model):
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(8, 5)
    with torch.no_grad():
        attached = model(x)
    deltas = [sum(m.lora_B[i] @ m.lora_A[i] for i in range(4)) for m in (model[0], model[2])]
    sk.fold_(model)
    torch.testing.assert_close(model(x), attached, atol=1e-5, rtol=1e-5)
    for idx, dw in zip((0, 2), deltas, strict=True):
        torch.testing.assert_close(model[idx].weight, original[idx].weight + dw, atol=1e-6, rtol=1e-6)


def test_regulariser_gradient_reaches_b_and_a_but_not_the_base() -> None:
    model = _group()
    pego = model[0]
    with torch.no_grad():
        pego.lora_B.normal_()
    sk.regularization_loss(model).backward()
    assert pego.lora_B.grad is not None and pego.lora_B.grad.abs().sum() > 0
    assert pego.lora_A.grad is not None and pego.lora_A.grad.abs().sum() > 0
    assert pego.base.weight.grad is None
    # and it equals the gradient of the naive loss
    a, b = pego.lora_A.detach().clone().requires_grad_(), pego.lora_B.detach().clone().requires_grad_()
    (1e-3 * _naive(pego.base.weight.detach(), a, b, "l1_rows")).backward()
    assert b.grad is not None
    torch.testing.assert_close(pego.lora_B.grad, b.grad, atol=1e-7, rtol=1e-5)


def test_training_step_adds_the_regulariser() -> None:
    """The learn recipe's loss is CE + sk.regularization_loss; a larger λ lowers the orthogonality loss."""
    from shiftkit.recipes.learn import TrainConfig, tensor_batches, train

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    ortho = {}
    for lam in (0.0, 10.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        sk.attach_(model, sk.PEGOConfig(lam=lam, r=2, num_modules=2))
        cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=8, warmup_ratio=0.0)
        train(model, sk.shift_parameters(model), tensor_batches(x, y, 8), None, cfg, progress=False)
        with torch.no_grad():
            ortho[lam] = sum(
                float(pego_orthogonality(m.base.weight, m.lora_A, m.lora_B)) for m in (model[0], model[2])
            )
    assert ortho[10.0] < 0.5 * ortho[0.0]


@pytest.mark.parametrize(
    "bad",
    [{"r": 0}, {"num_modules": 0}, {"lam": -1.0}, {"lam": True}, {"loss_form": "l2"}, {"r": 2.0}],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(sk.ShiftkitError):
        sk.PEGOConfig(**bad)  # type: ignore[arg-type]


def test_defaults_and_targets() -> None:
    cfg = sk.PEGOConfig()
    assert (cfg.r, cfg.num_modules, cfg.lam, cfg.loss_form) == (4, 4, 1e-3, "l1_rows")
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    sk.attach_(model, cfg)  # default: every Linear
    assert isinstance(model[0], PEGOLinear) and isinstance(model[2], PEGOLinear)
    assert isinstance(model[1], nn.LayerNorm)
    assert sum(p.numel() for p in sk.shift_parameters(model)) == 4 * 4 * (4 + 4) + 4 * 4 * (4 + 2)
