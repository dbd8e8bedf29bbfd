"""Shift files: exact round trips, self-describing metadata, clear errors on bad files, atomic saves."""

from __future__ import annotations

import copy
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import shiftkit as sk
from shiftkit.core.io import FORMAT_VERSION, META_KEY, read_metadata
from shiftkit.core.shift import DELTA, Shift
from shiftkit.core.wrapper import is_shift_module
from tiny_models import make


def _lora_shift(r: int = 2) -> Shift:
    model, _ = make("mlp")
    sk.attach_(model, sk.LoRAConfig(r=r, lora_alpha=4.0, target_modules=["fc1", "head"]))
    with torch.no_grad():
        for p in sk.shift_parameters(model):
            p.normal_()
    return sk.extract(model)


def _write(path: Path, meta: Any, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A safetensors file with arbitrary ``shiftkit`` metadata (a dict is JSON-encoded, a str kept)."""
    raw = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(
        tensors if tensors is not None else {"fc1.lora_A": torch.zeros(2, 6)}, str(path), {META_KEY: raw}
    )
    return path


def _valid_meta() -> dict[str, Any]:
    return {
        "method": "lora",
        "config": {"method": "lora", "version": 1, "config": {"r": 2, "target_modules": ["fc1"]}},
        "format_version": FORMAT_VERSION,
        "shiftkit_version": sk.__version__,
        "base": {"fc1": [8, 6]},
    }


# --- round trips -----------------------------------------------------------------------------------------
def test_round_trip_is_exact(tmp_path: Path) -> None:
    shift = _lora_shift()
    sk.save(shift, tmp_path / "s.safetensors")
    back = sk.load(tmp_path / "s.safetensors")
    assert back.method == "lora" and back.config == shift.config and back.base == shift.base
    assert list(back.tensors) == list(shift.tensors) or set(back.tensors) == set(shift.tensors)
    for k, t in shift.tensors.items():
        assert back.tensors[k].dtype == t.dtype and torch.equal(back.tensors[k], t), k


def test_round_trip_of_a_delta_in_bf16_and_str_path(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 2, generator=g).bfloat16(), "b": torch.randn(4, generator=g)}
    delta = Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})
    path = str(tmp_path / "sub" / "dir" / "d.safetensors")  # parent folders are created
    sk.save(delta, path)
    back = sk.load(path)
    assert back.method == DELTA and back.config is None and back.base == delta.base
    for k, t in tensors.items():
        assert back.tensors[k].dtype == t.dtype and torch.equal(back.tensors[k], t)


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    tensors = {"a": w, "b": w, "c": w.T, "d": w[1:3]}  # one storage, views, a transpose
    delta = Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})
    sk.save(delta, tmp_path / "d.safetensors")
    back = sk.load(tmp_path / "d.safetensors")
    for k, t in tensors.items():
        assert torch.equal(back.tensors[k], t), k


def test_metadata_contents(tmp_path: Path) -> None:
    shift = _lora_shift()
    path = tmp_path / "s.safetensors"
    sk.save(shift, path)
    with safe_open(str(path), framework="pt") as fh:
        raw = fh.metadata()
        keys = set(fh.keys())
    assert set(raw) == {META_KEY}
    meta = json.loads(raw[META_KEY])
    assert meta["format_version"] == FORMAT_VERSION == 1
    assert meta["shiftkit_version"] == sk.__version__
    assert meta["method"] == "lora"
    assert meta["config"]["method"] == "lora" and meta["config"]["config"]["r"] == 2
    assert meta["base"] == {"fc1": [8, 6], "head": [3, 8]}
    assert keys == {"fc1.lora_A", "fc1.lora_B", "head.lora_A", "head.lora_B"}
    assert read_metadata(path) == meta


def test_save_rejects_non_shifts(tmp_path: Path) -> None:
    with pytest.raises(sk.ShiftkitError, match="Shift"):
        sk.save({"a": torch.zeros(1)}, tmp_path / "x.safetensors")  # type: ignore[arg-type]


# --- bad files -------------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sk.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 8, 20, "half", "minus1"])
def test_truncated_file(tmp_path: Path, keep: int | str) -> None:
    path = tmp_path / "s.safetensors"
    sk.save(_lora_shift(), path)
    data = path.read_bytes()
    n = {"half": len(data) // 2, "minus1": len(data) - 1}.get(str(keep), keep)
    assert isinstance(n, int)
    path.write_bytes(data[:n])
    with pytest.raises(sk.CorruptFileError):
        sk.load(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "r.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(sk.CorruptFileError):
        sk.load(path)


def test_a_directory_is_not_a_shift_file(tmp_path: Path) -> None:
    with pytest.raises((sk.CorruptFileError, IsADirectoryError)):
        sk.load(tmp_path)


def test_foreign_safetensors_file_points_to_import_peft(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(sk.CorruptFileError, match="import_peft"):
        sk.load(path)


def test_bad_json_metadata(tmp_path: Path) -> None:
    with pytest.raises(sk.CorruptFileError, match="JSON"):
        sk.load(_write(tmp_path / "x.safetensors", "{not json"))


@pytest.mark.parametrize("bad", [None, [], "lora", 3])
def test_metadata_that_is_not_an_object(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(sk.CorruptFileError):
        sk.load(_write(tmp_path / "x.safetensors", bad))


def test_metadata_missing_keys(tmp_path: Path) -> None:
    meta = _valid_meta()
    del meta["base"]
    with pytest.raises(sk.CorruptFileError, match="base"):
        sk.load(_write(tmp_path / "x.safetensors", meta))


def test_valid_handmade_file_loads(tmp_path: Path) -> None:
    shift = sk.load(_write(tmp_path / "x.safetensors", _valid_meta()))
    assert shift.method == "lora" and shift.config == sk.LoRAConfig(r=2, target_modules=["fc1"])


def test_newer_format_version(tmp_path: Path) -> None:
    meta = {**_valid_meta(), "format_version": FORMAT_VERSION + 1}
    with pytest.raises(sk.CorruptFileError, match="format_version") as info:
        sk.load(_write(tmp_path / "x.safetensors", meta))
    assert "upgrade" in str(info.value)


@pytest.mark.parametrize("version", ["1", 1.0, None])
def test_format_version_must_be_an_int(tmp_path: Path, version: Any) -> None:
    with pytest.raises(sk.CorruptFileError):
        sk.load(_write(tmp_path / "x.safetensors", {**_valid_meta(), "format_version": version}))


def test_unknown_config_key(tmp_path: Path) -> None:
    meta = _valid_meta()
    meta["config"]["config"]["rank"] = 4
    with pytest.raises(sk.ShiftkitError, match="rank"):
        sk.load(_write(tmp_path / "x.safetensors", meta))


def test_newer_config_version(tmp_path: Path) -> None:
    meta = _valid_meta()
    meta["config"]["version"] = 99
    with pytest.raises(sk.ShiftkitError, match="upgrade"):
        sk.load(_write(tmp_path / "x.safetensors", meta))


def test_invalid_config_value(tmp_path: Path) -> None:
    meta = _valid_meta()
    meta["config"]["config"]["r"] = 0
    with pytest.raises(sk.ShiftkitError, match="r"):
        sk.load(_write(tmp_path / "x.safetensors", meta))


def test_unknown_method(tmp_path: Path) -> None:
    meta = _valid_meta()
    meta["method"] = meta["config"]["method"] = "lorra"
    with pytest.raises(sk.UnknownMethodError, match="lora"):
        sk.load(_write(tmp_path / "x.safetensors", meta))


def test_method_and_config_must_agree(tmp_path: Path) -> None:
    meta = {**_valid_meta(), "method": "ssf"}  # an SSF file carrying a LoRA config is corrupt
    with pytest.raises(sk.CorruptFileError, match="ssf"):
        sk.load(_write(tmp_path / "x.safetensors", meta))


def test_method_shift_without_config(tmp_path: Path) -> None:
    with pytest.raises(sk.CorruptFileError, match="config"):
        sk.load(_write(tmp_path / "x.safetensors", {**_valid_meta(), "config": None}))


@pytest.mark.parametrize("base", [[8, 6], {"fc1": 8}, {"fc1": ["a", "b"]}, {"fc1": None}, "fc1"])
def test_malformed_base(tmp_path: Path, base: Any) -> None:
    with pytest.raises(sk.CorruptFileError):
        sk.load(_write(tmp_path / "x.safetensors", {**_valid_meta(), "base": base}))


def test_tensor_of_no_module(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.safetensors", _valid_meta(), {"fc2.lora_A": torch.zeros(2, 8)})
    with pytest.raises(sk.CorruptFileError, match=r"fc2\.lora_A"):
        sk.load(path)


# --- a shift that does not fit the model ----------------------------------------------------------------
def _assert_untouched(model: nn.Module, reference: nn.Module) -> None:
    assert not any(is_shift_module(m) for m in model.modules())
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    assert all(p.requires_grad for p in model.parameters())
    sk.attach_(model, sk.SSFConfig(target_modules="all"))  # no stale state blocks a new shift


def test_attach_to_other_shapes_names_the_first_mismatch() -> None:
    shift = _lora_shift()
    model, _ = make("mlp")
    model.fc1 = nn.Linear(7, 8)
    model.head = nn.Linear(8, 2)
    reference = copy.deepcopy(model)
    with pytest.raises(sk.ShiftMismatchError) as info:
        sk.attach_(model, shift)
    msg = str(info.value)
    assert "fc1" in msg and "(8, 6)" in msg and "(8, 7)" in msg
    _assert_untouched(model, reference)


def test_attach_to_a_model_without_the_module() -> None:
    shift = _lora_shift()
    model, _ = make("mlp")
    del model.head
    reference = copy.deepcopy(model)
    with pytest.raises(sk.ShiftMismatchError, match="head"):
        sk.attach_(model, shift)
    _assert_untouched(model, reference)


def test_attach_with_missing_or_extra_tensors() -> None:
    shift = _lora_shift()
    fewer = Shift(
        shift.method, shift.config, {k: v for k, v in shift.tensors.items() if k != "head.lora_B"}, shift.base
    )
    model, _ = make("mlp")
    with pytest.raises(sk.ShiftMismatchError, match=r"head\.lora_B"):
        sk.attach_(model, fewer)
    _assert_untouched(model, make("mlp")[0])
    more = Shift(shift.method, shift.config, {**shift.tensors, "fc1.extra": torch.zeros(1)}, shift.base)
    model, _ = make("mlp")
    with pytest.raises(sk.ShiftMismatchError, match=r"fc1\.extra"):
        sk.attach_(model, more)


def test_attach_with_a_wrong_rank_tensor() -> None:
    shift = _lora_shift()
    bad = dict(shift.tensors)
    bad["fc1.lora_A"] = torch.zeros(3, 6)  # r=3 in a shift whose config says r=2
    model, _ = make("mlp")
    with pytest.raises(sk.ShiftMismatchError, match=r"fc1\.lora_A"):
        sk.attach_(model, Shift(shift.method, shift.config, bad, shift.base))
    _assert_untouched(model, make("mlp")[0])


def test_attach_a_shift_whose_config_is_another_methods() -> None:
    shift = _lora_shift()
    ssf_tensors = {"fc1.scale": torch.ones(8), "fc1.shift": torch.zeros(8)}
    odd = Shift("ssf", shift.config, ssf_tensors, {"fc1": (8, 6)})  # built by hand, not by shiftkit
    model, _ = make("mlp")
    with pytest.raises(sk.ShiftkitError, match=r"(?i)lora"):
        sk.attach_(model, odd)
    _assert_untouched(model, make("mlp")[0])


def test_a_delta_is_not_attached() -> None:
    model, _ = make("mlp")
    delta = sk.task_vector(model, model)
    with pytest.raises(sk.ShiftkitError, match="apply_"):
        sk.attach_(model, delta)


# --- atomic save under SIGKILL ---------------------------------------------------------------------------
_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from shiftkit.core.io import save
    from shiftkit.core.shift import Shift
    path, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    bufs = {f"t{j}": torch.empty(n) for j in range(k)}
    i = 0
    while True:
        for t in bufs.values():
            t.fill_(float(i))
        print(f"start {i}", flush=True)
        t0 = time.perf_counter()
        save(Shift("delta", None, bufs, {key: (n,) for key in bufs}), path)
        print(f"done {i} {time.perf_counter() - t0:.3f}", flush=True)
        i += 1
    """
)


@pytest.mark.slow
def test_interrupted_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    n, k = 5_000_000, 10  # 200 MB of float32 per save
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(n), str(k)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"writer died: {lines}"
            lines.append(line.strip())
            if line.startswith("start 1"):
                first = float(lines[-2].split()[2])
                time.sleep(min(0.05, first / 4))  # well inside the second write
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert "done 0" in " ".join(lines)
    shift = sk.load(path)
    assert set(shift.tensors) == {f"t{j}" for j in range(k)}
    values = {float(t[0]) for t in shift.tensors.values()}
    assert len(values) == 1
    (value,) = values
    assert value in (0.0, 1.0)
    for t in shift.tensors.values():
        assert t.shape == (n,) and bool((t == value).all())
    leftovers = list(tmp_path.glob(f".{path.name}.*.tmp"))
    if leftovers:  # killed mid-write: the rename never happened, so the target is the first version
        assert value == 0.0
    # only hidden temp files may remain beside the target: shiftkit's ``.big.safetensors.*.tmp`` and the
    # ``.tmpXXXXXX`` that safetensors (>= 0.7) itself writes before renaming onto shiftkit's temp name
    others = [p.name for p in tmp_path.iterdir() if p != path]
    assert all(name.startswith(".") and ".tmp" in name for name in others), others
    for p in tmp_path.iterdir():  # pytest keeps recent temp dirs: do not leave 400 MB behind
        p.unlink()


# --- fuzzing the parser ----------------------------------------------------------------------------------
_fuzz = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(
    header=st.binary(max_size=300),
    tail=st.binary(max_size=64),
    declared=st.none() | st.integers(0, 2**64 - 1),
)
def test_fuzz_random_header_bytes(tmp_path: Path, header: bytes, tail: bytes, declared: int | None) -> None:
    path = tmp_path / "f.safetensors"
    length = len(header) if declared is None else declared
    path.write_bytes(struct.pack("<Q", length) + header + tail)
    with pytest.raises(sk.CorruptFileError):
        sk.load(path)


@_fuzz
@given(data=st.data())
def test_fuzz_mutated_valid_file(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.safetensors"
    sk.save(_SMALL, path)
    raw = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, header_end - 1))
        raw[i] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    try:
        sk.load(path)
    except (sk.CorruptFileError, sk.UnknownMethodError):
        pass  # a mutated method name is a (documented) unknown method; anything else is corruption


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@_fuzz
@given(
    method=st.sampled_from(["lora", "ssf", "bitfit", "delta"]) | st.text(max_size=5),
    config=_json
    | st.fixed_dictionaries(
        {"method": st.sampled_from(["lora", "ssf", "bitfit"]), "version": _json, "config": _json}
    )
    | st.fixed_dictionaries(
        {
            "method": st.just("lora"),
            "version": st.just(1),
            "config": st.dictionaries(
                st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules", "init_lora_weights"]),
                _json,
                max_size=3,
            ),
        }
    ),
    version=_json,
    base=_json | st.dictionaries(st.sampled_from(["fc1", "", "x"]), _json, max_size=2),
)
def test_fuzz_metadata_json(tmp_path: Path, method: Any, config: Any, version: Any, base: Any) -> None:
    meta = {"method": method, "config": config, "format_version": version, "base": base}
    path = _write(tmp_path / "j.safetensors", meta)
    try:
        sk.load(path)
    except sk.ShiftkitError:
        pass  # every failure is a deliberate shiftkit error, never a bare TypeError/KeyError


_SMALL = Shift(
    "lora",
    sk.LoRAConfig(r=1, target_modules=["fc"]),
    {"fc.lora_A": torch.ones(1, 2), "fc.lora_B": torch.ones(3, 1)},
    {"fc": (3, 2)},
)


def test_a_folder_is_named_as_a_folder(tmp_path: Path) -> None:
    with pytest.raises(sk.CorruptFileError, match="is a folder"):
        sk.load(tmp_path)
