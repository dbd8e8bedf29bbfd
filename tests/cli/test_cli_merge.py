"""``shiftkit merge``: runs a recipe, --dry-run writes nothing, --force, --json, help without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from shiftkit.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "merge_ties.yaml"


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(4, 4, generator=gen), "b.bias": torch.randn(4, generator=gen)}
    save_file(base, tmp_path / "base.safetensors")
    for i in range(2):
        save_file(
            {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
            tmp_path / f"ft{i}.safetensors",
        )
    data = {
        "merge_method": "task_arithmetic",
        "base_model": "base.safetensors",
        "models": [
            {"model": "ft0.safetensors", "parameters": {"weight": 1.0}},
            {"model": "ft1.safetensors", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"lambda": 0.5},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "r.yaml"


def test_merge_writes_folder_table_and_json(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, js = recipe.parent / "out", recipe.parent / "summary.json"
    assert main(["merge", str(recipe), str(out), "--no-progress", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "task_arithmetic" in text and "merged" in text
    d = {n: load_file(recipe.parent / f"{n}.safetensors") for n in ("base", "ft0", "ft1")}
    got = load_file(out / "model.safetensors")
    for k, b in d["base"].items():
        want = b + 0.5 * ((d["ft0"][k] - b) + 0.5 * (d["ft1"][k] - b))
        torch.testing.assert_close(got[k], want, atol=1e-6, rtol=0)
    summary = json.loads(js.read_text())
    assert summary["tensors"] == 2 and summary["params"]["lambda_"] == 0.5 and summary["bytes_written"] > 0
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(recipe), str(out), "--no-progress", "--force"]) == 0


def test_dry_run_prints_plan_and_writes_nothing(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(os.listdir(recipe.parent))
    assert (
        main(["merge", str(recipe), str(recipe.parent / "out"), "--dry-run", "--max-shard-size", "40B"]) == 0
    )
    text = capsys.readouterr().out
    assert "plan: task_arithmetic(lambda_=0.5" in text and "base.safetensors" in text
    assert "model.safetensors.index.json" in text and "model-00001-of-00002.safetensors" in text
    assert sorted(os.listdir(recipe.parent)) == before


def test_bad_recipe_is_a_clean_error(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe.write_text(recipe.read_text() + "slices: []\n")
    assert main(["merge", str(recipe), str(recipe.parent / "out")]) == 2
    assert "slices" in capsys.readouterr().err


def test_example_recipe_parses_until_the_missing_models(tmp_path: Path) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert data["merge_method"] == "ties" and len(data["models"]) == 3
    assert main(["merge", str(EXAMPLE), str(tmp_path / "out"), "--dry-run"]) == 2  # models/ do not exist


def test_help_has_example_and_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom shiftkit.cli import main\n"
        "try:\n    main(['merge', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "shiftkit merge examples/merge_smollm2_ties.yaml" in proc.stdout and "--dry-run" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "shiftkit", "merge", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "RECIPE.yaml" in proc.stdout
