"""Every registered compressor (STYLE.md conformance): its lossless settings round-trip exactly, the encoded
shift saves and loads with sk.save/sk.load (the file holds the payload, not dense tensors), tensor-by-tensor
decoding equals whole-shift decoding, and ``nbytes`` counts the payload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import shiftkit as sk
from shiftkit.compression.registry import get_method
from shiftkit.core.encoding import decoded_tensors, encoded_layout
from shiftkit.core.shift import DELTA, Shift

NAMES = sk.list_compress_methods()


def _tv() -> Shift:
    g = torch.Generator().manual_seed(0)
    tensors = {"l1.weight": torch.randn(64, 48, generator=g), "l2.weight": torch.randn(32, 64, generator=g)}
    tensors["l1.bias"] = torch.randn(64, generator=g)
    # a few rows of one layer changed, as a targeted edit changes them (every compressor must shrink it)
    tensors["l3.weight"] = torch.zeros(128, 48)
    tensors["l3.weight"][[3, 40, 77]] = torch.randn(3, 48, generator=g)
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


def test_builtins_registered() -> None:
    assert "compeft" in NAMES


@pytest.mark.parametrize("name", [n for n in NAMES if get_method(n).lossless])
def test_lossless_round_trip(name: str) -> None:
    spec = get_method(name)
    tv = _tv()
    back = sk.decompress(sk.compress(tv, method=name, **spec.lossless))
    assert back.method == DELTA and set(back.tensors) == set(tv.tensors)
    assert all(torch.equal(back[k], tv[k]) for k in tv.tensors)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_and_streamed_decode(name: str, tmp_path: Path) -> None:
    tv = _tv()
    small = sk.compress(tv, method=name)
    assert small.encoding is not None and small.encoding["method"] == name
    assert small.nbytes == sum(t.numel() * t.element_size() for t in small.tensors.values())
    assert small.nbytes < tv.nbytes
    path = tmp_path / f"{name}.safetensors"
    sk.save(small, path)
    assert path.stat().st_size < small.nbytes + 16_384  # the payload plus the JSON header
    loaded = sk.load(path)
    whole = sk.decompress(loaded)
    assert list(encoded_layout(loaded)) == list(tv.tensors)
    for k, t in decoded_tensors(loaded):
        assert torch.equal(t, whole[k]) and t.shape == tv[k].shape and t.dtype == tv[k].dtype
