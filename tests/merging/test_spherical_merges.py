"""``nuslerp``, ``multislerp`` and ``karcher``: formulas on hand-made vectors, mergekit 0.1.5 as the oracle.

Three levels: small tensors whose merges follow from the definitions (Shoemake's slerp of orthogonal unit
vectors, the spherical mean of symmetric points, a geodesic's weighted mean), mergekit's own tensor functions
and merge-method objects on the same random tensors, and whole recipes through mergekit's ``run_merge`` and
``sk.merge_recipe`` on tiny Llama checkpoints (``tests/mk_llama.py``).
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
from mk_llama import assert_same_tensors, make_llamas, read_folder, run_mergekit, run_shiftkit
from shiftkit.core.shift import DELTA, Shift
from shiftkit.merging.karcher import karcher, karcher_mean
from shiftkit.merging.multislerp import multislerp_tensor
from shiftkit.merging.nuslerp import nuslerp_tensor, nuslerp_weight_t

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

E1, E2, E3 = torch.eye(3)
R2 = 1 / math.sqrt(2)


def _shift(tensors: dict[str, Tensor]) -> Shift:
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


def _close(got: Tensor, want: Tensor, tol: float = 1e-6) -> None:
    """Every entry within ``tol`` times the largest entry of ``want`` (relative agreement of the tensor)."""
    assert got.shape == want.shape
    scale = float(want.abs().max()) or 1.0
    err = float((got.double() - want.double()).abs().max())
    assert err <= tol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


# --- formulas ---------------------------------------------------------------------------------------------
def test_nuslerp_of_orthogonal_unit_vectors_follows_the_great_circle() -> None:
    _close(nuslerp_tensor(E1, E2, 0.5), R2 * (E1 + E2))
    # weights 1 : 3 → t = 3/4, Ω = π/2: sin(π/8) e1 + sin(3π/8) e2
    t = nuslerp_weight_t(1.0, 3.0)
    assert t == 0.75
    _close(nuslerp_tensor(E1, E2, t), math.sin(math.pi / 8) * E1 + math.sin(3 * math.pi / 8) * E2)
    # the norms are not renormalised: slerp of the unnormalised vectors (2 e1, e2)
    _close(nuslerp_tensor(2 * E1, E2, 0.5), R2 * (2 * E1 + E2))
    assert nuslerp_weight_t(1.0, -1.0) == 0.5  # a sum of ~0 gives the midpoint


def test_nuslerp_edge_cases_parallel_and_zero() -> None:
    v = torch.tensor([1.0, -2.0, 0.5])
    _close(nuslerp_tensor(v, 3 * v, 0.25), 0.75 * v + 0.25 * 3 * v)  # parallel: the lerp
    _close(nuslerp_tensor(v, -v, 0.25), 0.75 * v - 0.25 * v)  # antiparallel: the lerp too
    # a zero vector has cosine 0 with anything (norm clamped at 1e-7): Ω = π/2, so sin(tπ/2) · v1
    _close(nuslerp_tensor(torch.zeros(3), v, 0.3), math.sin(0.3 * math.pi / 2) * v)


def test_nuslerp_rows_and_columns() -> None:
    a = torch.stack([E1, E1])
    b = torch.stack([E2, 2 * E1])
    want = torch.stack([R2 * (E1 + E2), 1.5 * E1])  # row 0 orthogonal: great circle; row 1 parallel: lerp
    _close(nuslerp_tensor(a, b, 0.5, flatten=False), want)
    _close(nuslerp_tensor(a.T, b.T, 0.5, flatten=False, row_wise=True), want.T)  # fibres along axis 0
    # antiparallel rows up to float32 rounding (−0.7 x is rounded): the lerp, not a division by sin Ω ≈ 0
    x = _randn((16, 32), 0)
    _close(nuslerp_tensor(x, -0.7 * x, 0.25, flatten=False), 0.75 * x + 0.25 * (-0.7 * x))
    _close(nuslerp_tensor(x, -0.7 * x, 0.25, flatten=False, row_wise=True), 0.75 * x + 0.25 * (-0.7 * x))
    # flattened: one vector of 6 entries, cos = ⟨a, b⟩ / (‖a‖‖b‖) = 2 / (√2 · √5)
    om = math.acos(2 / math.sqrt(10))
    _close(nuslerp_tensor(a, b, 0.5), (math.sin(om / 2) / math.sin(om)) * (a + b))
    assert nuslerp_tensor(a, b, 0.5, flatten=True, row_wise=True).equal(nuslerp_tensor(a, b, 0.5))


def test_multislerp_is_the_weighted_direction_at_the_weighted_mean_norm() -> None:
    _close(multislerp_tensor([E1, E2], [1.0, 1.0]), R2 * (E1 + E2))
    # weights 1 : 3 → 1/4, 3/4; norms 1 and 3: direction ∝ e1/4 + 3 e2/4, norm 1/4 + 9/4
    d = (E1 + 3 * E2) / math.sqrt(10)
    _close(multislerp_tensor([E1, 3 * E2], [1.0, 3.0]), 2.5 * d)
    # unnormalised weights 2, 2: the same direction, norm 2·1 + 2·1
    _close(multislerp_tensor([E1, E2], [2.0, 2.0], normalize_weights=False), 4 * R2 * (E1 + E2))
    # three symmetric points about e3 average to e3 at their mean norm
    pts = [E3 + math.cos(2 * math.pi * k / 3) * E1 + math.sin(2 * math.pi * k / 3) * E2 for k in range(3)]
    _close(multislerp_tensor(pts, [1.0, 1.0, 1.0]), math.sqrt(2) * E3)


def test_multislerp_edge_cases() -> None:
    v = torch.tensor([1.0, 2.0])
    assert multislerp_tensor([v], [0.3]) is v  # one input: as it is
    _close(multislerp_tensor([E1, -E1], [1.0, 1.0]), torch.zeros(3))  # balanced antipodes: weighted sum
    _close(multislerp_tensor([E1, -3 * E1], [1.0, 1.0]), 0.5 * E1 - 1.5 * E1)
    with pytest.raises(sk.ShiftkitError, match="directions is zero"):  # more than two: no fallback
        multislerp_tensor([E1, -E1, E2, -2 * E2], [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(sk.ShiftkitError, match="nonzero weight sum"):
        multislerp_tensor([E1, E2], [1.0, -1.0])


def test_karcher_mean_of_symmetric_points_and_on_a_geodesic() -> None:
    _close(karcher_mean([E1, E2]), R2 * (E1 + E2))
    pts = [E3 + math.cos(2 * math.pi * k / 3) * E1 + math.sin(2 * math.pi * k / 3) * E2 for k in range(3)]
    norms = [1.0, 2.0, 3.0]
    _close(karcher_mean([n * p / p.norm() for n, p in zip(norms, pts)]), 2.0 * E3)
    # on one great circle the Karcher mean is at the weighted mean angle: 3/4 · π/2 for weights 1 : 3
    # (the extrinsic mean, multislerp's direction, is at atan(3) instead)
    want = math.cos(3 * math.pi / 8) * E1 + math.sin(3 * math.pi / 8) * E2
    _close(karcher_mean([E1, E2], [1.0, 3.0]), want)
    assert float((multislerp_tensor([E1, E2], [1.0, 3.0]) - want).norm()) > 0.05
    # a point at 120° on the circle: weights 1 : 1 give 60°
    far = torch.tensor([math.cos(2 * math.pi / 3), math.sin(2 * math.pi / 3), 0.0])
    _close(karcher_mean([E1, far]), torch.tensor([0.5, math.sqrt(3) / 2, 0.0]))


def test_karcher_edge_cases() -> None:
    v = torch.tensor([3.0, 4.0])
    assert karcher_mean([v]) is v
    # a zero input has no direction (the others' weights are renormalised) but counts in the norm
    _close(karcher_mean([torch.zeros(3), E1, E2]), (2 / 3) * R2 * (E1 + E2))
    _close(karcher_mean([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    _close(karcher_mean([E1, E2], max_iter=0), R2 * (E1 + E2))  # the start: the normalised Euclidean mean
    with pytest.raises(sk.ShiftkitError, match="max_iter"):
        karcher_mean([E1, E2], max_iter=-1)
    with pytest.raises(sk.ShiftkitError, match="tol"):
        karcher_mean([E1, E2], tol=-1.0)
    with pytest.raises(sk.ShiftkitError, match="weight sum"):
        karcher_mean([E1, E2], [1.0, -1.0])


def test_karcher_with_base_averages_the_weights() -> None:
    """θ0 = e1, τ0 = 0, τ1 = e2 − e1: the points are e1 and e2; the merged shift is their mean − θ0."""
    out = karcher([{"w": torch.zeros(3)}, {"w": E2 - E1}], [1.0, 1.0], base={"w": E1})
    _close(out["w"], R2 * (E1 + E2) - E1)
    with pytest.raises(sk.ShiftMismatchError, match="'w'"):
        karcher([{"w": E1}, {"w": E2}], [1.0, 1.0], base={"v": E1})


def test_each_method_through_sk_merge() -> None:
    a, b, c = (_shift({"w": x}) for x in (E1, E2, 3 * E3))
    _close(sk.merge([a, b], method="nuslerp").tensors["w"], R2 * (E1 + E2))
    want = math.sin(math.pi / 8) * E1 + math.sin(3 * math.pi / 8) * E2
    _close(sk.merge([a, b], method="nuslerp", weights=[1, 3]).tensors["w"], want)
    _close(sk.merge([a, b, c], method="multislerp").tensors["w"], (5 / 3) * (E1 + E2 + E3) / math.sqrt(3))
    pts = [x / x.norm() for x in (E1 + E3, E2 + E3, E3 - E1 - E2)]
    got = sk.merge([_shift({"w": p}) for p in pts], method="karcher", max_iter=50, tol=1e-9).tensors["w"]
    assert abs(float(got.norm()) - 1.0) < 1e-6
    # the Karcher mean: the Riemannian gradient Σ log_m(p) of Σ d(m, p)² / 2 vanishes there
    grad = torch.zeros(3, dtype=torch.float64)
    for p in pts:
        c = float(got.double() @ p.double())
        grad += math.acos(c) / math.sqrt(1 - c * c) * (p.double() - c * got.double())
    assert float(grad.norm()) < 1e-5
    with pytest.raises(sk.ShiftkitError, match="exactly 2"):
        sk.merge([a, b, c], method="nuslerp")


# --- mergekit's tensor functions as the oracle -------------------------------------------------------------
SHAPES = [(7,), (5, 9), (3, 4, 6), (64, 16)]


def _randn(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _mk(module: str) -> ModuleType:
    return importlib.import_module(f"mergekit.merge_methods.{module}")


def _group(mergekit: ModuleType, tensors: list[Tensor], base: Tensor | None = None) -> Any:
    base_mod = _mk("base")
    if base is None:
        return base_mod.TensorGroup.from_tensors(tensors)
    return base_mod.TensorGroup.from_tensors([base, *tensors], base_index=0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
def test_nuslerp_tensor_matches_mergekit(
    mergekit: ModuleType, shape: tuple[int, ...], flatten: bool, row_wise: bool
) -> None:
    mk_nuslerp = _mk("nuslerp").nuslerp
    for seed, (w0, w1) in enumerate([(1.0, 1.0), (0.3, 1.2), (2.0, 0.5)]):
        a, b = _randn(shape, seed), _randn(shape, 100 + seed)
        near = a + 0.05 * b  # nearly parallel to a (what weights without a base look like)
        t = w1 / (w0 + w1)
        for x, y in ((a, b), (a, near), (a, 2 * a), (torch.zeros(shape), b)):
            want = mk_nuslerp(t, x, y, dim=0 if row_wise else -1, flatten=flatten)
            _close(nuslerp_tensor(x, y, t, row_wise=row_wise, flatten=flatten), want)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(
    "params", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}]
)
def test_nuslerp_merge_matches_mergekits_method(
    mergekit: ModuleType, with_base: bool, params: dict[str, Any]
) -> None:
    method = _mk("nuslerp").nuslerp_merge_method
    base = _randn((6, 8), 1) if with_base else None
    thetas = [_randn((6, 8), 2), _randn((6, 8), 3)]
    ws = [0.7, 1.9]
    (want,) = method([_group(mergekit, thetas, base)], parameters={"weight": ws, **params})
    origin = torch.zeros(6, 8) if base is None else base
    got = sk.merge([_shift({"w": th - origin}) for th in thetas], method="nuslerp", weights=ws, **params)
    _close(got.tensors["w"] + origin, want)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp_matches_mergekit(
    mergekit: ModuleType, shape: tuple[int, ...], n: int, normalize_weights: bool
) -> None:
    method = _mk("multislerp").multislerp
    gen = torch.Generator().manual_seed(n)
    ws = (torch.rand(n, generator=gen) * 2 + 0.2).tolist()
    base = _randn(shape, 7)
    for origin in (None, base):
        # without a base the points are full weights, nearly parallel; with one, task vectors far apart
        thetas = [base + 0.3 * _randn(shape, 10 + i) for i in range(n)]
        params = {"weight": ws, "normalize_weights": normalize_weights}
        (want,) = method([_group(mergekit, thetas, origin)], parameters=params)
        zero = torch.zeros(shape) if origin is None else origin
        taus = [_shift({"w": th - zero}) for th in thetas]
        got = sk.merge(taus, method="multislerp", weights=ws, normalize_weights=normalize_weights)
        _close(got.tensors["w"] + zero, want)


def test_multislerp_fallback_matches_mergekit(mergekit: ModuleType) -> None:
    method = _mk("multislerp").multislerp
    a = _randn((4, 5), 0)
    (want,) = method([_group(mergekit, [a, -2 * a])], parameters={"weight": [2.0, 1.0]})  # directions cancel
    _close(multislerp_tensor([a, -2 * a], [2.0, 1.0]), want)
    (want,) = method(
        [_group(mergekit, [a, torch.zeros(4, 5), 2 * a])], parameters={"weight": [1.0, 3.0, 1.0]}
    )
    _close(multislerp_tensor([a, torch.zeros(4, 5), 2 * a], [1.0, 3.0, 1.0]), want)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_karcher_matches_mergekit(mergekit: ModuleType, shape: tuple[int, ...], n: int) -> None:
    mod = _mk("karcher")
    gen = torch.Generator().manual_seed(n)
    base = _randn(shape, 5)
    spread = [_randn(shape, 20 + i) for i in range(n)]  # far apart: several iterations
    near = [base + 0.05 * _randn(shape, 40 + i) for i in range(n)]  # weight-space-like: nearly parallel
    for xs in (spread, near, [torch.zeros(shape), *spread[1:]]):
        alphas = (torch.rand(n, generator=gen) + 0.1).tolist()
        total = sum(alphas)
        for max_iter, tol in ((10, 1e-5), (3, 1e-7), (40, 1e-6)):
            want = mod.karcher_merge_tensors(xs, [a / total for a in alphas], max_iter=max_iter, tol=tol)
            _close(karcher_mean(xs, alphas, max_iter=max_iter, tol=tol), want)
        (want,) = mod.karcher_merge_method([_group(mergekit, xs)], parameters={})
        _close(karcher_mean(xs), want)


def test_karcher_with_base_matches_mergekits_method(mergekit: ModuleType) -> None:
    """mergekit's karcher reads the base's tensor as one of the points (its input contract ignores bases)."""
    method = _mk("karcher").karcher_merge_method
    base = _randn((8, 5), 0)
    thetas = [base + 0.1 * _randn((8, 5), 1 + i) for i in range(3)]
    (want,) = method([_group(mergekit, thetas, base)], parameters={"max_iter": 20, "tol": 1e-6})
    taus = [torch.zeros_like(base), *(th - base for th in thetas)]
    got = sk.merge(
        [_shift({"w": t}) for t in taus], method="karcher", max_iter=20, tol=1e-6, base={"w": base}
    )
    _close(got.tensors["w"] + base, want)


# --- recipes: mergekit's run_merge against sk.merge_recipe -------------------------------------------------
@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llamas(tmp_path_factory.mktemp("spherical"), n_tuned=3)


def _model(paths: dict[str, Path], name: str, **params: Any) -> dict[str, Any]:
    return {"model": str(paths[name]), **({"parameters": params} if params else {})}


def _recipe(
    paths: dict[str, Path], method: str, models: list[Any], base: bool, **params: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32"}
    if base:
        out["base_model"] = str(paths["base"])
    if params:
        out["parameters"] = params
    return out


NU_FILTERS = {
    "nuslerp_flatten": [{"filter": "mlp", "value": False}, {"value": True}],
    "nuslerp_row_wise": [{"filter": "down_proj", "value": True}, {"value": False}],
}
# (id, method, models as (name, parameters), with base_model, top-level parameters)
RECIPES: list[tuple[str, str, list[tuple[str, dict[str, Any]]], bool, dict[str, Any]]] = [
    ("nuslerp-base", "nuslerp", [("ft0", {"weight": 1.0}), ("ft1", {"weight": 2.0})], True, {}),
    ("nuslerp-no-base", "nuslerp", [("ft0", {"weight": 0.4}), ("ft2", {"weight": 1.0})], False, {}),
    (
        "nuslerp-base-listed",
        "nuslerp",
        [("base", {"weight": 5.0}), ("ft0", {"weight": 1.0}), ("ft1", {"weight": 3.0})],
        True,
        {},
    ),
    ("nuslerp-rows", "nuslerp", [("ft0", {}), ("ft1", {})], True, {"weight": 1.0, "nuslerp_flatten": False}),
    (
        "nuslerp-columns-no-base",
        "nuslerp",
        [("ft1", {"weight": 1.0}), ("ft2", {"weight": 0.5})],
        False,
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    ),
    (
        "nuslerp-gradient-filters",
        "nuslerp",
        [("ft0", {"weight": [0.2, 1.0, 0.5]}), ("ft1", {"weight": 1.0})],
        True,
        NU_FILTERS,
    ),
    (
        "multislerp-base",
        "multislerp",
        [("ft0", {"weight": 1.0}), ("ft1", {"weight": 0.5}), ("ft2", {"weight": 2.0})],
        True,
        {},
    ),
    (
        "multislerp-no-base",
        "multislerp",
        [("ft0", {"weight": 1.0}), ("ft1", {"weight": 0.5}), ("ft2", {"weight": 2.0})],
        False,
        {},
    ),
    ("multislerp-one-model", "multislerp", [("ft1", {"weight": 0.3})], True, {}),
    (
        "multislerp-gradient-unnormalised",
        "multislerp",
        [("ft0", {"weight": [0.1, 0.8]}), ("ft2", {"weight": 0.6})],
        True,
        {"normalize_weights": False, "eps": [{"filter": "self_attn", "value": 1e-6}, {"value": 1e-8}]},
    ),
    ("karcher-no-base", "karcher", [("ft0", {}), ("ft1", {}), ("ft2", {})], False, {}),
    ("karcher-base-plus-one", "karcher", [("ft1", {})], True, {}),
    (
        "karcher-base-listed",
        "karcher",
        [("base", {}), ("ft0", {}), ("ft2", {})],
        True,
        {"max_iter": 30, "tol": 1e-7},
    ),
    (
        "karcher-weights-ignored",
        "karcher",
        [("ft0", {"weight": 3.0}), ("ft1", {"weight": 0.2})],
        False,
        {"max_iter": 2},
    ),
]


@pytest.mark.parametrize(
    ("method", "models", "base", "params"), [r[1:] for r in RECIPES], ids=[r[0] for r in RECIPES]
)
def test_recipe_matches_mergekit(
    mergekit: ModuleType,
    llamas: dict[str, Path],
    tmp_path: Path,
    method: str,
    models: list[tuple[str, dict[str, Any]]],
    base: bool,
    params: dict[str, Any],
) -> None:
    recipe = _recipe(llamas, method, [_model(llamas, n, **p) for n, p in models], base, **params)
    theirs = run_mergekit(mergekit, recipe, tmp_path / "mergekit")
    ours = run_shiftkit(recipe, tmp_path)
    assert_same_tensors(ours, theirs)
    ref = read_folder(llamas["base"])
    assert max(float((theirs[k] - ref[k]).abs().max()) for k in ref) > 1e-3  # moved off the base


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_missing_weight_is_an_error_in_both(
    mergekit: ModuleType, llamas: dict[str, Path], tmp_path: Path, method: str
) -> None:
    recipe = _recipe(llamas, method, [_model(llamas, "ft0", weight=1.0), _model(llamas, "ft1")], True)
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        run_mergekit(mergekit, recipe, tmp_path / "mergekit")
    with pytest.raises(sk.ShiftkitError, match="'weight'"):
        run_shiftkit(recipe, tmp_path)
