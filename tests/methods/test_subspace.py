"""Random-subspace shifts pinned against the spec (section 7): θ = θ0 + P d, projections, layout, grads."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import shiftkit as sk
from shiftkit.core.attach import attached_wrappers
from shiftkit.methods.subspace import PROJECTIONS, SubspaceConfig, SubspaceModule, SubspaceProjector, fwht
from tiny_models import make


def _projector(sizes: list[int], **kw: object) -> SubspaceProjector:
    return SubspaceProjector(sizes, SubspaceConfig(**kw), torch.zeros(1))  # type: ignore[arg-type]


def _matrix(proj: SubspaceProjector) -> Tensor:
    """Materialise ``P (D, dim)`` by projecting every basis vector."""
    with torch.no_grad():
        return proj.project(torch.eye(proj.dim)).T


def _hadamard(n: int) -> Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _projector_of(model: nn.Module) -> SubspaceProjector:
    return next(m for m in model.modules() if isinstance(m, SubspaceProjector))


def _flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --- the projections ---------------------------------------------------------------------------------
def _butterfly(x: Tensor) -> Tensor:
    """The textbook in-order butterfly: ``(u, v) -> (u + v, u - v)`` at strides 1, 2, 4, ..."""
    y, h, n = x.clone(), 1, x.shape[-1]
    while h < n:
        blocks = y.view(*y.shape[:-1], n // (2 * h), 2, h)
        u, v = blocks[..., 0, :].clone(), blocks[..., 1, :].clone()
        blocks[..., 0, :], blocks[..., 1, :] = u + v, u - v
        h *= 2
    return y


def test_fwht_is_the_sylvester_hadamard_matrix() -> None:
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ _hadamard(16).double().T)
    # several Kronecker factors (64 · 64 · 2) and a batch axis
    x = torch.randn(2, 8192, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), _butterfly(x))
    torch.testing.assert_close(fwht(fwht(x)), 8192 * x)  # H H = L·I
    with pytest.raises(sk.ShiftkitError, match="power-of-two"):
        fwht(torch.ones(6))


def test_dense_columns_have_unit_norm_over_all_rows() -> None:
    p = _matrix(_projector([30, 7, 50], dim=20, projection="dense"))
    assert p.shape == (87, 20)
    assert (p.norm(dim=0) - 1).abs().max() <= 1e-6


def test_sparse_is_very_sparse_per_layer_and_unit_norm_after_concatenation() -> None:
    sizes = [400, 100, 2500]
    proj = _projector(sizes, dim=200, projection="sparse")
    p = _matrix(proj)
    nonzero = p.norm(dim=0) > 0
    assert nonzero.all()
    assert (p.norm(dim=0) - 1).abs().max() <= 1e-6
    start = 0
    for size in sizes:
        block = p[start : start + size]
        density = float((block != 0).float().mean())
        assert density == pytest.approx(1 / math.sqrt(size), rel=0.1)  # 1/√D_t per layer
        start += size
    # within a column all non-zeros share one magnitude: ±1 before the column normalisation
    col = p[:, 0][p[:, 0] != 0].abs()
    torch.testing.assert_close(col, torch.full_like(col, float(col[0])))


def test_fastfood_matches_the_spec_formula_with_explicit_matrices() -> None:
    total, dim, length = 37, 20, 64
    proj = _projector([30, 7], dim=dim, projection="fastfood", seed=3)
    st = proj._state
    b, perm, g = st["B"].double(), st["perm"], st["G"].double()
    h = _hadamard(length).double()
    permute = torch.eye(length, dtype=torch.float64)[perm]  # (Π v)_k = v[perm[k]]
    full = h @ torch.diag(g) @ permute @ h @ torch.diag(b)  # (L, L) acting on pad(d)
    expected = full[:total, :dim] / (math.sqrt(length * float((g**2).sum())) * math.sqrt(total / length))
    d = torch.randn(dim, dtype=torch.float64)
    torch.testing.assert_close(proj.project(d), expected @ d)


def test_fastfood_columns_have_unit_norm_on_average() -> None:
    proj = _projector([2500, 700], dim=2000, projection="fastfood", seed=1)
    idx = torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:1000]
    with torch.no_grad():
        norms = proj.project(torch.eye(2000)[idx]).norm(dim=1)  # 1000 random basis vectors e_j
    assert abs(float(norms.mean()) - 1) <= 0.05


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_same_seed_same_projection(projection: str) -> None:
    a = _matrix(_projector([40, 9], dim=12, projection=projection, seed=5))
    b = _matrix(_projector([40, 9], dim=12, projection=projection, seed=5))
    c = _matrix(_projector([40, 9], dim=12, projection=projection, seed=6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dense_refuses_a_projection_above_the_limit() -> None:
    model, _ = make("mlp")
    with pytest.raises(sk.ShiftkitError, match=r"D=163 .*dim=1000.*163,000 floats"):
        sk.attach_(model, SubspaceConfig(projection="dense", max_dense_elements=100_000))
    assert not sk.shift_parameters(model)  # nothing attached


# --- the shift on a model ----------------------------------------------------------------------------
@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "embedding"])
def test_zero_d_is_bit_exact(projection: str, name: str) -> None:
    model, x = make(name)
    with torch.no_grad():
        expected = model(x)
    sk.attach_(model, SubspaceConfig(dim=50, projection=projection))
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    for _, w in attached_wrappers(model):
        for n, v in w.effective_params().items():
            assert torch.equal(v, w.base.get_parameter(n)), n


def test_every_weight_and_bias_takes_the_next_slice_in_model_order() -> None:
    model, _ = make("cnn")  # conv without bias, BN with affine, BN without affine, conv, linear
    theta0 = _flat_params(model)
    sk.attach_(model, SubspaceConfig(dim=30, projection="dense"))
    proj = _projector_of(model)
    assert proj.total == theta0.numel()  # every parameter of the model is in θ
    with torch.no_grad():
        proj.d.normal_()
        shift = proj.project(proj.d)
    sk.fold_(model)
    torch.testing.assert_close(_flat_params(model), theta0 + shift, atol=1e-6, rtol=0)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_gradient_is_p_transpose_times_the_parameter_gradient(projection: str) -> None:
    model, x = make("mlp")
    plain = copy.deepcopy(model)
    sk.attach_(model, SubspaceConfig(dim=16, projection=projection, seed=2))
    proj = _projector_of(model)
    with torch.no_grad():
        proj.d.normal_(0, 0.3)
    model(x).square().sum().backward()
    assert proj.d.grad is not None
    # reference: the plain model at θ = θ0 + P d, its gradient ∇θL, then Pᵀ ∇θL
    p = _matrix(proj)
    with torch.no_grad():
        theta = _flat_params(plain) + p @ proj.d
        torch.nn.utils.vector_to_parameters(theta, plain.parameters())
    plain(x).square().sum().backward()
    grad_theta = torch.cat([q.grad.reshape(-1) for q in plain.parameters() if q.grad is not None])
    expected = p.T @ grad_theta
    assert float((proj.d.grad - expected).norm() / expected.norm()) <= 1e-5


def test_one_projection_per_forward() -> None:
    model, x = make("mha_block")  # MHA reads out_proj.weight and .bias itself: two more reads
    sk.attach_(model, SubspaceConfig(dim=40))
    proj = _projector_of(model)
    wrappers = [w for _, w in attached_wrappers(model)]
    assert len(wrappers) == 5 and all(w.subspace is proj for w in wrappers)
    count = proj.evaluations
    model.train()
    model(x).sum().backward()
    assert proj.evaluations == count + 1
    model(x).sum().backward()  # a new forward recomputes (the last graph was freed by backward)
    assert proj.evaluations == count + 2
    opt = torch.optim.SGD([proj.d], lr=0.1)
    opt.step()  # d changed in place: the next read recomputes, and sees the new d
    w = wrappers[0].effective_params()["weight"]
    assert proj.evaluations == count + 3
    torch.testing.assert_close(w, wrappers[0].base.weight + proj.project(proj.d)[: w.numel()].view_as(w))


def test_submodules_called_directly_train_too() -> None:
    model, x = make("mlp")
    sk.attach_(model, SubspaceConfig(dim=12))
    proj = _projector_of(model)
    for _ in range(2):  # no forward of the root, so only the backward pass can drop the stale graph
        model.fc1(x).square().sum().backward()
    assert proj.d.grad is not None and proj.evaluations == 2


def test_shift_file_stores_d_once_and_round_trips(tmp_path: Path) -> None:
    model, x = make("cnn")
    fresh = copy.deepcopy(model)
    sk.attach_(model, SubspaceConfig(dim=25, projection="sparse", seed=4))
    with torch.no_grad():
        _projector_of(model).d.normal_()
        expected = model(x)
    shift = sk.extract(model)
    assert list(shift.tensors) == ["conv1.subspace.d"]  # one vector for the whole model
    sk.save(shift, tmp_path / "s.safetensors")
    sk.attach_(fresh, sk.load(tmp_path / "s.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    torch.testing.assert_close(_matrix(_projector_of(fresh)), _matrix(_projector_of(model)), atol=0, rtol=0)


def test_deepcopy_of_an_attached_model_is_independent() -> None:
    model, x = make("mlp")
    sk.attach_(model, SubspaceConfig(dim=20))
    model(x).sum().backward()  # leaves a cached P d with an autograd graph behind
    twin = copy.deepcopy(model)
    proj, twin_proj = _projector_of(model), _projector_of(twin)
    assert twin_proj is not proj
    with torch.no_grad():
        twin_proj.d.normal_()
        y_model, y_twin = model(x), twin(x)
    assert not torch.equal(y_model, y_twin)
    n = twin_proj.evaluations
    twin(x)
    assert twin_proj.evaluations == n + 1  # the twin's own hook resets the twin's cache
    sk.detach_(twin)
    assert not twin._forward_pre_hooks
    assert len(model._forward_pre_hooks) == 1
    with torch.no_grad():
        assert torch.equal(model(x), y_model)


def test_batchnorm_running_stats_update_through_the_wrapper() -> None:
    model, x = make("cnn")
    sk.attach_(model, SubspaceConfig(dim=10))
    bn = model.bn1.base
    before = bn.running_mean.clone()
    model.train()
    model(x)
    assert not torch.equal(bn.running_mean, before)
    assert int(bn.num_batches_tracked) == 1


def test_targets_are_parameter_holding_leaves() -> None:
    model, _ = make("mha_block")
    sk.attach_(model, SubspaceConfig(dim=10))
    names = [n for n, _ in attached_wrappers(model)]
    assert names == ["ln1", "attn.out_proj", "ln2", "mlp.0", "mlp.2"]  # MHA's packed in_proj stays out
    sk.detach_(model)
    with pytest.raises(sk.ShiftkitError, match="MultiheadAttention"):
        sk.attach_(model, SubspaceConfig(target_modules=["attn"]))


def test_training_d_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    sk.attach_(model, SubspaceConfig(dim=60, projection="fastfood"))
    opt = torch.optim.Adam(sk.shift_parameters(model), lr=0.05)
    first = float(F.cross_entropy(model(x), y).detach())
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(F.cross_entropy(model(x), y).detach()) < 0.9 * first
    assert isinstance(model[0], SubspaceModule)


@pytest.mark.parametrize(
    "bad", [{"dim": 0}, {"seed": -1}, {"projection": "gaussian"}, {"max_dense_elements": 0}, {"dim": 2.5}]
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(sk.ShiftkitError):
        SubspaceConfig(**bad)  # type: ignore[arg-type]
