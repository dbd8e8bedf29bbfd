"""Behaviour of the ``eata`` (reliable, non-redundant entropy minimisation + Fisher) and ``sar`` (SAM on
reliable entropies + model recovery) test-time adaptation methods."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit import adapt
from shiftkit.adapt.sar import PAPER_EXCLUDE
from shiftkit.errors import ShiftkitError
from tiny_models import make as make_tiny


class TinyLN(nn.Module):
    """``x (N, 6) -> (N, 3)``: Linear → LayerNorm → ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)
            self.head.weight.mul_(4.0)  # confident enough that some samples pass E0 = 0.4·ln 3

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.ln(self.fc1(x))))


class TinyGN(nn.Module):
    """``x (N, 3, 6, 6) -> (N, 3)``: Conv → GroupNorm → ReLU → pool → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.uniform_(-0.5, 0.5)
            self.head.weight.mul_(4.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(F.relu(self.gn(self.conv(x))), 1).flatten(1))


class FixedLogits(nn.Module):
    """Returns its input as logits through a LayerNorm's affine map only: ``z = x·γ + β`` (γ = 1, β = 0)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.norm.weight + self.norm.bias


def _model(kind: str) -> nn.Module:
    if kind == "bn":
        cnn = make_tiny("cnn")[0]
        with torch.no_grad():
            cnn.head.weight.mul_(10.0)  # the tiny CNN predicts near-uniformly; sharpen so samples pass E0
        return cnn
    torch.manual_seed(5)
    return TinyLN() if kind == "ln" else TinyGN()


def _batch(kind: str, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) if kind == "ln" else torch.randn(n, 3, 6, 6, generator=g)
    return 2.0 * x + 1.0  # a shifted input distribution


def _entropy(z: Tensor) -> Tensor:
    p = z.softmax(-1)
    return -(p * p.log()).sum(-1)


def _entropy_grad(z: Tensor) -> Tensor:
    """``∂H/∂z_j = −p_j (log p_j + H)`` for each row of ``z``."""
    p = z.softmax(-1)
    return -p * (p.log() + _entropy(z).unsqueeze(-1))


# Options that make the tiny 3-class models adapt (E0 = 0.4·ln 3 = 0.44 nats keeps few samples of a
# random tiny model; |cos| between 3-dim probability vectors is rarely below 0.4).
EATA_OPTS = {"e_margin": 1.0, "d_margin": 0.99, "lr": 1e-2}
SAR_OPTS = {"e_margin": 1.0, "lr": 5e-2, "collapse_entropy": None}
OPTS = {"eata": EATA_OPTS, "sar": SAR_OPTS}


# --- shared protocol ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["eata", "sar"])
def test_reset_is_bit_exact(name: str) -> None:
    model = _model("bn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tta = adapt.make(name, model, **OPTS[name])
    opt_state = copy.deepcopy(tta.optimizer.state_dict()) if tta.optimizer else None
    xs = [_batch("bn", 8, s) for s in range(3)]
    first = [tta(x) for x in xs]
    if name == "eata":
        assert tta.moving_probs is not None  # type: ignore[attr-defined]
    assert any(not torch.equal(a, b) for a, b in zip(first, [model(x) for x in xs], strict=True))
    tta.reset()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert tta.optimizer is not None and tta.optimizer.state_dict() == opt_state
    if name == "eata":
        assert tta.moving_probs is None  # type: ignore[attr-defined]
    again = [tta(x) for x in xs]  # m, optimizer moments and parameters all restart from the source
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["eata", "sar"])
@pytest.mark.parametrize("kind", ["bn", "ln", "gn"])
def test_only_norm_affine_parameters_change(name: str, kind: str) -> None:
    model = _model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tta = adapt.make(name, model, **OPTS[name])
    adapted = {id(p) for p in tta.adapted_parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in adapted}
    expected = {
        "bn": {"bn1.weight", "bn1.bias"},
        "ln": {"ln.weight", "ln.bias"},
        "gn": {"gn.weight", "gn.bias"},
    }
    assert names == expected[kind]
    for s in range(4):
        out = tta(_batch(kind, 8, s))
        assert out.shape == (8, 3) and torch.isfinite(out).all()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) != (k in expected[kind]), k  # adapted ones moved, the rest identical


@pytest.mark.parametrize("name", ["eata", "sar"])
def test_outputs_are_pre_update(name: str) -> None:
    model = _model("bn")
    tta = adapt.make(name, model, **OPTS[name])
    for s in range(3):
        x = _batch("bn", 8, s)
        with torch.no_grad():
            expected = tta.model(x)  # configured model (BN on batch statistics), before this batch's step
        out = tta(x)
        # without autograd the BN statistics come from one-pass moments, with it from the native kernel
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert not out.requires_grad


@pytest.mark.parametrize("name", ["eata", "sar"])
def test_batch_size_one_is_finite(name: str) -> None:
    model = _model("bn")
    tta = adapt.make(name, model, **OPTS[name])
    for s in range(3):
        out = tta(_batch("bn", 1, s))
        assert out.shape == (1, 3) and torch.isfinite(out).all()
    assert all(torch.isfinite(p).all() for p in tta.adapted_parameters())


@pytest.mark.parametrize("name", ["eata", "sar"])
@pytest.mark.parametrize("kind", ["bn", "ln", "gn"])
def test_entropy_decreases_on_shifted_stream(name: str, kind: str) -> None:
    model = _model(kind)
    # larger steps: the tiny CNN's only affine BN (bn1) is followed by a non-affine BN, so it moves slowly
    tta = adapt.make(name, model, **{**OPTS[name], "lr": 0.1 if name == "eata" else 0.2})
    held_out = _batch(kind, 32, 100)
    with torch.no_grad():
        start = _entropy(tta.model(held_out)).mean()
    for s in range(15):
        tta(_batch(kind, 16, s))
    with torch.no_grad():
        end = _entropy(tta.model(held_out)).mean()
    assert end < start - 0.02, (float(start), float(end))


@pytest.mark.parametrize("name", ["eata", "sar"])
def test_model_without_norm_layers(name: str) -> None:
    with pytest.raises(ShiftkitError, match=rf"'{name}'.*normalisation.*Sequential"):
        adapt.make(name, nn.Sequential(nn.Linear(4, 3)))


@pytest.mark.parametrize(
    ("name", "option", "bad"),
    [
        ("eata", "lr", 0.0),
        ("eata", "e_margin", -1.0),
        ("eata", "d_margin", 0.0),
        ("eata", "d_margin", float("nan")),
        ("eata", "fisher_alpha", -1.0),
        ("eata", "optimizer", "rmsprop"),
        ("sar", "lr", float("inf")),
        ("sar", "rho", -0.05),
        ("sar", "e_margin", 0.0),
        ("sar", "exclude", ["("]),
    ],
)
def test_bad_options(name: str, option: str, bad: object) -> None:
    with pytest.raises(ShiftkitError, match=option):
        adapt.make(name, _model("bn"), **{option: bad})


# --- EATA -----------------------------------------------------------------------------------------------
def _fixed_batch() -> Tensor:
    # 4 classes, E0 = 0.4·ln 4 = 0.555: rows 0, 2, 3 are confident (reliable), row 1 is uniform (H = ln 4).
    return torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 0], [0, 6.0, 0, 0], [4.5, 0, 0, 0]])


def test_eata_filters_weights_and_moving_probability() -> None:
    model = FixedLogits(4)
    lr = 1e-3
    tta = adapt.make("eata", model, optimizer="sgd", lr=lr, d_margin=0.6)
    e0 = 0.4 * math.log(4)
    z = _fixed_batch()
    assert (_entropy(z) < e0).tolist() == [True, False, True, True]
    # batch 1: no m yet, so every reliable sample is kept; the step is on mean_kept w_i·H_i
    out = tta(z)
    assert torch.equal(out, z)
    kept = torch.tensor([0, 2, 3])
    w = torch.exp(-(_entropy(z[kept]) - e0))
    g_z = w.unsqueeze(-1) * _entropy_grad(z[kept]) / len(kept)  # ∂L/∂z_i for the kept rows
    # Nesterov SGD (momentum 0.9), first step: Δθ = −lr·(g + 0.9·g)
    torch.testing.assert_close(model.norm.bias.detach(), -1.9 * lr * g_z.sum(0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(
        model.norm.weight.detach(), 1.0 - 1.9 * lr * (g_z * z[kept]).sum(0), rtol=1e-5, atol=1e-9
    )
    m1 = z[kept].softmax(-1).mean(0)
    torch.testing.assert_close(tta.moving_probs, m1)  # type: ignore[attr-defined]
    assert (tta.num_reliable, tta.num_updated) == (3, 3)  # type: ignore[attr-defined]
    # batch 2 (same inputs): the redundancy filter keeps reliable rows with |cos(p_i, m)| < 0.6 -> row 2 only
    with torch.no_grad():
        z2 = model(z)
    cos = F.cosine_similarity(z2.softmax(-1), m1.unsqueeze(0), dim=-1)
    assert cos[[0, 3]].min() > 0.8 and 0.3 < cos[2] < 0.5  # far from the threshold on either side
    tta(z)
    assert (tta.num_reliable, tta.num_updated) == (6, 4)  # type: ignore[attr-defined]
    torch.testing.assert_close(tta.moving_probs, 0.9 * m1 + 0.1 * z2[2].softmax(-1))  # type: ignore[attr-defined]


def test_eata_no_step_when_nothing_passes() -> None:
    model = FixedLogits(4)
    tta = adapt.make("eata", model)
    z = torch.zeros(3, 4)  # uniform predictions: H = ln 4 > E0
    out = tta(z)
    assert torch.equal(out, z)
    assert torch.equal(model.norm.weight, torch.ones(4)) and torch.equal(model.norm.bias, torch.zeros(4))
    assert tta.optimizer is not None and tta.optimizer.state_dict()["state"] == {}
    assert tta.moving_probs is None and tta.num_reliable == 0  # type: ignore[attr-defined]


def test_eata_fisher_is_mean_squared_batch_gradient() -> None:
    model = _model("ln")
    batches = [_batch("ln", 8, 50 + i) / 2.0 for i in range(3)]
    ref = copy.deepcopy(model).eval()
    ref_params = [ref.ln.weight, ref.ln.bias]
    expected = [torch.zeros_like(p) for p in ref_params]
    for x in batches:
        z = ref(x)
        grads = torch.autograd.grad(F.cross_entropy(z, z.argmax(-1)), ref_params)
        for e, g in zip(expected, grads, strict=True):
            e += g**2 / len(batches)
    tta = adapt.make("eata", model, fisher_data=iter(batches), fisher_alpha=5.0)
    assert tta.fisher is not None  # type: ignore[attr-defined]
    for f, e in zip(tta.fisher, expected, strict=True):  # type: ignore[attr-defined]
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-10)
    assert all(p.grad is None for p in tta.adapted_parameters())  # estimating F leaves no gradient behind
    assert float(tta.anti_forgetting_loss().detach()) == 0.0  # type: ignore[attr-defined]


def test_eata_fisher_term_restrains_the_parameters() -> None:
    source = [_batch("ln", 16, 50 + i) / 2.0 for i in range(4)]

    def drift(**opts: object) -> float:
        model = _model("ln")
        start = [p.detach().clone() for p in (model.ln.weight, model.ln.bias)]
        tta = adapt.make("eata", model, **EATA_OPTS, **opts)  # type: ignore[arg-type]
        for s in range(10):
            tta(_batch("ln", 16, s))
        return sum(
            float((p.detach() - p0).norm())
            for p, p0 in zip((model.ln.weight, model.ln.bias), start, strict=True)
        )

    free = drift()
    held = drift(fisher_data=source, fisher_alpha=1e6)
    assert free > 0 and held < 0.3 * free, (free, held)


def test_eta_equals_zero_fisher_alpha() -> None:
    source = [_batch("ln", 16, 50 + i) / 2.0 for i in range(2)]
    eta_model, zero_model = _model("ln"), _model("ln")
    eta = adapt.make("eata", eta_model, **EATA_OPTS, fisher_alpha=1e6)  # no fisher_data: β unused (ETA)
    zero = adapt.make("eata", zero_model, **EATA_OPTS, fisher_data=source, fisher_alpha=0.0)
    for s in range(4):
        x = _batch("ln", 16, s)
        torch.testing.assert_close(eta(x), zero(x), rtol=0, atol=0)
    for a, b in zip(eta_model.parameters(), zero_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_eata_bad_fisher_data() -> None:
    with pytest.raises(ShiftkitError, match=r"fisher_data.*no batch"):
        adapt.make("eata", _model("ln"), fisher_data=[])
    with pytest.raises(ShiftkitError, match=r"fisher_data.*str"):
        adapt.make("eata", _model("ln"), fisher_data=["x"])  # type: ignore[list-item]


def test_eata_accepts_labelled_fisher_batches() -> None:
    xs = [_batch("ln", 8, 60)]
    a = adapt.make("eata", _model("ln"), fisher_data=xs)
    b = adapt.make("eata", _model("ln"), fisher_data=[(x, torch.zeros(8, dtype=torch.long)) for x in xs])
    for fa, fb in zip(a.fisher, b.fisher, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(fa, fb)


# --- SAR ------------------------------------------------------------------------------------------------
def test_sar_step_matches_hand_written_sam() -> None:
    model = _model("ln")
    x = _batch("ln", 16, 7)
    lr, rho = 0.1, 0.5
    ref = copy.deepcopy(model).eval()
    params = [ref.ln.weight, ref.ln.bias]
    with torch.no_grad():
        e0 = float(_entropy(ref(x)).median())  # about half the samples are reliable
    ent = _entropy(ref(x))
    m1 = ent < e0
    g = torch.autograd.grad(ent[m1].mean(), params)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    eps = [rho * gi / (norm + 1e-12) for gi in g]
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p += e
    ent2 = _entropy(ref(x))[m1]
    m2 = ent2 < e0
    assert 0 < int(m2.sum()) < int(m1.sum())  # the second filter matters in this example
    g2 = torch.autograd.grad(ent2[m2].mean(), params)
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p -= e
    expected = [p.detach() - lr * gi for p, gi in zip(params, g2, strict=True)]  # SGD, first momentum step
    plain = [p.detach() - lr * gi for p, gi in zip(params, g, strict=True)]

    tta = adapt.make("sar", model, lr=lr, rho=rho, e_margin=e0, collapse_entropy=None)
    tta(x)
    for p, e, q in zip((model.ln.weight, model.ln.bias), expected, plain, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
        assert (p - q).abs().max() > 1e-4  # the sharpness-aware gradient differs from the plain one


def test_sar_recovery_resets_to_source() -> None:
    model = _model("ln")
    source = {k: v.clone() for k, v in model.state_dict().items()}
    tta = adapt.make("sar", model, e_margin=1.0, lr=5e-2, collapse_entropy=10.0)  # every L2 is < 10 nats
    tta(_batch("ln", 16, 0))
    assert tta.collapse_resets == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k]), k
    assert tta.optimizer is not None and tta.optimizer.state_dict()["state"] == {}
    tta(_batch("ln", 16, 1))
    assert tta.collapse_resets == 2  # the ema was cleared, so the next batch starts a fresh average


def test_sar_default_recovery_does_not_fire_on_healthy_stream() -> None:
    tta = adapt.make("sar", _model("ln"), e_margin=1.0, lr=5e-2)
    assert tta.collapse_entropy == 0.2
    for s in range(5):
        tta(_batch("ln", 16, s))
    assert tta.collapse_resets == 0


def test_sar_no_reliable_sample_skips_the_step() -> None:
    model = FixedLogits(4)
    tta = adapt.make("sar", model)
    z = torch.zeros(3, 4)
    assert torch.equal(tta(z), z)
    assert torch.equal(model.norm.weight, torch.ones(4)) and torch.equal(model.norm.bias, torch.zeros(4))
    assert tta.optimizer is not None and tta.optimizer.state_dict()["state"] == {}


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer3 = nn.Sequential(nn.BatchNorm1d(4))
        self.layer4 = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(4)) for _ in range(12)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer4(self.layer3(x))
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


def test_sar_exclude_patterns() -> None:
    model = _Named()
    tta = adapt.make("sar", model, exclude=PAPER_EXCLUDE)
    ids = {id(p) for p in tta.adapted_parameters()}
    kept = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if id(p) in ids})
    assert kept == sorted(["layer3.0"] + [f"blocks.{i}.0" for i in range(9)])
    assert all(not p.requires_grad for p in model.norm.parameters())
    all_norms = adapt.make("sar", _Named(), exclude="none")
    assert len(all_norms.adapted_parameters()) == 2 * (2 + 12 + 1)
    with pytest.raises(ShiftkitError, match="all are excluded"):
        adapt.make("sar", _Named(), exclude=[".*"])
