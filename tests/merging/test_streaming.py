"""Streaming checkpoint merge: equals the in-memory ``sk.merge`` on the same task vectors, over sharded HF
folders (tiny random LlamaForCausalLM saved with save_pretrained), single safetensors files and shift files;
atomic output; key policy; a multi-pass computation driver; the streaming safetensors writer."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.registry import MERGE_METHODS, MergeSpec
from shiftkit.merging.stream import multipass as plan_mod
from shiftkit.merging.stream.checkpoints import (
    ShardedWriter,
    open_checkpoint,
    parse_size,
    read_safetensors_header,
)
from shiftkit.merging.stream.runner import merge_recipe

transformers = pytest.importorskip("transformers")


def _tiny_llama(dtype: torch.dtype = torch.float32) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _build(root: Path, dtype: torch.dtype) -> dict[str, Any]:
    torch.manual_seed(0)
    base = _tiny_llama(dtype)
    base.save_pretrained(root / "base", max_shard_size="20KB")
    states = {"base": {k: v.clone() for k, v in base.state_dict().items()}}
    for i in range(3):
        with torch.no_grad():
            for p in base.parameters():
                p.copy_(states["base"][_name(base, p)] + 0.02 * torch.randn_like(p))
        base.save_pretrained(root / f"ft{i}", max_shard_size="20KB")
        states[f"ft{i}"] = {k: v.clone() for k, v in base.state_dict().items()}
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    return states


def _name(model: torch.nn.Module, param: Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("llama32")
    return root, _build(root, torch.float32)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("llamabf16")
    return root, _build(root, torch.bfloat16)


def _recipe(path: Path, method: str, base: Any, models: list[Any], **extra: Any) -> Path:
    data = {
        "merge_method": method,
        "base_model": None if base is None else str(base),
        "models": models,
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _tv(states: dict[str, Any], name: str) -> Shift:
    """τ = θ_t − θ0 in float32 (spec §0.4), as the streaming engine forms it."""
    b, t = states["base"], states[name]
    ts = {k: t[k].float() - b[k].float() for k in b}
    return Shift(DELTA, None, ts, {k: tuple(v.shape) for k, v in ts.items()})


def _expected(states: dict[str, Any], merged: Shift, dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: (v.float() + merged.tensors[k]).to(dtype) for k, v in states["base"].items()}


def _reload(out: Path) -> dict[str, Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    return dict(model.state_dict())


CASES = [
    ("task_arithmetic", [1.0, 0.5, -0.3], {"lambda": 0.7}, {"lambda_": 0.7}),
    ("ties", [1.0, 2.0, 0.5], {"density": 0.5}, {"density": 0.5}),
    ("dare_ties", [1.0, 1.0, 1.0], {"density": 0.5, "seed": 3}, {"density": 0.5, "seed": 3}),
    ("dare_linear", [0.5, 1.0, 1.0], {"density": 0.7, "rescale": False}, {"density": 0.7, "rescale": "none"}),
    # mergekit's linear averages the base with the models; its weight comes from the top-level parameters
    ("linear", [3.0, 1.0, 1.0], {"weight": 2.0}, {}),
]


@pytest.mark.parametrize(("method", "weights", "rparams", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_streaming_equals_in_memory_merge(
    fp32: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    method: str,
    weights: list[float],
    rparams: dict,
    kwargs: dict,
) -> None:
    root, states = fp32
    models = [{"model": str(root / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(weights)]
    recipe = _recipe(
        tmp_path / "r.yaml",
        method,
        root / "base",
        models,
        parameters=rparams,
        shiftkit={"max_shard_size": "30KB"},
    )
    out = tmp_path / "merged"
    summary = merge_recipe(recipe, out, progress=False)
    tvs = [_tv(states, f"ft{i}") for i in range(3)]
    if method == "linear":  # the base takes part as an input whose shift is zero
        tvs, weights = [0.0 * tvs[0], *tvs], [rparams["weight"], *weights]
    want = sk.merge(tvs, method=method, weights=weights, **kwargs)
    got = _reload(out)
    for k, v in _expected(states, want, torch.float32).items():
        assert torch.equal(got[k], v), k
    assert summary.tensors == len(states["base"]) and summary.passes == 1
    assert (
        len(list(out.glob("model-*-of-*.safetensors"))) > 1
        and (out / "model.safetensors.index.json").exists()
    )
    assert (out / "tokenizer_config.json").exists() and (out / "shiftkit_merge.yaml").exists()
    saved = yaml.safe_load((out / "shiftkit_merge.yaml").read_text())
    assert saved["merge_method"] == method and Path(saved["base_model"]).is_absolute()


def test_slerp_with_base_listed_is_mergekit_weight_slerp(
    fp32: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, states = fp32
    models = [{"model": str(root / "ft1")}, {"model": str(root / "base")}]  # base second: reordered first
    recipe = _recipe(tmp_path / "r.yaml", "slerp", root / "base", models, parameters={"t": 0.3})
    merge_recipe(recipe, tmp_path / "out", progress=False)
    zero = Shift(DELTA, None, {k: torch.zeros_like(v) for k, v in states["base"].items()}, {})
    want = sk.merge([zero, _tv(states, "ft1")], method="slerp", t=0.3, base=states["base"])
    got = _reload(tmp_path / "out")
    for k, v in _expected(states, want, torch.float32).items():
        assert torch.equal(got[k], v), k


def test_bf16_inputs_keep_bf16_and_math_is_float32(bf16: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, states = bf16
    models = [
        {"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.3}} for i in range(3)
    ]
    recipe = _recipe(tmp_path / "r.yaml", "ties", root / "base", models)
    merge_recipe(recipe, tmp_path / "out", progress=False)
    want = sk.merge([_tv(states, f"ft{i}") for i in range(3)], method="ties", density=0.3)
    got = load_file(tmp_path / "out" / "model.safetensors")
    for k, v in _expected(states, want, torch.bfloat16).items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_out_dtype_and_delta_shift_output(fp32: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, states = fp32
    models = [{"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0}} for i in range(2)]
    recipe = _recipe(tmp_path / "r.yaml", "task_arithmetic", root / "base", models, dtype="float16")
    summary = merge_recipe(recipe, tmp_path / "tv.safetensors", progress=False)
    merged = sk.load(tmp_path / "tv.safetensors")
    want = sk.merge([_tv(states, f"ft{i}") for i in range(2)])
    assert merged.method == DELTA and set(merged.tensors) == set(want.tensors)
    for k, v in want.tensors.items():
        assert merged.tensors[k].dtype == torch.float16 and torch.equal(merged.tensors[k], v.half()), k
    assert (tmp_path / "tv.recipe.yaml").exists() and summary.copied == 0
    assert sorted(os.listdir(tmp_path)) == ["r.yaml", "tv.recipe.yaml", "tv.safetensors"]


def test_safetensors_and_shift_file_inputs(fp32: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, states = fp32
    base = {**states["base"], "step": torch.tensor([7], dtype=torch.int64)}  # non-float: copied from base
    save_file(base, tmp_path / "base.safetensors")
    save_file(states["ft0"], tmp_path / "ft0.safetensors")
    sk.save(_tv(states, "ft1"), tmp_path / "tv1.safetensors")
    models = [
        {"model": "ft0.safetensors", "parameters": {"weight": 1.0}},
        {"model": "tv1.safetensors", "parameters": {"weight": 0.5}},
    ]
    recipe = _recipe(tmp_path / "r.yaml", "task_arithmetic", "base.safetensors", models)  # relative to recipe
    summary = merge_recipe(recipe, tmp_path / "out", progress=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = sk.merge([_tv(states, "ft0"), _tv(states, "ft1")], weights=[1.0, 0.5])
    for k, v in _expected(states, want, torch.float32).items():
        assert torch.equal(got[k], v), k
    assert torch.equal(got["step"], base["step"]) and summary.copied == 1


def test_baseless_linear_is_weighted_average_of_weights(
    fp32: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, states = fp32
    models = [
        {"model": str(root / "ft0"), "parameters": {"weight": 3.0}},
        {"model": str(root / "ft1"), "parameters": {"weight": 1.0}},
    ]
    recipe = _recipe(tmp_path / "r.yaml", "linear", None, models)
    merge_recipe(recipe, tmp_path / "out", progress=False)
    got = _reload(tmp_path / "out")
    for k, a in states["ft0"].items():
        torch.testing.assert_close(got[k], (3 * a + states["ft1"][k]) / 4, atol=1e-6, rtol=0)


def _ta_recipe(root: Path, tmp_path: Path) -> Path:
    return _recipe(
        tmp_path / "r.yaml",
        "task_arithmetic",
        root / "base",
        [{"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0}} for i in range(3)],
    )


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_merge_leaves_nothing(
    fp32: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    exc: type[BaseException],
) -> None:
    root, _ = fp32
    recipe = _ta_recipe(root, tmp_path)
    real = MERGE_METHODS.get("task_arithmetic").fn
    calls = {"n": 0}

    def flaky(tensors: list[dict[str, Tensor]], weights: list[float], **kw: Any) -> dict[str, Tensor]:
        calls["n"] += 1
        if calls["n"] == 8:
            raise exc("boom")
        return real(tensors, weights, **kw)

    spec = MERGE_METHODS.get("task_arithmetic")
    monkeypatch.setitem(MERGE_METHODS._entries, "task_arithmetic", dataclasses.replace(spec, fn=flaky))
    with pytest.raises(exc):
        merge_recipe(recipe, tmp_path / "out", progress=False)
    # tensors already in flight on the other merge workers finish; nothing more starts, nothing is left
    assert 8 <= calls["n"] <= 8 + 2 * torch.get_num_threads() and sorted(os.listdir(tmp_path)) == ["r.yaml"]


def test_refuses_existing_out_unless_force(fp32: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, _ = fp32
    recipe = _ta_recipe(root, tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(ShiftkitError, match="already exists"):
        merge_recipe(recipe, tmp_path / "out", progress=False)
    merge_recipe(recipe, tmp_path / "out", progress=False, force=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out", "r.yaml"]


def test_dry_run_writes_nothing(fp32: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, states = fp32
    summary = merge_recipe(_ta_recipe(root, tmp_path), tmp_path / "out", dry_run=True, max_shard_size="30KB")
    assert summary.dry_run and summary.tensors == len(states["base"]) and len(summary.inputs) == 4
    assert any(p.endswith("model.safetensors.index.json") for p in summary.outputs)
    assert sorted(os.listdir(tmp_path)) == ["r.yaml"]


def test_missing_tensor_policy(fp32: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, states = fp32
    partial = {k: v for k, v in states["ft1"].items() if k != "model.norm.weight"}
    save_file(partial, tmp_path / "partial.safetensors")
    models = [
        {"model": str(root / "ft0"), "parameters": {"weight": 1.0}},
        {"model": "partial.safetensors", "parameters": {"weight": 1.0}},
    ]
    recipe = _recipe(tmp_path / "r.yaml", "ties", root / "base", models, parameters={"density": 0.5})
    with pytest.raises(ShiftMismatchError, match=r"model\.norm\.weight"):
        merge_recipe(recipe, tmp_path / "out", progress=False)
    _recipe(
        tmp_path / "r.yaml",
        "ties",
        root / "base",
        models,
        parameters={"density": 0.5},
        shiftkit={"on_missing": "zero"},
    )
    merge_recipe(recipe, tmp_path / "out", progress=False)
    tv1 = _tv(states, "ft1")
    tv1.tensors["model.norm.weight"].zero_()
    want = sk.merge([_tv(states, "ft0"), tv1], method="ties", density=0.5)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(got["model.norm.weight"], _expected(states, want, torch.float32)["model.norm.weight"])


def test_extra_tensor_and_pickle_inputs_are_errors(fp32: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, states = fp32
    save_file({**states["ft0"], "extra.weight": torch.ones(2)}, tmp_path / "extra.safetensors")
    recipe = _recipe(
        tmp_path / "r.yaml",
        "task_arithmetic",
        root / "base",
        [{"model": "extra.safetensors", "parameters": {"weight": 1.0}}],
    )
    with pytest.raises(ShiftMismatchError, match=r"extra\.weight"):
        merge_recipe(recipe, tmp_path / "out", progress=False)
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ShiftkitError, match="pickle"):
        open_checkpoint(tmp_path / "pkl")


class _MaxNormPlan:
    """Fake global method: pass 0 finds max|τ_t| over the model, pass 1 counts nonzeros; Σ w τ_t / max_t."""

    n_passes = 2

    def __init__(self) -> None:
        self.mx: list[float] = []
        self.count = 0

    def observe(self, p: int, key: str, tensors: list[Tensor], weights: list[float]) -> None:
        if p == 0:
            m = [float(t.abs().max()) for t in tensors]
            self.mx = [max(a, b) for a, b in zip(self.mx or m, m)]
        else:
            self.count += sum(int((t != 0).sum()) for t in tensors)

    def end_pass(self, p: int) -> None:
        assert p == 0 or self.count > 0

    def apply(self, key: str, tensors: list[Tensor], weights: list[float]) -> Tensor:
        return sum((w * t / m for w, t, m in zip(weights, tensors, self.mx)), torch.zeros_like(tensors[0]))


def test_multi_pass_plan_driver(
    fp32: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, states = fp32

    def fake(
        tensors: list[dict[str, Tensor]], weights: list[float], *, scale: float = 1.0
    ) -> dict[str, Tensor]:
        return {k: sum(t[k] for t in tensors) * scale for k in tensors[0]}

    spec = MergeSpec("fake_global", fake, multipass=lambda weights, **p: _MaxNormPlan())
    monkeypatch.setitem(MERGE_METHODS._entries, "fake_global", spec)
    models = [{"model": str(root / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate([1.0, 2.0])]
    summary = merge_recipe(
        _recipe(tmp_path / "r.yaml", "fake_global", root / "base", models), tmp_path / "out", progress=False
    )
    taus = [_tv(states, f"ft{i}").tensors for i in range(2)]
    want = plan_mod.run_multipass_in_memory(_MaxNormPlan(), taus, [1.0, 2.0])
    got = load_file(tmp_path / "out" / "model.safetensors")
    for k, v in states["base"].items():
        assert torch.equal(got[k], v + want[k]), k
    assert summary.passes == 3


GLOBAL = [
    ("ties", {"semantics": "paper", "density": 0.3, "lambda": 1.2}),
    ("pcb", {"ratio": 0.2, "clamp": 0.01}),
]


@pytest.mark.parametrize(("method", "params"), GLOBAL, ids=[g[0] for g in GLOBAL])
def test_registered_global_plans_equal_in_memory(
    fp32: tuple[Path, dict[str, Any]], tmp_path: Path, method: str, params: dict[str, Any]
) -> None:
    root, states = fp32
    models = [{"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0}} for i in range(3)]
    summary = merge_recipe(
        _recipe(tmp_path / "r.yaml", method, root / "base", models, parameters=params),
        tmp_path / "out",
        progress=False,
    )
    kwargs = {("lambda_" if k == "lambda" else k): v for k, v in params.items()}
    want = sk.merge([_tv(states, f"ft{i}") for i in range(3)], method=method, **kwargs)
    got = load_file(tmp_path / "out" / "model.safetensors")
    for k, v in _expected(states, want, torch.float32).items():
        torch.testing.assert_close(got[k], v, atol=1e-7, rtol=1e-6)
    assert summary.passes > 1


def test_global_option_without_plan_is_refused(fp32: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, _ = fp32
    models = [{"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0}} for i in range(2)]
    params = {"density": 0.5, "zero_sign": "global_majority"}  # mergekit semantics: ties_multipass gives None
    recipe = _recipe(tmp_path / "r.yaml", "ties", root / "base", models, parameters=params)
    with pytest.raises(ShiftkitError, match="whole-model statistics"):
        merge_recipe(recipe, tmp_path / "out", progress=False)


def test_lora_shift_input(fp32: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    lowrank = pytest.importorskip("shiftkit.merging.lowrank")
    root, states = fp32
    model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    sk.attach_(model, sk.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in sk.shift_parameters(model):
            p.normal_(0, 0.1)
    shift = sk.extract(model)
    sk.save(shift, tmp_path / "lora.safetensors")
    recipe = _recipe(
        tmp_path / "r.yaml",
        "task_arithmetic",
        root / "base",
        [{"model": "lora.safetensors", "parameters": {"weight": 1.0}}],
    )
    merge_recipe(recipe, tmp_path / "out", progress=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    names = lowrank.lora_param_names(shift)
    assert names
    for k, v in states["base"].items():
        want = v + lowrank.lora_delta(shift, k) if k in names else v
        torch.testing.assert_close(got[k], want, atol=1e-6, rtol=0)


def test_writer_shards_and_reads_back(tmp_path: Path) -> None:
    tensors = {
        f"t{i}": torch.randn(10, 10).to(dt) for i, dt in enumerate([torch.float32, torch.bfloat16] * 3)
    }
    tensors["flag"] = torch.tensor([True, False])
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = ShardedWriter(tmp_path, entries, 450, {"note": "x"})
    for k, v in tensors.items():
        w.write(k, v)
    files = w.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert (
        set(index["weight_map"]) == set(tensors) and len(files) == len(set(index["weight_map"].values())) + 1
    )
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    for f in files[:-1]:
        with safe_open(str(f), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt", "note": "x"}
            for k in fh.keys():
                assert torch.equal(fh.get_tensor(k), tensors[k])
        assert all(i.start % 8 == 0 for i in read_safetensors_header(f)[0].values())
    with pytest.raises(ShiftkitError, match="out of order"):
        ShardedWriter(tmp_path, entries, 450, {}).write("t1", tensors["t1"])


def test_parse_size() -> None:
    assert (
        parse_size("500MB") == 500 * 10**6 and parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30
    )
    assert parse_size(123) == 123
    with pytest.raises(ShiftkitError):
        parse_size("lots")


def test_nan_input_is_an_error(fp32: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, states = fp32
    bad = dict(states["ft0"])
    bad["model.norm.weight"] = bad["model.norm.weight"].clone()
    bad["model.norm.weight"][3] = float("nan")
    save_file(bad, tmp_path / "bad.safetensors")
    recipe = _recipe(
        tmp_path / "r.yaml",
        "ties",
        root / "base",
        [{"model": "bad.safetensors", "parameters": {"weight": 1.0}}],
    )
    with pytest.raises(ShiftkitError, match=r"bad\.safetensors.*model\.norm\.weight.*NaN"):
        merge_recipe(recipe, tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors", "r.yaml"]


def test_shard_size_override_is_recorded(fp32: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, _ = fp32
    out = tmp_path / "out"
    merge_recipe(_ta_recipe(root, tmp_path), out, progress=False, max_shard_size="30KB")
    saved = yaml.safe_load((out / "shiftkit_merge.yaml").read_text())
    assert saved["shiftkit"]["max_shard_size"] == 30_000
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
