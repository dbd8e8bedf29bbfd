"""Exact LoRA → ΔW conversion and LoRA merging (merging/lowrank.py; spec combine-compress.md §1.6).

References: the attached wrapper's own delta (``sk.to_delta``), the formulas ``ΔW = s·B A`` and
Eckart–Young (``err² = Σ_{i>r} σ_i² / Σ σ_i²`` from ``torch.linalg.svdvals`` in float64), and the real peft
package's ``add_weighted_adapter`` (``cat`` and ``svd``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.lowrank import lora_delta, lora_kind, lora_param_names, lora_to_delta, merge_lora
from tiny_models import make


def _lora(model_name: str, seed: int, **cfg: Any) -> tuple[nn.Module, Shift]:
    """A random LoRA shift (A and B both random) on a fresh tiny model; returns (base, shift)."""
    base, _ = make(model_name)
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    cfg = {"r": 2, "lora_alpha": 3.0, "target_modules": "all", "init_lora_weights": False, **cfg}
    sk.attach_(model, sk.LoRAConfig(**cfg))
    return base, sk.extract(model)


def _dense(shift: Shift) -> dict[str, Tensor]:
    """Σ-ready ``s·B A`` per weight straight from the factors (the formula, base layout)."""
    config = shift.config
    assert isinstance(config, sk.LoRAConfig)
    out = {}
    for name in lora_param_names(shift):
        fqn = name[: -len(".weight")]
        a, b = shift.tensors[f"{fqn}.lora_A"].double(), shift.tensors[f"{fqn}.lora_B"].double()
        d = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1) * config.scaling
        kind = lora_kind(shift, fqn)
        out[name] = d.T if kind == "embedding" else d.reshape(b.shape[0], *a.shape[1:])
    return out


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- LoRA → ΔW -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "cnn", "embedding", "mha_block", "tiny_llama"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_to_delta_equals_attached_to_delta(name: str, rslora: bool) -> None:
    base, shift = _lora(name, 1, use_rslora=rslora)
    model = sk.attach_(copy.deepcopy(base), shift)
    ref = sk.to_delta(model)
    mine = lora_to_delta(shift)
    assert mine.method == DELTA and sorted(mine.tensors) == sorted(ref.tensors) == lora_param_names(shift)
    for k in ref.tensors:
        torch.testing.assert_close(mine[k], ref[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(lora_delta(shift, k), _dense(shift)[k].float(), atol=1e-6, rtol=0)


def test_lora_delta_is_float32_and_names_are_checked() -> None:
    _, shift = _lora("mlp", 2)
    half = Shift(shift.method, shift.config, {k: v.bfloat16() for k, v in shift.tensors.items()}, shift.base)
    assert lora_delta(half, "fc1.weight").dtype == torch.float32
    assert lora_to_delta(half)["fc1.weight"].dtype == torch.bfloat16
    with pytest.raises(ShiftMismatchError, match=r"fc1\.bias"):
        lora_delta(shift, "fc1.bias")
    with pytest.raises(ShiftkitError, match="LoRA"):
        lora_to_delta(sk.task_vector(make("mlp")[0], make("mlp")[0]))


def test_square_embedding_needs_the_model() -> None:
    class Sq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 6)

        def forward(self, ids: Tensor) -> Tensor:
            return self.emb(ids)

    torch.manual_seed(0)
    base = Sq()
    model = sk.attach_(
        copy.deepcopy(base), sk.LoRAConfig(r=2, target_modules=["emb"], init_lora_weights=False)
    )
    shift = sk.extract(model)
    assert lora_kind(shift, "emb") == "linear"  # a square weight is taken for a Linear without a model
    assert lora_kind(shift, "emb", model=base) == "embedding"
    torch.testing.assert_close(
        lora_to_delta(shift, base=base)["emb.weight"], sk.to_delta(model)["emb.weight"]
    )


def test_modules_to_save_need_the_base() -> None:
    base, shift = _lora("mlp", 3, target_modules=["fc1"], modules_to_save=["head"])
    model = sk.attach_(copy.deepcopy(base), shift)
    with torch.no_grad():
        model.head.saved.weight.add_(0.5)  # a trained copy that differs from the base
    shift = sk.extract(model)
    with pytest.raises(ShiftkitError, match="modules_to_save"):
        lora_to_delta(shift)
    with pytest.raises(ShiftkitError, match="modules_to_save"):
        sk.merge([shift])
    mine = lora_to_delta(shift, base=base)
    ref = sk.to_delta(model)
    assert sorted(mine.tensors) == sorted(ref.tensors) == ["fc1.weight", "head.bias", "head.weight"]
    for k in ref.tensors:
        torch.testing.assert_close(mine[k], ref[k], atol=1e-6, rtol=0)
    with pytest.raises(ShiftkitError, match="modules_to_save"):
        merge_lora([shift, shift])


# --- merge_lora ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_concat_is_the_exact_weighted_sum(method: str) -> None:
    _, s1 = _lora("embedding", 1, r=2, lora_alpha=3.0)
    _, s2 = _lora("embedding", 2, r=3, lora_alpha=5.0, use_rslora=True)
    w = [0.7, -1.3]
    res = merge_lora([s1, s2], method, w, output="concat")
    assert res.rank == 5 and res.shift.method == "lora" and res.shift.config.scaling == 1.0  # type: ignore[union-attr]
    div = sum(w) if method == "linear" else 1.0
    d1, d2 = _dense(s1), _dense(s2)
    for name in lora_param_names(s1):
        expected = (w[0] * d1[name] + w[1] * d2[name]) / div
        assert _rel(lora_delta(res.shift, name), expected) <= 1e-6
        assert res.errors[name] <= 1e-6
    assert res.max_error <= 1e-6


def test_concat_refuses_other_methods_and_rank() -> None:
    _, s1 = _lora("mlp", 1)
    with pytest.raises(ShiftkitError, match="concat"):
        merge_lora([s1, s1], "ties", output="concat")
    with pytest.raises(ShiftkitError, match="rank"):
        merge_lora([s1, s1], "linear", output="concat", rank=3)
    with pytest.raises(ShiftkitError, match="output"):
        merge_lora([s1], output="svd")
    with pytest.raises(ShiftkitError, match="LoRA"):
        merge_lora([lora_to_delta(s1)])


@pytest.mark.parametrize("name", ["mlp", "cnn", "embedding"])
def test_svd_with_full_rank_reproduces_the_delta_merge(name: str) -> None:
    _, s1 = _lora(name, 1, r=2)
    _, s2 = _lora(name, 2, r=2)
    exact = merge_lora([s1, s2], "linear", [2.0, 1.0], output="delta")
    assert exact.max_error == 0.0 and exact.rank is None
    res = merge_lora([s1, s2], "linear", [2.0, 1.0], rank=4)  # true rank ≤ 2 + 2
    assert res.rank == 4 and res.max_error <= 1e-5
    for k, v in exact.shift.tensors.items():
        assert _rel(lora_delta(res.shift, k), v) <= 1e-5


def test_truncated_svd_error_is_eckart_young() -> None:
    _, s1 = _lora("tiny_llama", 1, r=4)
    _, s2 = _lora("tiny_llama", 2, r=4)
    exact = merge_lora([s1, s2], "ties", density=0.5, output="delta").shift
    with pytest.warns(UserWarning, match="rank-3"):
        res = merge_lora([s1, s2], "ties", density=0.5, rank=3)
    for k, v in exact.tensors.items():
        fqn = k[: -len(".weight")]
        m = v.double().T if lora_kind(s1, fqn) == "embedding" else v.double().reshape(v.shape[0], -1)
        sv = torch.linalg.svdvals(m)
        expected = math.sqrt(float((sv[3:] ** 2).sum() / (sv**2).sum()))
        assert res.errors[k] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert res.max_error == max(res.errors.values()) > 1e-3


def test_result_attaches_and_matches_base_plus_merged_delta() -> None:
    base, s1 = _lora("embedding", 1)
    _, s2 = _lora("embedding", 2)
    _, x = make("embedding")
    exact = merge_lora([s1, s2], "ties", density=0.5, output="delta").shift
    reference = sk.apply_(copy.deepcopy(base), exact)
    res = merge_lora([s1, s2], "ties", density=0.5, rank=6)  # ≥ every weight's full rank: exact
    attached = sk.attach_(copy.deepcopy(base), res.shift)
    with torch.no_grad():
        torch.testing.assert_close(attached(x), reference(x), atol=1e-5, rtol=1e-5)
    # sk.merge takes LoRA shifts directly and gives the same dense merge
    assert sk.merge([s1, s2], "ties", density=0.5).allclose(exact, atol=1e-7)


def test_mismatched_targets_follow_on_missing() -> None:
    _, s1 = _lora("mlp", 1, target_modules=["fc1", "fc2"])
    _, s2 = _lora("mlp", 2, target_modules=["fc2", "head"])
    with pytest.raises(ShiftMismatchError, match="different tensors"):
        merge_lora([s1, s2], "linear")
    d1, d2 = _dense(s1), _dense(s2)
    skip = merge_lora([s1, s2], "linear", output="concat", on_missing="skip")
    zero = merge_lora([s1, s2], "linear", output="concat", on_missing="zero")
    assert skip.shift.base == zero.shift.base == {"fc1": (8, 6), "fc2": (8, 8), "head": (3, 8)}
    # skip: a weight only one shift adapts is that shift's change, not half of it
    assert _rel(lora_delta(skip.shift, "fc1.weight"), d1["fc1.weight"]) <= 1e-6
    assert _rel(lora_delta(zero.shift, "fc1.weight"), d1["fc1.weight"] / 2) <= 1e-6
    assert _rel(lora_delta(skip.shift, "head.weight"), d2["head.weight"]) <= 1e-6
    both = (d1["fc2.weight"] + d2["fc2.weight"]) / 2
    assert _rel(lora_delta(skip.shift, "fc2.weight"), both) <= 1e-6
    svd = merge_lora([s1, s2], "linear", on_missing="skip", rank=4)
    assert svd.max_error <= 1e-5


# --- against the real peft package ----------------------------------------------------------------------
def _peft_merge(base: nn.Module, shifts: list[Shift], weights: list[float], folder: Path, **kw: Any) -> Shift:
    peft = pytest.importorskip("peft")
    names = [f"a{i}" for i in range(len(shifts))]
    for n, s in zip(names, shifts, strict=True):
        sk.export_peft(s, folder / n, model=base)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(folder / n), adapter_name=n)
    pm.add_weighted_adapter(names, weights, "merged", **kw)
    pm.save_pretrained(str(folder / "out"), selected_adapters=["merged"])
    return sk.import_peft(folder / "out" / "merged", model=base)


@pytest.mark.filterwarnings("ignore:.*embedding layer")
def test_concat_equals_peft_cat(tmp_path: Path) -> None:
    base, s1 = _lora("embedding", 1, r=2, lora_alpha=3.0)
    _, s2 = _lora("embedding", 2, r=3, lora_alpha=4.0)
    theirs = _peft_merge(base, [s1, s2], [0.6, -1.5], tmp_path, combination_type="cat")
    ours = merge_lora([s1, s2], "task_arithmetic", [0.6, -1.5], output="concat").shift
    assert theirs.config.r == ours.config.r == 5  # type: ignore[union-attr]
    assert theirs.config.scaling == ours.config.scaling == 1.0  # type: ignore[union-attr]
    assert sorted(theirs.tensors) == sorted(ours.tensors)
    for k in ours.tensors:  # the same factors, not just the same product
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rank", [4, 2])
def test_svd_equals_peft_svd(tmp_path: Path, rank: int) -> None:
    # not "head" (3×8): PEFT's svd gives a weight thinner than the rank mismatched factors (B 3×3, A 4×8),
    # which no loader accepts; shiftkit pads such factors with zeros instead
    base, s1 = _lora("mlp", 1, r=2, target_modules=["fc1", "fc2"])
    _, s2 = _lora("mlp", 2, r=2, target_modules=["fc1", "fc2"])
    theirs = _peft_merge(base, [s1, s2], [1.0, 0.5], tmp_path, combination_type="svd", svd_rank=rank)
    res = merge_lora([s1, s2], "task_arithmetic", [1.0, 0.5], rank=rank, warn_above=None)
    assert theirs.config.r == res.rank == rank  # type: ignore[union-attr]
    for k in lora_param_names(res.shift):
        # equal products (SVD factors are unique only up to signs)
        assert _rel(lora_delta(res.shift, k), lora_delta(theirs, k)) <= 1e-5
    assert (res.max_error <= 1e-5) == (rank == 4)
