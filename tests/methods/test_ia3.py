"""(IA)³ pinned against its formulas (learn.md §6.1) and against the real peft package (0.21.2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shiftkit as sk
from shiftkit.methods.ia3 import IA3Conv, IA3Linear


@torch.no_grad()
def _randomise(*params: torch.Tensor) -> None:
    for p in params:
        p.uniform_(0.5, 1.5)


def _wrap_single(module: nn.Module, ff: bool) -> tuple[nn.Sequential, IA3Linear | IA3Conv]:
    model = nn.Sequential(module)
    sk.attach_(model, sk.IA3Config(target_modules=["0"], feedforward_modules=["0"] if ff else None))
    wrapper = model[0]
    assert isinstance(wrapper, IA3Linear | IA3Conv)
    _randomise(wrapper.ia3_l)
    return model, wrapper


# --- config ----------------------------------------------------------------------------------------------
def test_feedforward_modules_must_be_a_subset_of_the_targets() -> None:
    with pytest.raises(sk.ShiftkitError, match="subset"):
        sk.IA3Config(target_modules=["k", "v"], feedforward_modules=["fc2"])
    config = sk.IA3Config(target_modules=["k", "fc2"], feedforward_modules=["fc2"])
    assert config.feedforward_modules == ("fc2",)
    # a regex on either side cannot be compared as sets (as in PEFT): accepted, resolved per module
    assert sk.IA3Config(target_modules=r".*\.(k|fc2)", feedforward_modules=["fc2"])


def test_config_rejects_bad_values() -> None:
    with pytest.raises(sk.ShiftkitError, match="init_ia3_weights"):
        sk.IA3Config(init_ia3_weights="yes")  # type: ignore[arg-type]
    with pytest.raises(sk.ShiftkitError, match="feedforward_modules"):
        sk.IA3Config(feedforward_modules=[1])  # type: ignore[list-item]


# --- formulas --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_linear_output_side(bias: bool) -> None:
    lin = nn.Linear(5, 4, bias=bias)
    w = lin.weight.detach().clone()
    b = None if lin.bias is None else lin.bias.detach().clone()
    model, ia3 = _wrap_single(lin, ff=False)
    assert ia3.ia3_l.shape == (4, 1)
    l_out = ia3.ia3_l.detach().flatten()
    x = torch.randn(2, 3, 5)
    expected = (x @ w.T + (0 if b is None else b)) * l_out  # PEFT scales the bias too
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    sk.fold_(model)
    torch.testing.assert_close(lin.weight, l_out[:, None] * w)  # W' = diag(l) W
    if b is not None:
        torch.testing.assert_close(lin.bias, l_out * b)  # b' = l ⊙ b
    else:
        assert lin.bias is None
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_linear_feedforward_scales_the_input() -> None:
    lin = nn.Linear(6, 3)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    model, ia3 = _wrap_single(lin, ff=True)
    assert ia3.ia3_l.shape == (1, 6)
    l_in = ia3.ia3_l.detach().flatten()
    x = torch.randn(4, 6)
    expected = (x * l_in) @ w.T + b
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    sk.fold_(model)
    torch.testing.assert_close(lin.weight, w * l_in[None, :])  # W' = W diag(l)
    assert torch.equal(lin.bias, b)  # the bias is not scaled on the input side
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("ff", [False, True])
def test_conv2d(ff: bool, groups: int) -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    model, ia3 = _wrap_single(conv, ff=ff)
    channels = 4 if ff else 6
    assert ia3.ia3_l.shape == (1, channels, 1, 1)
    scale = ia3.ia3_l.detach()
    x = torch.randn(2, 4, 5, 5)
    if ff:
        expected = F.conv2d(x * scale, w, b, padding=1, groups=groups)
    else:
        expected = F.conv2d(x, w, b, padding=1, groups=groups) * scale
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x[0]), expected[0], atol=1e-5, rtol=1e-5)  # unbatched input
    sk.fold_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_init_is_ones_or_standard_normal() -> None:
    model = nn.Sequential(nn.Linear(4, 300), nn.ReLU(), nn.Linear(300, 2))
    sk.attach_(model, sk.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    assert torch.equal(model[0].ia3_l, torch.ones(300, 1))
    assert torch.equal(model[2].ia3_l, torch.ones(1, 300))
    sk.detach_(model)
    sk.attach_(model, sk.IA3Config(target_modules=["0"], init_ia3_weights=False))
    values = model[0].ia3_l.detach()
    assert abs(float(values.mean())) < 0.25 and 0.75 < float(values.std()) < 1.25


def test_default_targets_need_a_known_architecture() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(sk.ShiftkitError):
        sk.attach_(model, sk.IA3Config())
    # a model that happens to have a "value" layer is still not recognised as BERT-like
    odd = nn.ModuleDict({"value": nn.Linear(3, 3), "other": nn.Linear(3, 3)})
    with pytest.raises(sk.ShiftkitError, match="target_modules is required"):
        sk.attach_(odd, sk.IA3Config())
    assert not [m for m in odd.modules() if isinstance(m, IA3Linear)]  # rolled back


# --- against the peft package ----------------------------------------------------------------------------
def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config).eval()


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def _output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build", [_tiny_bert, _tiny_llama], ids=["bert", "llama"])
def test_default_config_agrees_with_peft(build: object) -> None:
    peft = pytest.importorskip("peft")
    from peft.tuners.ia3 import IA3Layer

    torch.manual_seed(0)
    base = build()  # type: ignore[operator]
    ours = copy.deepcopy(base)
    # PEFT picks targets and feedforward modules from its model-type mappings; random vectors (not ones)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False)).eval()
    sk.attach_(ours, sk.IA3Config())
    inner = theirs.base_model.model
    peft_layers = {n: m for n, m in inner.named_modules() if isinstance(m, IA3Layer)}
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    assert set(our_layers) == set(peft_layers) and peft_layers
    for name, layer in peft_layers.items():
        assert our_layers[name].is_feedforward == layer.is_feedforward, name
        assert our_layers[name].ia3_l.shape == layer.ia3_l["default"].shape, name
        with torch.no_grad():
            our_layers[name].ia3_l.copy_(layer.ia3_l["default"])
    assert any(m.is_feedforward for m in our_layers.values())
    assert not all(m.is_feedforward for m in our_layers.values())
    # the shift file is PEFT's adapter state dict up to the key prefix
    peft_state = peft.get_peft_model_state_dict(theirs)
    ours_state = sk.extract(ours).tensors
    assert {f"base_model.model.{k}" for k in ours_state} == set(peft_state)
    for k, t in ours_state.items():
        assert torch.equal(t, peft_state[f"base_model.model.{k}"]), k
    trainable_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in sk.shift_parameters(ours)) == trainable_theirs

    ids = torch.randint(0, 40, (2, 7))
    y_theirs, y_ours = _output(theirs, ids), _output(ours, ids)
    assert not torch.allclose(y_ours, _output(base, ids), atol=1e-3)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    # fold == merge_and_unload, parameter by parameter
    merged = theirs.merge_and_unload()
    sk.fold_(ours)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in merged.named_parameters()]
    for (n, p), (_, q) in zip(ours.named_parameters(), merged.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=n)
    torch.testing.assert_close(_output(ours, ids), y_theirs, atol=1e-5, rtol=1e-5)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 6)
        self.conv = nn.Conv2d(6, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 1, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, 6) -> (N, 3)
        h = self.fc2(torch.relu(self.k(x)))
        img = h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 3)  # (N, 6, T, 3)
        img = self.down(torch.relu(self.conv(img)))
        return self.head(img.mean((2, 3)))


def test_custom_targets_with_convs_agree_with_peft() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Net().eval()
    ours = copy.deepcopy(base)
    targets, ff = ["k", "fc2", "conv", "down"], ["fc2", "down"]
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False),
    ).eval()
    sk.attach_(ours, sk.IA3Config(target_modules=targets, feedforward_modules=ff))
    inner = theirs.base_model.model
    with torch.no_grad():
        for name in targets:
            theirs_l = inner.get_submodule(name).ia3_l["default"]
            getattr(ours, name).ia3_l.copy_(theirs_l)
            assert getattr(ours, name).is_feedforward == (name in ff)
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        y_theirs, y_ours = theirs(x), ours(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    merged = theirs.merge_and_unload()
    sk.fold_(ours)
    for (n, p), (_, q) in zip(ours.named_parameters(), merged.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=n)


def test_explicit_targets_keep_the_architecture_feedforward_default() -> None:
    """As PEFT: ``feedforward_modules=None`` falls back to the model family's mapping, not to "none"."""
    bert_like = nn.ModuleDict(
        {
            "key": nn.Linear(4, 4),
            "value": nn.Linear(4, 4),
            "output": nn.ModuleDict({"dense": nn.Linear(4, 4)}),
        }
    )
    sk.attach_(bert_like, sk.IA3Config(target_modules=["value", "output.dense"]))
    assert bert_like["output"]["dense"].is_feedforward  # type: ignore[index]
    assert not bert_like["value"].is_feedforward
    assert not isinstance(bert_like["key"], IA3Linear)
    sk.detach_(bert_like)
    sk.attach_(bert_like, sk.IA3Config(target_modules=["value", "output.dense"], feedforward_modules=[]))
    assert not bert_like["output"]["dense"].is_feedforward  # type: ignore[index]
