"""Target matching: list = exact/suffix, string = full regex, "all", "all-linear", types, excludes, errors."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import shiftkit as sk
from shiftkit.core.attach import attached_wrappers
from tiny_models import TaggedLinear, make


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.myquery = nn.Linear(4, 4)
        self.value = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.query(x) + self.myquery(x) + self.value(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Layer(), _Layer()])
        self.query = nn.Linear(4, 4)  # a top-level module named exactly "query"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return self.query(x)


def _wrapped(model: nn.Module, config: sk.ShiftConfig) -> list[str]:
    sk.attach_(model, config)
    return [n for n, _ in attached_wrappers(model)]


def test_list_entries_match_exact_name_or_dotted_suffix() -> None:
    names = _wrapped(_Net(), sk.LoRAConfig(target_modules=["query"]))
    assert names == ["layer.0.query", "layer.1.query", "query"]  # never "layer.0.myquery"


def test_list_entries_with_dots_match_a_suffix() -> None:
    names = _wrapped(_Net(), sk.LoRAConfig(target_modules=["0.query", "1.value"]))
    assert names == ["layer.0.query", "layer.1.value"]


def test_list_entry_is_not_a_substring_match() -> None:
    with pytest.raises(sk.TargetNotFoundError):
        sk.attach_(_Net(), sk.LoRAConfig(target_modules=["uery"]))


def test_regex_must_match_the_whole_name() -> None:
    assert _wrapped(_Net(), sk.LoRAConfig(target_modules=r".*\.query")) == ["layer.0.query", "layer.1.query"]
    assert _wrapped(_Net(), sk.LoRAConfig(target_modules=r"layer\.1\.(query|value)")) == [
        "layer.1.query",
        "layer.1.value",
    ]
    # "query" as a regex is a full match: only the top-level module named exactly "query"
    assert _wrapped(_Net(), sk.LoRAConfig(target_modules="query")) == ["query"]
    with pytest.raises(sk.TargetNotFoundError):  # a prefix is not a full match
        sk.attach_(_Net(), sk.LoRAConfig(target_modules=r"layer\.0\.quer"))


def test_all_targets_every_supported_module() -> None:
    net = _Net()
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    everything = [n for n, m in net.named_modules() if isinstance(m, nn.Linear | nn.LayerNorm)]
    assert _wrapped(copy.deepcopy(net), sk.LoRAConfig(target_modules="all")) == linears
    assert _wrapped(copy.deepcopy(net), sk.SSFConfig(target_modules="all")) == everything


def test_all_linear_excludes_the_output_embedding() -> None:
    model, _ = make("embedding")
    names = _wrapped(model, sk.LoRAConfig(target_modules="all-linear"))
    assert names == ["proj"]  # not "lm_head" (get_output_embeddings), not the Embedding
    # LoRA's default (target_modules=None) is "all-linear"
    model, _ = make("embedding")
    assert _wrapped(model, sk.LoRAConfig()) == ["proj"]
    # "all" does include the head and the embedding
    model, _ = make("embedding")
    assert _wrapped(model, sk.LoRAConfig(target_modules="all")) == ["embed", "proj", "lm_head"]


def test_exclude_modules_list_and_regex() -> None:
    names = _wrapped(_Net(), sk.LoRAConfig(target_modules="all", exclude_modules=["query", "myquery"]))
    assert names == ["layer.0.value", "layer.1.value"]
    names = _wrapped(
        _Net(), sk.LoRAConfig(target_modules=["query", "value"], exclude_modules=r"layer\.0\..*")
    )
    assert names == ["layer.1.query", "layer.1.value", "query"]


def test_exclude_everything_raises() -> None:
    with pytest.raises(sk.TargetNotFoundError, match="exclude_modules"):
        sk.attach_(_Net(), sk.LoRAConfig(target_modules=["value"], exclude_modules=["value"]))


def test_target_types_by_class_name_including_subclasses() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.plain = nn.Linear(3, 3)
            self.tagged = TaggedLinear(3, 3, tag="t")
            self.norm = nn.LayerNorm(3)

    # "Linear" is in TaggedLinear's MRO: both linears, never the norm
    assert _wrapped(Net(), sk.SSFConfig(target_modules="all", target_types=["Linear"])) == ["plain", "tagged"]
    assert _wrapped(Net(), sk.SSFConfig(target_modules="all", target_types=["TaggedLinear"])) == ["tagged"]
    assert _wrapped(Net(), sk.SSFConfig(target_modules="all", target_types="LayerNorm")) == ["norm"]
    with pytest.raises(sk.TargetNotFoundError):
        sk.attach_(Net(), sk.SSFConfig(target_modules="all", target_types=["Conv2d"]))


def test_subclass_wrapper_keeps_forwarding_attributes() -> None:
    model, x = make("tagged_linear")
    sk.attach_(model, sk.LoRAConfig(target_modules="all"))
    assert model.inp.tag == "in" and model.out.tag == "out"
    assert model.inp.in_features == 5 and model.out.out_features == 4
    assert model(x).shape == (3, 4)


def test_misspelt_target_suggests_similar_names() -> None:
    with pytest.raises(sk.TargetNotFoundError) as info:
        sk.attach_(_Net(), sk.LoRAConfig(target_modules=["qurey"]))
    msg = str(info.value)
    assert "qurey" in msg and "query" in msg


def test_pattern_matching_only_unsupported_types_is_a_clear_error() -> None:
    with pytest.raises(sk.ShiftkitError) as info:
        sk.attach_(_Net(), sk.LoRAConfig(target_modules=["norm"]))
    # something matched, so this is not "target not found": the message names the module and its type
    assert not isinstance(info.value, sk.TargetNotFoundError)
    assert "layer.0.norm" in str(info.value) and "LayerNorm" in str(info.value)


def test_list_entry_that_matches_nothing_warns() -> None:
    with pytest.warns(UserWarning, match="nonexistent"):
        names = _wrapped(_Net(), sk.LoRAConfig(target_modules=["value", "nonexistent"]))
    assert names == ["layer.0.value", "layer.1.value"]


def test_no_warning_when_every_entry_matches() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _wrapped(_Net(), sk.LoRAConfig(target_modules=["value", "query"]))


def test_attaching_twice_raises_and_keeps_the_first_shift() -> None:
    net = _Net()
    sk.attach_(net, sk.LoRAConfig(target_modules=["value"]))
    before = sk.named_shift_parameters(net)
    with pytest.raises(sk.ShiftkitError, match="already"):
        sk.attach_(net, sk.SSFConfig(target_modules="all"))
    with pytest.raises(sk.ShiftkitError, match="already"):
        sk.attach_(net, sk.LoRAConfig(target_modules=["query"]))
    assert sk.named_shift_parameters(net) == before


def test_failed_attach_leaves_the_model_untouched() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3)
            self.b = nn.Conv2d(4, 4, 3, groups=2)  # LoRA refuses grouped convs while wrapping

    net = Net()
    net.a.bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    modules = [(n, type(m)) for n, m in net.named_modules()]
    with pytest.raises(sk.ShiftkitError, match="'b'"):
        sk.attach_(net, sk.LoRAConfig(target_modules="all"))
    assert [(n, type(m)) for n, m in net.named_modules()] == modules
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    sk.attach_(net, sk.LoRAConfig(target_modules=["a"]))  # nothing half-attached is left behind


def test_unknown_method_names_suggest_the_close_one() -> None:
    with pytest.raises(sk.UnknownMethodError) as info:
        sk.get_method("lorra")
    assert "lorra" in str(info.value) and "'lora'" in str(info.value)
    assert isinstance(info.value, sk.ShiftkitError)


def test_unregistered_config_class_is_unknown() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True, kw_only=True)
    class MineConfig(sk.ShiftConfig):
        pass

    with pytest.raises(sk.UnknownMethodError, match="MineConfig"):
        sk.attach_(nn.Linear(2, 2), MineConfig(target_modules="all"))


def test_attach_rejects_other_objects() -> None:
    with pytest.raises(sk.ShiftkitError):
        sk.attach_(_Net(), {"method": "lora"})  # type: ignore[arg-type]


def test_modules_to_save_are_trainable_copies_not_wrapped_twice() -> None:
    model, x = make("mlp")
    y0 = model(x)
    sk.attach_(model, sk.LoRAConfig(target_modules="all", modules_to_save=["head"]))
    names = set(sk.named_shift_parameters(model))
    assert {"head.saved.weight", "head.saved.bias"} <= names
    assert not any(n.startswith("head.lora") for n in names)
    assert torch.equal(model(x), y0)  # LoRA starts at zero and the copy equals the original
    sk.detach_(model)
    assert torch.equal(model(x), y0)


def test_modules_to_save_round_trip_and_fold(tmp_path: Path) -> None:
    model, x = make("mlp")
    fresh = copy.deepcopy(model)
    sk.attach_(model, sk.SSFConfig(target_modules=["fc1"], modules_to_save=["head"]))
    with torch.no_grad():
        model.head.saved.weight.add_(1.0)
        y = model(x)
    sk.save(sk.extract(model), tmp_path / "s.safetensors")
    sk.attach_(fresh, sk.load(tmp_path / "s.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    sk.fold_(fresh)
    assert isinstance(fresh.head, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, atol=1e-5, rtol=1e-5)


def test_modules_to_save_keep_their_buffers() -> None:
    """A BatchNorm trained in full keeps its updated running statistics through fold and save/load."""
    model, x = make("cnn")
    fresh = copy.deepcopy(model)
    sk.attach_(model, sk.SSFConfig(target_modules=["head"], modules_to_save=["bn1"]))
    model.train()
    with torch.no_grad():
        model(x)  # updates bn1.saved's running statistics, as training does
    model.eval()
    with torch.no_grad():
        y = model(x)
    folded = sk.fold_(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), y, atol=1e-6, rtol=1e-6)
    # the unwrapped base bn2 drifted too (not part of any shift): give the fresh base the same statistics so
    # that only what the shift carries is compared
    fresh.bn2.load_state_dict(model.bn2.state_dict())
    sk.attach_(fresh, sk.extract(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, atol=1e-6, rtol=1e-6)
