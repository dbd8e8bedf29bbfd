"""The documented SmolLM2 merge walkthrough runs end to end on real sharded folders (assets test).

examples/make_merge_inputs.py makes a sharded base and two one-step fine-tunes of SmolLM2-135M in a tmp
folder; `shiftkit merge` then runs examples/merge_smollm2_ties.yaml's settings over them, and transformers
must load the sharded output, whose logits are finite and differ from the base's.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from conftest import need_asset
from shiftkit.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "make_merge_inputs.py"
RECIPE = ROOT / "examples" / "merge_smollm2_ties.yaml"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_merge_inputs", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_merge_inputs"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_recipe_names_the_folders_the_script_writes() -> None:
    data = yaml.safe_load(RECIPE.read_text())
    names = [Path(m["model"]).name for m in data["models"]]
    assert data["base_model"] == "runs/merge-inputs/base"
    assert names == list(_script().DOMAINS)
    assert all(Path(m["model"]).parent == Path("runs/merge-inputs") for m in data["models"])


@pytest.mark.assets
def test_walkthrough_merges_real_sharded_folders(tmp_path: Path) -> None:
    need_asset("smollm2-135m")
    need_asset("vader")
    from transformers import AutoModelForCausalLM

    mod = _script()
    inputs = tmp_path / "merge-inputs"
    folders = mod.make_inputs(
        inputs,
        domains=("tweets", "movies"),
        steps=1,
        batch_size=1,
        seq_len=16,
        lr=1e-4,
        train=r"model\.layers\.29\..*",  # the last block only: a full backward would take most of 60 s
        log=lambda _: None,
    )
    for folder in folders.values():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3  # 538 MB of fp32 in 200 MB shards
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()

    # the example recipe's settings, pointed at the tmp folders
    data = yaml.safe_load(RECIPE.read_text())
    data["base_model"] = str(folders["base"])
    per_model = data["models"][0]["parameters"]
    data["models"] = [{"model": str(f), "parameters": per_model} for d, f in folders.items() if d != "base"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--no-progress", "--max-shard-size", "100MB"]) == 0

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 6 and all((out / s).is_file() for s in shards)
    base_index = json.loads((folders["base"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base_index["weight_map"])
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()

    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 198]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(folders["base"], dtype=torch.float32).eval()
        want = base(input_ids=ids).logits
        del base
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        got = merged(input_ids=ids).logits
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() > 1e-4  # the merged task vector really moved the model
    assert (got - want).abs().max() < 5.0  # ... by a fine-tune's amount, not into garbage
