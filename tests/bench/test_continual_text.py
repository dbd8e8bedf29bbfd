"""``shiftkit bench continual-text``: the verdict and table from a payload, the balanced splits, and a tiny
run on MiniLM (assets) that resumes from its finished methods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import need_asset
from shiftkit.bench import continual_text as ct


def _method(transfer: float, last: float) -> dict[str, Any]:
    return {
        "metrics": {"transfer": transfer, "avg": (transfer + last) / 2, "last": last, "forgetting": 0.01},
        "seconds": 1.0, "peak_rss_mb": 100.0, "accuracy": [[last, transfer], [last, last]],
    }  # fmt: skip


def test_verdict_and_table() -> None:
    payload = {
        "methods": {
            "zero-shot": _method(0.61, 0.6),
            "finetune": _method(0.5, 0.8),
            "zscl": _method(0.6, 0.79),
        },
        "tasks": {"a": {}, "b": {}},
        "settings": {"n_train": 1, "n_test": 1, "epochs": 1, "seed": 0},
    }
    text = ct.verdict(payload)
    assert (
        "Transfer 60.0 vs zero-shot 61.0 (within" in text and "Last 79.0 vs fine-tuning 80.0 (within" in text
    )
    payload["methods"]["zscl"] = _method(0.55, 0.7)
    assert ct.verdict(payload).count("NOT within") == 2
    rows, columns = ct.table_rows(payload)
    assert columns[:4] == ["method", "transfer", "avg", "last"]
    assert rows[0]["MTIL anchor T/A/L"] == "69.4 / 65.3 / 65.3" and rows[2]["last"] == "70.0"
    payload.update(verdict="v", environment={}, timings={"total_seconds": 1.0})
    assert "<svg" in ct.render_html(payload)


def test_balanced_split_is_disjoint_and_even() -> None:
    texts = [f"t{i}" for i in range(90)]
    labels = np.array([0] * 50 + [1] * 30 + [2] * 10)
    tr, tr_y, te, te_y = ct._balanced(texts, labels, 12, 9, seed=0)
    assert np.bincount(tr_y).tolist() == [4, 4, 4] and np.bincount(te_y).tolist() == [3, 3, 3]
    assert not set(tr) & set(te)
    _, _, te2, _ = ct._balanced(texts, labels, 3, 9, seed=0)
    assert te2 == te  # the test set does not depend on n_train
    with pytest.raises(ValueError, match="class 2"):
        ct._balanced(texts, labels, 30, 3, seed=0)


@pytest.mark.assets
def test_tiny_run_resumes_finished_methods(tmp_path: Path) -> None:
    need_asset("minilm")
    need_asset("vader")
    need_asset("debates-2016")
    settings = {"n_train": 4, "n_test": 4, "n_reference": 4, "epochs": 1, "max_length": 16, "seed": 0}
    payload = ct.run_suite(settings, ["finetune"], tmp_path, progress=False)
    ft = payload["methods"]["finetune"]
    assert len(ft["accuracy"]) == 6 and all(len(r) == 6 for r in ft["accuracy"]) and len(ft["zero_shot"]) == 6
    assert all(0.0 <= a <= 1.0 for r in ft["accuracy"] for a in r)
    assert (tmp_path / "methods" / "finetune.json").is_file()
    again = ct.run_suite(settings, ["finetune"], tmp_path, progress=False)
    assert again["methods"]["finetune"]["accuracy"] == ft["accuracy"]  # read back, not retrained
