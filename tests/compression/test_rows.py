"""The ``rows`` compressor: a delta that changes few rows keeps those rows only, a rank-1 row edit is stored
as indices, coefficients and one vector, decoding is bit-exact, ``atol`` drops tiny rows, and a damaged
payload is refused."""

from __future__ import annotations

import pytest
import torch

import shiftkit as sk
from shiftkit.core.rows import decode_rows_tensor, rows_delta
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import CorruptFileError, ShiftkitError


def _delta() -> Shift:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(24, generator=g)
    edit = torch.zeros(40, 24)
    edit[[2, 7, 30]] = torch.tensor([1.5, -0.25, 3.0])[:, None] * v  # rows that are multiples of one vector
    sparse = torch.zeros(10, 24)
    sparse[4] = torch.randn(24, generator=g)
    bias = torch.zeros(10)
    bias[[1, 9]] = torch.tensor([0.5, -2.0])
    tensors = {"edit.weight": edit, "sparse.weight": sparse, "bias": bias}
    return Shift(DELTA, None, tensors, {k: tuple(t.shape) for k, t in tensors.items()})


def test_round_trip_is_exact_and_small() -> None:
    tv = _delta()
    small = sk.compress(tv, method="rows")
    assert {"edit.weight.coef", "edit.weight.vec", "sparse.weight.values"} <= set(small.tensors)
    assert small.tensors["edit.weight.rows"].tolist() == [2, 7, 30]
    back = sk.decompress(small)
    assert all(torch.equal(back[k], tv[k]) for k in tv.tensors)
    assert small.nbytes < tv.nbytes / 5


def test_atol_drops_tiny_rows() -> None:
    tv = _delta()
    tv.tensors["sparse.weight"][8] = 1e-6
    exact = sk.decompress(sk.compress(tv, method="rows"))
    assert torch.equal(exact["sparse.weight"], tv["sparse.weight"])
    lossy = sk.decompress(sk.compress(tv, method="rows", atol=1e-5))
    assert torch.equal(lossy["sparse.weight"][8], torch.zeros(24))
    with pytest.raises(ShiftkitError, match="atol"):
        sk.compress(tv, method="rows", atol=-1.0)


def test_rows_delta_adds_one_vector_to_the_given_rows() -> None:
    v = torch.arange(6, dtype=torch.float32)
    small = rows_delta({"w": (5, 6)}, {"w": torch.tensor([4, 1, 4])}, v, 2.0)
    dense = decode_rows_tensor(small, "w")
    want = torch.zeros(5, 6)
    want[[1, 4]] = 2.0 * v
    assert torch.equal(dense, want)
    with pytest.raises(ShiftkitError, match="width 6"):
        rows_delta({"w": (5, 7)}, {"w": torch.tensor([0])}, v, 1.0)
    with pytest.raises(ShiftkitError, match="out of range"):
        rows_delta({"w": (5, 6)}, {"w": torch.tensor([5])}, v, 1.0)


def test_damaged_payload_is_refused() -> None:
    small = sk.compress(_delta(), method="rows")
    broken = Shift(
        small.method,
        None,
        {**small.tensors, "edit.weight.rows": torch.tensor([2, 7, 99])},
        small.base,
        small.encoding,
    )
    with pytest.raises(CorruptFileError, match="out of range"):
        sk.decompress(broken)
    missing = {k: t for k, t in small.tensors.items() if k != "edit.weight.vec"}
    with pytest.raises(CorruptFileError, match="incomplete"):
        sk.decompress(Shift(small.method, None, missing, small.base, small.encoding))
