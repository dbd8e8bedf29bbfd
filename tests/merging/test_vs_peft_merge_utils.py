"""``semantics="peft"`` merges against the real peft package (``peft.utils.merge_utils``, peft 0.21.2).

peft merges one tensor at a time: ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and
``task_arithmetic`` take a list of per-task tensors and a weight tensor. The inputs here are continuous
random shifts (no magnitude ties at the trim threshold) with opposite-sign and sparse structure. peft's DARE
draws its masks with ``torch.bernoulli``; the tests hand it shiftkit's masks
(``dare_keep_mask(shape, density, key_seed(seed, key, i))``, one call per task in order), so the drop, the
``1/density`` rescale and the count-normalised disjoint merge are compared exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from shiftkit.merging.sparsify import dare_keep_mask, key_seed, topk_magnitude

SHAPES = {"a.weight": (24, 16), "a.bias": (24,), "b.weight": (8, 3, 5), "c.scale": (40,)}
WEIGHTS = [1.0, 0.5, 2.0]
ATOL = 1e-6

# peft warns that density >= 1 prunes nothing; that case is tested on purpose
pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning will be performed:UserWarning")


def _shift(tensors: dict[str, Tensor]) -> Shift:
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


@pytest.fixture(scope="module")
def merge_utils() -> ModuleType:
    """peft's merge helpers (peft is a pinned dev dependency: an ImportError fails, never skips)."""
    from peft.utils import merge_utils as mu

    return mu


@pytest.fixture(scope="module")
def shifts() -> list[Shift]:
    g = torch.Generator().manual_seed(99)
    out: list[dict[str, Tensor]] = [{}, {}, {}]
    for k, shape in SHAPES.items():
        dense = torch.randn(shape, generator=g)
        flip = torch.rand(shape, generator=g) < 0.5
        out[0][k] = dense
        out[1][k] = torch.where(flip, -0.8 * dense, 0.6 * dense) + 0.3 * torch.randn(shape, generator=g)
        out[2][k] = 1.5 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.3)
    return [_shift(t) for t in out]


def _per_tensor(shifts: list[Shift], fn: Callable[[str, list[Tensor]], Tensor]) -> dict[str, Tensor]:
    return {k: fn(k, [s.tensors[k] for s in shifts]) for k in SHAPES}


def _assert_equal(ours: Shift, theirs: dict[str, Tensor]) -> None:
    for k, t in theirs.items():
        torch.testing.assert_close(ours.tensors[k], t, atol=ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_topk_trim_equals_peft_magnitude_pruning(merge_utils: ModuleType, shifts: list[Shift]) -> None:
    for density in (0.1, 0.5, 0.77):
        for s in shifts:
            for t in s.tensors.values():
                torch.testing.assert_close(
                    topk_magnitude(t, density), merge_utils.prune(t, density, "magnitude")
                )


def test_task_arithmetic_equals_peft(merge_utils: ModuleType, shifts: list[Shift]) -> None:
    w = torch.tensor(WEIGHTS)
    theirs = _per_tensor(shifts, lambda k, ts: merge_utils.task_arithmetic(ts, w))
    _assert_equal(sk.merge(shifts, method="task_arithmetic", weights=WEIGHTS), theirs)


def test_magnitude_prune_equals_trim_then_task_arithmetic(
    merge_utils: ModuleType, shifts: list[Shift]
) -> None:
    # peft's magnitude_prune has no sk.merge method of its own: it is the TIES trim followed by a weighted sum
    w, density = torch.tensor(WEIGHTS), 0.4
    theirs = _per_tensor(shifts, lambda k, ts: merge_utils.magnitude_prune(ts, w, density))
    trimmed = [_shift({k: topk_magnitude(t, density) for k, t in s.tensors.items()}) for s in shifts]
    _assert_equal(sk.merge(trimmed, method="task_arithmetic", weights=WEIGHTS), theirs)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize(
    ("ours", "peft_method"), [("sum", "total"), ("count", "frequency"), ("total", "total")]
)
def test_ties_peft_semantics(
    merge_utils: ModuleType, shifts: list[Shift], density: float, ours: str, peft_method: str
) -> None:
    w = torch.tensor(WEIGHTS)
    theirs = _per_tensor(
        shifts, lambda k, ts: merge_utils.ties(ts, w, density, majority_sign_method=peft_method)
    )
    merged = sk.merge(
        shifts, method="ties", weights=WEIGHTS, density=density, semantics="peft", consensus=ours
    )
    _assert_equal(merged, theirs)


def test_ties_peft_differs_from_mergekit_semantics(merge_utils: ModuleType, shifts: list[Shift]) -> None:
    """With weights ≠ 1 the two semantics differ (vote on weighted shifts, weight- vs count-normalised)."""
    w = torch.tensor(WEIGHTS)
    theirs = _per_tensor(shifts, lambda k, ts: merge_utils.ties(ts, w, 0.5))
    mk = sk.merge(shifts, method="ties", weights=WEIGHTS, density=0.5, semantics="mergekit")
    assert any(not torch.allclose(mk.tensors[k], theirs[k], atol=1e-3) for k in SHAPES)


class _PeftMasks:
    """A ``torch`` stand-in for peft's merge_utils whose ``bernoulli`` returns shiftkit's DARE masks."""

    def __init__(self, density: float, seed: int) -> None:
        self.density, self.seed = density, seed
        self.key = ""
        self.index = 0
        self.calls = 0

    def start(self, key: str) -> None:
        self.key, self.index = key, 0

    def bernoulli(self, probs: Tensor) -> Tensor:
        assert torch.all(probs == self.density)
        mask = dare_keep_mask(probs.shape, self.density, key_seed(self.seed, self.key, self.index))
        self.index += 1
        self.calls += 1
        return mask.to(probs.dtype)


class _TorchProxy(ModuleType):
    def __init__(self, masks: _PeftMasks) -> None:
        super().__init__("torch")
        self.bernoulli = masks.bernoulli

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize(("density", "consensus"), [(0.3, "total"), (0.7, "frequency"), (1.0, "total")])
def test_dare_peft_semantics_with_shiftkit_masks(
    merge_utils: ModuleType,
    shifts: list[Shift],
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    density: float,
    consensus: str,
) -> None:
    seed = 3
    masks = _PeftMasks(density, seed)
    monkeypatch.setattr(merge_utils, "torch", _TorchProxy(masks))
    w = torch.tensor(WEIGHTS)

    def peft_merge(key: str, ts: list[Tensor]) -> Tensor:
        masks.start(key)
        if method == "dare_linear":
            return merge_utils.dare_linear(ts, w, density)
        return merge_utils.dare_ties(ts, w, density, majority_sign_method=consensus)

    theirs = _per_tensor(shifts, peft_merge)
    params: dict[str, Any] = {"density": density, "rescale": "inverse", "seed": seed}
    if method == "dare_ties":
        params.update(semantics="peft", consensus=consensus)
    merged = sk.merge(shifts, method=method, weights=WEIGHTS, **params)
    _assert_equal(merged, theirs)
    assert masks.calls == (0 if density >= 1.0 else 3 * len(SHAPES))
