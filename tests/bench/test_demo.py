"""``shiftkit demo``: the quick run end to end (assets), and the report writers on synthetic payloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import shiftkit as sk
from conftest import need_asset
from shiftkit.bench.demo import SECTIONS, DemoSettings, render_demo_html, run_demo, section_tables
from shiftkit.bench.report import render_html, table_rows, write_report
from shiftkit.cli import main
from shiftkit.errors import ShiftkitError

METHODS = ["probe", "full", "lora", "ssf", "bitfit"]
DOMAINS = ["tweets", "movies", "amazon", "nyt"]


def _payload(name: str = "lora") -> dict[str, Any]:
    rows = []
    for i, method in enumerate(["full", name]):
        acc = {d: 0.6 + 0.05 * j + 0.01 * i for j, d in enumerate(DOMAINS)}
        rows.append(
            {
                "method": method,
                "trainable_params": [1_000_000, 5_000][i],
                "trainable_pct_of_full": [100.0, 0.5][i],
                "accuracy": acc,
                "in_domain": acc["tweets"],
                "cross_domain_mean": sum(acc[d] for d in DOMAINS[1:]) / 3,
                "train_seconds": 1.5,
                "max_fold_diff": 1e-6,
                "file_bytes": 2048,
                "lr": 1e-3,
                "epochs": 1,
                "batch_size": 16,
                "steps": 4,
                "notes": "n<o>tes & more",
            }
        )
    settings = {"model": "minilm", "threshold": 0.5, "n_train": 8, "n_test": 8, "seed": 0, "fold_check": 8}
    return {
        "title": "demo <title>",
        "settings": settings,
        "train_domain": "tweets",
        "domains": DOMAINS,
        "methods": rows,
        "timings": {"total_seconds": 3.0},
        "environment": {"torch": "x", "shiftkit": "y", "threads": 2},
    }


def test_table_rows_columns_and_values() -> None:
    rows, columns = table_rows(_payload())
    assert columns[:4] == ["method", "trainable", "% of full", "tweets (in)"]
    assert {"movies", "amazon", "nyt", "cross mean", "train s", "max fold diff", "file"} <= set(columns)
    assert rows[1]["method"] == "lora" and rows[1]["trainable"] == "5.0k" and rows[1]["% of full"] == "0.5%"
    assert rows[1]["tweets (in)"] == "0.610" and rows[1]["file"] == "2.0 KiB"


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    payload = _payload(name="<script>alert(1)</script>")
    html = render_html(payload)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("<svg") == 2 and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "n&lt;o&gt;tes &amp; more" in html and "demo &lt;title&gt;" in html
    results, report = write_report(tmp_path / "out", payload)
    assert json.loads(results.read_text()) == payload
    assert report.read_text() == html
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "results.json"]


def _sections_payload() -> dict[str, Any]:
    payload = _payload()
    payload["fold"] = {
        "method": "lora",
        "sentences": 8,
        "rows": [
            {"model": "base", "params": 1000, "rate": 200.0},
            {"model": "lora attached", "params": 1100, "rate": 150.0},
            {"model": "lora folded", "params": 1000, "rate": 210.0, "max_diff": 3e-6},
        ],
        "fold_seconds": 0.01,
        "prediction_agreement": 1.0,
        "shift_params": 100,
    }
    acc = {d: 0.5 for d in DOMAINS}
    payload["merge"] = {
        "domains": DOMAINS,
        "settings": {"n_train": 8, "n_test": 8, "epochs": 1, "lora_r": 8, "lora_alpha": 16},
        "rows": [{"row": "merged: <ties>", "group": "merge", "accuracy": acc, "mean": 0.5}],
        "lora_params": 10,
        "train_seconds": 1.0,
    }
    payload["compress"] = {
        "domains": DOMAINS,
        "rows": [
            {
                "row": "fp32",
                "bytes": {d: 400 for d in DOMAINS},
                "total_bytes": 1600,
                "ratio": 1.0,
                "accuracy": acc,
                "mean": 0.5,
            },
            {
                "row": "compeft <d>",
                "bytes": {d: 25 for d in DOMAINS},
                "total_bytes": 100,
                "ratio": 16.0,
                "accuracy": acc,
                "mean": 0.5,
            },
        ],
    }
    payload["adapt"] = {
        "corruptions": ["fog"],
        "severity": 5,
        "images": 10,
        "batch_size": 5,
        "clean_error": 10.0,
        "source_info": {"settings": {"n_train": 64}, "train_seconds": 1.0},
        "runs": {"norm": {"errors": {"fog": 30.0}, "mean_error": 30.0, "images_per_second": 99.0}},
    }
    return payload


def test_demo_sections_tables_and_report() -> None:
    payload = _sections_payload()
    tables = section_tables(payload)
    assert [t[0] for t in tables] == list(SECTIONS)
    fold_rows = tables[1][2]
    assert [r["vs base"] for r in fold_rows] == ["1.00x", "0.75x", "1.05x"]  # 150/200, 210/200
    assert fold_rows[2]["max |Δ logits|"] == "3.0e-06" and fold_rows[1]["parameters"] == "1.1k"
    assert tables[2][3] == ["model", *DOMAINS, "mean"] and tables[4][2][0]["fog"] == "30.0"
    assert tables[3][2][1]["smaller"] == "16.0x" and tables[3][2][1]["bytes (4 files)"] == "100 B"
    page = render_demo_html(payload)
    assert (
        page.count("<h2>") == 5
        and "compeft &lt;d&gt;" in page
        and "&lt;ties&gt;" in page
        and "<ties>" not in page
    )
    assert page.count("<svg") == 2  # the learn section's two charts


def test_demo_settings_are_checked_before_training(tmp_path: Path) -> None:
    with pytest.raises(ShiftkitError, match="fold_method"):
        run_demo(DemoSettings(fold_method="full"), tmp_path / "out")
    with pytest.raises(ShiftkitError, match="corruption"):
        run_demo(DemoSettings(corruptions=("rain",)), tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_demo_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom shiftkit.cli import main\n"
        "try:\n    main(['demo', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'demo --help imported torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "shiftkit demo --quick" in out.stdout


@pytest.mark.assets
@pytest.mark.slow  # every section on a few examples: ~20 s
def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_asset("minilm")
    need_asset("vader")
    need_asset("efficientnet-lite0")
    need_asset("fashion-mnist")
    out = tmp_path / "demo"
    extra = tmp_path / "results-copy.json"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--json", str(extra)]) == 0
    printed = capsys.readouterr().out
    assert "max fold diff" in printed and "report.html" in printed
    for heading in ("learn: ", "fold: ", "merge: ", "compress: ", "adapt: "):
        assert f"\n{heading}" in printed, heading

    payload = json.loads((out / "results.json").read_text())
    assert payload == json.loads(extra.read_text())
    assert payload["sections"] == list(SECTIONS)
    assert payload["train_domain"] == "tweets" and payload["domains"] == DOMAINS
    assert payload["environment"]["torch"] and payload["timings"]["total_seconds"] > 0

    # learn: five methods, each tested on every domain, saved, reloaded and folded
    rows = {r["method"]: r for r in payload["methods"]}
    assert list(rows) == METHODS
    for method, r in rows.items():
        assert set(r["accuracy"]) == set(DOMAINS), method
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert r["max_fold_diff"] < 1e-4, method  # fold (or task-vector add) reproduces the trained model
        assert (out / r["shift_file"]).stat().st_size == r["file_bytes"]
        assert r["train_seconds"] > 0
    full = rows["full"]["trainable_params"]
    assert rows["probe"]["trainable_params"] == 384 * 2 + 2
    for method in ("lora", "ssf", "bitfit"):
        assert rows[method]["trainable_params"] < 0.02 * full
        assert sk.load(out / rows[method]["shift_file"]).method == method
    assert sk.load(out / "full.safetensors").method == "delta"

    # fold: the folded model is the base's size and matches the attached one
    base, attached, folded = payload["fold"]["rows"]
    assert folded["params"] == base["params"] == payload["full_params"] < attached["params"]
    assert folded["max_diff"] < 1e-4 and payload["fold"]["prediction_agreement"] == 1.0

    # merge: θ0, four experts, the oracle (each domain's own expert), two merges
    merge = payload["merge"]
    labels = [r["row"] for r in merge["rows"]]
    assert labels[0].startswith("θ0") and labels[1:5] == [f"LoRA expert: {d}" for d in DOMAINS]
    oracle = merge["rows"][5]
    assert oracle["accuracy"] == {d: merge["rows"][1 + i]["accuracy"][d] for i, d in enumerate(DOMAINS)}
    assert [r["method"] for r in merge["rows"][6:]] == ["task_arithmetic", "breadcrumbs"]
    for r in merge["rows"]:
        assert r["mean"] == pytest.approx(sum(r["accuracy"].values()) / 4)

    # compress: the four LoRA experts, uncompressed then each compressor; smaller files, same experts
    comp = payload["compress"]
    assert [r["compressor"] for r in comp["rows"]] == ["none", "compeft", "bcq"]
    for r in comp["rows"][1:]:
        assert r["ratio"] > 1 and set(r["accuracy"]) == set(DOMAINS)
    assert comp["rows"][0]["accuracy"] == {
        d: merge["rows"][1 + i]["accuracy"][d] for i, d in enumerate(DOMAINS)
    }

    # adapt: every method scored on every corruption; test-batch statistics beat the source model
    adapt = payload["adapt"]
    assert list(adapt["runs"]) == ["source", "norm", "tent"]
    for run in adapt["runs"].values():
        assert list(run["errors"]) == adapt["corruptions"] and run["counts"] == {
            c: adapt["images"] for c in adapt["corruptions"]
        }
    assert adapt["runs"]["norm"]["mean_error"] < adapt["runs"]["source"]["mean_error"]

    html = (out / "report.html").read_text()
    assert html.count("<svg") == 2 and html.count("<table>") == 5 and html.count("<h2>") == 5
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staged leftovers
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
