"""``shiftkit edit surgery`` and ``shiftkit edit ches`` on the real SmolLM2-135M with VADER data, as a user
runs them: the shift file saved and applicable, the printed tables and JSON, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import shiftkit as sk
from conftest import need_asset
from shiftkit.cli import main

pytestmark = pytest.mark.assets


def test_surgery_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_asset("smollm2-135m")
    need_asset("vader")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nMy day at work\n")
    out = tmp_path / "edit.safetensors"
    args = ["edit", "surgery", "--per-class", "4", "--epochs", "2", "--k", "64", "--alpha", "2"]
    args += ["--prompts", str(prompts), "--samples", "1", "--max-new-tokens", "4", "--out", str(out)]
    assert main([*args, "--json", str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    assert "probe: held-out accuracy" in printed and "edit: 64 rows" in printed
    assert "VADER negative %" in printed and "perplexity" in printed
    info = json.loads((tmp_path / "s.json").read_text())
    assert [r["edit"] for r in info["rows"]] == ["before", "after"]
    shift = sk.load(out)
    dense = sk.decompress(shift)
    changed = sum(int((t != 0).any(1).sum()) for t in dense.tensors.values())
    assert changed == 64 and all("gate_proj" in k for k in dense.tensors)
    assert main(args) == 2  # --out exists and no --force
    assert "exists" in capsys.readouterr().err


def test_ches_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_asset("smollm2-135m")
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Say something kind.\n", "chosen": " You did great today.", "rejected": " You did great."},
        {"prompt": "Say something kind.\n", "chosen": " You did great today.", "rejected": " Go away, fool."},
        {"prompt": "Name a fruit.\n", "chosen": " An apple.", "rejected": ""},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "c.json"
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        assert main(["edit", "ches", str(pairs), "--select", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 of 3 pairs scored" in printed and "LN-CHES" in printed
    info = json.loads(out.read_text())
    assert info["scores"][2] is None and info["order_most_alike_first"] == sorted(
        [0, 1], key=lambda i: -info["scores"][i]
    )
    assert info["selected"] == [info["order_most_alike_first"][-1]]  # quantile 0: the least alike
    assert torch.isfinite(torch.tensor(info["scores"][:2])).all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["edit", "ches", str(bad)]) == 2
    assert "expected" in capsys.readouterr().err
