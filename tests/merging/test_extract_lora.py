"""``sk.extract_lora``: a LoRA shift from two checkpoints, held against the SVD formula, PEFT and mergekit.

The fine-tune's change of every 2-D weight is exactly rank 4 with singular values ``c·(8, 4, 2, 1)`` plus
noise of about 1e-6 per entry, so rank 4 recovers it to the noise level, and energy thresholds pick known
ranks (``Σσ²`` fractions 0.753, 0.941, 0.988, 1). Its final norm and one layer norm change too (saved in
full as ``modules_to_save``, as mergekit does), and the base is saved in shards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

import shiftkit as sk
from shiftkit.merging.stream.extract_lora import extract_lora

TINY: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": False,
}
SPECTRUM = torch.tensor([8.0, 4.0, 2.0, 1.0]) * 0.02
NOISE = 1e-6
SAVED = {"model.norm", "model.layers.0.input_layernorm"}


def _low_rank(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    out, inp = shape
    u, _ = torch.linalg.qr(torch.randn(out, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, 4, generator=g))
    return (u * SPECTRUM) @ v.T + NOISE * torch.randn(out, inp, generator=g)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "base", max_shard_size="20KB")  # sharded: read through the index
    g = torch.Generator().manual_seed(1)
    tuned = {}
    for k, v in base.items():
        if v.dim() == 2:  # every 2-D weight, embeddings and head included
            tuned[k] = v + _low_rank(tuple(v.shape), g)
        elif k.removesuffix(".weight") in SAVED:
            tuned[k] = v + 0.01 * torch.randn(v.shape, generator=g)
        else:
            tuned[k] = v.clone()
    deltas = {k: (tuned[k] - base[k]).to(torch.float64) for k in base}
    model.save_pretrained(root / "tuned", state_dict=dict(tuned))  # save_pretrained may consume the dict
    assert (root / "base" / "model.safetensors.index.json").exists()
    return {"root": root, "base": root / "base", "tuned": root / "tuned", "deltas": deltas, "tuned_sd": tuned}


def _model(path: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def _logits(model: Any) -> Tensor:
    ids = torch.arange(24).reshape(2, 12) % TINY["vocab_size"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _tail(delta: Tensor, r: int) -> float:
    """Eckart–Young, from torch.linalg.svdvals alone: ``√(Σ_{i>r} σ_i²) / ‖ΔW‖_F``."""
    s = torch.linalg.svdvals(delta.to(torch.float64))
    return math.sqrt(float(s[r:].square().sum()) / float(s.square().sum()))


LINEARS = [
    f"model.layers.{i}.{m}.weight"
    for i in range(TINY["num_hidden_layers"])
    for m in (
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    )
]


def test_rank4_recovers_the_shift_and_saves_changed_norms(llamas: dict[str, Any], tmp_path: Path) -> None:
    s = extract_lora(llamas["base"], llamas["tuned"], tmp_path / "lora.safetensors", rank=4, progress=False)
    assert sorted(layer.name for layer in s.layers) == sorted(LINEARS)  # no embeddings, no head
    assert {layer.rank for layer in s.layers} == {4} and s.rank == 4
    for layer in s.layers:
        expected = _tail(llamas["deltas"][layer.name], 4)
        noise = NOISE * math.sqrt(llamas["deltas"][layer.name].numel()) / float(SPECTRUM.norm())
        assert expected < 1.5 * noise  # at the noise level: ‖noise‖ / ‖ΔW‖
        assert layer.error == pytest.approx(expected, rel=0.05, abs=2e-7), layer.name
    # embeddings and head changed but are not LoRA targets by default: saved in full (mergekit)
    assert set(s.saved) == SAVED | {"model.embed_tokens", "lm_head"}
    assert s.skipped == {} and s.unchanged == []
    shift = sk.load(tmp_path / "lora.safetensors")
    assert shift.method == "lora" and shift.config.r == 4 and shift.config.lora_alpha == 4.0
    assert s.bytes_written == (tmp_path / "lora.safetensors").stat().st_size
    assert s.parameters == shift.numel
    # dense deltas of the factors ≈ ΔW; saved modules are the tuned values
    base_model = _model(llamas["base"])
    delta = sk.to_delta(shift, base=base_model)
    for name in LINEARS:
        torch.testing.assert_close(delta[name].double(), llamas["deltas"][name], atol=1e-5, rtol=0)
    for module in s.saved:
        torch.testing.assert_close(
            shift.tensors[f"{module}.saved.weight"], llamas["tuned_sd"][f"{module}.weight"], atol=0, rtol=0
        )
    # sk.apply_ of the delta (and sk.attach_ of the shift) turn the base into ≈ the tuned model
    tuned_logits = _logits(_model(llamas["tuned"]))
    sk.apply_(base_model, delta)
    torch.testing.assert_close(_logits(base_model), tuned_logits, atol=1e-4, rtol=1e-4)
    attached = sk.attach_(_model(llamas["base"]), shift)
    torch.testing.assert_close(_logits(attached), _logits(base_model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_errors_follow_eckart_young(llamas: dict[str, Any], rank: int) -> None:
    s = extract_lora(llamas["base"], llamas["tuned"], rank=rank, progress=False)
    for layer in s.layers:
        assert layer.rank == rank
        expected = _tail(llamas["deltas"][layer.name], rank)
        assert layer.error == pytest.approx(expected, rel=1e-5), layer.name
        kept = 1.0 - expected**2
        assert layer.energy == pytest.approx(kept, rel=1e-6)
    assert s.max_error == max(layer.error for layer in s.layers)
    assert s.worst(2)[0].error == s.max_error and len(s.worst(2)) == 2


@pytest.mark.parametrize(
    ("energy", "cap", "expected"), [(0.7, 32, 1), (0.9, 32, 2), (0.95, 32, 3), (0.99, 32, 4), (1.0, 3, 3)]
)
def test_energy_picks_the_expected_ranks(
    llamas: dict[str, Any], energy: float, cap: int, expected: int
) -> None:
    s = extract_lora(llamas["base"], llamas["tuned"], rank=cap, energy=energy, progress=False)
    assert {layer.rank for layer in s.layers} == {expected}
    assert all(layer.energy >= min(energy, 0.98) for layer in s.layers)


def test_energy_one_keeps_the_full_rank_up_to_the_cap(llamas: dict[str, Any]) -> None:
    s = extract_lora(llamas["base"], llamas["tuned"], rank=64, energy=1.0, progress=False)
    for layer in s.layers:  # the noise makes ΔW full rank: every singular value is kept
        assert layer.rank == min(layer.shape) and layer.error < 1e-6
    # one r per shift file: a layer of smaller rank is padded with zeros (k_proj/v_proj have 8 rows)
    assert s.rank == 16 and s.shift.tensors["model.layers.0.self_attn.k_proj.lora_A"].shape == (16, 16)


def test_peft_folder_loads_in_peft_and_matches_the_shift(llamas: dict[str, Any], tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "adapter"
    s = extract_lora(
        llamas["base"],
        llamas["tuned"],
        out,
        rank=4,
        energy=0.99,
        targets=["mlp", "self_attn"],
        progress=False,
    )
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert set(config["modules_to_save"]) == SAVED | {"model.embed_tokens", "lm_head"}
    peft_model = PeftModel.from_pretrained(_model(llamas["base"]), str(out)).eval()
    tuned = _logits(_model(llamas["tuned"]))
    torch.testing.assert_close(_logits(peft_model), tuned, atol=1e-4, rtol=1e-4)
    ours = sk.attach_(_model(llamas["base"]), s.shift)
    torch.testing.assert_close(_logits(peft_model), _logits(ours), atol=1e-6, rtol=1e-6)


def test_per_layer_ranks_become_a_peft_rank_pattern(llamas: dict[str, Any], tmp_path: Path) -> None:
    from peft import PeftModel

    # a second fine-tune whose layer-0 q_proj change is rank 2: energy 0.999 gives it rank 2, the rest 4
    root = tmp_path / "m"
    tuned = dict(llamas["tuned_sd"])
    name = "model.layers.0.self_attn.q_proj.weight"
    model = _model(llamas["base"])
    g = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(16, 2, generator=g))
    v, _ = torch.linalg.qr(torch.randn(16, 2, generator=g))
    tuned[name] = model.state_dict()[name] + (u * torch.tensor([0.1, 0.05])) @ v.T
    model.save_pretrained(root / "tuned", state_dict=dict(tuned))
    out = tmp_path / "adapter"
    s = extract_lora(llamas["base"], root / "tuned", out, rank=8, energy=0.999, progress=False)
    ranks = {layer.name: layer.rank for layer in s.layers}
    assert ranks[name] == 2 and {r for k, r in ranks.items() if k != name} == {4}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights[f"base_model.model.{name[:-7]}.lora_A.weight"].shape == (2, 16)
    assert s.parameters == sum(w.numel() for w in weights.values())
    peft_model = PeftModel.from_pretrained(_model(llamas["base"]), str(out)).eval()
    ours = sk.attach_(_model(llamas["base"]), s.shift)  # the shift file pads q_proj to r = 4
    assert s.shift.tensors[f"{name[:-7]}.lora_A"].shape == (4, 16)
    torch.testing.assert_close(_logits(peft_model), _logits(ours), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(peft_model), _logits(_model(root / "tuned")), atol=1e-4, rtol=1e-4)


def test_embed_lora_factors_embeddings_and_head(llamas: dict[str, Any]) -> None:
    s = extract_lora(llamas["base"], llamas["tuned"], rank=4, embed_lora=True, progress=False)
    kinds = {layer.name: layer.kind for layer in s.layers}
    assert kinds["model.embed_tokens.weight"] == "embedding" and kinds["lm_head.weight"] == "linear"
    assert set(s.saved) == SAVED
    a, b = s.shift.tensors["model.embed_tokens.lora_A"], s.shift.tensors["model.embed_tokens.lora_B"]
    assert a.shape == (4, TINY["vocab_size"]) and b.shape == (TINY["hidden_size"], 4)  # PEFT's layout
    torch.testing.assert_close(
        (b @ a).T.double(), llamas["deltas"]["model.embed_tokens.weight"], atol=1e-5, rtol=0
    )
    model = sk.attach_(_model(llamas["base"]), s.shift)
    torch.testing.assert_close(_logits(model), _logits(_model(llamas["tuned"])), atol=1e-4, rtol=1e-4)


def test_targets_exclude_skip_others_and_dtype(llamas: dict[str, Any], tmp_path: Path) -> None:
    s = extract_lora(
        llamas["base"],
        llamas["tuned"],
        rank=4,
        targets="self_attn",
        exclude=[r"\.o_proj$"],
        others="skip",
        dtype="bfloat16",
        progress=False,
    )
    assert all("self_attn" in layer.name and "o_proj" not in layer.name for layer in s.layers)
    assert len(s.layers) == 6 and s.saved == {}
    # mergekit drops Linears its regexes leave out, and with --skip-undecomposable the norms
    assert "model.layers.0.mlp.up_proj.weight" in s.skipped
    assert "model.layers.1.self_attn.o_proj.weight" in s.skipped
    assert "model.norm.weight" in s.skipped and "lm_head.weight" in s.skipped
    assert all(t.dtype == torch.bfloat16 for t in s.shift.tensors.values())
    for layer in s.layers:  # bf16 storage rounding shows in the measured error
        assert 1e-5 < layer.error < 1e-2


def test_unchanged_weights_are_left_out(llamas: dict[str, Any], tmp_path: Path) -> None:
    # a fine-tune that only changed the attention: the MLP weights (ΔW = 0) get no factors
    root = tmp_path / "m"
    model = _model(llamas["base"])
    tuned = {k: (v if "self_attn" in k else model.state_dict()[k]) for k, v in llamas["tuned_sd"].items()}
    model.save_pretrained(root, state_dict=dict(tuned))
    s = extract_lora(llamas["base"], root, rank=4, progress=False)
    assert sorted(s.unchanged) == sorted(k for k in LINEARS if "mlp" in k)
    assert all("self_attn" in layer.name for layer in s.layers) and s.saved == {}
    with pytest.raises(sk.ShiftkitError, match="identical"):
        extract_lora(llamas["base"], llamas["base"], rank=4, progress=False)


def test_bad_input_is_named(llamas: dict[str, Any], tmp_path: Path) -> None:
    base, tuned = llamas["base"], llamas["tuned"]
    with pytest.raises(sk.ShiftkitError, match="nowhere"):
        extract_lora(tmp_path / "nowhere", tuned)
    with pytest.raises(sk.ShiftkitError, match="rank"):
        extract_lora(base, tuned, rank=0)
    for energy in (0.0, 1.5, -0.1):
        with pytest.raises(sk.ShiftkitError, match="energy"):
            extract_lora(base, tuned, energy=energy)
    with pytest.raises(sk.ShiftkitError, match="folder"):
        extract_lora(base, tuned, tmp_path / "x.safetensors", peft=True)
    (tmp_path / "exists.safetensors").write_bytes(b"old")
    with pytest.raises(sk.ShiftkitError, match="already exists"):
        extract_lora(base, tuned, tmp_path / "exists.safetensors", progress=False)
    assert (tmp_path / "exists.safetensors").read_bytes() == b"old"
    # key and shape mismatches
    sd = load_file(str(tuned / "model.safetensors"))
    for name, change in (
        ("extra", {"extra.weight": torch.zeros(2)}),
        ("shape", {"model.norm.weight": torch.ones(3)}),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tuned / "config.json").read_text())
        save_file({**sd, **change}, str(folder / "model.safetensors"))
        with pytest.raises(sk.ShiftMismatchError, match="extra.weight" if name == "extra" else "model.norm"):
            extract_lora(base, folder, progress=False)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp files left behind


# --- mergekit as the oracle ----------------------------------------------------------------------------
def _mergekit(base: Path, tuned: Path, out: Path, rank: int, *extra: str) -> dict[str, Tensor]:
    """Run mergekit 0.1.5's ``mergekit-extract-lora`` (its click command, in process: CPU, offline). Paths are
    absolute: for a relative one its model card asks the Hub about the name."""
    from mergekit.scripts.extract_lora import main

    args = ["--model", str(tuned.absolute()), "--base-model", str(base.absolute())]
    args += ["--out-path", str(out.absolute()), "--max-rank", str(rank), "--quiet", *extra]
    main.main(args=args, standalone_mode=False)
    return load_file(str(out / "adapter_model.safetensors"))


def _products(weights: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """``ΔW`` (weight layout) of each LoRA pair of a PEFT state dict, scale α/r included."""
    out: dict[str, Tensor] = {}
    for key, a in weights.items():
        for tag, emb in ((".lora_A.weight", False), (".lora_embedding_A", True)):
            if key.endswith(tag):
                module = key.removeprefix("base_model.model.").removesuffix(tag)
                b = weights[key.replace("_A", "_B")]
                r = config["rank_pattern"].get(module, config["r"])
                alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
                prod = (b.double() @ a.double()) * (alpha / r)
                out[f"{module}.weight"] = prod.T if emb else prod
    return out


# mergekit 0.1.5 imports numpy.core (deprecated in numpy 2) when it loads
@pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")
@pytest.mark.parametrize("embed", [False, True])
def test_same_lora_as_mergekit(llamas: dict[str, Any], tmp_path: Path, embed: bool) -> None:
    flag = ["--embed-lora"] if embed else []
    theirs = _mergekit(llamas["base"], llamas["tuned"], tmp_path / "mk", 4, *flag)
    their_config = json.loads((tmp_path / "mk" / "adapter_config.json").read_text())
    s = extract_lora(
        llamas["base"], llamas["tuned"], tmp_path / "ours", rank=4, embed_lora=embed, progress=False
    )
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    mine, other = _products(ours, our_config), _products(theirs, their_config)
    assert sorted(mine) == sorted(other)  # the same LoRA'd weights
    for name in other:  # the factors may differ by sign; their products may not
        torch.testing.assert_close(
            mine[name], other[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    # the same split of S between the factors (√S each side): equal up to the sign of each rank-one pair
    for key, t in theirs.items():
        if "lora_" in key:
            torch.testing.assert_close(ours[key].abs(), t.abs(), atol=1e-5, rtol=1e-4)
    # full-rank tensors: mergekit saves every norm (and embeddings without --embed-lora) even unchanged;
    # shiftkit saves the changed ones, with the same values
    their_saved = {k for k in theirs if "lora_" not in k}
    our_saved = {k for k in ours if "lora_" not in k}
    assert our_saved <= their_saved
    assert {k.removeprefix("base_model.model.").removesuffix(".weight") for k in our_saved} == set(s.saved)
    for key in our_saved:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)
    for key in their_saved - our_saved:  # what only mergekit writes did not change
        name = key.removeprefix("base_model.model.")
        assert float(llamas["deltas"][name].abs().max()) == 0.0, name
