"""``shiftkit bench recursive --quick`` on the real SmolLM2-135M: complete and sane outputs."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from conftest import need_asset


def test_recursive_suite_options() -> None:
    from shiftkit.bench.recursive import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--quick", "--r", "0", "--sharing", "sequence"])
    assert args.quick and args.r == 0 and args.sharing == "sequence" and args.out == "runs/recursive"


@pytest.mark.assets
def test_recursive_suite_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_asset("smollm2-135m")
    need_asset("rotten-tomatoes")
    from shiftkit.bench.recursive import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "rec"
    # one thread: on a busy 2-core machine two OpenMP threads were 2-10x slower; on an idle one 1.6x faster
    assert run(parser.parse_args(["--quick", "--out", str(out), "--no-progress", "--threads", "1"])) == 0
    printed = capsys.readouterr().out
    assert "held-out ppl" in printed and "fewer" in printed
    payload = json.loads((out / "results.json").read_text())
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    p = payload["params"]
    assert p["layers"] == 30 and p["slots"] == 15
    assert p["original"] == 134_515_008  # SmolLM2-135M (ASSETS.md), the tied embedding counted once
    # the formula, from the architecture: 15 shared blocks + rank-64 LoRAs on 30 layers + untied parameters
    hidden, kv, inter = 576, 192, 1536
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * inter * hidden
    lora = 30 * 64 * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter))
    assert p["shared"] == 15 * per_layer and p["lora"] == lora
    assert p["recursive"] == p["original"] - 30 * per_layer + 15 * per_layer + lora
    assert 0.2 < p["reduction"] < 0.3
    # the file holds the shared blocks and the LoRAs once, in fp32, plus a small header
    assert 4 * (p["shared"] + p["lora"]) < payload["shift_file_bytes"] < 4 * (p["shared"] + p["lora"]) + 2**20
    stages = payload["stages"]
    assert [st["params"] for st in stages] == [p["original"], p["recursive"], p["recursive"]]
    assert all(math.isfinite(st["ppl"]) and st["ppl"] > 1 for st in stages)
    assert stages[1]["ppl"] > stages[0]["ppl"]  # tying at rank 64 loses information
    assert payload["max_fold_diff"] < 1e-2  # logits of size ~10-30; fp32 rounding of the un-tied weights
    assert len(payload["train"]["losses"]) == 2
