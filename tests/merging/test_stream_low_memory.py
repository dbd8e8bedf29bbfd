"""The streaming merge's low-memory path for its largest tensors: the base is read in row blocks.

Above ``runner._PREFETCH_MAX`` elements (embeddings, heads) a merge that an in-place kernel computes keeps
the base's copy out of memory: each τ_t = θ_t − θ0 is formed with θ0 read row block by row block, the
merged shift replaces τ_0, and θ0 is added back the same way. The result must be the ordinary path's, bit for
bit; the tests lower the size limit so tiny tensors take the path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import shiftkit as sk
from shiftkit.merging.stream import runner
from shiftkit.merging.stream.checkpoints import open_checkpoint


@pytest.fixture
def files(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    base = {"embed.weight": torch.randn(37, 6, generator=g), "norm.weight": torch.randn(6, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    for i in range(3):
        tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(tuned, tmp_path / f"ft{i}.safetensors")
    return tmp_path


def _recipe(folder: Path, method: str, **params: float) -> Path:
    models = [
        {"model": str(folder / f"ft{i}.safetensors"), "parameters": {"weight": 1.0 - 0.2 * i, **params}}
        for i in range(3)
    ]
    data = {"merge_method": method, "base_model": str(folder / "base.safetensors"), "models": models}
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("dare_ties", {"density": 0.6})])
def test_row_block_path_equals_the_whole_tensor_path(
    files: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: dict
) -> None:
    recipe = _recipe(files, method, **params)
    sk.merge_recipe(recipe, files / "whole", progress=False)
    used: list[str] = []
    read_rows = runner.Checkpoint.read_rows

    def spy(self, key, start, stop, dtype=None):  # type: ignore[no-untyped-def]
        used.append(key)
        return read_rows(self, key, start, stop, dtype)

    monkeypatch.setattr(runner.Checkpoint, "read_rows", spy)
    monkeypatch.setattr(runner, "_PREFETCH_MAX", 100)  # embed (222 entries) takes the path, norm (6) not
    monkeypatch.setattr(runner, "_ROW_BLOCK", 24)  # 4 rows per block: 10 blocks, the last one short
    sk.merge_recipe(recipe, files / "rows", progress=False)
    assert set(used) == {"embed.weight"} and len(used) == 4 * 10  # 3 subtractions and 1 addition
    a, b = (
        load_file(str(files / "whole" / "model.safetensors")),
        load_file(str(files / "rows" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_read_rows_reads_the_rows(files: Path) -> None:
    with open_checkpoint(files / "base.safetensors") as ck:
        whole = ck.read("embed.weight")
        assert torch.equal(ck.read_rows("embed.weight", 5, 11), whole[5:11])
        assert ck.read_rows("embed.weight", 36, 37, torch.float64).dtype == torch.float64
        with pytest.raises(sk.ShiftkitError, match="outside"):
            ck.read_rows("embed.weight", 30, 40)


def test_parallel_workers_yield_in_order_and_run_large_jobs_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from shiftkit.merging.stream import kernels

    monkeypatch.setattr(runner, "_PREFETCH_MAX", 10)
    sizes = [3, 3, 3, 50, 3, 3, 20, 3]  # 50 and 20 exceed the limit: they run alone, on this thread
    seen: list[tuple[int, bool, bool]] = []

    def produce(i: int) -> int:
        own = kernels._POOL["owner"] == threading.get_ident()
        seen.append((i, threading.current_thread() is threading.main_thread(), own))
        return i * 10

    out = list(runner._in_order(list(range(len(sizes))), produce, lambda i: sizes[i], workers=2))
    assert out == [(i, i * 10) for i in range(len(sizes))]
    alone = {i: (main, own) for i, main, own in seen if sizes[i] > 10}
    assert alone == {3: (True, True), 6: (True, True)}  # the kernels may use the idle pool there
    assert all(not own for i, _, own in seen if sizes[i] <= 10)
    assert kernels._POOL["pool"] is None


def test_new_error_paths_name_what_is_wrong(files: Path) -> None:
    from shiftkit.merging.sparsify import per_input
    from shiftkit.merging.ties import ties_multipass

    with pytest.raises(sk.ShiftkitError, match="TIES density has 3 values for 2 inputs"):
        per_input([0.1, 0.2, 0.3], 2, "TIES density")
    with pytest.raises(sk.ShiftkitError, match="one density for every model"):
        ties_multipass([1.0, 1.0], semantics="paper", density=[0.2, 0.5])
    with open_checkpoint(files / "base.safetensors") as ck:
        assert ck.can_read_rows("embed.weight") and not ck.can_read_rows("missing.weight")
        with pytest.raises(sk.ShiftkitError, match="cannot be read in row blocks"):
            ck.read_rows("missing.weight", 0, 1)
