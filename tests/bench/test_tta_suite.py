"""``shiftkit bench tta-fmnist-c`` and ``shiftkit adapt``: tables, results and reports, on tiny runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import need_asset
from shiftkit.bench import tta_fmnist_c as suite
from shiftkit.cli import main
from shiftkit.data import grey28_to_rgb32
from shiftkit.recipes.image_source import digits_images


class Probe(nn.Module):
    """Conv → BN → ReLU → pool → Linear on (N, 3, 32, 32) images, 10 classes; deterministic weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def build_probe() -> nn.Module:
    """The ``--model`` factory of the CLI tests."""
    return Probe().eval()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The ``--data`` factory: 40 images whose class is readable from the red channel's mean."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 10
    x = torch.rand(40, 3, 32, 32, generator=g) * 0.2
    x[:, 0] += y[:, None, None] / 12.5
    return x.clamp(0, 1), y


def test_grey28_to_rgb32_pads_and_repeats() -> None:
    img = torch.arange(28 * 28, dtype=torch.uint8).reshape(1, 28, 28).numpy()
    x = grey28_to_rgb32(img)
    assert x.shape == (1, 3, 32, 32)
    assert torch.equal(x[0, 0, 2:30, 2:30], torch.as_tensor(img[0]).float() / 255.0)
    assert x[0, :, :2].abs().sum() == 0 and torch.equal(x[0, 0], x[0, 2])


def test_adapt_cli_with_factories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "adapt",
            "--model",
            "test_tta_suite:build_probe",
            "--data",
            "test_tta_suite:make_data",
            "--corruptions",
            "gaussian_noise",
            "contrast",
            "--method",
            "source",
            "norm",
            "tent",
            "--set",
            "tent.lr=0.01",
            "--stream",
            "episodic",
            "--batch-size",
            "10",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "gaussian_noise" in text and "tent" in text
    payload = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in payload["runs"]] == ["source", "norm", "tent"]
    assert payload["params"]["tent"] == {"lr": 0.01}
    for r in payload["runs"]:
        assert set(r["errors"]) == {"gaussian_noise", "contrast"}
        assert r["counts"] == {"gaussian_noise": 40, "contrast": 40}
        assert all(0.0 <= e <= 100.0 for e in r["errors"].values())
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    # source and norm differ only by BN statistics; with a 6-channel BN on shifted data they must differ
    assert payload["runs"][0]["errors"] != payload["runs"][1]["errors"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "tnet"], "unknown adapt method"),
        (["--corruptions", "fogg"], "unknown corruption"),
        (["--stream", "contiual"], "continual"),
        (["--method", "source", "norm", "--set", "lr=1"], "name the method"),
        (["--method", "tent", "--set", "tent.momentum=0.5"], "momentum"),
        (["--set", "lr"], "KEY=VALUE"),
        (["--method", "norm", "--set", "tent.lr=1"], "not among"),
        (["--data", "mnist6k"], "unknown --data"),
        (["--data", "nomodule_xyz:load"], "cannot load data factory"),
        (["--stream", "gradual"], "needs corruptions"),
    ],
)
def test_adapt_cli_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["adapt", "--model", "test_tta_suite:build_probe", "--data", "test_tta_suite:make_data"]
    rc = main([*base, "--corruptions", "none", "--out", str(tmp_path), "--no-progress", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.assets
def test_digits_images() -> None:
    need_asset("digits")
    x, y = digits_images()
    assert x.shape == (1797, 3, 32, 32) and y.shape == (1797,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert x[:, :, :2].abs().sum() == 0  # padded like MNIST


@pytest.mark.assets
def test_suite_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole suite end to end on a tiny budget: source training, corruptions, 3 streams, digits."""
    for name in ("efficientnet-lite0", "fashion-mnist", "mnist5k", "digits"):
        need_asset(name)
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    out = tmp_path / "out"
    sizes_args = [
        "--quick",
        "--per-domain",
        "20",
        "--batch-size",
        "10",
        "--methods",
        "source",
        "norm",
        "lame",
    ]
    args = parser.parse_args(
        [*sizes_args, "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    )
    sizes = dict(suite.SIZES["quick"])
    suite.SIZES["quick"] = {
        **sizes,
        "n_train": 256,
        "mnist_n_train": 256,
        "digits_n": 300,
        "fisher_images": 20,
        "corruptions": ("fog", "contrast"),
    }
    try:
        assert suite.run(args) == 0
    finally:
        suite.SIZES["quick"] = sizes
    text = capsys.readouterr().out
    assert "Mean error %" in text and "mnist→digits" in text
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["results"]) == {"episodic", "continual", "correlated"}
    for stream in payload["results"].values():
        assert list(stream) == ["source", "norm", "lame"]
        for run in stream.values():
            assert set(run["errors"]) == {"fog", "contrast"} and run["counts"]["fog"] == 20
    assert payload["streams"]["correlated"]["kind"] == "correlated"
    # the source model never adapts: its error cannot depend on the stream order
    src = [payload["results"][s]["source"]["mean_error"] for s in ("episodic", "continual", "correlated")]
    assert src[0] == src[1] == src[2]
    assert payload["digits"]["results"]["source"]["counts"] == {"digits": 300}
    assert list((tmp_path / "cache" / "tta-fmnist-c").glob("*.safetensors"))
    assert (out / "report.html").exists()
