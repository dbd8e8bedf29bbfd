"""DELLA, DELLA-linear and SCE: hand-computed values, then mergekit 0.1.5 as the oracle.

SCE is deterministic and must equal mergekit to float precision, tensor by tensor and recipe by recipe.
DELLA draws its drops at random (shiftkit from per-tensor seeds, mergekit from torch's global generator),
so it is held against mergekit statistically: kept fraction per row, the keep probability of each rank,
the common rescale factor, and the merged result's size over several seeds; with ``density: 1`` (no drop)
its recipes must match exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor

import shiftkit as sk
from mk_llama import assert_same_tensors, make_llamas, read_folder, run_mergekit, run_shiftkit
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError
from shiftkit.merging.della import della, della_drop, della_linear, magprune, magprune_probs
from shiftkit.merging.registry import get_merge_method
from shiftkit.merging.sce import sce, sce_select_mask, sce_weights

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


def _t(values: Any) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _close(a: Tensor, b: Any, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=1e-5)


def _delta(**tensors: Tensor) -> Shift:
    return Shift(DELTA, None, dict(tensors), {k: tuple(v.shape) for k, v in tensors.items()})


# --- MagPrune by hand ------------------------------------------------------------------------------------
def test_magprune_probs_rise_linearly_with_the_rank_in_a_row() -> None:
    # |x| ranks 0..3: 0.1 -> 0, 0.5 -> 1, 2.0 -> 2, -3.0 -> 3; p = 0.4 + 0.2 * r / 3
    _close(magprune_probs(_t([0.1, -3.0, 2.0, 0.5]), 0.5, 0.1), [0.4, 0.6, 0.4 + 0.4 / 3, 0.4 + 0.2 / 3])


def test_magprune_probs_rank_each_row_along_dimension_one() -> None:
    x = _t([[1.0, -5.0, 3.0], [9.0, 8.0, -7.0]])
    _close(magprune_probs(x, 0.5, 0.2), [[0.3, 0.7, 0.5], [0.7, 0.5, 0.3]])
    # 3-D (as mergekit): ranked along dimension 1 for every (i, :, k)
    y = torch.stack([x.T, -x.T * 2])  # (2, 3, 2)
    want = magprune_probs(x, 0.5, 0.2).T
    _close(magprune_probs(y, 0.5, 0.2), torch.stack([want, want]))


def test_magprune_probs_break_ties_by_position_and_keep_single_entries_at_density() -> None:
    _close(magprune_probs(_t([2.0, -2.0, 2.0]), 0.6, 0.3), [0.3, 0.6, 0.9])
    _close(magprune_probs(_t([[4.0], [-1.0]]), 0.6, 0.3), [[0.6], [0.6]])  # rows of one entry
    _close(magprune_probs(_t(5.0), 0.6, 0.3), 0.6)  # a 0-d tensor


def test_magprune_keeps_or_zeroes_each_entry_and_rescales() -> None:
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    plain = magprune(x, 0.5, 0.2, rescale="none", seed=3)
    kept = plain != 0
    assert torch.equal(plain[kept], x[kept]) and 0 < int(kept.sum()) < x.numel()
    l1 = magprune(x, 0.5, 0.2, rescale="l1", seed=3)  # the same draws, then one factor ‖x‖₁ / ‖kept‖₁
    assert torch.equal(l1 != 0, kept)
    _close(l1, plain * (x.abs().sum() / plain.abs().sum()), atol=1e-5)
    inverse = magprune(x, 0.5, 0.2, rescale="inverse", seed=3)  # each survivor / its own p
    _close(inverse, torch.where(kept, x / magprune_probs(x, 0.5, 0.2), 0.0))
    assert torch.equal(magprune(x, 1.0, 0.2, seed=3), x)
    assert torch.equal(magprune(x, 0.0, 0.2, seed=3), torch.zeros_like(x))


@pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.5), (0.9, 0.15), (0.1, 0.1), (0.3, 0.31)])
def test_della_refuses_probabilities_outside_zero_one(density: float, epsilon: float) -> None:
    with pytest.raises(ShiftkitError, match="density ± epsilon"):
        magprune(torch.ones(4, 4), density, epsilon)
    with pytest.raises(ShiftkitError, match="density ± epsilon"):
        della([{"w": torch.ones(4, 4)}] * 2, [1.0, 1.0], density=[0.5, density], epsilon=epsilon)


def test_della_rejects_bad_arguments() -> None:
    tensors = [{"w": torch.ones(3, 3)}] * 2
    with pytest.raises(ShiftkitError, match="rescale"):
        della(tensors, [1.0, 1.0], rescale="l2")
    with pytest.raises(ShiftkitError, match="density has 3 values for 2 inputs"):
        della(tensors, [1.0, 1.0], density=[0.5, 0.5, 0.5])
    with pytest.raises(ShiftkitError, match="epsilon has 1 values for 2 inputs"):
        della_linear(tensors, [1.0, 1.0], epsilon=[0.1])


# --- DELLA's elect and fuse by hand (density 1: nothing dropped) -----------------------------------------
T1 = _t([1.0, -2.0, 3.0, 0.0])
T2 = _t([-3.0, 1.0, 1.0, 0.0])


def test_della_without_drop_is_the_weighted_disjoint_mean() -> None:
    # u = w·τ: [2, -4, 6, 0], [-3, 1, 1, 0]; Σu = [-1, -3, 7, 0] -> γ = [-, -, +, +]
    # agreeing: 0 -> τ2 alone (-3), 1 -> τ1 alone (-2), 2 -> (6 + 1) / (2 + 1), 3 -> none (0)
    out = della([{"w": T1}, {"w": T2}], [2.0, 1.0], density=1.0, lambda_=2.0)
    _close(out["w"], [-6.0, -4.0, 14.0 / 3.0, 0.0])
    raw = della([{"w": T1}, {"w": T2}], [2.0, 1.0], density=1.0, normalize=False)
    _close(raw["w"], [-3.0, -4.0, 7.0, 0.0])


def test_della_linear_without_drop_is_task_arithmetic() -> None:
    out = della_linear([{"w": T1}, {"w": T2}], [2.0, 1.0], density=1.0, lambda_=0.5)
    _close(out["w"], 0.5 * (2.0 * T1 + T2))
    mean = della_linear([{"w": T1}, {"w": T2}], [2.0, 1.0], density=1.0, normalize=True)
    _close(mean["w"], (2.0 * T1 + T2) / 3.0)


def test_density_and_epsilon_per_input() -> None:
    # input 1 is dropped entirely (density 0), input 0 kept entirely (density 1): exact
    out = della_linear([{"w": T1}, {"w": T2}], [2.0, 1.0], density=[1.0, 0.0], epsilon=[0.1, 0.2])
    _close(out["w"], 2.0 * T1)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    a, b = della_drop([{"w": x}, {"w": x}], density=[0.3, 0.7], epsilon=[0.1, 0.25], rescale="none", seed=0)
    assert float((a["w"] != 0).float().mean()) < 0.45 < float((b["w"] != 0).float().mean())


def test_drops_are_reproducible_per_tensor_name() -> None:
    g = torch.Generator().manual_seed(2)
    shifts = [{"a": torch.randn(6, 20, generator=g), "b": torch.randn(20, generator=g)} for _ in range(2)]
    one = della(shifts, [1.0, 1.0], density=0.5, epsilon=0.2, seed=7)
    reordered = della(
        [{"b": s["b"], "a": s["a"]} for s in shifts], [1.0, 1.0], density=0.5, epsilon=0.2, seed=7
    )
    alone = della([{"a": s["a"]} for s in shifts], [1.0, 1.0], density=0.5, epsilon=0.2, seed=7)
    assert torch.equal(one["a"], reordered["a"]) and torch.equal(one["b"], reordered["b"])
    assert torch.equal(one["a"], alone["a"])
    assert not torch.equal(one["a"], della(shifts, [1.0, 1.0], density=0.5, epsilon=0.2, seed=8)["a"])


# --- SCE by hand -----------------------------------------------------------------------------------------
def test_sce_weights_erase_and_mean() -> None:
    # mean squares 14/4 = 3.5 and 11/4 = 2.75 -> η = [0.56, 0.44]; Στ = [-2, -1, 4, 0] -> γ = [-, -, +, +]
    out = sce([{"w": T1}, {"w": T2}], [1.0, 1.0])
    _close(out["w"], [-3.0, -2.0, 3.0 * 0.56 + 1.0 * 0.44, 0.0])
    assert sce_weights(torch.stack([T1, T2])) == pytest.approx([0.56, 0.44])


def test_sce_selects_the_highest_variance_coordinates() -> None:
    # variances [4, 2.25, 1, 0]: three non-zero, ⌊3 · 0.5⌋ = 1 selected (coordinate 0)
    stack = torch.stack([T1, T2])
    assert sce_select_mask(stack, 0.5).tolist() == [True, False, False, False]
    assert sce_select_mask(stack, 0.7).tolist() == [True, True, False, False]
    # selected: [1, 0, 0, 0], [-3, 0, 0, 0] -> η = [0.1, 0.9], γ₀ = - -> -3
    _close(sce([{"w": T1}, {"w": T2}], [1.0, 1.0], select_topk=0.5)["w"], [-3.0, 0.0, 0.0, 0.0])
    _close(sce([{"w": T1}, {"w": T2}], [1.0, 1.0], select_topk=0.0)["w"], [0.0, 0.0, 0.0, 0.0])


def test_sce_gives_equal_weights_to_tiny_shifts_as_mergekit() -> None:
    # Σ mean(τ²) = 6.25e-8 < 1e-6: η = [0.5, 0.5] instead of [0.56, 0.44]
    out = sce([{"w": T1 * 1e-4}, {"w": T2 * 1e-4}], [1.0, 1.0])
    _close(out["w"], [-3e-4, -2e-4, 2e-4, 0.0], atol=1e-10)


def test_sce_has_no_weights_and_refuses_a_negative_fraction() -> None:
    a, b = _delta(w=T1), _delta(w=T2)
    with pytest.raises(ShiftkitError, match="weights"):
        sk.merge([a, b], method="sce", weights=[0.5, 1.0])
    with pytest.raises(ShiftkitError, match="select_topk"):
        sk.merge([a, b], method="sce", select_topk=-0.1)


def test_every_method_runs_through_sk_merge() -> None:
    g = torch.Generator().manual_seed(4)
    shifts = [_delta(w=torch.randn(8, 12, generator=g), b=torch.randn(12, generator=g)) for _ in range(3)]
    d = sk.merge(
        shifts, method="della", weights=[1.0, 0.5, 2.0], density=[0.3, 0.5, 0.7], epsilon=0.1, seed=1
    )
    assert d["w"].shape == (8, 12) and 0 < float((d["w"] != 0).float().mean()) < 1
    again = sk.merge(
        shifts, method="della", weights=[1.0, 0.5, 2.0], density=[0.3, 0.5, 0.7], epsilon=0.1, seed=1
    )
    assert torch.equal(d["w"], again["w"])
    lin = sk.merge(shifts, method="della_linear", density=1.0)
    _close(lin["w"], sum(s["w"] for s in shifts))
    s = sk.merge(shifts, method="sce", select_topk=0.5)
    direct = sce([dict(x.tensors) for x in shifts], [1.0] * 3, select_topk=0.5)
    assert torch.equal(s["w"], direct["w"])


def test_specs() -> None:
    for name in ("della", "della_linear"):
        spec = get_merge_method(name)
        assert spec.per_input == ("density", "epsilon") and spec.recipe_required == ("weight",)
        assert spec.recipe_default("density") == 1.0 and spec.recipe_default("epsilon") == 0.15
        assert spec.recipe_default("rescale") == "l1"
    assert get_merge_method("della").weighting == "normalized"
    assert get_merge_method("della_linear").weighting == "linear"
    assert (
        get_merge_method("sce").weighting == "none"
        and get_merge_method("sce").recipe_default("select_topk") == 1
    )


# --- mergekit at tensor level ----------------------------------------------------------------------------
def _mk_merge(method: str, base: Tensor, deltas: list[Tensor], **parameters: Any) -> Tensor:
    from mergekit.merge_methods.api import merge_tensors

    params = {
        k: ({i + 1: x for i, x in enumerate(v)} if isinstance(v, list) else v) for k, v in parameters.items()
    }
    return merge_tensors([base, *[base + d for d in deltas]], method, parameters=params, base_index=0) - base


def _deltas(shape: tuple[int, ...], n: int = 3, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=g) * 0.1 for _ in range(n)]
    out[1] = -0.7 * out[0] + 0.05 * torch.randn(shape, generator=g)  # mostly opposite signs
    out[2] = out[2] * (torch.rand(shape, generator=g) < 0.4)  # sparse
    return out


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("shape", [(24, 40), (40,), (3, 4, 5)])
def test_sce_equals_mergekit(mergekit: ModuleType, select_topk: float, shape: tuple[int, ...]) -> None:
    ds = _deltas(shape)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    theirs = _mk_merge("sce", base, ds, select_topk=select_topk)
    ours = sce([{"w": d} for d in ds], [1.0] * 3, select_topk=select_topk)["w"]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    if select_topk > 0:
        assert float(ours.abs().max()) > 1e-3


def test_magprune_keeps_density_of_each_row_like_mergekit(mergekit: ModuleType) -> None:
    from mergekit.sparsify import della_magprune

    x = torch.randn(64, 400, generator=torch.Generator().manual_seed(5))
    density, eps = 0.3, 0.1
    p = magprune_probs(x, density, eps)
    sigma = (p * (1 - p)).sum(1).sqrt() / x.shape[1]  # binomial std of a row's kept fraction
    torch.manual_seed(0)
    theirs = (della_magprune(x, density, eps) != 0).float().mean(1)
    ours = (magprune(x, density, eps, rescale="none", seed=0) != 0).float().mean(1)
    for kept in (theirs, ours):
        assert bool(((kept - density).abs() < 4.5 * sigma).all())
    assert abs(float(ours.mean() - theirs.mean())) < 6 * float(sigma.mean()) / math.sqrt(x.shape[0])


def test_magprune_scales_every_kept_entry_by_one_factor_like_mergekit(mergekit: ModuleType) -> None:
    from mergekit.sparsify import RescaleNorm, della_magprune

    x = torch.randn(16, 50, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(1)
    theirs = della_magprune(x, 0.4, 0.2, rescale_norm=RescaleNorm.l1)
    ours = magprune(x, 0.4, 0.2, rescale="l1", seed=1)
    for out in (theirs, ours):
        kept = out != 0
        ratio = out[kept] / x[kept]
        _close(ratio, torch.full_like(ratio, float(x.abs().sum() / x[kept].abs().sum())), atol=1e-4)
        _close(out.abs().sum(), x.abs().sum(), atol=1e-3)


@pytest.mark.parametrize("shape", [(4, 30), (60,), (3, 10, 2)])
def test_keep_frequency_of_each_rank_matches_mergekit(mergekit: ModuleType, shape: tuple[int, ...]) -> None:
    """Over 300 draws the keep frequency of every entry is its rank's probability, in both tools."""
    from mergekit.sparsify import della_magprune

    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    density, eps, draws = 0.5, 0.3, 300
    p = magprune_probs(x, density, eps)
    torch.manual_seed(2)
    theirs = sum((della_magprune(x, density, eps) != 0).float() for _ in range(draws)) / draws
    ours = sum((magprune(x, density, eps, rescale="none", seed=s) != 0).float() for s in range(draws)) / draws
    sigma = (p * (1 - p) / draws).sqrt()
    for freq in (theirs, ours):
        assert bool(((freq - p).abs() < 4.5 * sigma).all())
    # larger entries are kept more often: the frequency rises with |x| (rank correlation > 0.9)
    mags = x.abs().reshape(-1)
    for freq in (theirs, ours):
        assert (
            float(torch.corrcoef(torch.stack([mags.argsort().argsort().float(), freq.reshape(-1)]))[0, 1]) > 0
        )
    flat_rows = x.reshape(1, -1) if x.dim() < 2 else x.movedim(1, -1).reshape(-1, x.shape[1])
    freq_rows = ours.reshape(1, -1) if x.dim() < 2 else ours.movedim(1, -1).reshape(-1, x.shape[1])
    for row, f in zip(flat_rows, freq_rows, strict=True):
        r = row.abs().argsort().argsort().float()
        assert float(torch.corrcoef(torch.stack([r, f]))[0, 1]) > 0.9


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_merged_della_matches_mergekit_in_distribution(mergekit: ModuleType, method: str) -> None:
    """Over 12 seeds: the same fraction of non-zero entries, the same norm, and the same expected merge
    (the two tools' seed averages differ by no more than their own seed-to-seed noise predicts)."""
    ds = _deltas((32, 64), seed=1)
    base = torch.zeros(32, 64)
    weights, density, eps, seeds = [1.0, 0.5, 2.0], [0.3, 0.5, 0.7], 0.1, 12
    fn = della if method == "della" else della_linear
    outs: dict[str, list[Tensor]] = {"ours": [], "theirs": []}
    for s in range(seeds):
        torch.manual_seed(100 + s)
        outs["theirs"].append(
            _mk_merge(method, base, ds, weight=weights, density=density, epsilon=eps, **{"lambda": 1.1})
        )
        outs["ours"].append(
            fn([{"w": d} for d in ds], weights, density=density, epsilon=eps, lambda_=1.1, seed=s)["w"]
        )
    ours, theirs = torch.stack(outs["ours"]), torch.stack(outs["theirs"])
    nonzero = [float((x != 0).float().mean()) for x in (ours, theirs)]
    norms = [float(x.flatten(1).norm(dim=1).mean()) for x in (ours, theirs)]
    assert abs(nonzero[0] - nonzero[1]) < 0.012, nonzero
    assert abs(norms[0] / norms[1] - 1) < 0.04, norms
    # E‖mean_ours − mean_theirs‖² = (Σ Var_ours + Σ Var_theirs) / seeds when both have the same expectation
    gap = float((ours.mean(0) - theirs.mean(0)).square().sum())
    noise = float((ours.var(0).sum() + theirs.var(0).sum()) / seeds)
    assert 0.7 < gap / noise < 1.3, gap / noise
    if method == "della_linear":  # each shift is kept with density on average: about task arithmetic
        ta = 1.1 * sum(w * d for w, d in zip(weights, ds, strict=True))
        assert float((theirs.mean(0) - ta).norm() / ta.norm()) < 0.5


# --- mergekit at recipe level ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llamas(tmp_path_factory.mktemp("della_sce"))


def _recipe(
    llamas: dict[str, Path], method: str, models: list[tuple[str, dict[str, Any]]], **top: Any
) -> dict:
    out: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas[n]), **({"parameters": p} if p else {})} for n, p in models],
        "dtype": "float32",
    }
    if top:
        out["parameters"] = top
    return out


THREE = [("ft0", {"weight": 1.0}), ("ft1", {"weight": 0.5}), ("ft2", {"weight": 2.0})]
NO_WEIGHTS: list[tuple[str, dict[str, Any]]] = [("ft0", {}), ("ft1", {}), ("ft2", {})]

EXACT = {
    "sce-minimal": ("sce", NO_WEIGHTS, {}),
    "sce-select": ("sce", NO_WEIGHTS, {"select_topk": 0.3}),
    "sce-filter-gradient": (
        "sce",
        [("ft0", {}), ("ft1", {})],
        {
            "select_topk": [
                {"filter": "mlp", "value": [0.2, 0.9]},
                {"filter": "self_attn", "value": 0.5},
                {"value": 1},
            ]
        },
    ),
    "sce-weights-ignored": ("sce", [("ft0", {"weight": 0.3}), ("ft1", {"weight": 2.0})], {}),
    "della-density-1": ("della", THREE, {"lambda": 0.9}),
    "della_linear-density-1": ("della_linear", THREE, {"normalize": True, "epsilon": 0.3}),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_deterministic_recipes_equal_mergekit(
    mergekit: ModuleType, llamas: dict[str, Path], case: str, tmp_path: Path
) -> None:
    method, models, top = EXACT[case]
    recipe = _recipe(llamas, method, models, **top)
    theirs = run_mergekit(mergekit, recipe, tmp_path / "mergekit")
    ours = run_shiftkit(recipe, tmp_path)
    assert_same_tensors(ours, theirs)
    base = read_folder(llamas["base"])
    assert max(float((t - base[k]).abs().max()) for k, t in theirs.items()) > 1e-3


RANDOM = {
    "della-per-model-density": (
        "della",
        [
            ("ft0", {"weight": 1.0, "density": 0.3}),
            ("ft1", {"weight": 0.5, "density": 0.7}),
            ("ft2", {"weight": 2.0, "density": 0.5}),
        ],
        {"epsilon": 0.1, "lambda": 1.2},
    ),
    "della-gradient-and-filter": (
        "della",
        [("ft0", {"weight": 1.0}), ("ft1", {"weight": 1.0, "density": [0.3, 0.7]})],
        {"density": [{"filter": "mlp", "value": 0.4}, {"value": 0.6}], "epsilon": 0.15},
    ),
    "della_linear-gradient-and-filter": (
        "della_linear",
        [("ft0", {"weight": 0.6, "epsilon": 0.05}), ("ft1", {"weight": 0.4}), ("ft2", {"weight": 0.5})],
        {"density": [{"filter": "self_attn", "value": [0.3, 0.7]}, {"value": 0.5}], "epsilon": 0.2},
    ),
}


def _summary(merged: dict[str, Tensor], base: dict[str, Tensor], part: str = "") -> tuple[float, float]:
    """Fraction of entries changed from the base and the norm of the merged delta, over the tensors whose
    names contain ``part`` (all by default)."""
    keys = [k for k in base if part in k]
    changed = sum(float((merged[k] != base[k]).sum()) for k in keys)
    total = sum(base[k].numel() for k in keys)
    norm = math.sqrt(sum(float((merged[k].double() - base[k].double()).square().sum()) for k in keys))
    return changed / total, norm


@pytest.mark.parametrize("case", list(RANDOM))
def test_random_recipes_match_mergekit_in_distribution(
    mergekit: ModuleType, llamas: dict[str, Path], case: str, tmp_path: Path
) -> None:
    method, models, top = RANDOM[case]
    recipe = _recipe(llamas, method, models, **top)
    base = read_folder(llamas["base"])
    torch.manual_seed(0)
    theirs_model = run_mergekit(mergekit, recipe, tmp_path / "mergekit")
    ours_model = run_shiftkit(recipe, tmp_path)
    theirs, ours = _summary(theirs_model, base), _summary(ours_model, base)
    assert 0.1 < theirs[0] < 0.99
    assert abs(ours[0] - theirs[0]) < 0.02, (ours, theirs)
    assert abs(ours[1] / theirs[1] - 1) < 0.04, (ours, theirs)
    # layer by layer (a gradient, or a filter, gives each its own density): ~2.6k entries a layer
    for part in [f"layers.{i}." for i in range(6)] + ["mlp", "self_attn"]:
        mine, ref = _summary(ours_model, base, part), _summary(theirs_model, base, part)
        assert abs(mine[0] - ref[0]) < 0.05, (part, mine, ref)


def test_a_recipe_gets_mergekits_defaults_and_errors(
    mergekit: ModuleType, llamas: dict[str, Path], tmp_path: Path
) -> None:
    # no density: mergekit's 1.0, so nothing is dropped and the merge is deterministic
    recipe = _recipe(llamas, "della_linear", THREE)
    assert_same_tensors(run_shiftkit(recipe, tmp_path), run_mergekit(mergekit, recipe, tmp_path / "mk"))
    # density 0.9 with mergekit's epsilon 0.15: p would reach 1.05; mergekit raises too
    bad = _recipe(llamas, "della", [("ft0", {"weight": 1.0, "density": 0.9})])
    with pytest.raises(ShiftkitError, match="epsilon"):
        run_shiftkit(bad, tmp_path, name="bad")
    with pytest.raises(Exception, match=r"[Ee]psilon"):
        run_mergekit(mergekit, bad, tmp_path / "mk-bad")
    missing = _recipe(llamas, "della", [("ft0", {"density": 0.5})])
    with pytest.raises(ShiftkitError, match="'weight'"):
        run_shiftkit(missing, tmp_path, name="missing")
