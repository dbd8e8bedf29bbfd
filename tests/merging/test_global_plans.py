"""Streaming order statistics and the multi-pass computations of paper-TIES and PCB vs the in-memory merge.

The plans must reproduce ``sk.merge`` bit for bit (``torch.equal``): order statistics are exact and every
elementwise step runs on the same per-tensor chunks in both paths.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import shiftkit as sk
from shiftkit.core.functional import topk_mask
from shiftkit.core.shift import DELTA, Shift
from shiftkit.merging.registry import MERGE_METHODS, get_merge_method
from shiftkit.merging.sparsify import topk_magnitude
from shiftkit.merging.stream.multipass import run_multipass_in_memory
from shiftkit.merging.stream.order_stats import KthLargestMagnitude, OrderStatistics, decode_key, order_key


def chunks(seed: int, kind: str) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(int(n), generator=g) for n in torch.randint(1, 900, (6,), generator=g)]
    if kind == "ties":
        xs = [torch.round(x * 2) / 2 for x in xs]  # few levels, many exact ties and zeros
    elif kind == "zeros":
        xs = [x * (torch.rand(x.shape, generator=g) < 0.3) for x in xs]
    elif kind == "const":
        xs = [torch.full_like(x, -0.75) for x in xs]
    return xs


def run(sel: OrderStatistics | KthLargestMagnitude, xs: list[Tensor]) -> None:
    for p in range(sel.n_passes):
        for x in xs:
            sel.observe(p, 0, x)
        sel.end_pass(p)


def test_order_key_is_monotone_and_invertible() -> None:
    x = torch.tensor([-3e38, -1.0, -1e-30, -0.0, 0.0, 1e-45, 1.0, 2.0, 3e38])
    k = order_key(x)
    assert torch.all(k[1:] >= k[:-1]) and k[3] == k[4]
    assert all(decode_key(int(v)).item() == x[i].item() for i, v in enumerate(k))


@pytest.mark.parametrize("kind", ["randn", "ties", "zeros", "const"])
@pytest.mark.parametrize(("bins", "cap"), [(4096, 1 << 16), (4096, 0), (16, 5)])
def test_order_statistics_equal_kthvalue(kind: str, bins: int, cap: int) -> None:
    xs = chunks(len(kind) + bins, kind)
    flat = torch.cat(xs)
    d = flat.numel()
    ranks = [0, d - 1, d // 2, int(d * 0.01), int(d * 0.99), d - 2]
    sel = OrderStatistics(1, lambda n: ranks, bins=bins, cap=cap)
    run(sel, xs)
    assert sel.done
    for q, j in enumerate(ranks):
        want = torch.kthvalue(flat, j + 1).values
        assert sel.value(0, q) == want
        assert sel.tally(0, q) == (int((flat < want).sum()), int((flat == want).sum()), d)


@pytest.mark.parametrize("kind", ["randn", "ties", "zeros"])
def test_kth_largest_magnitude_ties_modes(kind: str) -> None:
    xs = chunks(7, kind)
    flat = torch.cat(xs)
    d = flat.numel()
    for k in (1, d // 5, d // 2, d):
        exact = KthLargestMagnitude(1, lambda n, k=k: k, ties="exact_k")
        run(exact, xs)
        assert torch.equal(torch.cat([exact.keep_mask(0, x) for x in xs]), topk_mask(flat, k))
        keep_all = KthLargestMagnitude(1, lambda n, k=k: k)
        run(keep_all, xs)
        thr = torch.kthvalue(flat.abs(), d - k + 1).values
        assert torch.equal(torch.cat([keep_all.keep_mask(0, x) for x in xs]), flat.abs() >= thr)


def argsort_topk(x: Tensor, density: float) -> Tensor:
    """The previous definition of topk_magnitude: first k of a stable descending argsort of |x|."""
    if density >= 1.0:
        return x
    k = int(density * x.numel())
    flat = x.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), descending=True, stable=True)[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(x.shape)


@pytest.mark.parametrize("kind", ["randn", "ties", "zeros", "const"])
def test_fast_topk_equals_argsort_definition(kind: str) -> None:
    x = torch.cat(chunks(11, kind)).reshape(-1, 1)
    for density in (0.0, 0.001, 0.1, 0.2, 0.5, 0.9, 0.999, 1.0):
        assert torch.equal(topk_magnitude(x, density), argsort_topk(x, density))


def shifts(seed: int, n: int, tie_heavy: bool) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = {"w1": torch.randn(60, 80, generator=g), "b": torch.randn(200, generator=g) * 0.1,
             "w0": torch.randn(5000, generator=g) * 2}  # fmt: skip
        if tie_heavy:
            t = {k: torch.round(v * 2) / 2 for k, v in t.items()}
        out.append(t)
    return out


def as_shifts(tensors: list[dict[str, Tensor]]) -> list[Shift]:
    return [Shift(DELTA, None, t, {k: tuple(v.shape) for k, v in t.items()}) for t in tensors]


def check_plan(method: str, tensors: list[dict[str, Tensor]], **params: object) -> None:
    weights = [1.0] * len(tensors)
    passes = get_merge_method(method).multipass(weights, **params)
    assert passes is not None
    streamed = run_multipass_in_memory(passes, tensors, weights)
    merged = sk.merge(as_shifts(tensors), method=method, **params)
    for k in tensors[0]:
        assert torch.equal(streamed[k], merged[k]), k


@pytest.mark.parametrize("tie_heavy", [False, True])
@pytest.mark.parametrize("zero_sign", ["global_majority", "positive"])
def test_ties_paper_plan_equals_merge(tie_heavy: bool, zero_sign: str) -> None:
    tensors = shifts(1, 3, tie_heavy)
    for density in (0.2, 0.5):
        check_plan("ties", tensors, semantics="paper", density=density, zero_sign=zero_sign, lambda_=1.3)


def test_ties_plan_global_majority_sign_matters() -> None:
    # two tasks with exactly opposite entries everywhere but one: every vote ties except index 0 (negative)
    a = {"x": torch.tensor([-2.0, 1.0, -1.0]), "y": torch.tensor([3.0])}
    b = {"x": torch.tensor([-1.0, -1.0, 1.0]), "y": torch.tensor([-3.0])}
    passes = get_merge_method("ties").multipass([1.0, 1.0], semantics="paper", density=1.0)
    out = run_multipass_in_memory(passes, [a, b], [1.0, 1.0])
    torch.testing.assert_close(out["x"], torch.tensor([-1.5, -1.0, -1.0]))
    torch.testing.assert_close(out["y"], torch.tensor([-3.0]))


@pytest.mark.parametrize("tie_heavy", [False, True])
@pytest.mark.parametrize("inter", ["root", "vision"])
def test_pcb_plan_equals_merge(tie_heavy: bool, inter: str) -> None:
    tensors = shifts(2, 3, tie_heavy)
    check_plan("pcb", tensors, inter=inter, ratio=0.1, clamp=0.01)
    check_plan("pcb", tensors, inter=inter, ratio=0.5, clamp=1e-4, lambda_=1.2, lambdas=[1.0, 0.9, 1.1])


def test_plan_factories_return_none_when_tensor_local() -> None:
    factories: dict[str, Callable[..., object]] = {
        name: spec.multipass for name, spec in MERGE_METHODS.items() if spec.multipass is not None
    }
    assert set(factories) == {"ties", "pcb"}
    assert factories["ties"]([1.0, 2.0], semantics="mergekit") is None
    assert factories["ties"]([1.0, 1.0], semantics="peft") is None
    assert factories["pcb"]([1.0, 1.0], scope="per_tensor") is None
    assert factories["ties"]([1.0, 1.0], semantics="paper").n_passes == 5  # type: ignore[attr-defined]
    assert factories["pcb"]([1.0, 1.0]).n_passes == 8  # type: ignore[attr-defined]
