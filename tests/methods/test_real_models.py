"""Every method on a real pretrained model: all-MiniLM-L6-v2 (6-layer BERT, hidden 384), offline."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import shiftkit as sk
from conftest import need_asset

pytestmark = pytest.mark.assets

SENTENCES = ["The movie was wonderful.", "Shipping took far too long and the box was damaged."]


@pytest.fixture(scope="module")
def minilm() -> Iterator[tuple[nn.Module, dict[str, torch.Tensor]]]:
    need_asset("minilm")
    from shiftkit import zoo

    model, tok = zoo.load_model("minilm")
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    # two short sentences are far too little work to share between threads: on a busy 2-core machine one
    # thread is ~20x faster per op (measured 0.02 s vs 0.55 s per forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model.eval(), batch
    torch.set_num_threads(threads)


def _hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).last_hidden_state


def _expected_trainable(model: nn.Module, method: str) -> int:
    """The trainable count from each method's formula, computed from the untouched model."""
    if method == "lora":  # r · (in + out) per targeted Linear
        r = 8
        return sum(
            r * (m.in_features + m.out_features)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ("query", "value")
        )
    if method == "ssf":  # a scale and a shift per output channel of every Linear and LayerNorm
        return sum(
            2 * (m.out_features if isinstance(m, nn.Linear) else m.weight.numel())
            for m in model.modules()
            if isinstance(m, nn.Linear | nn.LayerNorm)
        )
    # bitfit: one offset per existing bias of a supported module
    return sum(
        m.bias.numel()
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.LayerNorm) and getattr(m, "bias", None) is not None
    )


CONFIGS: dict[str, Any] = {
    "lora": lambda: sk.LoRAConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
    "ssf": lambda: sk.SSFConfig(target_modules="all"),
    "bitfit": lambda: sk.BitFitConfig(target_modules="all"),
}


def test_lora_count_matches_the_paper_arithmetic(minilm: tuple[nn.Module, dict[str, torch.Tensor]]) -> None:
    model, _ = minilm
    layers, hidden, r = model.config.num_hidden_layers, model.config.hidden_size, 8
    assert (layers, hidden) == (6, 384)
    assert _expected_trainable(model, "lora") == layers * 2 * (r * hidden + hidden * r) == 73_728


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_method_on_minilm(
    method: str, minilm: tuple[nn.Module, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    pristine, batch = minilm  # never modified: the reference for "bit for bit"
    model = copy.deepcopy(pristine)
    with torch.no_grad():
        y_base = _hidden(model, batch)

    sk.attach_(model, CONFIGS[method]())
    params = sk.shift_parameters(model)
    assert sum(p.numel() for p in params) == _expected_trainable(pristine, method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in params)
    assert trainable < 0.01 * sum(p.numel() for p in pristine.parameters())

    # forward + backward (through the pooler too, which SSF/BitFit also shift): grads reach exactly the shift
    model.train()
    out = model(**batch)
    (out.last_hidden_state.square().mean() + out.pooler_output.square().mean()).backward()
    shift_ids = {id(p) for p in params}
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for p in model.parameters() if id(p) not in shift_ids)
    model.eval()

    with torch.no_grad():  # move away from the (near-)identity start so that every check below bites
        for p in params:
            p.grad = None
            p.add_(torch.randn_like(p) * 0.02)
        y_shifted = _hidden(model, batch)
    assert (y_shifted - y_base).abs().max() > 1e-3
    path = tmp_path / f"{method}.safetensors"
    sk.save(sk.extract(model), path)

    # detach: the base comes back bit for bit
    sk.detach_(model)
    state, reference = model.state_dict(), pristine.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(_hidden(model, batch), y_base)

    # load → attach to the (now fresh) base: identical outputs
    sk.attach_(model, sk.load(path))
    with torch.no_grad():
        assert torch.equal(_hidden(model, batch), y_shifted)

    # fold: same hidden states, plain architecture
    sk.fold_(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in pristine.modules()]
    with torch.no_grad():
        torch.testing.assert_close(_hidden(model, batch), y_shifted, atol=1e-4, rtol=1e-4)
