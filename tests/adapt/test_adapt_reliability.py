"""Reliability of every registered adaptation method: bit-exact reset, only chosen parameters change,
batch size 1, BN / LN / GN models, a long soak stream, clear errors, and ``adapt.evaluate``."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from shiftkit import adapt
from shiftkit.data import streams
from shiftkit.errors import ShiftkitError
from tiny_models import make as make_tiny

#: methods that never change a parameter
FROZEN = {"source", "norm", "alpha_bn", "bn_ema", "lame"}
#: methods that need BatchNorm layers
BN_ONLY = {"norm", "alpha_bn", "bn_ema"}
#: options for the tests: label_shift on top of a method that trains; EATA and SAR keep every sample (random
#: inputs to a 3- or 4-class tiny model are all above the default 0.4·ln C entropy margin)
OPTIONS: dict[str, dict[str, object]] = {
    "label_shift": {"method": "tent"},
    "eata": {"e_margin": 10.0},
    "sar": {"e_margin": 10.0},
}


class NormNet(nn.Module):
    """Conv → {LayerNorm over channels | GroupNorm} → ReLU → pool → Linear; ``(N, 3, 6, 6) -> (N, 4)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm: nn.Module = nn.GroupNorm(2, 8) if kind == "gn" else nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.kind == "ln":
            h = self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            h = self.norm(h)
        return self.head(F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bn":
        return make_tiny("cnn")[0]
    return NormNet(kind).eval()


def _batches(n: int, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 6, generator=g) * 1.5 + 0.7 for _ in range(n)]


def _cases() -> list[tuple[str, str]]:
    cases = []
    for m in adapt.list_methods():
        for kind in ("bn", "ln", "gn"):
            if m in BN_ONLY and kind != "bn":
                continue
            cases.append((m, kind))
    return cases


def _opt_state(tta: adapt.TTAMethod) -> list[tuple[str, torch.Tensor]]:
    opt = getattr(tta, "optimizer", None)
    inner = getattr(tta, "inner", None)
    if opt is None and inner is not None:
        opt = getattr(inner, "optimizer", None)
    if opt is None:
        return []
    out = []
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            if torch.is_tensor(v):
                out.append((f"{i}.{k}", v.clone()))
    return out


@pytest.mark.parametrize(("method", "kind"), _cases())
def test_reset_is_bit_exact(method: str, kind: str) -> None:
    model = _model(kind)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    tta = adapt.make(method, model, **OPTIONS.get(method, {}))
    xs = _batches(4)
    first = [tta(x) for x in xs]
    opt_after_first = _opt_state(tta)
    tta.reset()
    for k, v in model.state_dict().items():
        assert torch.equal(state0[k], v), f"{method}/{kind}: {k} not restored"
    again = [tta(x) for x in xs]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b), f"{method}/{kind}: outputs after reset differ"
    for (ka, a), (kb, b) in zip(opt_after_first, _opt_state(tta), strict=True):
        assert ka == kb and torch.equal(a, b), f"{method}/{kind}: optimizer state {ka} differs after reset"


@pytest.mark.parametrize(("method", "kind"), _cases())
def test_only_adapted_parameters_change(method: str, kind: str) -> None:
    model = _model(kind)
    before = {k: v.clone() for k, v in model.named_parameters()}
    tta = adapt.make(method, model, **OPTIONS.get(method, {}))
    chosen = {id(p) for p in tta.adapted_parameters()}
    if method in FROZEN:
        assert not chosen
    for x in _batches(5):
        tta(x)
    changed = {k for k, p in model.named_parameters() if not torch.equal(before[k], p)}
    for k, p in model.named_parameters():
        if id(p) not in chosen:
            assert k not in changed, f"{method}/{kind}: {k} changed but is not adapted"
    if method not in FROZEN:
        assert changed, f"{method}/{kind}: nothing adapted"


@pytest.mark.parametrize(("method", "kind"), _cases())
def test_batch_size_one(method: str, kind: str) -> None:
    tta = adapt.make(method, _model(kind), **OPTIONS.get(method, {}))
    for x in _batches(6, size=1):
        out = tta(x)
        assert out.shape[0] == 1 and torch.isfinite(out).all(), f"{method}/{kind}"


@pytest.mark.parametrize("method", sorted(BN_ONLY))
def test_bn_methods_refuse_models_without_batchnorm(method: str) -> None:
    with pytest.raises(ShiftkitError, match="BatchNorm"):
        adapt.make(method, _model("ln"))


@pytest.mark.parametrize("method", ["tent", "eata", "sar"])
def test_entropy_methods_refuse_models_without_norms(method: str) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 4))
    with pytest.raises(ShiftkitError, match="norm"):
        adapt.make(method, model)


def test_unknown_stream_is_a_clear_error() -> None:
    with pytest.raises(ShiftkitError, match="continual"):
        streams.make_stream("contiual", {"a": (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))}, 2)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny ops are dominated by thread hand-offs: 1 thread runs a tiny step in ~1.5 ms instead of ~100 ms
    on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["tent", "eata", "sar", "bn_ema", "lame", "label_shift"])
def test_soak_long_stream(method: str, one_thread: None) -> None:
    """2,000 batches of 4 shifted images: no NaN, and resident memory stops growing after warm-up."""
    torch.manual_seed(0)
    model = _model("bn")
    opts = {**OPTIONS.get(method, {}), **({"lr": 5e-2} if method in ("tent", "eata") else {})}
    tta = adapt.make(method, model, **opts)
    g = torch.Generator().manual_seed(1)
    rss_warm = 0.0
    for i in range(2000):
        x = torch.randn(4, 3, 6, 6, generator=g) * (1 + (i % 7)) + (i % 5) - 2
        out = tta(x)
        assert torch.isfinite(out).all(), f"{method}: non-finite output at batch {i}"
        if i == 200:
            rss_warm = _rss_mb()
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert _rss_mb() - rss_warm < 30.0, f"{method}: memory grew by {_rss_mb() - rss_warm:.1f} MiB"


def test_evaluate_scores_and_resets() -> None:
    """A model that is right on the first half of every domain: per-domain errors from the formula."""

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :2] * 100.0  # the first two features are the class scores

    def domain(n: int, wrong: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 2
        x = F.one_hot(y, 2).float()
        x[:wrong] = 1.0 - x[:wrong]
        return x, y

    doms = {"a": domain(10, 3), "b": domain(6, 0), "c": domain(8, 8)}
    run = adapt.evaluate(adapt.make("source", Fixed()), streams.episodic(doms, 4))
    assert run.errors == pytest.approx({"a": 30.0, "b": 0.0, "c": 100.0})
    assert run.mean_error == pytest.approx(130.0 / 3)
    assert run.overall_error == pytest.approx(100.0 * 11 / 24)
    assert run.counts == {"a": 10, "b": 6, "c": 8}
    assert run.stream["kind"] == "episodic"


def test_evaluate_resets_at_domain_starts_only_when_told() -> None:
    """bn_ema accumulates statistics: an episodic stream gives each domain a fresh start, continual not."""
    x = torch.randn(16, 3, 6, 6) * 3 + 2
    y = torch.zeros(16, dtype=torch.long)
    doms = {"a": (x, y), "b": (x.clone(), y)}
    model = _model("bn")
    tta = adapt.make("bn_ema", model, tau=None)
    adapt.evaluate(tta, streams.episodic(doms, 8))
    assert tta.batches_seen == 2  # reset at the start of b
    adapt.evaluate(tta, streams.continual(doms, 8))
    assert tta.batches_seen == 4


def test_evaluate_rejects_bad_outputs() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum()

    doms = {"a": (torch.randn(4, 3), torch.zeros(4, dtype=torch.long))}
    with pytest.raises(ShiftkitError, match="shape"):
        adapt.evaluate(adapt.make("source", Bad()), streams.continual(doms, 2))


def test_methods_on_copies_are_independent() -> None:
    """The suite runs each method on a deep copy: adapting one copy leaves the source untouched."""
    model = _model("bn")
    src = {k: v.clone() for k, v in model.state_dict().items()}
    tta = adapt.make("tent", copy.deepcopy(model), lr=1e-2)
    for x in _batches(3):
        tta(x)
    for k, v in model.state_dict().items():
        assert torch.equal(src[k], v)


@pytest.mark.parametrize(
    "method", ["norm", "alpha_bn", "bn_ema", "tent", "eata", "sar", "lame", "label_shift"]
)
def test_close_removes_patches_and_hooks(method: str) -> None:
    """After reset() + close() the model computes exactly what the untouched source model computes."""
    model = _model("bn")
    source = copy.deepcopy(model)
    tta = adapt.make(method, model, **OPTIONS.get(method, {}))
    for x in _batches(3):
        tta(x)
    tta.reset()
    tta.close()
    tta.close()  # idempotent
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    assert not any(m.__dict__.get("forward") for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_bn_ema_model_callable_before_the_first_batch() -> None:
    tta = adapt.make("bn_ema", _model("bn"))
    out = tta.model(_batches(1)[0])
    assert torch.isfinite(out).all()


def test_evaluate_counts_nonfinite_batches() -> None:
    class Diverged(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(x), 2)
            out[0, 0] = float("nan")
            return out

    doms = {"a": (torch.randn(6, 3), torch.zeros(6, dtype=torch.long))}
    run = adapt.evaluate(adapt.make("source", Diverged()), streams.continual(doms, 2))
    assert run.nonfinite_batches == 3
