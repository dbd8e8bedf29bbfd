"""``shiftkit bench merge-vader``: grids chosen on validation only, table and report, a quick run (assets)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import shiftkit as sk
from conftest import need_asset
from shiftkit.bench import _merge_vader_merges as mvm
from shiftkit.bench import merge_vader as mv
from shiftkit.cli import main

DOMAINS = ["tweets", "movies", "amazon", "nyt"]


def test_select_on_validation_takes_the_best_score_and_the_earliest_on_a_tie() -> None:
    calls: list[float] = []

    def score(v: float) -> float:
        calls.append(v)
        return {0.3: 0.70, 0.5: 0.80, 1.0: 0.80}[v]

    best, scores = mvm.select_on_validation((0.3, 0.5, 1.0), score)
    assert best == 0.5 and scores == {"0.3": 0.70, "0.5": 0.80, "1.0": 0.80} and calls == [0.3, 0.5, 1.0]
    assert mvm.select_on_validation((1.0, 0.5), {0.5: 0.8, 1.0: 0.8}.__getitem__)[0] == 1.0
    with pytest.raises(sk.ShiftkitError, match="at least one"):
        mvm.select_on_validation((), float)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def test_merge_grid_is_chosen_on_validation_and_only_the_choice_is_tested(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Validation prefers the middle λ of the grid, the test split the last: the row reports the middle."""
    model = _Tiny()
    tvs = {d: sk.Shift("delta", None, {"w": torch.tensor([1.0, float(i)])}) for i, d in enumerate(DOMAINS)}
    total = sum(tv["w"] for tv in tvs.values())  # λ Σ τ_t
    val, test = {d: ["val"] for d in DOMAINS}, {d: ["test"] for d in DOMAINS}
    seen: list[tuple[str, float]] = []
    lams = mvm.GRIDS["task_arithmetic"].values
    assert len(lams) == 3 and lams == tuple(sorted(lams))

    def fake_evaluate(m: nn.Module, batches: dict[str, Any]) -> dict[str, float]:
        split = "val" if batches is val else "test" if batches is test else "?"
        lam = float(m.w.detach()[0] / total[0])  # recover λ from the merged weights
        seen.append((split, round(lam, 6)))
        target = lams[1] if split == "val" else lams[2]
        return {d: 1.0 - abs(lam - target) / 4 for d in batches}

    monkeypatch.setattr(mvm, "evaluate", fake_evaluate)
    data = SimpleNamespace(
        model=model,
        base_state={k: v.clone() for k, v in model.state_dict().items()},
        val_batches=val,
        test_batches=test,
        test={d: [0] * 10 for d in DOMAINS},
        settings=SimpleNamespace(seed=0, grid="small"),
    )
    row = mvm._merge_one(data, "task_arithmetic", "lora", tvs, one=False)  # type: ignore[arg-type]
    assert seen == [*[("val", lam) for lam in lams], ("test", lams[1])]  # test: once, after the choice
    expected = {str(lam): 1.0 - abs(lam - lams[1]) / 4 for lam in lams}
    assert row["coef"] == f"lambda={lams[1]}" and row["val_scores"] == pytest.approx(expected)
    test_acc = 1.0 - abs(lams[1] - lams[2]) / 4
    assert row["accuracy"] == pytest.approx({d: test_acc for d in DOMAINS}) and row["mixed"] == pytest.approx(
        test_acc
    )
    assert torch.equal(model.w, torch.zeros(2))  # θ0 restored after every candidate
    # λ only rescales the merged shift: one merge, every grid value a multiple of it (exact for TA)
    assert mvm.GRIDS["task_arithmetic"].scale and sk.merge(list(tvs.values()), lambda_=0.5).allclose(
        0.5 * sk.merge(list(tvs.values()))
    )


def _payload() -> dict[str, Any]:
    def row(name: str, group: str, kind: str, mixed: float) -> dict[str, Any]:
        acc = {d: 0.6 + 0.05 * i for i, d in enumerate(DOMAINS)}
        return {"row": name, "group": group, "kind": kind, "accuracy": acc, "mean": 0.675, "mixed": mixed,
                "coef": "lambda=0.5", "seconds": 1.5, "notes": "<i>n</i>"}  # fmt: skip

    rows = [row("θ0", "base", "-", 0.6), row("lora merge: ties", "merge", "lora", 0.70)]
    rows += [row("lora route: key-query (FedIns)", "route", "lora", 0.72)]
    return {
        "title": "t", "domains": DOMAINS, "rows": rows, "failed": [{"row": "x", "error": "E: <boom>"}],
        "skipped": [], "cache": {"hit": False}, "threads": 2, "environment": {},
        "timings": {"total_seconds": 3},
        "settings": {"n_train": 8, "n_val": 4, "n_test": 8, "epochs": 1, "batch_size": 16, "full_lr": 1e-4,
                     "lora_lr": 2e-3, "lora_r": 8, "seed": 0, "size": "quick"},
    }  # fmt: skip


def test_table_verdict_and_report() -> None:
    payload = _payload()
    payload["verdict"] = mv.verdict(payload["rows"])
    assert "(lora route: key-query (FedIns), 0.720) beats the best static LoRA merge" in payload["verdict"]
    assert "+0.020" in payload["verdict"]
    rows, columns = mv.table_rows(payload)
    assert columns == ["row", *DOMAINS, "mean", "mixed", "coef", "seconds"]
    assert rows[1]["mixed"] == "0.700" and rows[1]["tweets"] == "0.600" and rows[1]["seconds"] == "1.5"
    html = mv.render_html(payload)
    assert html.count("<svg") == 2 and "E: &lt;boom&gt;" in html and "<i>n</i>" not in html
    parser = argparse.ArgumentParser()
    mv.add_arguments(parser)
    args = parser.parse_args(["--quick", "--methods", "ties,pcb", "--no-cache"])
    assert args.quick and args.no_cache and args.out == "runs/merge-vader"


@pytest.mark.assets
@pytest.mark.slow
def test_merge_vader_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_asset("minilm")
    need_asset("vader")
    out = tmp_path / "mv"
    assert main(["bench", "merge-vader", "--quick", "--no-cache", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mixed" in printed and "report.html" in printed and "mixed-domain stream" in printed
    payload = json.loads((out / "results.json").read_text())
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert payload["failed"] == [] and payload["settings"]["n_train"] == 16
    labels = [r["row"] for r in payload["rows"]]
    pair_or_single = {"arcee_fusion", "nearswap", "nuslerp", "passthrough"}  # recipe methods: base + one
    for name in sk.list_merge_methods():  # every method that merges 4 experts has its row (LoRA vectors)
        listed = any(label.startswith(f"lora merge: {name}") for label in labels)
        assert listed == (name not in pair_or_single), name
    assert "lora merge: atlas (supervised)" in labels and "lora merge: atlas (entropy)" in labels
    assert {r["row"] for r in payload["rows"] if r["group"] == "route"} == {
        "lora route: key-query (FedIns)",
        "lora route: learned MLP (PSEC)",
    }
    for r in payload["rows"]:
        assert set(r["accuracy"]) == set(DOMAINS), r["row"]
        assert all(0.0 <= a <= 1.0 for a in [*r["accuracy"].values(), r["mean"], r["mixed"]]), r["row"]
    for r in payload["rows"]:
        if r["group"] == "route":  # per-sentence routing: the shuffled stream scores like the pooled domains
            assert r["mixed"] == pytest.approx(r["mixed_pooled"], abs=1e-6)
    assert payload["train_info"]["lora-tweets"]["lora_delta_max_diff"] < 1e-6


def test_cache_key_follows_the_expert_settings_but_not_the_kinds() -> None:
    from shiftkit.bench._merge_vader_merges import MergeVaderSettings
    from shiftkit.recipes.vader_experts import _lora_config, cache_key

    base = MergeVaderSettings()
    assert (base.n_train, base.lora_r, base.lora_targets) == (512, 8, "all-linear")  # peft-vader's LoRA plan
    assert cache_key(base) == cache_key(MergeVaderSettings(kinds=("lora",)))  # kinds share one folder
    assert cache_key(base) != cache_key(MergeVaderSettings(lora_targets=r".*\.(query|value)"))
    assert cache_key(base) != cache_key(MergeVaderSettings(n_train=256))
    cfg = _lora_config(base)  # the frozen shared head is never a LoRA target
    assert cfg.target_modules == "all-linear" and cfg.exclude_modules == ("head",)
