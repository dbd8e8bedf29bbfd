"""``shiftkit bench compress-vader``: the table and verdict from a payload, and a quick run (assets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import need_asset
from shiftkit.bench import compress_vader as cv
from shiftkit.cli import main

DOMAINS = ["tweets", "movies", "amazon", "nyt"]


def _row(compressor: str, setting: str, ratio: float, delta: float) -> dict[str, Any]:
    acc = {d: 0.8 + delta for d in DOMAINS}
    return {
        "kind": "lora", "compressor": compressor, "setting": setting, "params": {}, "bytes": 1000.0 / ratio,
        "ratio_fp32": 2 * ratio, "ratio_bf16": ratio, "accuracy": acc, "mean": 0.8 + delta, "delta": delta,
        "alphas": [1.0] * 4 if compressor == "compeft" else [],
    }  # fmt: skip


def test_verdict_takes_the_smallest_setting_within_one_point() -> None:
    rows = [
        _row("none", "fp32", 0.5, 0.0),
        _row("compeft", "density 0.1", 20.0, -0.005),
        _row("compeft", "density 0.05", 40.0, -0.03),  # too lossy
        _row("bcq", "3 bits", 5.0, 0.0),
    ]
    text = cv.verdict(rows)
    assert "density 0.1 is 20.0x smaller" in text and "MEETS" in text
    assert "misses" in cv.verdict([rows[0], _row("bcq", "3 bits", 5.0, 0.0)])
    assert "no compressed setting" in cv.verdict([rows[0], rows[2]])
    payload = {"domains": DOMAINS, "rows": rows, "title": "t", "verdict": text, "environment": {}}
    table, columns = cv.table_rows(payload)
    assert columns[:6] == ["kind", "compressor", "setting", "bytes", "vs fp32", "vs bf16"]
    assert table[1]["Δ"] == "-0.5" and table[1]["setting"] == "density 0.1 (α 1/1/1/1)"


@pytest.mark.assets
@pytest.mark.slow
def test_compress_vader_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_asset("minilm")
    need_asset("vader")
    out = tmp_path / "cv"
    assert main(["bench", "compress-vader", "--quick", "--no-cache", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vs bf16" in printed and "report.html" in printed
    payload = json.loads((out / "results.json").read_text())
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    rows = payload["rows"]
    assert [(r["compressor"], r["setting"]) for r in rows] == [
        ("none", "fp32 (uncompressed)"),
        ("none", "bf16 (cast)"),
        ("compeft", "density 0.1"),
        ("compeft", "density 0.1, per tensor"),
        ("bcq", "3 bits, group 64"),
    ]
    fp32, bf16, compeft, _per_tensor, bcq = rows
    assert bf16["bytes"] < 0.55 * fp32["bytes"] and compeft["bytes"] < bf16["bytes"] / 4
    assert bcq["bytes"] < bf16["bytes"] and set(compeft["alphas"]) <= {1.0, 3.0}
    for r in rows:
        assert set(r["accuracy"]) == set(DOMAINS) and "ties_mean" in r
