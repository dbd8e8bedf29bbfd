"""A method of each verb added from the user's own module: one file, one decorator each, no edit of shiftkit.

The module below is written to a temporary folder at test time (it is not part of shiftkit) and defines a
learnable method (``rowscale``), a merge method (``halfway``) and a test-time method (``mean_centre``).
Each then works wherever a built-in one does: attach / fold / save / load, ``sk.merge``,
``sk.merge_lora``, ``shiftkit merge`` (the recipe's ``plugins:`` key), ``adapt.make`` and
``shiftkit adapt --plugin``.
"""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

import shiftkit as sk
from shiftkit import adapt
from shiftkit.cli import main
from shiftkit.core.registry import METHODS
from shiftkit.merging.registry import MERGE_METHODS

PLUGIN = '''
"""A user's own shiftkit methods (written by tests/test_plugins.py)."""
from dataclasses import dataclass

import torch
from torch import nn

import shiftkit as sk
from shiftkit import adapt
from shiftkit.adapt.base import TTAMethod
from shiftkit.core.wrapper import ShiftWrapper


@sk.register_merge_method("halfway", recipe_required=("weight",), weighting="normalized")
def halfway(tensors, weights, *, keep=0.5):
    """keep × the weighted average of the shifts."""
    total = sum(weights)
    return {k: keep * sum(w * t[k] for w, t in zip(weights, tensors)) / total for k in tensors[0]}


@dataclass(frozen=True, kw_only=True)
class RowScaleConfig(sk.ShiftConfig):
    init: float = 1.0


class RowScale(ShiftWrapper):
    def __init__(self, base, config):
        super().__init__(base)
        self.scale = nn.Parameter(torch.full((base.out_features,), float(config.init)))

    def forward(self, x):
        return self.base(x) * self.scale

    def effective_params(self):
        out = {"weight": self.base.weight * self.scale[:, None]}
        if self.base.bias is not None:
            out["bias"] = self.base.bias * self.scale
        return out


@sk.register_method("rowscale", config=RowScaleConfig, targets=(nn.Linear,), foldable=True)
def wrap(module, config):
    return RowScale(module, config)


@adapt.register_method("mean_centre", adapts="outputs", needs_grad=False)
class MeanCentre(TTAMethod):
    """Subtract the batch's mean logit vector (a toy output correction)."""

    def __init__(self, model, *, episodic=False, steps=1):
        super().__init__(model, episodic=episodic, steps=steps)

    def forward(self, x):
        with torch.no_grad():
            out = self.model(x)
        return out - out.mean(0, keepdim=True)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    folder = tmp_path_factory.mktemp("plugins")
    name = f"my_shiftkit_plugin_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(PLUGIN)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))
        # the registries are process-wide: leave them as the other tests expect
        for reg, key in ((MERGE_METHODS, "halfway"), (METHODS, "rowscale")):
            reg._entries.pop(key, None)
        adapt.registry.ADAPT_METHODS._entries.pop("mean_centre", None)
        sys.modules.pop(name, None)


def _shift(seed: int) -> sk.Shift:
    g = torch.Generator().manual_seed(seed)
    t = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}
    return sk.Shift("delta", None, t, {k: tuple(v.shape) for k, v in t.items()})


def test_learnable_method_from_a_user_module(plugin: ModuleType, tmp_path: Path) -> None:
    assert "rowscale" in sk.list_methods()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    sk.attach_(model, plugin.RowScaleConfig(init=1.5, target_modules=["0"]))
    attached = model(x).detach()
    sk.save(sk.extract(model), tmp_path / "rs.safetensors")  # the config is resolved through the registry
    back = sk.load(tmp_path / "rs.safetensors")
    assert type(back.config).__name__ == "RowScaleConfig" and back.config.init == 1.5
    sk.fold_(model)
    torch.testing.assert_close(model(x), attached)


def test_merge_method_from_a_user_module(plugin: ModuleType, tmp_path: Path) -> None:
    a, b = _shift(0), _shift(1)
    merged = sk.merge([a, b], method="halfway", weights=[1.0, 3.0], keep=0.5)
    torch.testing.assert_close(merged.tensors["w"], 0.5 * (a.tensors["w"] + 3 * b.tensors["w"]) / 4)
    # sk.merge_lora: exact ΔW of LoRA inputs, merged by the user's method
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 3))
    loras = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 3))
        m.load_state_dict(lin.state_dict())
        sk.attach_(m, sk.LoRAConfig(r=2, target_modules=["0"], init_lora_weights=False))
        loras.append(sk.extract(m))
    res = sk.merge_lora(loras, method="halfway", output="delta")
    want = 0.5 * (sk.to_delta(loras[0]).tensors["0.weight"] + sk.to_delta(loras[1]).tensors["0.weight"]) / 2
    torch.testing.assert_close(res.shift.tensors["0.weight"], want)


def test_recipe_plugins_key_runs_a_user_merge(plugin: ModuleType, tmp_path: Path) -> None:
    base = {"w": torch.zeros(3, 4)}
    save_file(base, str(tmp_path / "base.safetensors"))
    a, b = _shift(0), _shift(1)
    save_file({"w": a.tensors["w"]}, str(tmp_path / "a.safetensors"))
    save_file({"w": b.tensors["w"]}, str(tmp_path / "b.safetensors"))
    recipe: dict[str, Any] = {
        "plugins": [plugin.__name__],
        "merge_method": "halfway",
        "base_model": str(tmp_path / "base.safetensors"),
        "models": [
            {"model": str(tmp_path / "a.safetensors"), "parameters": {"weight": 1.0}},
            {"model": str(tmp_path / "b.safetensors"), "parameters": {"weight": 1.0}},
        ],
        "parameters": {"keep": 0.25},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(path), str(out), "--no-progress"]) == 0
    got = sk.load(out).tensors["w"]
    torch.testing.assert_close(got, 0.25 * (a.tensors["w"] + b.tensors["w"]) / 2)
    saved = yaml.safe_load((tmp_path / "merged.recipe.yaml").read_text())
    assert saved["plugins"] == [plugin.__name__]  # the resolved recipe re-runs with the same plugin
    recipe["plugins"] = ["no_such_plugin_module"]
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(sk.ShiftkitError, match="cannot import plugin module 'no_such_plugin_module'"):
        sk.merge_recipe(path, tmp_path / "x.safetensors", progress=False)


def test_adapt_method_from_a_user_module(
    plugin: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert adapt.get_method("mean_centre").adapts == "outputs"
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    x = torch.rand(4, 3, 32, 32)
    out = adapt.make("mean_centre", model)(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(10), atol=1e-6, rtol=0)
    args = [
        "adapt",
        "--plugin",
        plugin.__name__,
        "--method",
        "source",
        "mean_centre",
        "--model",
        "test_tta_suite:build_probe",
        "--data",
        "test_tta_suite:make_data",
        "--corruptions",
        "none",
        "--batch-size",
        "10",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    sys.path.insert(0, str(Path(__file__).parent / "bench"))
    try:
        assert main(args) == 0
    finally:
        sys.path.remove(str(Path(__file__).parent / "bench"))
    payload = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["method"] for r in payload["runs"]] == ["source", "mean_centre"]
    assert "mean_centre" in capsys.readouterr().out
