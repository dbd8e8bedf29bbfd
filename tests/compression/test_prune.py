"""Light-PEFT's base pruning (``shiftkit.compression.prune``): masks of 1 change nothing, a zero mask equals
removing the unit, quantile selection counts, and refusals (spec §8.1 sanity checks)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import shiftkit as sk
from shiftkit.compression.prune import attach_masks_, find_layers, prune_, select_units
from shiftkit.errors import ShiftkitError
from tiny_models import make


def _bert() -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=36,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config).eval(), torch.randint(0, 40, (2, 7))


@torch.no_grad()
def test_unit_masks_change_nothing_and_zero_masks_equal_pruning() -> None:
    model, x = _bert()
    ref = model(x).last_hidden_state
    masks = attach_masks_(model)
    assert [ly.heads for ly in masks.layers] == [4, 4] and masks.l1().item() == 2 * (4 + 36)
    assert torch.equal(model(x).last_hidden_state, ref)
    masks.head[0][1] = 0.0
    masks.head[1][3] = 0.0
    masks.ffn[0][[2, 5, 30]] = 0.0
    masked = model(x).last_hidden_state
    masks.remove()
    pruned = prune_(
        copy.deepcopy(model),
        {"encoder.layer.0": [1], "encoder.layer.1": [3]},
        {"encoder.layer.0": [2, 5, 30]},
    )
    assert torch.allclose(pruned(x).last_hidden_state, masked, atol=1e-5)
    assert pruned.encoder.layer[0].attention.self.query.out_features == 18
    assert pruned.encoder.layer[0].attention.self.num_attention_heads == 3
    assert pruned.encoder.layer[0].output.dense.in_features == 33
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_select_units_by_quantiles() -> None:
    model, _ = _bert()
    masks = attach_masks_(model)
    with torch.no_grad():
        for m in [*masks.head, *masks.ffn]:
            m.copy_(torch.randperm(m.numel()).to(m.dtype))  # distinct values
    heads, neurons = select_units(masks, head_ratio=1 / 3, ffn_ratio=1 / 3)
    for layer, m_att, _ in masks:  # layer-wise: ⌈ρ·H⌉ = 2 of 4 (quantile at 1, interpolated)
        assert sorted(heads[layer.prefix]) == sorted(int(i) for i in torch.argsort(m_att)[: math.ceil(4 / 3)])
    total = sum(len(v) for v in neurons.values())
    assert total == math.ceil((2 * 36 - 1) / 3) or total == math.ceil(2 * 36 / 3)  # global over both layers
    with torch.no_grad():
        masks.head[0].fill_(1.0)  # all tied: the layer still keeps one head
    heads, _ = select_units(masks, head_ratio=0.5, ffn_ratio=0.0)
    assert len(heads["encoder.layer.0"]) == 3


def test_llama_ffn_pruning_and_refusals() -> None:
    model, x = make("tiny_llama")
    layers = find_layers(model)
    assert len(layers) == 2 and layers[0].ffn_in[0].endswith("mlp.gate_proj")
    masks = attach_masks_(model)
    with torch.no_grad():
        masks.ffn[1][[0, 7]] = 0.0
        masked = model(x)
    masks.remove()
    pruned = prune_(copy.deepcopy(model), None, {layers[1].prefix: [0, 7]})
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked, atol=1e-5)
    with pytest.raises(ShiftkitError, match="grouped-query"):
        prune_(copy.deepcopy(model), {layers[0].prefix: [0]})
    lora = sk.attach_(copy.deepcopy(model), sk.LoRAConfig(target_modules=["down_proj"]))
    with pytest.raises(ShiftkitError, match="detach or fold"):
        prune_(lora, None, {layers[0].prefix: [0]})
    with pytest.raises(ShiftkitError, match="found no transformer layer"):
        find_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ShiftkitError, match="head_ratio"):
        select_units(attach_masks_(copy.deepcopy(model)), head_ratio=1.0)


def test_masks_train_with_a_shift_and_l1() -> None:
    model, x = _bert()
    sk.attach_(model, sk.LoRAConfig(r=2, target_modules=["query", "value"]))
    masks = attach_masks_(model)  # after the shift: the hooks sit on the modules that run
    loss = model(x).last_hidden_state.square().mean() + 1e-4 * masks.l1()
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in masks.parameters())
