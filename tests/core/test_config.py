"""Configs: frozen, normalised, validated, and serialised through the registry."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

import shiftkit as sk
from shiftkit.core.config import config_to_dict
from shiftkit.core.registry import config_from_dict


def test_configs_are_frozen_and_hashable() -> None:
    config = sk.LoRAConfig(r=4, target_modules=["q", "v"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.target_modules = ("k",)  # type: ignore[misc]
    assert hash(config) == hash(sk.LoRAConfig(r=4, target_modules=("q", "v")))
    assert len({config, sk.LoRAConfig(r=4, target_modules=["q", "v"])}) == 1


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        sk.LoRAConfig(4)  # type: ignore[misc]


def test_lists_become_tuples() -> None:
    config = sk.SSFConfig(
        target_modules=["a", "b"], exclude_modules=["c"], target_types=["Linear"], modules_to_save=["head"]
    )
    assert config.target_modules == ("a", "b")
    assert config.exclude_modules == ("c",)
    assert config.target_types == ("Linear",)
    assert config.modules_to_save == ("head",)
    assert config == sk.SSFConfig(
        target_modules=("a", "b"), exclude_modules=("c",), target_types=("Linear",), modules_to_save=("head",)
    )


def test_single_strings() -> None:
    config = sk.BitFitConfig(target_modules=r".*\.dense", target_types="LayerNorm", modules_to_save="head")
    assert config.target_modules == r".*\.dense"  # a string stays a regex
    assert config.target_types == ("LayerNorm",)  # a single type name is a one-element tuple
    assert config.modules_to_save == ("head",)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_modules", 5),
        ("target_modules", ["a", 1]),
        ("exclude_modules", {"a": 1}),
        ("target_types", [int]),
    ],
)
def test_bad_pattern_types(field: str, value: Any) -> None:
    with pytest.raises(sk.ShiftkitError, match=field):
        sk.LoRAConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 0},
        {"r": -1},
        {"r": 2.5},
        {"lora_dropout": 1.5},
        {"lora_dropout": 1.0},
        {"lora_dropout": -0.1},
        {"init_lora_weights": "kaiming"},
        {"lora_alpha": "16"},  # from a hand-written JSON/YAML file: must not fail later inside attach_
    ],
)
def test_invalid_lora_values(kwargs: dict[str, Any]) -> None:
    (name,) = kwargs
    with pytest.raises(sk.ShiftkitError, match=name):
        sk.LoRAConfig(**kwargs)


def test_invalid_ssf_values() -> None:
    with pytest.raises(sk.ShiftkitError, match="init_std"):
        sk.SSFConfig(init_std=-0.1)


def test_replace_validates() -> None:
    config = sk.LoRAConfig(r=4)
    assert config.replace(r=2) == sk.LoRAConfig(r=2)
    assert config.r == 4
    with pytest.raises(sk.ShiftkitError):
        config.replace(r=0)


def test_lora_scaling() -> None:
    assert sk.LoRAConfig(r=4, lora_alpha=8).scaling == 2.0
    assert sk.LoRAConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)
    assert sk.LoRAConfig().scaling == 1.0  # PEFT defaults r=8, alpha=8


def test_to_dict_shape_and_json_safety() -> None:
    config = sk.LoRAConfig(r=4, lora_alpha=16, target_modules=["q"], modules_to_save=["head"])
    data = config_to_dict(config)
    assert data == {
        "method": "lora",
        "version": sk.LoRAConfig.version,
        "config": {
            "target_modules": ["q"],
            "exclude_modules": None,
            "target_types": None,
            "modules_to_save": ["head"],
            "r": 4,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "use_rslora": False,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        },
    }
    assert config_from_dict(json.loads(json.dumps(data))) == config


@pytest.mark.parametrize(
    "config",
    [
        sk.LoRAConfig(),
        sk.LoRAConfig(
            r=3,
            lora_alpha=5.5,
            lora_dropout=0.1,
            use_rslora=True,
            init_lora_weights="gaussian",
            target_modules=r"layer\.\d+\.query",
            exclude_modules=["layer.0.query"],
            target_types=["Linear"],
            modules_to_save=["classifier"],
        ),
        sk.SSFConfig(identity_init=True, init_std=0.1, target_modules="all"),
        sk.BitFitConfig(exclude_modules=r".*norm.*"),
    ],
    ids=["lora-default", "lora-full", "ssf", "bitfit"],
)
def test_round_trip(config: sk.ShiftConfig) -> None:
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_unknown_keys_are_an_error() -> None:
    data = config_to_dict(sk.LoRAConfig())
    data["config"]["rank"] = 4
    with pytest.raises(sk.ShiftkitError, match="rank"):
        config_from_dict(data)


def test_missing_keys_take_defaults() -> None:
    # a file written before a field existed loads with that field's default
    assert config_from_dict({"method": "lora", "version": 1, "config": {"r": 2}}) == sk.LoRAConfig(r=2)


def test_newer_version_is_an_error() -> None:
    data = config_to_dict(sk.SSFConfig())
    data["version"] = sk.SSFConfig.version + 1
    with pytest.raises(sk.ShiftkitError, match="upgrade"):
        config_from_dict(data)


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"method": "lora", "config": {}},
        {"method": "lora", "version": 1, "config": {}, "extra": 1},
        {"method": "lora", "version": "1", "config": {}},
        {"method": "lora", "version": 1, "config": []},
        {"method": "lora", "version": 1, "config": {"r": 0}},
        {"method": "lora", "version": 1, "config": {"lora_dropout": "high"}},
    ],
)
def test_malformed_dicts(data: Any) -> None:
    with pytest.raises(sk.ShiftkitError):
        config_from_dict(data)


def test_unknown_method_in_dict() -> None:
    with pytest.raises(sk.UnknownMethodError, match="lora"):
        config_from_dict({"method": "lorra", "version": 1, "config": {}})


def test_method_names_match_the_registry() -> None:
    for name in sk.list_methods():
        cls = sk.get_method(name).config_cls
        assert cls.method == name
        assert cls.__name__.endswith("Config")
        assert sk.get_method(cls) is sk.get_method(name) is sk.get_method(cls())
