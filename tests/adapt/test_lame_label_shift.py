"""Behaviour of ``lame`` (Laplacian output correction) and ``label_shift`` (Saerens EM prior correction).

Reference numbers come from independent numpy implementations of the formulas (spec §6.8; Saerens et al.
2002) and from the Bayes posteriors of known class-conditional Gaussians.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit import adapt
from shiftkit.adapt.label_shift import em_prior
from shiftkit.adapt.lame import lame_affinity, lame_energy, lame_solve
from shiftkit.errors import ShiftkitError, UnknownMethodError
from tiny_models import make as make_tiny

# --- LAME ----------------------------------------------------------------------------------------------


def _np_lame(p: np.ndarray, w: np.ndarray, lam: float, max_iter: int) -> tuple[np.ndarray, int]:
    """Straightforward numpy version of the spec §6.8 solver (loop over rows for the softmax)."""
    unary = -np.log(p + 1e-10)
    y = p.copy()
    e_prev = 0.0
    iters = 0
    for i in range(max_iter):
        iters = i + 1
        a = -unary + lam * (w @ y)
        y = np.empty_like(a)
        for r in range(a.shape[0]):
            e = np.exp(a[r] - a[r].max())
            y[r] = e / e.sum()
        energy = float((unary * y - lam * (w @ y) * y + y * np.log(np.clip(y, 1e-20, None))).sum())
        if i > 1 and abs(energy - e_prev) <= 1e-8 * abs(e_prev):
            break
        e_prev = energy
    return y, iters


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lame_solve_matches_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 12, 4
    logits = rng.normal(size=(n, k)) * 2.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    w = rng.uniform(size=(n, n)) * (rng.uniform(size=(n, n)) < 0.4)
    for lam, max_iter in ((1.0, 100), (0.5, 100), (1.0, 2)):
        expected, iters = _np_lame(p, w, lam, max_iter)
        log_y, got_iters = lame_solve(torch.from_numpy(p), torch.from_numpy(w), lam, max_iter)
        assert got_iters == iters
        np.testing.assert_allclose(log_y.exp().numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(log_y.numpy(), np.log(expected), atol=1e-6)


def _np_knn(z: np.ndarray, k: int) -> np.ndarray:
    n = len(z)
    w = np.zeros((n, n))
    for i in range(n):
        d = [(float(np.linalg.norm(z[i] - z[j])), j) for j in range(n) if j != i]
        for _, j in sorted(d)[: min(k, n - 1)]:
            w[i, j] = 1.0
    return w


def _np_rbf(z: np.ndarray, k: int) -> np.ndarray:
    n = len(z)
    dist = np.array([[np.linalg.norm(z[i] - z[j]) for j in range(n)] for i in range(n)])
    sigma = np.mean([sorted(dist[i])[min(k, n) - 1] for i in range(n)])  # self (0) counts as the first
    return np.exp(-(dist**2) / (2 * sigma**2))


@pytest.mark.parametrize("kind", ["knn", "rbf", "linear"])
@pytest.mark.parametrize("k", [1, 3, 5, 50])
@pytest.mark.parametrize("sym", [False, True])
def test_affinities_match_direct_formulas(kind: str, k: int, sym: bool) -> None:
    z = F.normalize(torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(k)), dim=1)
    zn = z.numpy()
    if kind == "knn":
        expected = _np_knn(zn, k)
    elif kind == "linear":
        expected = np.array([[float(zn[i] @ zn[j]) for j in range(9)] for i in range(9)])
    elif k == 1:  # σ = 0 (only the point itself): the σ → 0 limit, identity
        expected = np.eye(9)
    else:
        expected = _np_rbf(zn, k)
    if sym:
        expected = (expected + expected.T) / 2
    got = lame_affinity(z, kind, k, force_symmetry=sym)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-7)
    if kind == "knn" and not sym:  # k > N − 1 is clamped: every other point is a neighbour
        assert (got.sum(1) == min(k, 8)).all()


def test_affinity_errors() -> None:
    z = torch.randn(4, 3)
    with pytest.raises(ShiftkitError, match="affinity"):
        lame_affinity(z, "cosine")
    with pytest.raises(ShiftkitError, match="k must"):
        lame_affinity(z, "knn", 0)


@pytest.mark.parametrize("kind", ["rbf", "linear"])
def test_energy_decreases(kind: str) -> None:
    # CCCP property: Y ← softmax(log p + λWY) is the bound-optimisation step of KL(Y‖p) − (λ/2) tr(YᵀWY),
    # which cannot increase for a symmetric PSD W (rbf, linear). The spec's stopping energy (λ instead of
    # λ/2) is checked to end below its starting value.
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        p = torch.softmax(2 * torch.randn(30, 5, generator=g, dtype=torch.float64), 1)
        w = lame_affinity(F.normalize(torch.randn(30, 8, generator=g, dtype=torch.float64), dim=1), kind)
        ys = [p] + [lame_solve(p, w, 1.0, t)[0].exp() for t in range(1, 15)]
        cccp = [float(lame_energy(y, p, w, 0.5)) for y in ys]
        assert all(b <= a + 1e-9 for a, b in itertools.pairwise(cccp)), cccp
        assert float(lame_energy(ys[-1], p, w)) < float(lame_energy(p, p, w))


class FeatNet(nn.Module):
    """``x (N, 6) -> body (Linear, ReLU, Linear) -> z (N, 5) -> head -> (N, 3)``, with a BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5))
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
            self.bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(self.body(x)))


def _featnet() -> FeatNet:
    torch.manual_seed(5)
    return FeatNet().eval()


@pytest.mark.parametrize("kind", ["rbf", "knn", "linear"])
def test_lame_uses_last_linear_input(kind: str) -> None:
    model = _featnet()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    x = torch.randn(10, 6)
    with torch.no_grad():
        z = model.bn(model.body(x))
        logits = model.head(z)
    z, logits = z.double(), logits.double()  # LAME solves in float64
    expected, iters = lame_solve(logits.softmax(1), lame_affinity(F.normalize(z, dim=1), kind, 3), 1.0, 100)
    tta = adapt.make("lame", model, affinity=kind, k=3)
    out = tta(x)
    torch.testing.assert_close(out, expected.float())
    torch.testing.assert_close(out.exp().sum(1), torch.ones(10))  # log-probabilities
    assert tta.last_iterations == iters and tta.feature_module == "head"
    assert tta.adapted_parameters() == []
    for n, t in model.state_dict().items():  # parameters and buffers untouched
        assert torch.equal(t, before[n]), n
    assert not any(p.requires_grad for p in model.parameters())


def test_lame_feature_module_option() -> None:
    model = _featnet()
    x = torch.randn(8, 6)
    with torch.no_grad():
        h = model.body[1](model.body[0](x)).double()  # input of body.2
        logits = model(x).double()
    expected, _ = lame_solve(logits.softmax(1), lame_affinity(F.normalize(h, dim=1), "knn", 2), 1.0, 100)
    out = adapt.make("lame", model, affinity="knn", k=2, feature_module="body.2")(x)
    torch.testing.assert_close(out, expected.float())


def test_lame_feature_module_errors() -> None:
    with pytest.raises(ShiftkitError, match=r"'nope'.*FeatNet.*'body.2'"):
        adapt.make("lame", _featnet(), feature_module="nope")
    conv_only = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ShiftkitError, match=r"nn.Linear.*Sequential.*feature_module"):
        adapt.make("lame", conv_only)
    unused = _featnet()
    unused.extra = nn.Linear(5, 5)  # registered last, never called by forward
    with pytest.raises(ShiftkitError, match=r"'extra' was not called"):
        adapt.make("lame", unused)(torch.randn(4, 6))


@pytest.mark.parametrize(
    ("option", "value"), [("affinity", "cos"), ("k", 0), ("lam", -1.0), ("max_iter", 0), ("k", True)]
)
def test_lame_bad_options(option: str, value: object) -> None:
    with pytest.raises(ShiftkitError, match=option):
        adapt.make("lame", _featnet(), **{option: value})


def test_lame_batch_size_one_returns_log_p() -> None:
    model = _featnet()
    x = torch.randn(1, 6)
    with torch.no_grad():
        expected = model(x).log_softmax(1)
    tta = adapt.make("lame", model)
    torch.testing.assert_close(tta(x), expected)
    assert tta.last_iterations == 0


class Clustered(nn.Module):
    """Identity features ``z = x`` (D = 8) and a weak linear classifier over K = 4 class directions."""

    def __init__(self, centres: Tensor) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.head = nn.Linear(8, 4, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(centres)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.feat(x))


def _clustered_batch(labels: Tensor, g: torch.Generator) -> tuple[Clustered, Tensor]:
    centres = torch.eye(4, 8)
    # Two noise scales: a shared cluster offset would be invisible to the head; here every sample gets a
    # large independent perturbation in the head's directions (noisy p) and the dims 4..7 carry a strong
    # class code (clustered features).
    code = torch.randn(4, 4, generator=g) * 3.0
    x = torch.cat([centres[labels, :4] + 0.9 * torch.randn(len(labels), 4, generator=g), code[labels]], 1)
    x[:, 4:] += 0.3 * torch.randn(len(labels), 4, generator=g)
    return Clustered(centres), x


def test_lame_improves_label_correlated_batch() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(40, dtype=torch.long)  # one class only: the label-correlated extreme
    model, x = _clustered_batch(labels, g)
    with torch.no_grad():
        source_acc = (model(x).argmax(1) == labels).float().mean().item()
    for kind in ("knn", "rbf"):
        acc = (adapt.make("lame", model, affinity=kind)(x).argmax(1) == labels).float().mean().item()
        assert source_acc < 0.8 and acc > source_acc + 0.1, (kind, source_acc, acc)


def test_lame_balanced_well_separated_batch_runs() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(40) % 4
    model, x = _clustered_batch(labels, g)
    x[:, :4] = torch.eye(4)[labels] * 5.0  # well separated classes
    for kind in ("knn", "rbf", "linear"):
        out = adapt.make("lame", model, affinity=kind, k=50)(x)  # k > N − 1: clamped
        assert out.shape == (40, 4) and torch.isfinite(out).all()
        assert (out.argmax(1) == labels).float().mean() > 0.9


# --- label_shift ---------------------------------------------------------------------------------------

MEANS = torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])


def _bayes_model() -> nn.Module:
    """Logits ``μ_kᵀx − ‖μ_k‖²/2`` = log N(x; μ_k, I) + const(x): exact posteriors under a uniform prior."""
    head = nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(MEANS)
        head.bias.copy_(-(MEANS**2).sum(1) / 2)
    return nn.Sequential(head).eval()


def _gaussian_data(prior: list[float], n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.tensor(prior), n, replacement=True, generator=g)
    return MEANS[labels] + torch.randn(n, 2, generator=g), labels


def _np_em(p: np.ndarray, ps: np.ndarray, iters: int) -> np.ndarray:
    pi = ps.copy()
    for _ in range(iters):
        q = p * (pi / ps)
        q /= q.sum(1, keepdims=True)
        pi = q.mean(0)
    return pi


def test_em_prior_matches_numpy() -> None:
    x, _ = _gaussian_data([0.6, 0.3, 0.1], 500, 3)
    with torch.no_grad():
        logits = _bayes_model()(x).double()
    ps = np.array([0.5, 0.3, 0.2])
    pi, iters = em_prior(logits, torch.tensor(ps).log(), torch.tensor(ps), max_iter=40, tol=0.0)
    assert iters == 40
    np.testing.assert_allclose(pi.numpy(), _np_em(logits.softmax(1).numpy(), ps, 40), atol=1e-10)


def test_label_shift_recovers_prior_and_improves_accuracy() -> None:
    target = [0.7, 0.2, 0.1]
    x, labels = _gaussian_data(target, 3000, 0)
    model = _bayes_model()
    with torch.no_grad():
        source_acc = (model(x).argmax(1) == labels).float().mean().item()
    tta = adapt.make("label_shift", model, momentum=0.0)  # per-batch EM on the 3000 samples
    out = tta(x)
    assert tta.prior is not None and (tta.prior - torch.tensor(target)).abs().max() < 0.05
    acc = (out.argmax(1) == labels).float().mean().item()
    assert acc > source_acc + 0.05, (source_acc, acc)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3000))
    # Online: 30 batches of 100 with the default momentum reach the same prior.
    stream = adapt.make("label_shift", _bayes_model())
    for xb in x.split(100):
        stream(xb)
    assert stream.prior is not None and (stream.prior - torch.tensor(target)).abs().max() < 0.05


def test_label_shift_uniform_target_is_near_identity() -> None:
    x, _ = _gaussian_data([1 / 3, 1 / 3, 1 / 3], 3000, 1)
    model = _bayes_model()
    with torch.no_grad():
        logits = model(x)
    tta = adapt.make("label_shift", model, momentum=0.0)
    out = tta(x)
    assert tta.prior is not None and (tta.prior - 1 / 3).abs().max() < 0.03
    assert (out.argmax(1) == logits.argmax(1)).float().mean() > 0.97
    assert (out.exp() - logits.softmax(1)).abs().max() < 0.06


def test_label_shift_source_prior_counts_and_errors() -> None:
    tta = adapt.make("label_shift", _bayes_model(), source_prior=[2, 1, 1], momentum=0.0, em_iters=1)
    torch.testing.assert_close(tta.prior, torch.tensor([0.5, 0.25, 0.25]))
    x, _ = _gaussian_data([0.2, 0.4, 0.4], 50, 2)
    with torch.no_grad():
        logits = _bayes_model()(x)
    ps = np.array([0.5, 0.25, 0.25])
    pi = _np_em(logits.softmax(1).double().numpy(), ps, 1)  # one EM step from π_s
    pi = 0.999 * pi + 0.001 * ps  # the running estimate keeps 0.1 % of π_s (no class collapses to 0)
    q = logits.softmax(1).double().numpy() * pi / ps
    torch.testing.assert_close(tta(x).exp().double(), torch.from_numpy(q / q.sum(1, keepdims=True)))
    with pytest.raises(ShiftkitError, match="source_prior has 2 classes"):
        adapt.make("label_shift", _bayes_model(), source_prior=[0.5, 0.5])(x)
    for bad in ({"source_prior": [1.0, 0.0, 1.0]}, {"momentum": 1.0}, {"em_iters": 0}, {"tol": -1.0}):
        with pytest.raises(ShiftkitError, match=next(iter(bad))):
            adapt.make("label_shift", _bayes_model(), **bad)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_label_shift_recovers_a_class_absent_for_many_batches(momentum: float) -> None:
    """A label-correlated stream: 60 batches of class 0, then class 2. EM must bring class 2 back at once."""
    tta = adapt.make("label_shift", _bayes_model(), momentum=momentum)
    for seed in range(60):
        x, _ = _gaussian_data([1.0, 0.0, 0.0], 40, seed)
        tta(x)
    x, y = _gaussian_data([0.0, 0.0, 1.0], 40, 100)
    with torch.no_grad():
        source_acc = float((_bayes_model()(x).argmax(1) == y).float().mean())
    # momentum 0: at once; momentum 0.9: the running average needs a few batches to shift its weight
    accs = [float((tta(x).argmax(1) == y).float().mean()) for _ in range(12 if momentum else 1)]
    assert accs[-1] >= source_acc - 0.05, (accs, source_acc)


def test_label_shift_inner_method_errors() -> None:
    model, _ = make_tiny("cnn")
    with pytest.raises(UnknownMethodError, match=r"tnet.*Known:.*tent"):
        adapt.make("label_shift", model, method="tnet")
    with pytest.raises(ShiftkitError, match="cannot wrap itself"):
        adapt.make("label_shift", model, method="label_shift")
    with pytest.raises(ShiftkitError, match="unknown option"):
        adapt.make("label_shift", model, method="tent", method_params={"lrr": 1.0})


def _snapshot(tta: adapt.TTAMethod) -> dict[str, Tensor]:
    state = {k: v.detach().clone() for k, v in tta.model.state_dict().items()}
    return state


@pytest.mark.parametrize("inner", ["tent", "norm", "lame"])
def test_label_shift_composes_and_resets_bit_exact(inner: str) -> None:
    model, _ = make_tiny("cnn")
    params = {"lr": 1e-2} if inner == "tent" else {}
    tta = adapt.make("label_shift", model, method=inner, method_params=params)
    assert isinstance(tta, adapt.LabelShift)
    assert tta.adapted_parameters() == tta.inner.adapted_parameters()
    assert (len(tta.adapted_parameters()) > 0) == (inner == "tent")
    g = torch.Generator().manual_seed(4)
    xs = [2.0 * torch.randn(8, 3, 6, 6, generator=g) + 1.0 for _ in range(3)]
    start = _snapshot(tta)
    opt_start = tta.inner.optimizer.state_dict() if tta.inner.optimizer else None
    first = [tta(x) for x in xs]
    assert tta.prior is not None and tta.prior.shape == (3,)
    if inner == "tent":
        assert any(not torch.equal(v, start[k]) for k, v in _snapshot(tta).items())
    calls = []
    inner_reset = tta.inner.reset
    tta.inner.reset = lambda: (calls.append(1), inner_reset())  # type: ignore[method-assign]
    tta.reset()
    assert calls == [1]  # the inner method's reset runs exactly once
    assert tta.prior is None
    for k, v in _snapshot(tta).items():
        assert torch.equal(v, start[k]), k
    if opt_start is not None:
        assert tta.inner.optimizer is not None and tta.inner.optimizer.state_dict()["state"] == {}
        assert opt_start["state"] == {}
    second = [tta(x) for x in xs]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert all(math.isclose(float(o.exp().sum(1).mean()), 1.0, rel_tol=1e-5) for o in second)


def test_label_shift_episodic_restarts_from_source_prior() -> None:
    x, _ = _gaussian_data([0.7, 0.2, 0.1], 200, 5)
    tta = adapt.make("label_shift", _bayes_model(), episodic=True)
    first = tta(x)
    prior = tta.prior
    torch.testing.assert_close(tta(x), first)  # the running prior was reset before the second call
    torch.testing.assert_close(tta.prior, prior)
