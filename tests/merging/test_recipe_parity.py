"""A recipe means in ``shiftkit merge`` what it means in mergekit 0.1.5 (the dev dependency, an oracle only).

Before these fixes a recipe without ``density`` was pruned by shiftkit (0.2 for ``ties``, 0.1 for
``dare_*``, 0.9 and the top 1 % for ``breadcrumbs``) but not by mergekit; ``linear`` with a ``base_model``
left the base out of the average; a missing ``weight`` or ``t`` became 1.0 / 0.5 where mergekit refuses;
and SLERP's float32 norms of a large tensor silently fell back to a linear interpolation.

The matrix runs every method that both tools have on the same tiny local Llama checkpoints, minimal recipes
(required keys only: mergekit's defaults apply) and recipes with the optional parameters, through mergekit's
``run_merge`` and shiftkit's ``merge_recipe``, and compares every tensor. A second test reads mergekit's own
parameter specs and checks every shiftkit ``MergeSpec`` against them, so a drift in defaults fails here.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor

import shiftkit as sk
from mk_llama import make_llamas, read_folder, run_mergekit, run_shiftkit
from shiftkit.merging.registry import get_merge_method
from shiftkit.merging.slerp import DOT_THRESHOLD, slerp_tensor

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

TINY = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and three fine-tunes (dense, sign-conflicting, sparse shifts) as HF folders."""
    return make_llamas(tmp_path_factory.mktemp("parity"), **TINY)


_read = read_folder


def _recipe(ckpts: dict[str, Path], case: dict[str, Any]) -> dict[str, Any]:
    models = [{"model": str(ckpts[name]), **({"parameters": p} if p else {})} for name, p in case["models"]]
    out: dict[str, Any] = {"merge_method": case["method"], "models": models, "dtype": "float32"}
    if case.get("base", True):
        out["base_model"] = str(ckpts["base"])
    if case.get("parameters"):
        out["parameters"] = case["parameters"]
    return out


def _mergekit(mk: ModuleType, recipe: dict[str, Any], out: Path) -> dict[str, Tensor]:
    return run_mergekit(mk, recipe, out)


def _shiftkit(recipe: dict[str, Any], tmp: Path) -> dict[str, Tensor]:
    return run_shiftkit(recipe, tmp)


W = {"weight": 1.0}
THREE = [("ft0", {"weight": 1.0}), ("ft1", {"weight": 0.5}), ("ft2", {"weight": 2.0})]

# (id, case): minimal recipes first (only what mergekit requires), then optional parameters
CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear-minimal-no-base", {"method": "linear", "models": THREE, "base": False}),
    ("linear-base-top-weight", {"method": "linear", "models": THREE, "parameters": {"weight": 0.7}}),
    (
        "linear-base-listed-unnormalised",
        {
            "method": "linear",
            "models": [("base", {"weight": 0.2}), *THREE],
            "parameters": {"normalize": False},
        },
    ),
    ("task_arithmetic-minimal", {"method": "task_arithmetic", "models": THREE}),
    (
        "task_arithmetic-options",
        {
            "method": "task_arithmetic",
            "models": THREE,
            "parameters": {"lambda": 0.6, "normalize": True, "density": 0.3, "int8_mask": True},
        },
    ),
    ("ties-minimal", {"method": "ties", "models": THREE}),
    (
        "ties-options",
        {
            "method": "ties",
            "models": [(n, {**p, "density": 0.4}) for n, p in THREE],
            "parameters": {"lambda": 0.9, "normalize": False, "rescale": True},
        },
    ),
    ("dare_linear-minimal", {"method": "dare_linear", "models": THREE}),
    ("dare_ties-minimal", {"method": "dare_ties", "models": THREE}),
    (
        "dare_ties-options-density-1",
        {"method": "dare_ties", "models": THREE, "parameters": {"normalize": True, "lambda": 1.3}},
    ),
    ("breadcrumbs-minimal", {"method": "breadcrumbs", "models": THREE}),
    (
        "breadcrumbs-options",
        {
            "method": "breadcrumbs",
            "models": [(n, {**p, "density": 0.7, "gamma": 0.05}) for n, p in THREE],
            "parameters": {"rescale": True, "lambda": 0.8},
        },
    ),
    ("breadcrumbs_ties-minimal", {"method": "breadcrumbs_ties", "models": THREE}),
    (
        "breadcrumbs_ties-options",
        {
            "method": "breadcrumbs_ties",
            "models": [(n, {**p, "density": 0.6, "gamma": 0.02}) for n, p in THREE],
            "parameters": {"normalize": True},
        },
    ),
    ("slerp-base-plus-one", {"method": "slerp", "models": [("ft1", {})], "parameters": {"t": 0.3}}),
    (
        "slerp-base-listed",
        {"method": "slerp", "models": [("ft0", {}), ("base", {})], "parameters": {"t": 0.8}},
    ),
    ("model_stock-minimal", {"method": "model_stock", "models": [(n, {}) for n, _ in THREE]}),
    (
        "model_stock-filter-wise",
        {"method": "model_stock", "models": [(n, {}) for n, _ in THREE], "parameters": {"filter_wise": True}},
    ),
]


def _no_threshold_ties(ckpts: dict[str, Path], density: float) -> None:
    """A magnitude tie at a trim threshold would make the kept set implementation-defined: assert none."""
    base = _read(ckpts["base"])
    for i in range(3):
        for k, v in _read(ckpts[f"ft{i}"]).items():
            mags = (v - base[k]).abs().reshape(-1).sort(descending=True).values
            n = int(density * mags.numel())
            if 0 < n < mags.numel() and mags[n] > 0:
                assert mags[n - 1] > mags[n], k


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_recipe_means_what_it_means_in_mergekit(
    mergekit: ModuleType, ckpts: dict[str, Path], case: dict[str, Any], tmp_path: Path
) -> None:
    recipe = _recipe(ckpts, case)
    for _, p in case["models"]:
        if "density" in p:
            _no_threshold_ties(ckpts, p["density"])
    theirs = _mergekit(mergekit, recipe, tmp_path / "mergekit")
    ours = _shiftkit(recipe, tmp_path)
    assert set(ours) == set(theirs)
    base = _read(ckpts["base"])
    moved = 0.0
    for k, t in theirs.items():
        torch.testing.assert_close(ours[k], t, atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        moved = max(moved, float((t - base[k]).abs().max()))
    assert moved > 1e-3, "the merge left the base unchanged: the comparison would prove nothing"


@pytest.mark.parametrize(
    ("case", "key"),
    [
        ({"method": "ties", "models": [("ft0", {}), ("ft1", W)]}, "weight"),
        ({"method": "linear", "models": THREE}, "weight"),  # the base is averaged in: it needs one
        ({"method": "task_arithmetic", "models": [("ft0", {"density": 0.5})]}, "weight"),
        ({"method": "slerp", "models": [("ft1", {})]}, "t"),
    ],
    ids=["ties-no-weight", "linear-base-without-weight", "task_arithmetic-no-weight", "slerp-no-t"],
)
def test_missing_required_values_are_errors_in_both(
    mergekit: ModuleType, ckpts: dict[str, Path], case: dict[str, Any], key: str, tmp_path: Path
) -> None:
    recipe = _recipe(ckpts, case)
    with pytest.raises(RuntimeError, match=f"Missing required parameter {key}"):
        _mergekit(mergekit, recipe, tmp_path / "mergekit")
    with pytest.raises(sk.ShiftkitError, match=f"'{key}'"):
        _shiftkit(recipe, tmp_path)
    assert not (tmp_path / "shiftkit").exists()


# mergekit parameter -> shiftkit parameter, and how mergekit's value reads in shiftkit
_NAMES = {"lambda": "lambda_"}
_VALUES = {"rescale": lambda v: "l1" if v else "none"}
_IGNORED_EVERYWHERE = {"int8_mask"}  # a memory switch without effect on results
# methods whose mergekit task reads the base model's tensor as one of the merged values
BASE_IS_INPUT = {"linear", "slerp", "passthrough", "arcee_fusion", "nearswap", "karcher"}


def test_every_spec_matches_mergekits_parameter_specs(mergekit: ModuleType) -> None:
    registry = importlib.import_module("mergekit.merge_methods.registry")
    theirs = {m.spec.name: m.spec for m in registry.registered_methods()}
    shared = sorted(set(theirs) & set(sk.list_merge_methods()))
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "slerp", "model_stock"} <= set(shared)
    for name in shared:
        spec = get_merge_method(name)
        for p in theirs[name].parameters:
            if p.name in _IGNORED_EVERYWHERE:
                continue
            if p.name == "weight":
                assert ("weight" in spec.recipe_required) == p.required, name
                continue
            if p.name in spec.recipe_ignored:
                continue
            ours = _NAMES.get(p.name, p.name)
            assert ours in spec.params, f"{name}: mergekit's {p.name!r} is not a shiftkit parameter"
            if p.required:
                assert ours in spec.recipe_required, f"{name}: mergekit requires {p.name!r}"
            else:
                want = _VALUES.get(p.name, lambda v: v)(p.default)
                assert spec.recipe_default(ours) == want, (
                    f"{name}.{p.name}: {spec.recipe_default(ours)} vs {want}"
                )
        assert spec.base_is_input == (name in BASE_IS_INPUT), name
        # per-model parameters (mergekit's INPUT / NON_BASE scope) take one value per input here too
        per_model = {
            _NAMES.get(p.name, p.name)
            for p in theirs[name].parameters
            if str(getattr(p.scope, "value", p.scope)) != "shared"
            and p.name != "weight"
            and p.name not in spec.recipe_ignored
        }
        assert set(spec.per_input) == per_model, f"{name}: per-model parameters {sorted(per_model)}"


# --- precision of whole-tensor reductions -------------------------------------------------------------
def _slerp64(a: Tensor, b: Tensor, t: float) -> Tensor:
    """SLERP written out in float64 (the reference): no float32 reduction anywhere."""
    x, y = a.double(), b.double()
    c = float((x @ y) / (x.norm() * y.norm()))
    if abs(c) > DOT_THRESHOLD:
        return (1 - t) * x + t * y
    om = math.acos(c)
    return (math.sin((1 - t) * om) * x + math.sin(t * om) * y) / math.sin(om)


def test_slerp_of_a_large_tensor_is_not_silently_linear() -> None:
    """16.4M entries (a SmolLM2-sized embedding): true cosine 0.99928, below the lerp threshold 0.9995.

    Float32 norms of the whole tensor are ~2e-4 low here, which put the cosine at 0.99969 and turned the
    slerp into a lerp without a word; float64 block sums give the reference to float32 rounding.
    """
    g = torch.Generator().manual_seed(0)
    n = 16_400_000
    a = torch.randn(n, generator=g) * 0.01 + 0.02
    b = a + torch.randn(n, generator=g) * 0.00085
    naive = float((a / a.norm() * (b / b.norm())).sum())  # what a float32 reduction computes
    assert naive > DOT_THRESHOLD, "the data no longer shows the float32 failure"
    ref = _slerp64(a, b, 0.3)
    got = slerp_tensor(a, b, 0.3)
    lerp = 0.7 * a.double() + 0.3 * b.double()
    err = float((got.double() - ref).abs().max())
    assert err < 1e-8, err
    assert float((lerp - ref).abs().max()) > 100 * err  # the lerp fallback would be measurably wrong


def test_float64_reductions_stay_exact_on_2e8_entries_in_small_memory() -> None:
    """2·10⁸ entries streamed as stride-0 views (no 800 MB tensor): float32 loses over half the norm."""
    from shiftkit.core.functional import abs_sum64, dot64, norm64

    n = 200_000_000
    a = torch.tensor([0.01]).expand(n)
    b = torch.tensor([-0.03]).expand(n)
    exact_a = float(torch.tensor(0.01, dtype=torch.float32)) * math.sqrt(n)  # 0.01 as stored in float32
    assert abs(float(a.norm()) / exact_a - 1) > 0.1  # torch's float32 reduction over 2e8 entries
    assert abs(norm64(a) / exact_a - 1) < 1e-12
    exact_dot = n * float(torch.tensor(0.01)) * float(torch.tensor(-0.03))
    assert abs(dot64(a, b) / exact_dot - 1) < 1e-12
    assert abs(abs_sum64(b) / (n * abs(float(torch.tensor(-0.03)))) - 1) < 1e-12


def test_model_stock_and_dare_rescale_use_float64_sums() -> None:
    from shiftkit.merging.model_stock import model_stock_ratio
    from shiftkit.merging.sparsify import l1_rescaled

    g = torch.Generator().manual_seed(1)
    n = 16_400_000
    a = torch.randn(n, generator=g) * 0.01 + 0.02
    b = a + torch.randn(n, generator=g) * 0.002
    x, y = a.double(), b.double()
    c = float((x @ y) / (x.norm() * y.norm()))
    want = 2 * c / (1 + c)
    assert abs(float(model_stock_ratio([a, b])) - want) < 1e-6
    kept = torch.where(a > 0.02, a, torch.zeros_like(a))
    scale = float(x.abs().sum() / kept.double().abs().sum())
    got = l1_rescaled(a, kept)
    i = int(torch.argmax(kept))
    assert abs(float(got[i]) / float(kept[i]) - scale) < 1e-6 * scale
