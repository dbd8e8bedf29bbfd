"""The streaming merge's in-place TIES / DARE-TIES kernels equal the registered merge functions exactly, and
the k-th largest magnitude (radix select, or a sampled bracket) equals ``torch.kthvalue``, including heavily
tied tensors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shiftkit.merging.registry import MERGE_METHODS
from shiftkit.merging.stream import kernels as streaming

LEAN = [
    ({"density": 0.5}, [1.0, 2.0, 0.5]),
    ({"density": 0.3, "consensus": "count", "normalize": False, "lambda_": 0.8}, [1.0, -0.5, 1.5]),
    ({"density": 1.0}, [0.3, 1.0, 1.0]),
    ({"density": 0.0}, [1.0, 1.0, 1.0]),
    ({"density": 0.25, "consensus": "frequency"}, [1.0, 1.0]),
    ({"density": [0.9, 0.2, 1.0]}, [1.0, 0.5, 2.0]),  # one density per input (a recipe's per-model values)
]


@pytest.mark.parametrize(("params", "weights"), LEAN)
@pytest.mark.parametrize("quantised", [False, True])
def test_lean_ties_kernel_is_bit_identical(
    monkeypatch: pytest.MonkeyPatch, params: dict[str, Any], weights: list[float], quantised: bool
) -> None:
    monkeypatch.setattr(streaming, "_BLOCK", 64)  # several blocks per tensor: ties straddle block edges
    gen = torch.Generator().manual_seed(1)
    taus = [torch.randn(13, 29, generator=gen) for _ in weights]
    if quantised:  # many equal magnitudes: the exact-k tie rule (lower flat index first) decides
        taus = [torch.round(t * 2) / 2 for t in taus]
    full = {"semantics": "mergekit", "lambda_": 1.0, "consensus": "sum", "normalize": True, **params}
    want = MERGE_METHODS.get("ties").fn([{"w": t} for t in taus], weights, **full)["w"]
    acc = torch.zeros(13, 29)
    streaming.ties_into_(acc, [t.clone() for t in taus], weights, full)
    assert torch.equal(acc, want)


@pytest.mark.parametrize("kind", ["normal", "tied", "zeros", "structured"])
@pytest.mark.parametrize("frac", [0.001, 0.2, 0.5, 0.999])
@pytest.mark.parametrize("path", ["radix", "sampled", "radix-blocks"])
def test_kth_largest_abs_is_exact(monkeypatch: pytest.MonkeyPatch, kind: str, frac: float, path: str) -> None:
    if path != "radix":  # the sampled bracket (and its blockwise radix fallback) on a small tensor
        monkeypatch.setattr(streaming, "_SELECT_WHOLE", 100)
        monkeypatch.setattr(streaming, "_SAMPLE", 256)
        monkeypatch.setattr(streaming, "_RADIX_BLOCK", 700)
    monkeypatch.setattr(streaming, "_BLOCK", 1000)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5000, generator=gen)
    if kind == "tied":
        x = torch.round(x * 2) / 2
    elif kind == "zeros":
        x[:4000] = 0.0
    elif kind == "structured":
        x = torch.arange(5000, dtype=torch.float32) - 2500
    k = max(int(frac * x.numel()), 1)
    if path == "radix-blocks":  # the fallback when the sampled bracket misses (heavily tied tensors)
        thr, above, equal = streaming._radix_kth(x, k, whole=False)
    else:
        thr, above, equal = streaming._kth_largest_abs(x, k)
    want = torch.kthvalue(x.abs(), x.numel() - k + 1).values
    assert torch.equal(thr, want) and above == int((x.abs() > want).sum())
    assert equal == int((x.abs() == want).sum())


DARE = [
    {"density": 0.4, "rescale": "l1", "seed": 3},
    {"density": 0.7, "rescale": "inverse", "seed": 0, "normalize": True, "consensus": "count"},
    {"density": 0.5, "rescale": "none", "seed": 1, "lambda_": 0.5},
    {"density": 0.0, "rescale": "l1", "seed": 0},
    {"density": 1.0, "rescale": "l1", "seed": 0},
    {"density": [0.3, 1.0, 0.8], "rescale": "l1", "seed": 2},
]


@pytest.mark.parametrize("params", DARE)
def test_lean_dare_ties_kernel_equals_registered(
    monkeypatch: pytest.MonkeyPatch, params: dict[str, Any]
) -> None:
    monkeypatch.setattr(streaming, "_BLOCK", 64)
    gen = torch.Generator().manual_seed(4)
    taus = [torch.randn(11, 23, generator=gen) for _ in range(3)]
    weights = [1.0, 0.6, -0.4]
    full = {"semantics": "mergekit", "lambda_": 1.0, "consensus": "sum", "normalize": False, **params}
    want = MERGE_METHODS.get("dare_ties").fn([{"fc.w": t} for t in taus], weights, **full)["fc.w"]
    acc = torch.zeros(11, 23)
    streaming.dare_ties_into_(acc, [t.clone() for t in taus], weights, full, "fc.w")
    assert torch.equal(acc, want)
