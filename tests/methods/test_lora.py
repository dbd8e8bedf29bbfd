"""LoRA pinned against the formula ``y = x Wᵀ + b + (α/r)·x Aᵀ Bᵀ`` and against the real peft package."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shiftkit as sk
from shiftkit.methods.lora import LoRAConv2d, LoRAEmbedding, LoRALinear
from tiny_models import TaggedLinear


@torch.no_grad()
def _fill(*params: torch.Tensor, std: float = 0.5) -> None:
    for p in params:
        p.normal_(0.0, std)


def _wrap_single(module: nn.Module, config: sk.LoRAConfig) -> nn.Module:
    model = nn.Sequential(module)
    sk.attach_(model, config.replace(target_modules=["0"]))
    return model


# --- formula ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_the_formula(bias: bool) -> None:
    r, alpha = 3, 6.0
    model = _wrap_single(nn.Linear(5, 4, bias=bias), sk.LoRAConfig(r=r, lora_alpha=alpha))
    lora = model[0]
    assert isinstance(lora, LoRALinear)
    assert lora.lora_A.shape == (r, 5) and lora.lora_B.shape == (4, r)
    _fill(lora.lora_A, lora.lora_B)
    x = torch.randn(2, 7, 5)
    w, a, b = lora.base.weight, lora.lora_A, lora.lora_B
    expected = x @ w.T + (alpha / r) * (x @ a.T) @ b.T
    if bias:
        expected = expected + lora.base.bias
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    # the effective weight seen by code that reads .weight, and the fold
    torch.testing.assert_close(lora.weight, w + (alpha / r) * b @ a, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        y = model(x)
    sk.fold_(model)
    torch.testing.assert_close(model(x), y, atol=1e-6, rtol=1e-6)
    assert isinstance(model[0], nn.Linear) and (model[0].bias is not None) == bias


def test_rslora_scales_by_alpha_over_sqrt_r() -> None:
    r, alpha = 4, 3.0
    plain = _wrap_single(nn.Linear(5, 4), sk.LoRAConfig(r=r, lora_alpha=alpha))
    rs = copy.deepcopy(plain)
    sk.detach_(rs)
    sk.attach_(rs, sk.LoRAConfig(r=r, lora_alpha=alpha, use_rslora=True, target_modules=["0"]))
    _fill(plain[0].lora_A, plain[0].lora_B)
    with torch.no_grad():
        rs[0].lora_A.copy_(plain[0].lora_A)
        rs[0].lora_B.copy_(plain[0].lora_B)
    x = torch.randn(3, 5)
    base = plain[0].base(x)
    # the LoRA branch is the same product, scaled by α/√r instead of α/r
    torch.testing.assert_close(
        rs(x) - base, (plain(x) - base) * (alpha / math.sqrt(r)) / (alpha / r), atol=1e-6, rtol=1e-5
    )
    assert rs[0].scaling == pytest.approx(alpha / math.sqrt(r))


def test_init_follows_peft() -> None:
    fan_in = 400
    model = _wrap_single(nn.Linear(fan_in, 300), sk.LoRAConfig(r=16))
    a, b = model[0].lora_A.detach(), model[0].lora_B.detach()
    bound = 1 / math.sqrt(fan_in)  # Kaiming uniform with a=√5 is U(-1/√in, 1/√in)
    assert bool((b == 0).all())
    assert float(a.abs().max()) <= bound
    assert float(a.abs().max()) > 0.98 * bound
    assert float(a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.03)  # std of U(-c, c) is c/√3
    assert abs(float(a.mean())) < 0.05 * bound


def test_gaussian_and_random_inits() -> None:
    r = 8
    gauss = _wrap_single(nn.Linear(500, 10), sk.LoRAConfig(r=r, init_lora_weights="gaussian"))[0]
    assert float(gauss.lora_A.detach().std()) == pytest.approx(1 / r, rel=0.05)
    assert bool((gauss.lora_B == 0).all())
    noisy = _wrap_single(nn.Linear(20, 10), sk.LoRAConfig(r=r, init_lora_weights=False))[0]
    assert float(noisy.lora_B.detach().abs().sum()) > 0


def test_dropout_applies_only_to_the_branch_and_only_in_train_mode() -> None:
    model = _wrap_single(nn.Linear(30, 20), sk.LoRAConfig(r=4, lora_dropout=0.5))
    _fill(model[0].lora_A, model[0].lora_B)
    x = torch.randn(8, 30)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    y1 = model(x)
    torch.manual_seed(2)
    y2 = model(x)
    assert not torch.equal(y1, y2)


def test_subclass_of_linear_is_wrapped_and_its_forward_used() -> None:
    model = nn.Sequential(TaggedLinear(4, 3, tag="mine"))
    sk.attach_(model, sk.LoRAConfig(r=2, target_modules="all"))
    assert isinstance(model[0], LoRALinear) and model[0].tag == "mine"


# --- Conv2d ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "bias"), [(1, 0, 1, True), (2, 1, 1, False), (1, 2, 2, True)]
)
def test_conv2d_matches_an_explicit_conv(stride: int, padding: int, dilation: int, bias: bool) -> None:
    r, alpha = 2, 5.0
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    model = _wrap_single(conv, sk.LoRAConfig(r=r, lora_alpha=alpha))
    lora = model[0]
    assert isinstance(lora, LoRAConv2d)
    assert lora.lora_A.shape == (r, 3, 3, 3) and lora.lora_B.shape == (4, r, 1, 1)
    _fill(lora.lora_A, lora.lora_B)
    x = torch.randn(2, 3, 9, 9)
    s = alpha / r
    # the branch: a k×k conv to r channels with the base's geometry, then a 1×1 conv
    h = F.conv2d(x, lora.lora_A, None, stride, padding, dilation)
    expected = conv(x) + s * F.conv2d(h, lora.lora_B)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # the folded kernel: ΔW[o, i, u, v] = s Σ_k B[o, k] A[k, i, u, v]
    kernel = s * torch.einsum("ok,kiuv->oiuv", lora.lora_B[:, :, 0, 0], lora.lora_A)
    torch.testing.assert_close(lora.delta()["weight"], kernel, atol=1e-6, rtol=1e-6)
    y = expected.detach()
    sk.fold_(model)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    assert model[0] is conv  # folded in place: the original module, with the new kernel


def test_grouped_conv_is_refused_with_its_name() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(sk.ShiftkitError, match="groups"):
        sk.attach_(model, sk.LoRAConfig(target_modules=["0"]))
    assert isinstance(model[0], nn.Conv2d)


# --- Embedding -------------------------------------------------------------------------------------------
def test_embedding_matches_the_formula() -> None:
    r, alpha = 3, 6.0
    emb = nn.Embedding(10, 4, padding_idx=0)
    model = _wrap_single(emb, sk.LoRAConfig(r=r, lora_alpha=alpha))
    lora = model[0]
    assert isinstance(lora, LoRAEmbedding)
    assert lora.lora_A.shape == (r, 10) and lora.lora_B.shape == (4, r)
    assert (
        bool((lora.lora_A == 0).all()) and float(lora.lora_B.detach().abs().sum()) > 0
    )  # PEFT: A zero, B normal
    ids = torch.tensor([[0, 3, 9], [1, 1, 4]])
    assert torch.equal(model(ids), emb(ids))
    _fill(lora.lora_A)
    a, b = lora.lora_A, lora.lora_B
    expected = emb.weight[ids] + (alpha / r) * a.T[ids] @ b.T
    torch.testing.assert_close(model(ids), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lora.weight, emb.weight + (alpha / r) * (b @ a).T, atol=1e-6, rtol=1e-6)
    y = expected.detach()
    sk.fold_(model)
    torch.testing.assert_close(model(ids), y, atol=1e-6, rtol=1e-6)
    assert model[0].padding_idx == 0


# --- against the peft package ----------------------------------------------------------------------------
class _PeftNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 6, 1)  # not targeted: a module both libraries must leave alone
        self.q = nn.Linear(6, 8)
        self.v = nn.Linear(8, 6, bias=False)
        self.img = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.out = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (N, T, 6)
        h = self.v(torch.tanh(self.q(h)))  # (N, T, 6)
        img = h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 4)  # (N, 6, T, 4)
        return self.out(self.img(img).mean((2, 3)))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_agrees_with_peft(use_rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _PeftNet().eval()
    ours = copy.deepcopy(base)
    targets = ["emb", "q", "v", "img"]
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora),
    ).eval()
    sk.attach_(ours, sk.LoRAConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora))
    inner = theirs.base_model.model
    with torch.no_grad():
        for name in ("q", "v", "img"):  # PEFT's B starts at zero: give both sides the same random pair
            a = inner.get_submodule(name).lora_A["default"].weight
            b = inner.get_submodule(name).lora_B["default"].weight
            _fill(a, b)
            getattr(ours, name).lora_A.copy_(a)
            getattr(ours, name).lora_B.copy_(b)
        ea = inner.emb.lora_embedding_A["default"]
        eb = inner.emb.lora_embedding_B["default"]
        _fill(ea, eb)
        ours.emb.lora_A.copy_(ea)
        ours.emb.lora_B.copy_(eb)
    ids = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        y_theirs, y_ours = theirs(ids), ours(ids)
    assert not torch.allclose(y_ours, base(ids), atol=1e-3)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-6, rtol=1e-6)
    # trainable parameter count: PEFT's own figure
    trainable_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in sk.shift_parameters(ours)) == trainable_theirs
    # fold == merge_and_unload
    merged = theirs.merge_and_unload()
    sk.fold_(ours)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in merged.named_parameters()]
    for (n, p), (_, q) in zip(ours.named_parameters(), merged.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), merged(ids), atol=1e-6, rtol=1e-6)
