"""``select_ranks``: exact order statistics by radix select, against a full sort."""

from __future__ import annotations

import pytest
import torch

from shiftkit.core.functional import BLOCK64, select_ranks
from shiftkit.errors import ShiftkitError


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(1000, generator=g),
        lambda g: torch.rand(BLOCK64 + 12345, generator=g) ** 3,  # non-negative, two blocks
        lambda g: (torch.randn(50_000, generator=g) * 3).round(),  # heavy ties
        lambda g: torch.tensor([-0.0, 0.0, 1.0, -2.0, float("inf"), -float("inf"), 1e-45, -1e-45]),
        lambda g: torch.randn(4, 5, 6, generator=g),
    ],
)
def test_ranks_equal_the_sorted_values(make) -> None:  # type: ignore[no-untyped-def]
    x = make(torch.Generator().manual_seed(0))
    ordered = x.reshape(-1).sort().values
    n = ordered.numel()
    ranks = [0, n // 4, n // 2, (3 * n) // 4, n - 1, n // 2]
    assert [float(v) for v in select_ranks(x, ranks)] == [float(ordered[j]) for j in ranks]


def test_other_dtypes_and_bad_ranks() -> None:
    x = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    assert [float(v) for v in select_ranks(x, [2, 0])] == [3.0, 1.0]
    with pytest.raises(ShiftkitError, match="outside"):
        select_ranks(x, [3])
