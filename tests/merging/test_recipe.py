"""Merge recipes: mergekit-shaped YAML, validation errors before any work, parameter mapping, round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from shiftkit.errors import ShiftkitError, UnknownMethodError
from shiftkit.merging.stream.recipe import load_recipe, resolve_recipe


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("base", "a", "b"):
        save_file({"w": torch.randn(2, 2)}, tmp_path / f"{name}.safetensors")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _data(method: str = "ties", **over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "merge_method": method,
        "base_model": "base.safetensors",
        "models": [
            {"model": "a.safetensors", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "b.safetensors", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    }
    data.update(over)
    return data


def test_mergekit_ties_recipe_resolves(files: Path) -> None:
    r = resolve_recipe(_data(parameters={"lambda": 0.8, "int8_mask": True, "normalize": True}, dtype="bf16"))
    assert r.method == "ties" and r.weights == [1.0, 0.5]
    assert (
        r.models == [files / "a.safetensors", files / "b.safetensors"]
        and r.base == files / "base.safetensors"
    )
    assert r.params["density"] == 0.5 and r.params["lambda_"] == 0.8 and "int8_mask" not in r.params
    assert r.params["semantics"] == "mergekit" and r.out_dtype == "bfloat16" and r.max_shard_size == 2 * 10**9


def test_unknown_keys_name_the_allowed_ones(files: Path) -> None:
    with pytest.raises(ShiftkitError, match=r"unknown recipe key\(s\) \['modelz'\].*merge_method"):
        resolve_recipe(_data(modelz=[]))
    bad = _data()
    bad["models"][0]["weights"] = 1
    with pytest.raises(ShiftkitError, match=r"models\[0\].*'weights'.*allowed"):
        resolve_recipe(bad)
    with pytest.raises(ShiftkitError, match=r"unknown shiftkit key.*'shard'"):
        resolve_recipe(_data(shiftkit={"shard": 1}))


def test_models_or_slices_not_both(files: Path) -> None:
    with pytest.raises(ShiftkitError, match=r"exactly one of 'models:'.*'slices:'"):
        resolve_recipe(_data(slices=[{"sources": []}]))
    with pytest.raises(ShiftkitError, match="modules:"):
        resolve_recipe(_data(modules={}))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_missing_base(files: Path, method: str) -> None:
    data = _data(method)
    del data["base_model"]
    with pytest.raises(ShiftkitError, match="needs 'base_model:'"):
        resolve_recipe(data)


def test_unknown_method(files: Path) -> None:
    with pytest.raises(UnknownMethodError, match="Did you mean 'ties'"):
        resolve_recipe(_data("tiess"))


def test_bad_parameter_name_and_value(files: Path) -> None:
    with pytest.raises(ShiftkitError, match=r"no parameter 'epsilon'.*accepts"):
        resolve_recipe(_data(parameters={"epsilon": 0.1}))
    bad = _data()
    for m in bad["models"]:
        m["parameters"]["density"] = -1.0
    with pytest.raises(ShiftkitError, match="density must be >= 0"):
        resolve_recipe(bad)
    with pytest.raises(ShiftkitError, match="semantics"):
        resolve_recipe(_data(parameters={"semantics": "nope"}))
    with pytest.raises(ShiftkitError, match="neither a value, a gradient"):
        resolve_recipe(_data(parameters={"lambda": {"filter": "mlp"}}))
    assert resolve_recipe(_data(parameters={"lambda": [0.1, 0.9]})).settings["lambda"] == [0.1, 0.9]
    with pytest.raises(ShiftkitError, match="unknown dtype"):
        resolve_recipe(_data(dtype="int3"))


def test_per_model_parameters(files: Path) -> None:
    mixed = _data()
    mixed["models"][1]["parameters"]["density"] = 0.7  # TIES's density is per model (mergekit: NON_BASE)
    assert resolve_recipe(mixed).params["density"] == [0.5, 0.7]
    bad = _data()
    bad["models"][1]["parameters"]["lambda"] = 0.7  # λ is one value for the whole merge
    with pytest.raises(ShiftkitError, match=r"per-model values of 'lambda_'.*not supported for 'ties'"):
        resolve_recipe(bad)
    ok = _data(parameters={"density": 0.9})  # per-model values win over the global one, as in mergekit
    assert resolve_recipe(ok).params["density"] == 0.5


def test_dare_rescale_bool_maps_to_l1(files: Path) -> None:
    assert resolve_recipe(_data("dare_ties", parameters={"rescale": True})).params["rescale"] == "l1"
    assert resolve_recipe(_data("dare_linear", parameters={"rescale": False})).params["rescale"] == "none"


def test_base_listed_in_models(files: Path) -> None:
    data = _data()
    data["models"].insert(0, {"model": "base.safetensors"})
    assert len(resolve_recipe(data).models) == 2  # the task-arithmetic family takes τ of the others only
    slerp = {
        "merge_method": "slerp",
        "base_model": "base.safetensors",
        "parameters": {"t": 0.2},
        "models": [{"model": "a.safetensors"}, {"model": "base.safetensors"}],
    }
    r = resolve_recipe(slerp)
    assert r.models == [files / "base.safetensors", files / "a.safetensors"]  # t = 0 is the base
    one = resolve_recipe({**slerp, "models": [{"model": "a.safetensors"}]})  # mergekit's "base + one model"
    assert one.models == r.models and one.weights == [1.0, 1.0]
    with pytest.raises(ShiftkitError, match="slerp merges exactly 2"):
        resolve_recipe({**slerp, "models": [{"model": "a.safetensors"}, {"model": "b.safetensors"}] * 2})


def test_relative_paths_from_recipe_folder_and_round_trip(
    files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = files / "r.yaml"
    path.write_text(yaml.safe_dump(_data(shiftkit={"max_shard_size": "500MB", "on_missing": "zero"})))
    monkeypatch.chdir(files.parent)  # the paths are relative to the recipe now, not the cwd
    r = load_recipe(path)
    assert r.base == files / "base.safetensors" and r.max_shard_size == 500 * 10**6 and r.on_missing == "zero"
    again = resolve_recipe(yaml.safe_load(r.to_yaml()))
    assert (again.method, again.base, again.models, again.weights, again.params) == (
        r.method,
        r.base,
        r.models,
        r.weights,
        r.params,
    )
    assert "version" in yaml.safe_load(r.to_yaml())["shiftkit"]


def test_missing_model_and_bad_yaml(files: Path) -> None:
    data = _data()
    data["models"][0]["model"] = "org/hub-model"
    with pytest.raises(ShiftkitError, match=r"not found.*local"):
        resolve_recipe(data)
    (files / "bad.yaml").write_text("merge_method: [")
    with pytest.raises(ShiftkitError, match="not valid YAML"):
        load_recipe(files / "bad.yaml")
    with pytest.raises(FileNotFoundError):
        load_recipe(files / "nope.yaml")
