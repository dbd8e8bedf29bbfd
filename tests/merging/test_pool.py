"""ShiftPool: membership rules, one-file save/load, static merging (combine-compress.md §5.1, §6.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import shiftkit as sk
from shiftkit.core.config import ShiftConfig
from shiftkit.core.shift import Shift
from shiftkit.errors import CorruptFileError, ShiftkitError, ShiftMismatchError
from shiftkit.merging import ShiftPool
from tiny_models import make


def member(model: str, config: ShiftConfig, seed: int) -> Shift:
    """A non-trivial shift: the method's init plus seeded noise on every shift parameter."""
    m, _ = make(model)
    sk.attach_(m, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sk.shift_parameters(m):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return sk.extract(m)


def lora_pool(ranks: tuple[int, ...] = (2, 2, 2), head: bool = False) -> ShiftPool:
    extra = {"modules_to_save": ["head"]} if head else {}
    return ShiftPool(
        {
            f"d{i}": member(
                "mlp", sk.LoRAConfig(r=r, lora_alpha=4.0, target_modules=["fc1", "fc2"], **extra), i
            )
            for i, r in enumerate(ranks)
        }
    )


def test_container_api() -> None:
    pool = lora_pool()
    assert pool.names() == ["d0", "d1", "d2"] and len(pool) == 3 and "d1" in pool
    assert pool.method == "lora" and set(pool.base) == {"fc1", "fc2"} and pool.index("d2") == 2
    assert pool.get("d1") is pool["d1"] and list(pool) == pool.names()
    removed = pool.remove("d0")
    assert removed.method == "lora" and pool.names() == ["d1", "d2"]
    pool.add("d0", removed)
    assert pool.names() == ["d1", "d2", "d0"]
    with pytest.raises(ShiftkitError, match="already has a member 'd0'"):
        pool.add("d0", removed)
    with pytest.raises(ShiftkitError, match="without '/'"):
        pool.add("a/b", removed)
    with pytest.raises(ShiftkitError, match="no member 'zz'"):
        pool.get("zz")


def test_mismatched_members_are_named() -> None:
    pool = lora_pool()
    with pytest.raises(ShiftMismatchError, match="'bad' is a 'ssf' shift"):
        pool.add("bad", member("mlp", sk.SSFConfig(target_modules=["fc1", "fc2"]), 0))
    with pytest.raises(ShiftMismatchError, match=r"'other' targets different modules.*fc2"):
        pool.add("other", member("mlp", sk.LoRAConfig(r=2, target_modules=["fc1"]), 0))
    ssf = ShiftPool({"a": member("mlp", sk.SSFConfig(target_modules=["fc1"]), 0)})
    odd = member("mlp", sk.SSFConfig(target_modules=["fc1"]), 1)
    bad = Shift("ssf", odd.config, {**odd.tensors, "fc1.scale": torch.ones(5)}, odd.base)
    with pytest.raises(ShiftMismatchError, match=r"'b': 'fc1\.scale' is \(5,\)"):
        ssf.add("b", bad)
    # LoRA members may differ in rank only
    assert lora_pool((1, 3, 2)).names() == ["d0", "d1", "d2"]


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    pool = lora_pool((1, 3, 2), head=True)
    path = tmp_path / "pool.safetensors"
    pool.save(path)
    back = ShiftPool.load(path)
    assert back.names() == pool.names()
    for (n, a), (m, b) in zip(pool.items(), back.items(), strict=True):
        assert n == m and a.method == b.method and a.config == b.config and a.base == b.base
        assert set(a.tensors) == set(b.tensors)
        for k in a.tensors:
            assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k])
    # overwriting keeps a valid file (atomic temp file + rename, no leftovers)
    pool.remove("d1")
    pool.save(path)
    assert ShiftPool.load(path).names() == ["d0", "d2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.safetensors"]


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: object) -> Path:
    save_file(tensors, str(path), metadata={"shiftkit_pool": json.dumps(meta)})
    return path


def test_corrupt_files(tmp_path: Path) -> None:
    pool = lora_pool()
    good = tmp_path / "good.safetensors"
    pool.save(good)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CorruptFileError):
        ShiftPool.load(trunc)
    single = tmp_path / "shift.safetensors"
    sk.save(pool["d0"], single)
    with pytest.raises(CorruptFileError, match="not a pool file"):
        ShiftPool.load(single)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as fh:
        meta = json.loads(fh.metadata()["shiftkit_pool"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    with pytest.raises(CorruptFileError, match="does not list the members"):
        ShiftPool.load(_write(tmp_path / "a.safetensors", tensors, {**meta, "order": ["d0", "d1"]}))
    with pytest.raises(CorruptFileError, match="belongs to no pool member"):
        ShiftPool.load(_write(tmp_path / "b.safetensors", {**tensors, "zz/fc1.lora_A": torch.ones(1)}, meta))
    with pytest.raises(CorruptFileError, match="malformed"):
        ShiftPool.load(_write(tmp_path / "c.safetensors", tensors, {"order": []}))
    with pytest.raises(CorruptFileError, match="newer"):
        ShiftPool.load(_write(tmp_path / "d.safetensors", tensors, {**meta, "format_version": 99}))
    bad_shape = dict(tensors)
    bad_shape["d1/fc1.lora_B"] = torch.ones(3, 2)
    with pytest.raises(CorruptFileError, match="'d1'"):
        ShiftPool.load(_write(tmp_path / "e.safetensors", bad_shape, meta))


def test_merge_equals_weighted_sum_of_deltas() -> None:
    pool = lora_pool(head=True)
    c = [0.3, -0.5, 1.2]
    ref, x = make("mlp")
    for d, ci in zip(pool.to_deltas(ref), c, strict=True):  # W0 + Σ c_i ΔW_i by definition
        sk.apply_(ref, d, scale=ci)
    model, _ = make("mlp")
    sk.apply_(model, pool.merge("task_arithmetic", c, model=model))
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)
    by_name, _ = make("mlp")
    sk.apply_(by_name, pool.merge("task_arithmetic", {"d0": 0.3, "d1": -0.5, "d2": 1.2}, model=by_name))
    torch.testing.assert_close(by_name(x), ref(x), atol=1e-5, rtol=0)


def test_merge_lora_without_model_and_to_deltas_restores_model() -> None:
    pool = lora_pool((1, 3, 2))
    model, _ = make("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with_model = pool.merge("task_arithmetic", [1.0, 0.5, 0.25], model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    no_model = pool.merge("task_arithmetic", [1.0, 0.5, 0.25])  # LoRA factors → exact ΔW inside sk.merge
    assert with_model.allclose(no_model, atol=1e-6)
    ssf = ShiftPool({"a": member("mlp", sk.SSFConfig(target_modules=["fc1"]), 0)})
    with pytest.raises(ShiftkitError, match="needs the base model"):
        ssf.to_deltas()
