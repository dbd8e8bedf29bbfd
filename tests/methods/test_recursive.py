"""Relaxed recursive transformers pinned to the spec's checks (learn.md §3.5), on a tiny transformers Llama.

Expected values come from the formulas, computed here from the original weights with plain torch:
``W_shared[k] = mean of the tied layers``, ``‖W_shared + BA − W‖_F = sqrt(Σ_{i>r} σ_i²(R))``, and the
parameter count ``K·(tied params per layer) + Σ r·(in + out) + untied``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import shiftkit as sk
from shiftkit.methods.recursive import (
    RecursiveConfig,
    RecursiveLinear,
    find_layer_stack,
    recursive_parameter_count,
    slot_sources,
    tie_slots,
)
from tiny_models import make

L, N, K = 4, 2, 2
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
PROJ += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
SLOTS = {"cycle": [0, 1, 0, 1], "sequence": [0, 0, 1, 1]}  # ℓ mod K and ⌊ℓ/N⌋ for L=4, N=2


def _llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=L,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        return LlamaForCausalLM(config).to(dtype).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def _weight(model: nn.Module, layer: int, proj: str) -> torch.Tensor:
    module = model.model.layers[layer].get_submodule(proj)
    return (module.base if isinstance(module, RecursiveLinear) else module).weight


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


@pytest.mark.parametrize("sharing", ["cycle", "sequence"])
def test_full_rank_reconstructs_every_weight_and_the_logits(sharing: str) -> None:
    model64 = _llama(torch.float64)
    sk.attach_(model64, RecursiveConfig(num_loops=N, sharing=sharing, r=64))  # r ≥ min(in, out) = 32
    for layer in range(L):
        for proj in PROJ:
            wrapper = model64.model.layers[layer].get_submodule(proj)
            assert isinstance(wrapper, RecursiveLinear) and wrapper.slot == SLOTS[sharing][layer]
            want = wrapper.base.weight
            err = (wrapper.effective_params()["weight"] - want).abs().max() / want.abs().max()
            assert err <= 1e-12, (layer, proj, float(err))
    model = _llama()
    expected = _logits(model)
    sk.attach_(model, RecursiveConfig(num_loops=N, sharing=sharing, r=64))
    torch.testing.assert_close(_logits(model), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sharing", ["cycle", "sequence"])
@torch.no_grad()
def test_shared_weights_are_the_mean_and_rank_r_error_is_eckart_young(sharing: str) -> None:
    model = _llama(torch.float64)
    original = copy.deepcopy(model)
    r = 3
    sk.attach_(model, RecursiveConfig(num_loops=N, sharing=sharing, r=r))
    for proj in PROJ:
        for layer in range(L):
            tied = [ell for ell in range(L) if SLOTS[sharing][ell] == SLOTS[sharing][layer]]
            mean = sum(_weight(original, ell, proj) for ell in tied) / len(tied)
            wrapper = model.model.layers[layer].get_submodule(proj)
            torch.testing.assert_close(wrapper.shared.weight, mean, atol=1e-14, rtol=0)
            residual = _weight(original, layer, proj) - mean
            sigma = torch.linalg.svdvals(residual)
            want = sigma[r:].square().sum().sqrt()
            got = torch.linalg.matrix_norm(
                wrapper.effective_params()["weight"] - _weight(original, layer, proj)
            )
            assert abs(float(got - want)) <= 1e-10 * float(sigma[0]), (layer, proj)
            assert wrapper.lora_A.shape == (r, residual.shape[1]) and wrapper.lora_B.shape == (
                residual.shape[0],
                r,
            )


def test_tied_layers_share_one_parameter_saved_once() -> None:
    model = _llama()
    sk.attach_(model, RecursiveConfig(num_loops=N, sharing="cycle", r=2))
    layers = model.model.layers
    for proj in PROJ:
        assert layers[0].get_submodule(proj).shared is layers[2].get_submodule(proj).shared
        assert layers[1].get_submodule(proj).shared is layers[3].get_submodule(proj).shared
        assert layers[0].get_submodule(proj).shared is not layers[1].get_submodule(proj).shared
    names = list(sk.named_shift_parameters(model))
    shared = [n for n in names if n.endswith("shared.weight")]
    assert len(shared) == K * len(PROJ)  # one per slot and projection, under the first tied layer
    assert all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in shared)
    assert len([n for n in names if n.endswith("lora_A")]) == L * len(PROJ)


def test_rank_zero_is_the_strict_recursive_model() -> None:
    model = _llama()
    strict = copy.deepcopy(model)
    sk.attach_(model, RecursiveConfig(num_loops=N, sharing="sequence", r=0))
    assert all(n.endswith("shared.weight") for n in sk.named_shift_parameters(model))
    with torch.no_grad():  # the strict model built by hand: each tied pair computes with its mean
        for proj in PROJ:
            for pair in ([0, 1], [2, 3]):
                mean = sum(_weight(strict, ell, proj) for ell in pair) / 2
                for ell in pair:
                    _weight(strict, ell, proj).copy_(mean)
    torch.testing.assert_close(_logits(model), _logits(strict), atol=1e-5, rtol=1e-5)
    for proj in PROJ:  # tied layers compute with the same weights
        w0 = model.model.layers[0].get_submodule(proj).effective_params()["weight"]
        assert torch.equal(w0, model.model.layers[1].get_submodule(proj).effective_params()["weight"])


def test_stepwise_init_selects_layers_from_linspace() -> None:
    want = np.round(np.linspace(0, L - 1, K)).astype(int).tolist()  # the spec's round(linspace(0, L−1, K))
    assert [s[0] for s in slot_sources(tie_slots(L, N, "cycle"), "stepwise")] == want == [0, 3]
    model = _llama()
    original = copy.deepcopy(model)
    sk.attach_(model, RecursiveConfig(num_loops=N, init="stepwise", r=0))
    for proj in PROJ:
        for k, source in enumerate(want):
            shared = model.model.layers[k].get_submodule(proj).shared.weight  # cycle: layer k is in slot k
            assert torch.equal(shared, _weight(original, source, proj))
    assert slot_sources([0, 1, 2, 0, 1, 2], "lower") == [[0], [1], [2]]
    assert slot_sources([0, 1, 2, 0, 1, 2], "upper") == [[3], [4], [5]]


def test_tie_slots_formulas_and_stepwise_on_thirty_layers() -> None:
    assert tie_slots(30, 2, "cycle") == [ell % 15 for ell in range(30)]
    assert tie_slots(30, 2, "sequence") == [ell // 2 for ell in range(30)]
    picks = [s[0] for s in slot_sources(tie_slots(30, 2), "stepwise")]
    assert picks == np.round(np.linspace(0, 29, 15)).astype(int).tolist()  # numpy as the reference
    assert picks[0] == 0 and picks[-1] == 29


def test_parameter_count_formula() -> None:
    model = _llama()
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(model.model.layers[0].get_submodule(p).weight.numel() for p in PROJ)
    lora_per_layer = sum(sum(model.model.layers[0].get_submodule(p).weight.shape) for p in PROJ)
    r = 4
    sk.attach_(model, RecursiveConfig(num_loops=N, r=r))
    count = recursive_parameter_count(model)
    untied = total - L * per_layer
    assert count["original"] == total
    assert count["untied"] == untied
    assert count["shared"] == K * per_layer
    assert count["lora"] == L * r * lora_per_layer
    assert count["recursive"] == K * per_layer + L * r * lora_per_layer + untied
    assert count["reduction"] == pytest.approx(1 - count["recursive"] / total)
    # the shift file holds exactly the shared weights and the LoRAs
    assert sum(t.numel() for t in sk.extract(model).tensors.values()) == count["shared"] + count["lora"]


def test_save_load_attach_on_a_fresh_model_and_fold_reproduce(tmp_path: Path) -> None:
    model = _llama()
    sk.attach_(model, RecursiveConfig(num_loops=N, sharing="sequence", r=3))
    with torch.no_grad():
        for p in sk.shift_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    expected = _logits(model)
    sk.save(sk.extract(model), tmp_path / "rec.safetensors")
    fresh = _llama()
    sk.attach_(fresh, sk.load(tmp_path / "rec.safetensors"))
    assert torch.equal(_logits(fresh), expected)
    layers = fresh.model.layers
    assert layers[0].self_attn.q_proj.shared is layers[1].self_attn.q_proj.shared  # still tied
    sk.fold_(fresh)  # un-tie: a vanilla Llama computing the relaxed model
    assert type(layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(_logits(fresh), expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(layers[0].self_attn.q_proj.weight, layers[1].self_attn.q_proj.weight)


def test_detach_restores_the_original_model() -> None:
    model = _llama()
    expected = _logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sk.attach_(model, RecursiveConfig(num_loops=N, r=0))
    assert not torch.allclose(_logits(model), expected)
    sk.detach_(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model), expected)


def test_biases_are_averaged_and_tied_on_bert() -> None:
    model, ids = make("tiny_bert")  # 2 layers with biased Linears
    expected = model(ids)
    sk.attach_(model, RecursiveConfig(num_loops=2, r=64))
    layer = model.hf.encoder.layer
    q0, q1 = layer[0].attention.self.query, layer[1].attention.self.query
    assert q0.shared is q1.shared
    torch.testing.assert_close(q0.shared.bias, (q0.base.bias + q1.base.bias) / 2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=0)  # full rank: unchanged


def test_layer_stack_discovery_and_outside_targets() -> None:
    model = _llama()
    name, stack = find_layer_stack(model)
    assert name == "model.layers" and stack is model.model.layers
    bert, _ = make("tiny_bert")
    assert find_layer_stack(bert)[0] == "hf.encoder.layer"
    sk.attach_(model, RecursiveConfig(r=1))  # default targets: every Linear; the head stays as it is
    assert type(model.lm_head) is nn.Linear  # outside the layer stack: left unwrapped
    sk.detach_(model)
    sk.attach_(model, RecursiveConfig(r=1, target_modules=["q_proj", "v_proj"], layers="model.layers"))
    assert isinstance(model.model.layers[3].self_attn.v_proj, RecursiveLinear)
    assert type(model.model.layers[3].self_attn.k_proj) is nn.Linear


def test_clear_errors() -> None:
    model = _llama()
    with pytest.raises(sk.ShiftkitError, match="divisible by num_loops"):
        sk.attach_(model, RecursiveConfig(num_loops=3))
    with pytest.raises(sk.TargetNotFoundError, match="no layer stack"):
        sk.attach_(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), RecursiveConfig())
    with pytest.raises(sk.TargetNotFoundError, match=r"model\.nope"):
        sk.attach_(model, RecursiveConfig(layers="model.nope"))
    with pytest.raises(sk.ShiftkitError, match=r"not an nn\.ModuleList"):
        sk.attach_(model, RecursiveConfig(layers="model.norm"))
    with pytest.raises(sk.ShiftkitError, match="outside the layer stack"):
        sk.attach_(model, RecursiveConfig(target_modules=["lm_head", "q_proj"]))
    with pytest.raises(sk.ShiftkitError, match="in every layer"):
        sk.attach_(model, RecursiveConfig(target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    assert (
        not sk.shift_parameters(model) and type(model.lm_head) is nn.Linear
    )  # failed attaches left no trace
    for bad in ({"num_loops": 0}, {"r": -1}, {"sharing": "zigzag"}, {"init": "random"}, {"layers": ""}):
        with pytest.raises(sk.ShiftkitError):
            RecursiveConfig(**bad)  # type: ignore[arg-type]
