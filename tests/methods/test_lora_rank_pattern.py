"""Per-module LoRA ranks and alphas (``rank_pattern`` / ``alpha_pattern``, PEFT's semantics).

PEFT itself is the oracle for the file format (tests/methods/test_peft_interop.py); here the shift side:
shapes, scalings, save/load, the dense change and the merges that concatenate factors of several ranks.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import shiftkit as sk
from shiftkit.methods.lora.config import module_patterns
from tiny_models import make


def _model() -> tuple[nn.Module, torch.Tensor]:
    model, x = make("tiny_llama")
    return model, x


CONFIG = sk.LoRAConfig(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj"],
    rank_pattern={"layers.0.self_attn.q_proj": 1, "v_proj": 2},
    alpha_pattern={"v_proj": 6},
    init_lora_weights=False,
)


def test_each_module_gets_its_rank_and_scaling() -> None:
    model, _ = _model()
    sk.attach_(model, CONFIG)
    mods = dict(model.named_modules())
    names = ("layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "layers.0.self_attn.v_proj")
    q0, q1, v0 = (mods[f"hf.model.{n}"] for n in names)
    assert (q0.lora_A.shape[0], q1.lora_A.shape[0], v0.lora_A.shape[0]) == (1, 4, 2)
    assert (q0.scaling, q1.scaling, v0.scaling) == (8.0, 2.0, 3.0)  # α/r per module
    assert CONFIG.scaling_of("x.layers.0.v_proj") == 3.0
    assert (
        CONFIG.rank_of("model.layers.10.self_attn.q_proj") == 4
    )  # "layers.0.self_attn.q_proj" must end the name


def test_dense_change_save_load_and_fold_agree(tmp_path: Path) -> None:
    model, x = _model()
    base = copy.deepcopy(model)
    sk.attach_(model, CONFIG)
    with torch.no_grad():
        expected = model(x)
    shift = sk.extract(model)
    sk.save(shift, tmp_path / "s.safetensors")
    back = sk.load(tmp_path / "s.safetensors")
    assert back.config == CONFIG and hash(back.config) == hash(CONFIG)
    delta = sk.to_delta(back)
    for fqn in ("hf.model.layers.0.self_attn.q_proj", "hf.model.layers.1.self_attn.v_proj"):
        a, b = back.tensors[f"{fqn}.lora_A"], back.tensors[f"{fqn}.lora_B"]
        torch.testing.assert_close(delta.tensors[f"{fqn}.weight"], CONFIG.scaling_of(fqn) * b @ a)
    folded = copy.deepcopy(base)
    sk.apply_(folded, delta)
    fresh = copy.deepcopy(base)
    sk.attach_(fresh, back)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh(x), expected)


def test_concat_merge_of_different_ranks_is_exact() -> None:
    model, _ = _model()
    sk.attach_(model, CONFIG)
    one = sk.extract(model)
    other_model, _ = _model()
    sk.attach_(other_model, sk.LoRAConfig(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    two = sk.extract(other_model)
    result = sk.merge_lora([one, two], "task_arithmetic", output="concat")
    exact = sk.merge([sk.to_delta(one), sk.to_delta(two)], "task_arithmetic")
    merged = sk.to_delta(result.shift)
    for name, t in exact.tensors.items():
        torch.testing.assert_close(merged.tensors[name], t, atol=1e-5, rtol=1e-5)
    cfg = result.shift.config
    assert isinstance(cfg, sk.LoRAConfig)
    assert cfg.rank_of("hf.model.layers.0.self_attn.q_proj") == 1 + 3
    assert cfg.rank_of("hf.model.layers.1.self_attn.v_proj") == 2 + 3


def test_module_patterns_never_leak_onto_a_longer_name() -> None:
    values = {"fc": 2, "block.fc": 8, "other.fc": 8, "q": 8}
    pattern = module_patterns(values, 8)
    cfg = sk.LoRAConfig(r=8, rank_pattern={k: int(v) for k, v in pattern.items()})
    assert {k: cfg.rank_of(k) for k in values} == values
    assert list(pattern)[-1] == "fc"  # longest first: "fc" is looked at last


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("rank_pattern", {"q": 0}, "rank"),
        ("rank_pattern", {"q": 2.5}, "rank"),
        ("alpha_pattern", {"q": "x"}, "alpha"),
        ("rank_pattern", {"(": 2}, "regular expression"),
        ("rank_pattern", ["q"], "map"),
    ],
)
def test_bad_patterns_are_named(field: str, value: object, match: str) -> None:
    with pytest.raises(sk.ShiftkitError, match=match):
        sk.LoRAConfig(**{field: value})  # type: ignore[arg-type]


def test_rslora_uses_each_modules_rank() -> None:
    cfg = sk.LoRAConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q": 16})
    assert cfg.scaling_of("a.q") == 8 / math.sqrt(16) and cfg.scaling_of("a.v") == 8 / 2


class _Clash(nn.Module):
    """Two Linears whose names end alike: ``fc`` and ``block.fc``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)
        self.block = nn.Sequential()
        self.block.add_module("fc", nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.fc(self.fc(x))


def test_peft_files_keep_ranks_of_names_that_end_alike(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    cfg = sk.LoRAConfig(
        r=8, lora_alpha=8, target_modules=["fc"], rank_pattern={"^fc$": 2}, alpha_pattern={"^fc$": 6},
        init_lora_weights=False,
    )  # fmt: skip
    model = _Clash()
    base = copy.deepcopy(model)
    sk.attach_(model, cfg)
    assert model.fc.lora_A.shape[0] == 2 and model.block.fc.lora_A.shape[0] == 8
    sk.export_peft(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x))
    back = sk.import_peft(tmp_path / "a")
    assert isinstance(back.config, sk.LoRAConfig)
    assert back.config.rank_of("fc") == 2 and back.config.rank_of("block.fc") == 8
    assert back.config.scaling_of("fc") == 3.0 and back.config.scaling_of("block.fc") == 1.0


def test_pattern_order_is_part_of_the_config() -> None:
    a = sk.LoRAConfig(rank_pattern={"fc": 4, "block.fc": 8})
    b = sk.LoRAConfig(rank_pattern={"block.fc": 8, "fc": 4})
    assert a.rank_of("block.fc") == 4 and b.rank_of("block.fc") == 8  # the first matching key wins
    assert a != b
