"""SVFit pinned against the spec (learn.md §2): ``W(s) = U_r diag(s) V_rᵀ + W_e`` and its sanity checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from shiftkit.methods.svfit import SVFitLinear, energy_rank


def _with_singular_values(sigma: list[float], out: int, inp: int, seed: int = 0) -> nn.Linear:
    """A Linear whose weight is ``Q₁ diag(σ) Q₂ᵀ`` with random orthonormal ``Q₁ (out, k)``, ``Q₂ (in, k)``."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigma)
    q1, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(q1 @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ q2.T)
    return lin


def _expected_rank(sigma: list[float], tau: float) -> int:
    """The spec's rule written out: the smallest r with Σ_{i≤r} σ_i² / Σ σ_i² ≥ τ."""
    total = sum(s * s for s in sigma)
    running = 0.0
    for r, s in enumerate(sigma, start=1):
        running += s * s
        if running / total >= tau - 1e-12:
            return r
    return len(sigma)


def _attach(module: nn.Module, **kwargs: object) -> tuple[nn.Sequential, SVFitLinear]:
    model = nn.Sequential(module)
    sk.attach_(model, sk.SVFitConfig(target_modules=["0"], **kwargs))  # type: ignore[arg-type]
    wrapper = model[0]
    assert isinstance(wrapper, SVFitLinear)
    return model, wrapper


@torch.no_grad()
def _perturb(wrapper: SVFitLinear, std: float = 0.5) -> None:
    wrapper.s_delta.normal_(0.0, std)


# --- config ----------------------------------------------------------------------------------------------
def test_config_defaults_to_the_paper_energy_rule() -> None:
    assert sk.SVFitConfig().energy == 0.99 and sk.SVFitConfig().r is None
    assert sk.SVFitConfig(r=4).energy is None
    assert sk.SVFitConfig(energy=1).energy == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"r": 2, "energy": 0.9}, {"r": 0}, {"r": True}, {"r": 2.0}, {"energy": 0.0}, {"energy": 1.5}],
)
def test_config_rejects_bad_rank_rules(kwargs: dict[str, object]) -> None:
    with pytest.raises(sk.ShiftkitError, match="SVFitConfig"):
        sk.SVFitConfig(**kwargs)  # type: ignore[arg-type]


# --- rank rules --------------------------------------------------------------------------------------------
SIGMA = [5.0, 3.0, 2.0, 1.0, 0.5, 0.1]


@pytest.mark.parametrize("tau", [0.5, 0.7, 0.9, 0.97, 0.99, 0.999, 1.0])
def test_energy_rule_picks_the_smallest_rank_reaching_tau(tau: float) -> None:
    _, svf = _attach(_with_singular_values(SIGMA, 9, 7), energy=tau)
    assert svf.rank == _expected_rank(SIGMA, tau)
    assert svf.s_delta.shape == (svf.rank,)
    torch.testing.assert_close(svf.sigma, torch.tensor(SIGMA[: svf.rank]), atol=1e-6, rtol=1e-6)


def test_energy_rank_edge_cases() -> None:
    # 2 of 4 equal values hold exactly half the energy: τ = 0.5 is reached at r = 2, not 3
    assert energy_rank(torch.ones(4), 0.5) == 2
    assert energy_rank(torch.tensor([2.0, 1.0, 1.0]), 1.0) == 3
    assert energy_rank(torch.zeros(3), 0.99) == 1


def test_explicit_rank_is_capped_at_min_dims() -> None:
    _, svf = _attach(_with_singular_values(SIGMA, 9, 7), r=2)
    assert svf.rank == 2
    _, full = _attach(_with_singular_values(SIGMA, 9, 7), r=100)
    assert full.rank == 7  # min(out, in), the number of singular values


# --- formula and sanity checks (spec §2.5) -----------------------------------------------------------------
def test_init_reconstructs_the_weight_and_the_output_exactly() -> None:
    lin = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    y0 = lin(x).detach()
    model, svf = _attach(copy.deepcopy(lin), r=5)  # full rank: U diag(σ) Vᵀ = W
    torch.testing.assert_close(svf.U_r @ torch.diag(svf.sigma) @ svf.Vh_r, lin.weight, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    assert torch.equal(svf.delta()["weight"], torch.zeros_like(lin.weight))
    torch.testing.assert_close(svf.singular_values, torch.linalg.svdvals(lin.weight.detach()))


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_the_paper_formula(bias: bool) -> None:
    lin = nn.Linear(7, 6, bias=bias)
    w = lin.weight.detach().double()
    model, svf = _attach(lin, r=3)
    _perturb(svf)
    # the paper's form with an explicit residual: y = x W_eᵀ + ((x V_r) ⊙ s) U_rᵀ + b
    u, sig, vh = torch.linalg.svd(w, full_matrices=False)
    u_r, v_r, sig_r = u[:, :3], vh[:3].T, sig[:3]
    w_e = w - u_r @ torch.diag(sig_r) @ v_r.T
    # singular vectors are defined up to a joint sign: align ours to the reference pair by pair
    signs = torch.sign((svf.U_r.double() * u_r).sum(0))
    s = sig_r + svf.s_delta.detach().double()
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    expected = x @ w_e.T + ((x @ v_r) * s) @ u_r.T
    if bias:
        expected = expected + lin.bias.detach().double()
    torch.testing.assert_close(svf.U_r.double() * signs, u_r, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_delta_is_rank_r_inside_the_principal_subspaces() -> None:
    lin = _with_singular_values(SIGMA, 9, 7)
    _, svf = _attach(lin, r=3)
    _perturb(svf)
    delta = svf.delta()["weight"].detach().double()
    assert int(torch.linalg.matrix_rank(delta, rtol=1e-5)) <= 3  # ΔW was computed in fp32
    u, vh = svf.U_r.double(), svf.Vh_r.double()
    # (I − U_r U_rᵀ) ΔW = 0 and ΔW (I − V_r V_rᵀ) = 0: column space ⊂ span(U_r), row space ⊂ span(V_r)
    assert (delta - u @ (u.T @ delta)).abs().max() < 1e-6
    assert (delta - (delta @ vh.T) @ vh).abs().max() < 1e-6
    expected = u @ torch.diag(svf.s_delta.detach().double()) @ vh  # ΔW = U_r diag(s − σ) V_rᵀ
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-6)


def test_fold_equals_attached() -> None:
    lin = nn.Linear(8, 5)
    model, svf = _attach(lin, energy=0.9)
    _perturb(svf)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = model(x)
    sk.fold_(model)
    assert type(model[0]) is nn.Linear
    with torch.no_grad():
        err = (model(x) - y).abs().max() / y.abs().max()
    assert err <= 1e-5


def test_trainable_count_is_the_sum_of_ranks() -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    sk.attach_(net, sk.SVFitConfig(energy=0.95, target_modules="all"))
    wrappers = [m for m in net if isinstance(m, SVFitLinear)]
    assert len(wrappers) == 3
    total = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert total == sum(w.rank for w in wrappers) == sum(p.numel() for p in sk.shift_parameters(net))
    assert [p.shape for p in sk.shift_parameters(net)] == [(w.rank,) for w in wrappers]
    assert all(p.ndim == 1 for p in sk.shift_parameters(net))  # vectors: the learn recipe never decays them


def test_buffers_are_not_saved_and_reattach_recomputes_the_same_rank(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    fresh = copy.deepcopy(net)
    sk.attach_(net, sk.SVFitConfig(energy=0.9))
    for w in (net[0], net[2]):
        _perturb(w)
    x = torch.randn(5, 6)
    with torch.no_grad():
        y = net(x)
    shift = sk.extract(net)
    assert set(shift.tensors) == {"0.s_delta", "2.s_delta"}  # U_r, V_r, σ come back from the base weights
    assert not any("U_r" in k for k in net.state_dict())
    sk.save(shift, tmp_path / "svfit.safetensors")
    sk.attach_(fresh, sk.load(tmp_path / "svfit.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def test_reattach_to_a_base_with_another_rank_names_the_mismatch() -> None:
    lin = _with_singular_values(SIGMA, 9, 7)
    model, _ = _attach(lin, energy=0.9)
    shift = sk.extract(model)
    other = nn.Sequential(_with_singular_values([1.0] * 7, 9, 7))  # flat spectrum: a larger r at τ = 0.9
    with pytest.raises(sk.ShiftMismatchError, match=r"0\.s_delta"):
        sk.attach_(other, shift)


def test_gradient_reaches_only_s_delta() -> None:
    model, svf = _attach(nn.Linear(5, 4), r=2)
    model(torch.randn(3, 5)).square().sum().backward()
    assert svf.s_delta.grad is not None and svf.s_delta.grad.abs().sum() > 0
    assert svf.base.weight.grad is None


def _grad_wrt_s(svf: SVFitLinear, x: Tensor) -> Tensor:
    svf.s_delta.grad = None
    svf(x).sum().backward()
    assert svf.s_delta.grad is not None
    return svf.s_delta.grad


def test_gradient_is_that_of_the_singular_values() -> None:
    """∂L/∂s_i = Σ (x v_i)(g u_i): the derivative of x (U diag(s) Vᵀ)ᵀ with respect to s."""
    _, svf = _attach(nn.Linear(5, 4), r=3)
    x = torch.randn(6, 5)
    grad = _grad_wrt_s(svf, x)
    expected = ((x @ svf.Vh_r.T) * (torch.ones(6, 4) @ svf.U_r)).sum(0)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)
