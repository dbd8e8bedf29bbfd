"""``shiftkit learn CONFIG.yaml``: in-process runs on a tiny ``module:function`` model and on MiniLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from conftest import need_asset
from shiftkit.cli import main
from shiftkit.recipes.models import TextClassifier


class TinyEncoder(nn.Module):
    """Embedding → Linear → tanh; token states ``(batch, seq, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(40, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return torch.tanh(self.proj(self.embeddings(input_ids)))


class CharTokenizer:
    """Characters → ids 1..39 (0 pads), truncated to ``max_length``."""

    pad_token_id = 0

    def __call__(self, texts: list[str], truncation: bool = True, max_length: int = 64) -> dict:
        return {"input_ids": [[1 + ord(c) % 39 for c in t][:max_length] or [1] for t in texts]}


def tiny_model() -> tuple[nn.Module, CharTokenizer]:
    """The user's own ``module:function`` factory: a deterministic tiny classifier."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = TinyEncoder()
    return TextClassifier(encoder, num_labels=2, hidden_size=8, seed=0), CharTokenizer()


def _config(tmp_path: Path, method: str, model: str = f"{__name__}:tiny_model", n: int = 32) -> Path:
    cfg = tmp_path / "learn.yaml"
    cfg.write_text(
        f"model: {model}\n"
        f"data: {{name: vader, domain: tweets, n_train: {n}, n_test: {n}, eval_domains: [movies]}}\n"
        f"method: {method}\n"
        "train: {epochs: 1, lr: 1.0e-2, batch_size: 16, seed: 0, max_length: 32}\n"
        f"output: {tmp_path / 'out'}\n"
    )
    return cfg


def test_help_has_an_example_and_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom shiftkit.cli import main\n"
        "try:\n    main(['learn', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'learn --help imported torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "shiftkit learn examples/learn_vader_lora.yaml" in out.stdout
    assert "unknown keys are an error" in out.stdout


@pytest.mark.assets
def test_learn_lora_on_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_asset("vader")
    cfg = _config(tmp_path, "{name: lora, r: 2, lora_alpha: 4, target_modules: [proj]}")
    extra = tmp_path / "copy.json"
    assert main(["learn", str(cfg), "--no-progress", "--json", str(extra)]) == 0
    printed = capsys.readouterr().out
    assert "acc tweets" in printed and "acc movies" in printed

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics == json.loads(extra.read_text())
    assert set(metrics["accuracy"]) == {"tweets", "movies"}
    assert all(0.0 <= a <= 1.0 for a in metrics["accuracy"].values())
    assert metrics["steps"] == 2 and len(metrics["losses"]) == 2
    # LoRA on proj (2·8 + 8·2) plus the head trained beside it (8·2 + 2)
    assert metrics["trainable_params"] == 2 * 8 + 8 * 2 + 8 * 2 + 2

    shift = sk.load(tmp_path / "out" / "shift.safetensors")
    assert shift.method == "lora" and shift.config.modules_to_save == ("head",)
    assert metrics["shift_bytes"] == (tmp_path / "out" / "shift.safetensors").stat().st_size
    fresh, _ = tiny_model()
    sk.attach_(fresh, shift)  # the file fits a fresh model built by the same factory
    assert not list(tmp_path.glob("out/.*.tmp"))  # no temp files left


@pytest.mark.assets
@pytest.mark.parametrize("method", ["full", "probe"])
def test_learn_full_and_probe_write_task_vectors(tmp_path: Path, method: str) -> None:
    need_asset("vader")
    cfg = _config(tmp_path, method)
    assert main(["learn", str(cfg), "--no-progress", "--output", str(tmp_path / "o2")]) == 0
    shift = sk.load(tmp_path / "o2" / "shift.safetensors")
    assert shift.method == "delta"
    keys = set(shift.tensors)
    if method == "probe":
        assert keys == {"head.weight", "head.bias"}
    else:
        assert {"head.weight", "encoder.proj.weight", "encoder.embeddings.weight"} <= keys
    fresh, _ = tiny_model()
    sk.apply_(fresh, shift)


def test_unknown_key_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: minilm\nmethod: {name: lora, rank: 8}\n")
    assert main(["learn", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "rank" in err and "shiftkit learn: error" in err


def test_missing_output_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "noout.yaml"
    cfg.write_text("model: minilm\nmethod: bitfit\n")
    assert main(["learn", str(cfg)]) == 2
    assert "no output folder" in capsys.readouterr().err


@pytest.mark.assets
@pytest.mark.slow
def test_learn_minilm_bitfit(tmp_path: Path) -> None:
    need_asset("minilm")
    need_asset("vader")
    cfg = _config(tmp_path, "bitfit", model="minilm", n=32)
    assert main(["learn", str(cfg), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["method"] == "bitfit" and metrics["steps"] == 2
    assert metrics["trainable_params"] < 0.01 * metrics["total_params"]
    from shiftkit.recipes.models import text_classifier

    fresh, _ = text_classifier("minilm", num_labels=2, seed=0)
    sk.attach_(fresh, sk.load(tmp_path / "out" / "shift.safetensors"))


def tiny_bert() -> tuple[nn.Module, CharTokenizer]:
    """A deterministic tiny BERT classifier (4 heads of 6, FFN 36) for Light-PEFT runs."""
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=36,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        encoder = BertModel(config, add_pooling_layer=False)
    return TextClassifier(encoder, num_labels=2, seed=0), CharTokenizer()


@pytest.mark.assets
def test_learn_with_light_peft_prunes_and_writes_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shiftkit.compression.prune import prune_

    need_asset("vader")
    lora = "{name: lora, r: 4, lora_alpha: 8, target_modules: [query, key, value, intermediate.dense]}"
    cfg = _config(tmp_path, lora, model=f"{__name__}:tiny_bert", n=64)
    with cfg.open("a") as f:
        f.write("prune: {estimate_steps: 3, head_ratio: 0.25, ffn_ratio: 0.25, module_ratio: 0.5}\n")
    assert main(["learn", str(cfg), "--no-progress"]) == 0
    assert "lora (light-peft)" in capsys.readouterr().out
    plan = json.loads((tmp_path / "out" / "prune.json").read_text())
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["prune"]["estimate_steps"] == 3 and metrics["steps"] == 4  # 64 sentences, batch 16
    assert (
        metrics["prune"]["heads_removed"] == sum(len(v) for v in plan["heads"].values()) == 2
    )  # 1 per layer
    # half of the 8 by module score, and any whose every rank falls under the rank quantile
    assert 4 <= len(metrics["prune"]["lora_modules_removed"]) < 8
    base, _ = tiny_bert()
    prune_(base, plan["heads"], plan["neurons"])
    sk.attach_(base, sk.load(tmp_path / "out" / "shift.safetensors"))  # the shift fits the rebuilt base
    assert base(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)).shape == (1, 2)


def test_prune_needs_lora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"model: minilm\nmethod: bitfit\nprune: {{estimate_steps: 4}}\noutput: {tmp_path}\n")
    assert main(["learn", str(cfg)]) == 2
    assert "needs method lora" in capsys.readouterr().err
    cfg.write_text(f"model: minilm\nmethod: lora\nprune: {{estimate: 4}}\noutput: {tmp_path}\n")
    assert main(["learn", str(cfg)]) == 2
    assert "estimate_steps" in capsys.readouterr().err
