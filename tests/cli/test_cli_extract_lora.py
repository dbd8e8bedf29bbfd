"""``shiftkit extract-lora BASE TUNED OUT``: the printed table, the written files, JSON, --quiet, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import shiftkit as sk
from shiftkit.cli import main

TINY: dict[str, Any] = {
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A base and a fine-tune whose 2-D weights changed by an exact rank-2 ΔW, its final norm by noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli_extract")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(3)
    tuned = {}
    for k, v in model.state_dict().items():
        if v.dim() == 2:
            d = torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
            tuned[k] = v + 0.01 * d
        elif k == "model.norm.weight":
            tuned[k] = v + 0.01
        else:
            tuned[k] = v.clone()
    model.save_pretrained(root / "tuned", state_dict=dict(tuned))
    return root / "base", root / "tuned"


def test_extract_lora_prints_the_worst_layers_and_writes_the_shift(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned = folders
    out, report = tmp_path / "lora.safetensors", tmp_path / "summary.json"
    args = [str(base), str(tuned), str(out), "--rank", "2", "--top", "3", "--json", str(report)]
    assert main(["extract-lora", *args]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == "worst 3 of 7 layers by relative error ‖ΔW − BA‖/‖ΔW‖:"
    assert lines[1].split() == ["layer", "shape", "rank", "rel.", "error", "energy", "kept"]
    rows = [line.split() for line in lines[3:6]]
    assert all(r[0].startswith("model.layers.0.") and r[2] == "2" for r in rows)
    assert all(float(r[3]) < 1e-5 for r in rows)  # ΔW is exactly rank 2
    assert "LoRA layers" in printed and "saved" in printed and str(out) in printed
    shift = sk.load(out)
    assert shift.method == "lora" and shift.config.r == 2
    assert "model.norm.saved.weight" in shift.tensors
    summary = json.loads(report.read_text())
    assert summary["rank"] == 2 and len(summary["layers"]) == 7
    # embeddings and head changed too: saved in full, as mergekit does without --embed-lora
    assert sorted(summary["saved"]) == ["lm_head", "model.embed_tokens", "model.norm"]
    assert summary["bytes_written"] == out.stat().st_size and summary["outputs"] == [str(out)]


def test_extract_lora_peft_energy_dtype_quiet(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned = folders
    out = tmp_path / "adapter"
    args = [str(base), str(tuned), str(out), "--peft", "--energy", "0.999", "--rank", "8"]
    assert main(["extract-lora", *args, "--dtype", "bfloat16", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens", "model.norm"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    # an existing OUT needs --force; the old output stays as it was
    assert main(["extract-lora", *args]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["extract-lora", *args, "--force", "--target", "self_attn", "--quiet"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert all("self_attn" in m for m in config["target_modules"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rank", "0"], "rank must be a positive integer"),
        (["--energy", "1.5"], "energy must be in (0, 1]"),
        (["--energy", "0"], "energy must be in (0, 1]"),
    ],
)
def test_extract_lora_bad_options_exit_2_with_the_reason(
    folders: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    base, tuned = folders
    assert main(["extract-lora", str(base), str(tuned), str(tmp_path / "x.safetensors"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shiftkit extract-lora: error:") and message in err
    assert not any(tmp_path.iterdir())


def test_extract_lora_missing_folder(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = folders
    assert main(["extract-lora", str(base), str(tmp_path / "gone"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "tuned model folder" in err and "gone" in err and "does not exist" in err


def test_extract_lora_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["extract-lora", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "shiftkit extract-lora models/base models/tuned" in text and "--energy" in text
