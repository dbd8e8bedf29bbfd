"""CONTRIBUTING.md's compressor example, run as written: registered by its one decorator, it works through
sk.compress / sk.decompress, files, and the verbs that accept compressed shifts."""

from __future__ import annotations

from pathlib import Path

import torch

import shiftkit as sk
from contributing_docs import run_section_example
from shiftkit.core.encoding import COMPRESS_METHODS
from shiftkit.core.shift import DELTA, Shift


def test_contributing_compressor_example(tmp_path: Path) -> None:
    try:
        run_section_example("A compressor")
        g = torch.Generator().manual_seed(0)
        tv = Shift(DELTA, None, {"w": torch.randn(8, 4, generator=g)}, {"w": (8, 4)})
        small = sk.compress(tv, method="half")
        assert small.nbytes == tv.nbytes // 2
        sk.save(small, tmp_path / "h.safetensors")
        back = sk.decompress(sk.load(tmp_path / "h.safetensors"))
        assert torch.equal(back["w"], tv["w"].half().float())
        merged = sk.merge([small, tv], method="linear", weights=[0.5, 0.5])
        assert torch.allclose(merged["w"], 0.5 * (back["w"] + tv["w"]))
    finally:
        COMPRESS_METHODS._entries.pop("half", None)
