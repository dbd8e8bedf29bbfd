"""``shiftkit bench peft-vader``: the method table, row selection, the report, and a quick run (assets)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

import shiftkit as sk
from conftest import need_asset
from shiftkit.bench import peft_vader as pv
from shiftkit.bench.report import format_table, render_suite_html, suite_table_rows
from shiftkit.cli import main
from shiftkit.recipes import vader_classify as vc
from shiftkit.recipes.vader_classify import VaderSettings, method_plan

DOMAINS = ["tweets", "movies", "amazon", "nyt"]
ROW_KEYS = {
    "method", "trainable_params", "trainable_pct_of_full", "accuracy", "in_domain", "cross_domain_mean",
    "train_seconds", "eval_seconds", "steps", "final_loss", "foldable", "max_fold_diff", "shift_file",
    "file_bytes", "peak_rss_mb", "train_mem_mb", "worker_seconds", "lr", "epochs", "batch_size", "notes",
}  # fmt: skip


def test_every_registered_method_has_a_plan_that_builds() -> None:
    s = VaderSettings()
    for name in sk.list_methods():
        assert name in vc.PLANS, f"{name} is registered but has no MiniLM plan in vader_classify.PLANS"
        plan = method_plan(name, s)
        assert plan.config is not None and sk.get_method(plan.config) is sk.get_method(name)
        assert "head" in plan.config.modules_to_save  # every shift trains the new head too
        assert plan.train.lr == vc.PLANS[name].lr
    assert method_plan("probe", s).config is None and method_plan("probe", s).train.epochs == 30
    assert method_plan("full", VaderSettings(lr_scale=2.0)).train.lr == 2 * vc.PLANS["full"].lr


def test_plan_config_that_does_not_fit_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(vc.PLANS, "lora", vc.PlanSpec(lr=1e-3, notes="", config={"rank": 8}))
    with pytest.raises(sk.ShiftkitError, match=r"lora: the plan's config does not fit LoRAConfig"):
        method_plan("lora", VaderSettings())
    with pytest.raises(sk.ShiftkitError, match="no MiniLM plan"):
        method_plan("nope", VaderSettings())


def test_select_orders_rows_and_reports_what_is_skipped() -> None:
    registered = ["bitfit", "lora", "newmethod"]
    rows, skipped = pv._select(None, registered, lp_ft=True)
    assert rows == ["probe", "full", "lora", "bitfit"]  # table order; probe first (LP-FT)
    reasons = {s["method"]: s["reason"] for s in skipped}
    assert "no MiniLM plan" in reasons["newmethod"]
    assert set(reasons) == {"newmethod"} | (set(vc.PLANS) - {"probe", "full", "lora", "bitfit"})
    assert all("not registered" in reasons[m] for m in set(reasons) - {"newmethod"})
    rows, skipped = pv._select(["bitfit", "full"], registered, lp_ft=True)
    assert rows == ["probe", "full", "bitfit"] and skipped == []  # the probe's head starts the others
    assert pv._select(["bitfit"], registered, lp_ft=False)[0] == ["bitfit"]
    with pytest.raises(sk.ShiftkitError, match=r"unknown method\(s\) \['lorra'\]"):
        pv._select(["lorra"], registered, lp_ft=True)


def _row(method: str, i: int) -> dict[str, Any]:
    acc = {d: 0.6 + 0.05 * j + 0.01 * i for j, d in enumerate(DOMAINS)}
    return {
        "method": method,
        "trainable_params": [22_000_000, 5_000, 300][i % 3],
        "trainable_pct_of_full": [100.0, 0.02, 0.001][i % 3],
        "accuracy": acc,
        "in_domain": acc["tweets"],
        "cross_domain_mean": sum(acc[d] for d in DOMAINS[1:]) / 3,
        "train_seconds": 2.0,
        "max_fold_diff": 1e-6,
        "foldable": i != 1,
        "file_bytes": 4096,
        "peak_rss_mb": 700.4,
        "train_mem_mb": None if i == 2 else 150.0,
        "lr": 1e-3,
        "epochs": 2,
        "batch_size": 16,
        "steps": 64,
        "notes": "<b>n</b>",
    }


def _payload(methods: list[str]) -> dict[str, Any]:
    run = {
        "train_domain": "tweets",
        "domains": DOMAINS,
        "methods": [_row(m, i) for i, m in enumerate(methods)],
        "skipped": [{"method": "ghost", "reason": "not <registered>"}],
        "failed": [{"method": "broken", "error": "ValueError: <boom>"}],
    }
    settings = {
        "model": "minilm",
        "threshold": 0.5,
        "n_train": 512,
        "n_test": 400,
        "seed": 0,
        "fold_check": 64,
    }
    return {"title": "t", "settings": settings, "runs": [run], "memory": "m", "timings": {"total_seconds": 1}}


def test_suite_table_and_report() -> None:
    methods = [f"m{i}" for i in range(14)]  # as many rows as the full suite: legend wraps, colours differ
    payload = _payload(methods)
    rows, columns = suite_table_rows(payload["runs"][0])
    assert columns[:4] == ["method", "trainable", "% of full", "tweets (in)"]
    assert columns[-4:] == ["peak RSS", "train mem", "foldable", "max Δ"]
    assert [r["foldable"] for r in rows[:3]] == ["yes", "no", "yes"]
    assert (
        rows[0]["peak RSS"] == "700 MiB"
        and rows[0]["train mem"] == "150 MiB"
        and rows[2]["train mem"] == "n/a"
    )
    text = format_table(rows, columns)
    assert len(text.splitlines()) == 2 + len(methods)
    header, rule = text.splitlines()[:2]
    assert [header.index(c) for c in columns] == [m.start() for m in re.finditer("-+", rule)]  # aligned
    html = render_suite_html(payload)
    assert html.count("<svg") == 2 and "&lt;registered&gt;" in html and "ValueError: &lt;boom&gt;" in html
    assert "<b>n</b>" not in html and "skipped ghost" in html and "FAILED broken" in html
    legend = re.findall(r">(m\d+)</text>", html.split("<svg")[1])  # the accuracy chart's legend
    assert legend == methods


@pytest.mark.slow
def test_a_failing_worker_is_reported_not_raised(tmp_path: Path) -> None:
    spec = {
        "settings": {**VaderSettings().__dict__, "methods": ["nope"]},
        "method": "nope",
        "stage": str(tmp_path),
        "result": str(tmp_path / "r.json"),
    }
    result = pv._spawn(spec, tmp_path / "spec.json")
    assert result["ok"] is False and "no MiniLM plan" in result["error"]


@pytest.mark.assets
@pytest.mark.slow
def test_peft_vader_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_asset("minilm")
    need_asset("vader")
    out, extra = tmp_path / "pv", tmp_path / "copy.json"
    t0 = time.perf_counter()
    argv = ["bench", "peft-vader", "--quick", "--no-progress", "--methods", "ia3", "--out", str(out)]
    assert main([*argv, "--json", str(extra)]) == 0
    assert time.perf_counter() - t0 < 60
    printed = capsys.readouterr().out
    assert "trained on tweets" in printed and "peak RSS" in printed and "report.html" in printed

    payload = json.loads((out / "results.json").read_text())
    assert payload == json.loads(extra.read_text())
    assert {"suite", "title", "settings", "full_params", "runs", "environment", "timings", "memory"} <= set(
        payload
    )
    assert payload["settings"]["n_train"] == 16 and payload["settings"]["train_domains"] == ["tweets"]
    assert payload["environment"]["torch"] and payload["timings"]["total_seconds"] > 0
    (run,) = payload["runs"]
    assert run["train_domain"] == "tweets" and run["domains"] == DOMAINS and run["failed"] == []
    rows = {r["method"]: r for r in run["methods"]}
    assert list(rows) == ["probe", "ia3"]
    for name, r in rows.items():
        assert ROW_KEYS <= set(r), name
        assert set(r["accuracy"]) == set(DOMAINS) and all(0 <= a <= 1 for a in r["accuracy"].values())
        others = [r["accuracy"][d] for d in DOMAINS[1:]]
        assert r["cross_domain_mean"] == pytest.approx(sum(others) / 3)
        assert r["max_fold_diff"] < 1e-4 and r["foldable"] is True
        assert r["file_bytes"] > 0 and r["peak_rss_mb"] > 100 and r["train_mem_mb"] >= 0
        assert r["trainable_pct_of_full"] == pytest.approx(
            100 * r["trainable_params"] / payload["full_params"]
        )
    assert rows["probe"]["trainable_params"] == 384 * 2 + 2
    # (IA)3 on BERT: key/value outputs (6 × 2 × 384) and both output.dense inputs (6 × (384 + 1536)), + head
    assert rows["ia3"]["trainable_params"] == 6 * 2 * 384 + 6 * (384 + 1536) + 770
    assert rows["ia3"]["steps"] == 1 and rows["ia3"]["head_init"] == "probe"

    html = (out / "report.html").read_text()
    assert html.count("<svg") == 2 and "<table>" in html
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.json"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staged leftovers
