"""Bottleneck adapters pinned against the formulas of Houlsby et al. (2019) and He et al. (2022).

Sequential: ``y = h + s·(W_up f(W_down h + b_d) + b_u)``, ``h = base(x)``; parallel: ``y = base(x) +
s·(W_up f(W_down x + b_d) + b_u)``. Per sequential adapter ``2md + d + m`` parameters. Not foldable.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import shiftkit as sk
from conftest import need_asset
from shiftkit.methods.adapter import AdapterLinear, adapter_param_count


def _attach(module: nn.Module, **kwargs: object) -> tuple[nn.Sequential, AdapterLinear]:
    model = nn.Sequential(module)
    sk.attach_(model, sk.AdapterConfig(target_modules=["0"], **kwargs))  # type: ignore[arg-type]
    wrapper = model[0]
    assert isinstance(wrapper, AdapterLinear)
    return model, wrapper


@torch.no_grad()
def _randomise(wrapper: AdapterLinear) -> None:
    for p in (wrapper.down_weight, wrapper.down_bias, wrapper.up_weight, wrapper.up_bias):
        p.copy_(torch.randn_like(p) * 0.3)


def _reference(z: Tensor, wrapper: AdapterLinear, act: str, scale: float) -> Tensor:
    """The branch written out with plain matrix products: ``s·(f(z W_dᵀ + b_d) W_uᵀ + b_u)``."""
    f = {"gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2.0))), "relu": F.relu, "silu": F.silu}[act]
    hidden = f(z @ wrapper.down_weight.T + wrapper.down_bias)
    return scale * (hidden @ wrapper.up_weight.T + wrapper.up_bias)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_sequential_matches_houlsby_formula(activation: str) -> None:
    lin = nn.Linear(6, 5).double()
    model, ad = _attach(lin, bottleneck=3, activation=activation)
    _randomise(ad)
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    with torch.no_grad():
        h = x @ lin.weight.T + lin.bias
        expected = h + _reference(h, ad, activation, 1.0)
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)
    assert ad.down_weight.shape == (3, 5) and ad.up_weight.shape == (5, 3)  # on the output width


def test_parallel_matches_he_formula_with_scale() -> None:
    lin = nn.Linear(6, 5, bias=False).double()
    model, ad = _attach(lin, bottleneck=4, placement="parallel", scale=4.0, activation="relu")
    _randomise(ad)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = x @ lin.weight.T + _reference(x, ad, "relu", 4.0)
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)
    assert ad.down_weight.shape == (4, 6) and ad.up_weight.shape == (5, 4)  # input width -> output width


def test_parameter_counts() -> None:
    d, m = 16, 4
    _, seq = _attach(nn.Linear(d, d), bottleneck=m)
    n_seq = sum(p.numel() for p in seq.named_shift_parameters().values())
    assert n_seq == 2 * m * d + d + m == adapter_param_count(d, d, m)
    _, par = _attach(nn.Linear(10, 7), bottleneck=m, placement="parallel")
    n_par = sum(p.numel() for p in par.named_shift_parameters().values())
    assert n_par == m * 10 + m + 7 * m + 7
    assert adapter_param_count(768, 768, 64) == 2 * 64 * 768 + 768 + 64  # BERT-base, official bottleneck


def test_default_init_is_exact_identity_and_up_is_zero() -> None:
    lin = nn.Linear(8, 8)
    x = torch.randn(5, 8)
    y0 = lin(x).detach()
    for placement in ("sequential", "parallel"):
        model, ad = _attach(copy.deepcopy(lin), placement=placement)
        assert torch.count_nonzero(ad.up_weight) == 0 and torch.count_nonzero(ad.up_bias) == 0
        assert torch.count_nonzero(ad.down_bias) == 0
        # W_down is Kaiming-uniform (a=√5): U(-1/√fan_in, 1/√fan_in), clearly non-zero
        bound = 1 / math.sqrt(ad.down_weight.shape[1])
        assert ad.down_weight.abs().max() <= bound and ad.down_weight.abs().max() > bound / 4
        with torch.no_grad():
            assert torch.equal(model(x), y0)


def test_houlsby_init_is_near_identity() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    model, ad = _attach(copy.deepcopy(lin), init_weights="houlsby", bottleneck=64)
    for w in (ad.down_weight, ad.up_weight):
        assert w.abs().max() <= 2e-3  # truncated at two standard deviations
        assert 0.7e-3 < w.std().item() < 1.0e-3  # a normal truncated at ±2σ has std 0.88σ
    assert torch.count_nonzero(ad.down_bias) == 0 and torch.count_nonzero(ad.up_bias) == 0
    x = torch.randn(4, 64)
    with torch.no_grad():
        diff = (model(x) - lin(x)).abs().max().item()
    assert 0 < diff < 1e-3


def test_fold_refused_and_detach_restores_bit_for_bit() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 3))
    original = copy.deepcopy(model)
    sk.attach_(model, sk.AdapterConfig(target_modules="all", bottleneck=2))
    for w in model.modules():
        if isinstance(w, AdapterLinear):
            _randomise(w)
    x = torch.randn(2, 6)
    with torch.no_grad():
        attached = model(x)
    with pytest.raises(sk.NotFoldableError):
        sk.fold_(model)
    with pytest.raises(sk.NotFoldableError):
        sk.to_delta(model)
    with torch.no_grad():
        assert torch.equal(model(x), attached)  # the refused fold changed nothing
    sk.detach_(model)
    for (n, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]


def test_weight_reads_see_the_base_and_mha_out_proj_is_skipped() -> None:
    _, ad = _attach(nn.Linear(4, 4))
    assert ad.weight is ad.base.weight and ad.bias is ad.base.bias  # dtype checks etc. still work
    block = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)})
    sk.attach_(block, sk.AdapterConfig(target_modules="all"))
    assert isinstance(block["fc"], AdapterLinear)
    assert not isinstance(block["attn"].out_proj, AdapterLinear)  # MHA never calls out_proj.forward


def test_only_adapter_parameters_get_gradients() -> None:
    model, ad = _attach(nn.Linear(6, 6), bottleneck=3)
    model(torch.randn(4, 6)).sum().backward()
    assert ad.base.weight.grad is None
    assert ad.up_weight.grad is not None and ad.up_weight.grad.abs().sum() > 0
    assert ad.down_weight.grad is not None  # zero at init (W_up = 0), but present


@pytest.mark.parametrize(
    "bad",
    [
        {"bottleneck": 0},
        {"bottleneck": 2.5},
        {"placement": "middle"},
        {"activation": "tanh"},
        {"init_weights": "random"},
        {"init_std": -1.0},
        {"scale": "big"},
    ],
)
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(sk.ShiftkitError):
        sk.AdapterConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.assets
def test_houlsby_placement_on_minilm() -> None:
    """Two adapters per layer (attention output and FFN output), LayerNorms trained: ``2L(2md+d+m)`` + LN."""
    need_asset("minilm")
    from shiftkit import zoo

    model, tok = zoo.load_model("minilm")
    model.eval()
    batch = dict(tok(["a short sentence", "and another one"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    m = 64
    cfg = sk.AdapterConfig(target_modules=["output.dense"], modules_to_save=["LayerNorm"], bottleneck=m)
    sk.attach_(model, cfg)
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    wrapped = [n for n, mod in model.named_modules() if isinstance(mod, AdapterLinear)]
    assert len(wrapped) == 2 * layers
    assert all(n.endswith(("attention.output.dense", ".output.dense")) for n in wrapped)
    layer_norms = 2 * layers + 1  # two per layer plus the embeddings'
    n_train = sum(p.numel() for p in sk.shift_parameters(model))
    assert n_train == 2 * layers * (2 * m * d + d + m) + layer_norms * 2 * d
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, before, atol=0, rtol=0)
