"""``shiftkit inspect`` and ``shiftkit fold``, run in-process through ``shiftkit.cli.main``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import shiftkit as sk
from shiftkit.cli import main

R = 2
# the model specs the CLI resolves: this module's factories, as "module:function" (the module is in
# sys.modules under __name__ whatever pytest's import mode)
MODEL = f"{__name__}:build"
OTHER_MODEL = f"{__name__}:build_other"


def build() -> nn.Module:
    """The base model: the same weights on every call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def build_other() -> nn.Module:
    """Same module names, other widths: a LoRA made for :func:`build` does not fit it."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def lora_params(linears: list[tuple[int, int]], r: int) -> int:
    """LoRA parameter count: ``A (r, in)`` + ``B (out, r)`` per linear."""
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in linears)


@pytest.fixture
def shift_file(tmp_path: Path) -> Path:
    """A LoRA shift with random A and B (a non-zero update) on both linears of :func:`build`."""
    model = build()
    torch.manual_seed(1)
    sk.attach_(model, sk.LoRAConfig(r=R, lora_alpha=4.0, init_lora_weights=False))
    path = tmp_path / "lora.safetensors"
    sk.save(sk.extract(model), path)
    return path


def test_inspect_prints_table_and_writes_json(
    shift_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "info.json"
    assert main(["inspect", str(shift_file), "--modules", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = lora_params([(6, 16), (16, 3)], R)  # 2·(6+16) + 2·(16+3) = 82
    assert "method" in printed and "lora" in printed
    assert "parameters" in printed and f"{expected:,}" in printed
    assert "config.r" in printed
    # --modules: one row per module, with its base shape and tensors
    assert "16x6" in printed and "3x16" in printed
    assert f"lora_A{(R, 6)}" in printed and f"lora_B{(3, R)}" in printed

    info = json.loads(out.read_text())
    assert info["method"] == "lora"
    assert info["parameters"] == expected
    assert info["tensor_bytes"] == expected * 4  # float32
    assert info["tensors"] == 4
    assert info["modules"] == 2
    assert info["base"] == {"0": [16, 6], "3": [3, 16]}
    assert info["module_tensors"]["0"] == {"lora_A": [R, 6], "lora_B": [16, R]}
    assert info["config"]["config"]["r"] == R
    assert info["file_bytes"] == shift_file.stat().st_size


def test_fold_writes_the_weights_of_attach_and_fold(
    shift_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "folded"
    assert main(["fold", str(shift_file), "--model", MODEL, "--output", str(out_dir)]) == 0
    assert "lora" in capsys.readouterr().out
    folded = load_file(str(out_dir / "model.safetensors"))

    # reference: fold by hand with the LoRA formula W' = W + (α/r)·B A
    base = build()
    shift = sk.load(shift_file)
    want = {k: v.clone() for k, v in base.state_dict().items()}
    for name in ("0", "3"):
        a, b = shift[f"{name}.lora_A"], shift[f"{name}.lora_B"]
        want[f"{name}.weight"] += (4.0 / R) * (b @ a)

    assert set(folded) == set(want)
    for key, tensor in want.items():
        torch.testing.assert_close(folded[key], tensor, atol=1e-6, rtol=0, msg=key)
    # the shift was not a no-op, so the comparison above has teeth
    assert not torch.allclose(folded["0.weight"], base.state_dict()["0.weight"], atol=1e-3)

    # and it equals the in-Python attach + fold
    model = build()
    sk.fold_(sk.attach_(model, shift))
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(folded[key], tensor, atol=1e-6, rtol=0, msg=key)


def test_fold_writes_json(shift_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "fold.json"
    code = main(
        ["fold", str(shift_file), "--model", MODEL, "--output", str(tmp_path / "o"), "--json", str(report)]
    )
    assert code == 0
    info = json.loads(report.read_text())
    n_base = 6 * 16 + 16 + 2 * 16 + 16 * 3 + 3
    assert info["method"] == "lora" and info["modules"] == 2
    assert info["params_before"] == info["params_after"] == n_base


def test_inspect_corrupt_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 this is not a safetensors file")
    assert main(["inspect", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("shiftkit inspect: error:")
    assert str(bad) in captured.err and "not a readable safetensors file" in captured.err
    assert "Traceback" not in captured.err


def test_inspect_truncated_file_is_a_clear_error(
    shift_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = tmp_path / "cut.safetensors"
    data = shift_file.read_bytes()
    cut.write_bytes(data[: len(data) - 20])  # header intact, tensor bytes short
    assert main(["inspect", str(cut)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shiftkit inspect: error:") and str(cut) in err
    assert "Traceback" not in err


def test_inspect_foreign_safetensors_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert main(["inspect", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shiftkit inspect: error:") and "not a shift file" in err


def test_fold_into_model_of_other_shapes_names_the_mismatch(
    shift_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "folded"
    assert main(["fold", str(shift_file), "--model", OTHER_MODEL, "--output", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shiftkit fold: error:")
    # names the module and both shapes: shift (16, 6) vs model (16, 5)
    assert re.search(r"\b0\b.*\(16, 6\).*\(16, 5\)", err), err
    assert not (out_dir / "model.safetensors").exists()


def test_fold_unknown_model_spec_is_a_clear_error(
    shift_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["fold", str(shift_file), "--model", f"{__name__}:no_such_factory", "--output", str(tmp_path)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("shiftkit fold: error:") and "no_such_factory" in err
