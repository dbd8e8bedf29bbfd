"""ZeroI2V linear adapters pinned against the spec: ``LA(z) = z + s·(W₂ Dropout(W₁z + b₁) + b₂)``.

In eval mode (dropout off) ``LA(z) = M z + c``, ``M = I + s·W₂W₁``, ``c = s·(W₂b₁ + b₂)``; folded before
a Linear ``(W, b)``: ``W' = W M``, ``b' = W c + b``; after it: ``W' = M W``, ``b' = M b + c``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from conftest import need_asset
from shiftkit.core.config import config_to_dict
from shiftkit.core.registry import config_from_dict
from shiftkit.methods.linear_adapter import LinearAdapterLinear, linear_adapter_affine


def _attach(module: nn.Module, **kwargs: object) -> tuple[nn.Sequential, LinearAdapterLinear]:
    model = nn.Sequential(module).eval()  # eval: dropout off, the adapter is exactly affine
    sk.attach_(model, sk.LinearAdapterConfig(target_modules=["0"], **kwargs))  # type: ignore[arg-type]
    wrapper = model[0]
    assert isinstance(wrapper, LinearAdapterLinear)
    return model, wrapper


@torch.no_grad()
def _randomise(wrapper: LinearAdapterLinear) -> tuple[Tensor, ...]:
    for p in (wrapper.w1, wrapper.b1, wrapper.w2, wrapper.b2):
        p.copy_(torch.randn_like(p) * 0.5)
    return tuple(p.detach().clone() for p in (wrapper.w1, wrapper.b1, wrapper.w2, wrapper.b2))


def _affine_by_hand(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, s: float) -> tuple[Tensor, Tensor]:
    d = w2.shape[0]
    m = torch.eye(d, dtype=w1.dtype) + s * w2 @ w1
    return m, s * (w2 @ b1 + b2)


def test_adapter_is_the_affine_map() -> None:
    _, la = _attach(nn.Linear(8, 4).double(), scale=0.5)
    w1, b1, w2, b2 = _randomise(la)
    z = torch.randn(5, 3, 8, dtype=torch.float64)
    m, c = _affine_by_hand(w1, b1, w2, b2, 0.5)
    with torch.no_grad():
        out = la.adapter(z)
        torch.testing.assert_close(out, z @ m.T + c, atol=1e-12, rtol=0)
        torch.testing.assert_close(out, z + 0.5 * ((z @ w1.T + b1) @ w2.T + b2), atol=1e-12, rtol=0)
    fm, fc = linear_adapter_affine(w1, b1, w2, b2, 0.5)
    torch.testing.assert_close(fm, m, atol=1e-14, rtol=0)
    torch.testing.assert_close(fc, c, atol=1e-14, rtol=0)


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_linear_float64(position: str, bias: bool) -> None:
    lin = nn.Linear(8, 6, bias=bias).double()
    w = lin.weight.detach().clone()
    b = torch.zeros(6, dtype=torch.float64) if lin.bias is None else lin.bias.detach().clone()
    model, la = _attach(lin, position=position)
    w1, b1, w2, b2 = _randomise(la)
    m, c = _affine_by_hand(w1, b1, w2, b2, 0.5)
    x = torch.randn(4, 8, dtype=torch.float64)
    if position == "before":  # base applied to the adapted input
        expected = (x @ m.T + c) @ w.T + b
        w_fold, b_fold = w @ m, w @ c + b
    else:  # adapter applied to the base output
        expected = (x @ w.T + b) @ m.T + c
        w_fold, b_fold = m @ w, m @ b + c
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=0)
    sk.fold_(model)
    assert model[0] is lin and [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    assert lin.bias is not None  # created by the fold where the base had none
    torch.testing.assert_close(lin.weight, w_fold, atol=1e-12, rtol=0)
    torch.testing.assert_close(lin.bias, b_fold, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=0)


def test_fold_float32_within_spec_tolerance() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    cfg = sk.LinearAdapterConfig(target_modules="all", after_modules=["2"], dropout=0.1)
    sk.attach_(model, cfg)
    for mod in model.modules():
        if isinstance(mod, LinearAdapterLinear):
            _randomise(mod)
    model.eval()  # dropout off: the model is affine around the GELU and folds exactly
    x = torch.randn(16, 32)
    with torch.no_grad():
        attached = model(x)
    sk.fold_(model)
    with torch.no_grad():
        folded = model(x)
    rel = ((folded - attached).abs().max() / attached.abs().max()).item()
    assert rel <= 1e-5
    assert sum(p.numel() for p in model.parameters()) == 32 * 64 + 64 + 64 * 32 + 32  # same as the base


def test_hidden_width_and_parameter_count() -> None:
    _, la = _attach(nn.Linear(768, 10))
    h = 768 // 4  # ⌊0.25·D⌋ on the input width (position "before")
    assert la.w1.shape == (h, 768) and la.w2.shape == (768, h)
    assert sum(p.numel() for p in la.named_shift_parameters().values()) == 2 * h * 768 + h + 768
    _, after = _attach(nn.Linear(768, 10), position="after")
    assert after.w1.shape == (2, 10)  # ⌊0.25·10⌋ on the output width
    _, explicit = _attach(nn.Linear(8, 8), hidden=5)
    assert explicit.w1.shape == (5, 8)
    _, tiny = _attach(nn.Linear(3, 3))
    assert tiny.w1.shape == (1, 3)  # never zero-width


def test_identity_at_init() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 16)
    x = torch.randn(4, 256)
    y0 = lin(x).detach()
    model, la = _attach(lin)
    assert torch.count_nonzero(la.w2) == 0 and torch.count_nonzero(la.b2) == 0
    assert torch.count_nonzero(la.b1) == 0
    assert abs(la.w1.std().item() - 0.02) < 0.002  # W₁ ~ N(0, 0.02²)
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    assert la.scale == 0.5  # the reference's adapter_scale


def test_dropout_only_in_train_mode() -> None:
    model, la = _attach(nn.Linear(64, 64), dropout=0.5)
    _randomise(la)
    x = torch.randn(8, 64)
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(a, b)  # a fresh dropout mask each call
    model.eval()
    with torch.no_grad():
        e1, e2 = model(x), model(x)
        w1, b1, w2, b2 = (p.detach() for p in (la.w1, la.b1, la.w2, la.b2))
        m, c = _affine_by_hand(w1, b1, w2, b2, 0.5)
        expected = la.base(x @ m.T + c)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, expected, atol=1e-5, rtol=1e-5)


def test_wrappers_follow_the_models_mode_at_attach() -> None:
    model = nn.Sequential(nn.Linear(32, 32)).eval()
    sk.attach_(model, sk.LinearAdapterConfig(target_modules="all", dropout=0.5))
    la = model[0]
    assert isinstance(la, LinearAdapterLinear) and not la.training and not la.dropout.training
    _randomise(la)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval model: no dropout without calling .eval() again


def test_after_modules_choose_the_side_per_module() -> None:
    model = nn.ModuleDict({"c_fc": nn.Linear(8, 16), "c_proj": nn.Linear(16, 8), "q": nn.Linear(8, 8)})
    cfg = sk.LinearAdapterConfig(target_modules="all", after_modules=["c_proj"])
    sk.attach_(model, cfg)
    sides = {n: model[n].position for n in ("c_fc", "c_proj", "q")}
    assert sides == {"c_fc": "before", "c_proj": "after", "q": "before"}
    assert model["c_proj"].w1.shape[1] == 8  # adapter on c_proj's 8-wide output
    regex = sk.LinearAdapterConfig(target_modules="all", position="after", after_modules=r"c_.*")
    assert config_from_dict(config_to_dict(regex)) == regex
    listed = sk.LinearAdapterConfig(after_modules=["c_proj", "out_proj"])
    assert listed.after_modules == ("c_proj", "out_proj")
    assert config_from_dict(config_to_dict(listed)) == listed


def test_save_load_keeps_the_sides(tmp_path: object) -> None:
    from pathlib import Path

    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    fresh = copy.deepcopy(model)
    sk.attach_(model, sk.LinearAdapterConfig(target_modules="all", after_modules=["2"]))
    for mod in model.modules():
        if isinstance(mod, LinearAdapterLinear):
            _randomise(mod)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = model(x)
    path = Path(str(tmp_path)) / "la.safetensors"
    sk.save(sk.extract(model), path)
    sk.attach_(fresh, sk.load(path))
    assert fresh[2].position == "after"
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize(
    "bad",
    [
        {"ratio": 0.0},
        {"hidden": 0},
        {"hidden": 2.0},
        {"scale": "half"},
        {"dropout": 1.0},
        {"position": "inside"},
        {"after_modules": [1, 2]},
    ],
)
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(sk.ShiftkitError):
        sk.LinearAdapterConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.assets
def test_reference_placement_folds_on_minilm() -> None:
    """Before the FFN up-projection, after the attention and FFN output projections; logits ≤ 1e-5."""
    need_asset("minilm")
    from shiftkit import zoo

    model, tok = zoo.load_model("minilm")
    model.eval()
    batch = dict(tok(["a short sentence", "and another one"], padding=True, return_tensors="pt"))
    cfg = sk.LinearAdapterConfig(
        target_modules=["intermediate.dense", "output.dense"], after_modules=["output.dense"], dropout=0.1
    )
    sk.attach_(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sk.shift_parameters(model):
            p.add_(torch.randn_like(p) * 0.02)
        attached = model(**batch).last_hidden_state
    sk.fold_(model)
    with torch.no_grad():
        folded = model(**batch).last_hidden_state
    assert (folded - attached).abs().max().item() <= 1e-5 * attached.abs().max().item()
