"""Recipe features against mergekit 0.1.5 on tiny local Llamas: slices, passthrough, gradients, filters,
per-model parameters and fine-tunes with an extended vocabulary (``tokenizer_source``, ``tokenizer:``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import shiftkit as sk
from mk_llama import TINY_LLAMA, assert_same_tensors, make_llamas, read_folder, run_mergekit, run_shiftkit

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llamas(tmp_path_factory.mktemp("features"))


def _both(mk: ModuleType, recipe: dict[str, Any], tmp: Path) -> tuple[dict, dict]:
    theirs = run_mergekit(mk, copy.deepcopy(recipe), tmp / "mergekit")
    return run_shiftkit(recipe, tmp), theirs


def test_slices_of_offset_layer_ranges_slerped(
    mergekit: ModuleType, llamas: dict[str, Path], tmp_path: Path
) -> None:
    a, b = str(llamas["ft0"]), str(llamas["ft1"])
    recipe = {
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}, {"model": b, "layer_range": [3, 6]}]},
            {"sources": [{"model": a, "layer_range": [3, 6]}, {"model": b, "layer_range": [0, 3]}]},
        ],
        "merge_method": "slerp",
        "base_model": a,
        "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]},
        "dtype": "float32",
    }
    ours, theirs = _both(mergekit, recipe, tmp_path)
    assert_same_tensors(ours, theirs, atol=2e-7)


def test_passthrough_duplicates_layers_with_a_filtered_scale(
    mergekit: ModuleType, llamas: dict[str, Path], tmp_path: Path
) -> None:
    a = str(llamas["ft0"])
    scale = [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]
    recipe = {
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 4]}]},
            {"sources": [{"model": a, "layer_range": [2, 6], "parameters": {"scale": scale}}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    ours, theirs = _both(mergekit, recipe, tmp_path)
    assert_same_tensors(ours, theirs, atol=0)
    src = read_folder(llamas["ft0"])
    # output layer 5 is source layer 3 of the second slice: o_proj halved, q_proj as it is
    torch.testing.assert_close(
        ours["model.layers.5.self_attn.o_proj.weight"], 0.5 * src["model.layers.3.self_attn.o_proj.weight"]
    )
    torch.testing.assert_close(
        ours["model.layers.5.self_attn.q_proj.weight"], src["model.layers.3.self_attn.q_proj.weight"]
    )
    cfg = json.loads((tmp_path / "shiftkit" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8


@pytest.mark.parametrize(
    "method,per_model",
    [
        (
            "task_arithmetic",
            [{"weight": [0.2, 1.0]}, {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.1}]}],
        ),
        ("ties", [{"weight": 1.0, "density": [0.9, 0.2]}, {"weight": 0.6, "density": 0.5}]),
        (
            "breadcrumbs",
            [
                {"weight": 1.0, "density": 0.7, "gamma": 0.05},
                {"weight": 0.5, "density": [0.3, 0.9], "gamma": 0.0},
            ],
        ),
        ("linear", [{"weight": [0, 1, 0.5]}, {"weight": 0.5}]),
    ],
)
def test_gradients_filters_and_per_model_parameters(
    mergekit: ModuleType, llamas: dict[str, Path], tmp_path: Path, method: str, per_model: list[dict]
) -> None:
    recipe = {
        "models": [{"model": str(llamas[f"ft{i}"]), "parameters": p} for i, p in enumerate(per_model)],
        "merge_method": method,
        "base_model": str(llamas["base"]),
        "dtype": "float32",
    }
    if method == "linear":  # mergekit's linear averages the base too: its weight from the top level
        recipe["parameters"] = {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.1}]}
    ours, theirs = _both(mergekit, recipe, tmp_path)
    assert_same_tensors(ours, theirs, atol=2e-7)


def test_a_gradient_reaches_the_last_layer_and_the_non_layer_tensors(
    mergekit: ModuleType, llamas: dict[str, Path], tmp_path: Path
) -> None:
    """t runs from 0 at layer 0 to 1 at the last layer; tensors outside the layers take its start."""
    recipe = {
        "models": [{"model": str(llamas["ft0"])}, {"model": str(llamas["ft1"])}],
        "merge_method": "slerp",
        "base_model": str(llamas["ft0"]),
        "parameters": {"t": [0.0, 1.0]},
        "dtype": "float32",
    }
    ours, theirs = _both(mergekit, recipe, tmp_path)
    assert_same_tensors(ours, theirs, atol=2e-7)
    a, b = read_folder(llamas["ft0"]), read_folder(llamas["ft1"])
    torch.testing.assert_close(
        ours["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"]
    )
    torch.testing.assert_close(
        ours["model.layers.5.mlp.up_proj.weight"], b["model.layers.5.mlp.up_proj.weight"]
    )


# --- vocabulary-extended fine-tunes ---------------------------------------------------------------------
def _tokenizer(folder: Path, words: list[str]) -> None:
    """A word-level fast tokenizer over ``words`` saved in ``folder`` (no download, no sentencepiece)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def extended(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base with 64 tokens, a fine-tune that added 3 tokens (67 rows) and one that added 2 others."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("vocab")
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"])
    _tokenizer(paths["base"], words)
    g = torch.Generator().manual_seed(11)
    for name, added in (("ft0", ["<tool>", "</tool>", "<think>"]), ("ft1", ["<think>", "<img>"])):
        n = 64 + len(added)
        cfg = LlamaConfig(**{**TINY_LLAMA, "vocab_size": n})
        tuned = {}
        for k, v in base.items():
            if v.shape[0] == 64 and k in ("model.embed_tokens.weight", "lm_head.weight"):
                v = torch.cat([v, torch.randn(len(added), v.shape[1], generator=g) * 0.02])
            tuned[k] = v + torch.randn(v.shape, generator=g) * 0.01
        ft = LlamaForCausalLM(cfg)
        paths[name] = root / name
        ft.save_pretrained(paths[name], state_dict=tuned)
        _tokenizer(paths[name], words + added)
    return paths


def _same_by_token(ours: dict, theirs: dict, tmp: Path) -> None:
    """Equal tensors, the vocabulary rows compared by token: mergekit numbers the tokens a union adds in
    hash-map order (it changes from run to run), shiftkit in input and id order."""
    from transformers import AutoTokenizer

    mine = AutoTokenizer.from_pretrained(tmp / "shiftkit").get_vocab()
    other = AutoTokenizer.from_pretrained(tmp / "mergekit").get_vocab()
    assert sorted(mine) == sorted(other)
    order = sorted(mine)
    rows_ours = torch.tensor([mine[t] for t in order])
    rows_theirs = torch.tensor([other[t] for t in order])
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        n = len(order)
        torch.testing.assert_close(ours[k][rows_ours], theirs[k][rows_theirs], atol=2e-7, rtol=1e-5)
        torch.testing.assert_close(ours[k][n:], theirs[k][n:], atol=2e-7, rtol=1e-5)  # padding rows
    rest = {k: v for k, v in ours.items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    assert_same_tensors(rest, {k: theirs[k] for k in rest}, atol=2e-7)
    assert sorted(ours) == sorted(theirs)


@pytest.mark.parametrize("source", ["union", "base", "ft0"])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_vocabulary_extended_fine_tunes_merge_as_mergekit(
    mergekit: ModuleType, extended: dict[str, Path], tmp_path: Path, source: str, method: str
) -> None:
    recipe: dict[str, Any] = {
        "models": [
            {"model": str(extended["ft0"]), "parameters": {"weight": 0.6}},
            {"model": str(extended["ft1"]), "parameters": {"weight": 0.4}},
        ],
        "merge_method": method,
        "base_model": str(extended["base"]),
        "tokenizer_source": str(extended["ft0"]) if source == "ft0" else source,
        "dtype": "float32",
    }
    if method == "linear":
        recipe["parameters"] = {"weight": 0.0}  # the base takes part with weight 0: a plain average
    ours, theirs = _both(mergekit, recipe, tmp_path)
    _same_by_token(ours, theirs, tmp_path)
    rows = {"union": 64 + 4, "base": 64, "ft0": 67}[source]
    assert ours["model.embed_tokens.weight"].shape[0] == rows
    assert json.loads((tmp_path / "shiftkit" / "config.json").read_text())["vocab_size"] == rows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "shiftkit")
    assert len(tok) == rows


def test_tokenizer_block_sets_rows_of_added_tokens(
    mergekit: ModuleType, extended: dict[str, Path], tmp_path: Path
) -> None:
    recipe: dict[str, Any] = {
        "models": [
            {"model": str(extended["ft0"]), "parameters": {"weight": 0.5}},
            {"model": str(extended["ft1"]), "parameters": {"weight": 0.5}},
        ],
        "merge_method": "task_arithmetic",
        "base_model": str(extended["base"]),
        "tokenizer": {
            "source": "union",
            "tokens": {
                "<think>": {"source": str(extended["ft1"])},
                "<tool>": {"source": {"kind": "zero"}},
                "<img>": {"source": {"kind": "model_token", "model": str(extended["ft0"]), "token": "w5"}},
            },
            "pad_to_multiple_of": 8,
        },
        "dtype": "float32",
    }
    ours, theirs = _both(mergekit, recipe, tmp_path)
    _same_by_token(ours, theirs, tmp_path)
    assert ours["model.embed_tokens.weight"].shape[0] == 72  # 68 tokens padded to a multiple of 8


def test_the_merge_api_reads_the_same_vocabulary_recipe(extended: dict[str, Path], tmp_path: Path) -> None:
    """``sk.merge_recipe`` on a dict-free path: the summary names the output vocabulary."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"models:\n  - model: {extended['ft0']}\n  - model: {extended['ft1']}\n"
        f"merge_method: task_arithmetic\nbase_model: {extended['base']}\ntokenizer_source: union\n"
        "parameters:\n  weight: 0.5\ndtype: float32\n"
    )
    sk.merge_recipe(recipe, tmp_path / "out", progress=False)
    assert read_folder(tmp_path / "out")["lm_head.weight"].shape[0] == 68


def test_a_sliced_recipe_refuses_a_shift_file_output(llamas: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"slices:\n  - sources: [{{model: {llamas['ft0']}, layer_range: [0, 3]}}]\n"
        "merge_method: passthrough\ndtype: float32\n"
    )
    with pytest.raises(sk.ShiftkitError, match="write it to a folder"):
        sk.merge_recipe(recipe, tmp_path / "out.safetensors", progress=False)
    assert not (tmp_path / "out.safetensors").exists()
