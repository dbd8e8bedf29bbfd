"""``shiftkit bench intrinsic-dim``: options, table and report from a payload, and a quick run (assets)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import need_asset
from shiftkit.bench import intrinsic_dim as idim
from shiftkit.cli import main


def _payload() -> dict[str, Any]:
    result = {
        "dims": [10, 100, 1000],
        "accuracy": [0.3, 0.85, 0.97],
        "p_full": 0.9,
        "threshold": 0.9,
        "d_int90": 100,
        "d_int90_interpolated": 55.0,
        "num_params": 5000,
        "projection": "fastfood",
        "seconds": [1.0, 1.5, 2.0],
        "full_seconds": 0.5,
        "target": 0.81,
    }
    settings = {**idim.IntrinsicDimSettings().__dict__, "n_train": 1300, "projection": "<fast>"}
    return {
        "suite": "intrinsic-dim",
        "title": "id <title>",
        "settings": settings,
        "result": result,
        "environment": {"torch": "x", "shiftkit": "y", "python": "3", "threads": 1},
        "timings": {"total_seconds": 3.0},
    }


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    idim.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_options_build_the_settings() -> None:
    s = idim._settings(_args())
    assert s == idim.IntrinsicDimSettings()
    assert s.dims == (10, 20, 50, 100, 200, 500, 1000) and s.projection == "fastfood" and s.threads == 1
    q = idim._settings(_args("--quick", "--dims", "5", "7", "--projection", "sparse", "--seed", "3"))
    assert q.dims == (5, 7) and q.projection == "sparse" and q.seed == 3
    assert q.epochs == idim.SIZES["quick"]["epochs"] and q.hidden == idim.SIZES["quick"]["hidden"]
    with pytest.raises(SystemExit):
        _args("--projection", "gaussian")


def test_table_summary_and_html_from_a_payload() -> None:
    payload = _payload()
    rows, columns = idim.table_rows(payload)
    assert columns == ["run", "trainable", "% of D", "accuracy", "% of full", "≥ 90%", "train s"]
    assert [r["run"] for r in rows] == ["full", "dim 10", "dim 100", "dim 1000"]
    assert [r["≥ 90%"] for r in rows[1:]] == ["no", "yes", "yes"]  # target 0.81
    assert rows[1]["% of D"] == "0.2%" and rows[2]["% of full"] == "94.4%"
    text = idim.summary(payload)
    assert "d_int90 = 100" in text and "interpolated 55" in text and "D = 5,000" in text
    page = idim.render_html(payload)
    assert "<title>id &lt;title&gt;</title>" in page and "&lt;fast&gt;" in page and "<fast>" not in page
    assert page.count("<circle") == 3 and "<svg" in page
    payload["result"].update(d_int90=None, d_int90_interpolated=None)
    assert "no dim of the grid reached" in idim.summary(payload)
    assert "<svg" in idim.render_html(payload)


@pytest.mark.assets
@pytest.mark.slow
def test_quick_run_writes_results_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_asset("digits")
    out, extra = tmp_path / "id", tmp_path / "copy.json"
    argv = ["bench", "intrinsic-dim", "--quick", "--no-progress", "--out", str(out), "--json", str(extra)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dim 10" in printed and "dim 100" in printed and "d_int90" in printed
    payload = json.loads((out / "results.json").read_text())
    assert payload == json.loads(extra.read_text())
    r = payload["result"]
    assert r["dims"] == [10, 100] and len(r["accuracy"]) == 2
    assert r["num_params"] == 16 * 64 + 16 + 16 * 16 + 16 + 16 * 10 + 10  # the quick MLP, all of θ
    assert 0 < r["p_full"] <= 1 and payload["settings"]["n_train"] == 256
    assert "<svg" in (out / "report.html").read_text()
