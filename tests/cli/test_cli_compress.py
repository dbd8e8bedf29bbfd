"""``shiftkit compress``: shift files and fine-tuned folders (streamed against --base), the printed table,
inspect's compressed rows, errors; and `shiftkit merge` reading a compressed shift file tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import shiftkit as sk
from mk_llama import make_llamas, read_folder, run_shiftkit
from shiftkit.cli import main


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llamas(tmp_path_factory.mktemp("compress_cli"), n_tuned=2)


def _tv(llamas: dict[str, Path], name: str) -> sk.Shift:
    f32 = lambda d: {k: v.float() for k, v in d.items()}  # noqa: E731
    return sk.task_vector(f32(read_folder(llamas["base"])), f32(read_folder(llamas[name])))


def test_folder_against_base_equals_in_memory(llamas: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "ft0.compeft.safetensors"
    args = ["compress", str(llamas["ft0"]), str(out), "--base", str(llamas["base"]), "--density", "0.2"]
    rc = main([*args, "--json", str(tmp_path / "c.json"), "--quiet"])
    assert rc == 0
    streamed = sk.load(out)
    in_memory = sk.compress(_tv(llamas, "ft0"), method="compeft", density=0.2)
    a, b = sk.decompress(streamed), sk.decompress(in_memory)
    assert set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a[k], b[k]) for k in a.tensors)
    info = json.loads((tmp_path / "c.json").read_text())
    assert info["file_bytes"] == out.stat().st_size and info["ratio_vs_bf16"] > 1
    assert capsys.readouterr().out == ""
    bad = ["compress", str(llamas["ft0"]), str(tmp_path / "x.safetensors"), "--base", str(llamas["base"])]
    assert main([*bad, "--param", "bogus=1"]) == 2  # a parameter the compressor lacks, streamed
    assert "compressor 'compeft'" in capsys.readouterr().err


def test_shift_file_table_and_inspect(llamas: dict[str, Path], tmp_path: Path, capsys) -> None:
    src = tmp_path / "tv.safetensors"
    sk.save(_tv(llamas, "ft1"), src)
    out = tmp_path / "tv.small.safetensors"
    assert main(["compress", str(src), str(out), "--density", "0.1", "--payload", "golomb"]) == 0
    text = capsys.readouterr().out
    assert "ratio vs fp32 / bf16" in text and "compeft" in text
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "compressed" in text and '"density": 0.1' in text
    assert main(["compress", str(src), str(out)]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["compress", str(src), str(out), "--force", "--param", "density=0.05"]) == 0
    assert sk.load(out).encoding["params"]["density"] == 0.05
    assert main(["compress", str(src), str(tmp_path / "x.safetensors"), "--density", "0"]) == 2
    assert "density" in capsys.readouterr().err
    assert main(["compress", "--list"]) == 0
    assert "compeft" in capsys.readouterr().out
    assert main(["compress", str(src)]) == 2 and "give IN and OUT" in capsys.readouterr().err


def test_merge_reads_a_compressed_shift_file(llamas: dict[str, Path], tmp_path: Path) -> None:
    small = sk.compress(_tv(llamas, "ft0"), method="compeft", density=0.3)
    sk.save(small, tmp_path / "c.safetensors")
    sk.save(sk.decompress(small), tmp_path / "d.safetensors")
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(llamas["base"]),
        "models": [
            {"model": str(tmp_path / "c.safetensors"), "parameters": {"weight": 0.7}},
            {"model": str(llamas["ft1"]), "parameters": {"weight": 0.3}},
        ],
    }
    ours = run_shiftkit(recipe, tmp_path, "from_compressed")
    recipe["models"][0]["model"] = str(tmp_path / "d.safetensors")
    ref = run_shiftkit(recipe, tmp_path, "from_dense")
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
