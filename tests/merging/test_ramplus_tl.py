"""``ramplus_tl`` (RAM+, tensor-local): hand-computed values, mergekit 0.1.5's ``ramplus_tl_merge`` as the
oracle on random tensors, and recipes run through both tools (mergekit is a dev dependency, an oracle only).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor

import shiftkit as sk
from mk_llama import assert_same_tensors, make_llamas, read_folder, run_mergekit, run_shiftkit
from shiftkit.core.shift import DELTA, Shift
from shiftkit.merging.ram import ram_tensor
from shiftkit.merging.ramplus_tl import ramplus_tl, ramplus_tl_scales, ramplus_tl_tensor

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


def _shift(tensors: dict[str, Tensor]) -> Shift:
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


@pytest.fixture(scope="module")
def mk_methods(mergekit: ModuleType) -> dict[str, ModuleType]:
    return {n: importlib.import_module(f"mergekit.merge_methods.{n}") for n in ("ram", "base")}


def _mergekit(mk: dict[str, ModuleType], base: Tensor, taus: list[Tensor], **params: float) -> Tensor:
    """mergekit's ``ramplus_tl_merge`` on θ0 and θ_i = θ0 + τ_i."""
    group = mk["base"].TensorGroup.from_tensors([base, *(base + t for t in taus)], base_index=0)
    out: Tensor = mk["ram"].ramplus_tl_merge([group], parameters=params)[0]
    return out


# --- hand-computed values ---------------------------------------------------------------------------------
T1 = torch.tensor([1.0, 2.0, 0.0, 3.0, 0.0, 1e-6])
T2 = torch.tensor([0.0, 4.0, 0.0, 0.0, 6.0, 0.0])
T3 = torch.tensor([0.0, 6.0, 0.0, 0.0, 0.0, 0.0])


def test_by_hand() -> None:
    taus = [T1, T2, T3]
    # ε = 1e-5: contributors per entry {1}, {1,2,3}, {}, {1}, {2}, {} (1e-6 is no change).
    # τ1: U = 2 (entries 0, 3), S = 1 → ρ = 0.5; τ2: U = 1 (entry 4), S = 1 → ρ = 1; τ3: U = 0 (no λ)
    # r = 0.4, α = 0.8: λ1 = 1 + 0.4·0.5 = 1.2, λ2 = 1 + 0.4·min(1, 0.8) = 1.32; entry 1 is the mean 4
    assert ramplus_tl_scales(taus, r=0.4, alpha=0.8) == pytest.approx([1.2, 1.32, 1.0])
    want = torch.tensor([1.2, 4.0, 0.0, 3.6, 7.92, 0.0])
    torch.testing.assert_close(ramplus_tl_tensor(taus, r=0.4, alpha=0.8), want)
    # mergekit's defaults r = 0.1, α = 0.2: both ratios are capped at 0.2 → λ = 1.02
    torch.testing.assert_close(ramplus_tl_tensor(taus), torch.tensor([1.02, 4.0, 0.0, 3.06, 6.12, 0.0]))
    # α < 0: torch.clamp(ρ, 0, α) is α, so λ = 1 + 0.5·(−1) = 0.5 for every shift with lone changes
    torch.testing.assert_close(
        ramplus_tl_tensor(taus, r=0.5, alpha=-1.0), torch.tensor([0.5, 4.0, 0.0, 1.5, 3.0, 0.0])
    )


def test_by_hand_epsilon() -> None:
    taus = [T1, T2, T3]
    # ε = 0: entry 5 (1e-6) is τ1's third lone change: ρ1 = 1/3, λ1 = 1 + 0.3·1/3 = 1.1; λ2 = 1 + 0.3·1 = 1.3
    want = torch.tensor([1.1, 4.0, 0.0, 3.3, 7.8, 1.1e-6])
    torch.testing.assert_close(ramplus_tl_tensor(taus, r=0.3, alpha=1.0, epsilon=0.0), want)
    # ε = 2.5: contributors {}, {2,3}, {}, {1}, {2}, {}; τ1: U = 1, S = 0 → λ1 = 1;
    # τ2: U = 1, S = 1, ρ2 = 1 / max(1, 2.5) = 0.4 → λ2 = 1.4; entry 1 is the mean of 4 and 6
    assert ramplus_tl_scales(taus, r=1.0, alpha=1.0, epsilon=2.5) == pytest.approx([1.0, 1.4, 1.0])
    want = torch.tensor([0.0, 5.0, 0.0, 3.0, 8.4, 0.0])
    torch.testing.assert_close(ramplus_tl_tensor(taus, r=1.0, alpha=1.0, epsilon=2.5), want)
    got = sk.merge([_shift({"w": t}) for t in taus], method="ramplus_tl", r=1.0, alpha=1.0, epsilon=2.5)
    torch.testing.assert_close(got.tensors["w"], want)


def test_no_reinforcement_is_ram_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(50, 20, generator=g) * (torch.rand(50, 20, generator=g) < 0.4) for _ in range(3)]
    for params in ({"r": 0.0, "alpha": 5.0}, {"r": 3.0, "alpha": 0.0}):
        assert torch.equal(ramplus_tl_tensor(taus, **params), ram_tensor(taus))
    # one shift alone: every change is a lone one, nothing is shared, ρ = 0: the shift itself
    assert torch.equal(ramplus_tl_tensor(taus[:1], r=5.0, alpha=5.0), taus[0] * (taus[0].abs() > 1e-5))


def test_scalar_and_empty_tensors() -> None:
    a = {"s": torch.tensor(0.5), "e": torch.zeros(0)}
    b = {"s": torch.tensor(0.0), "e": torch.zeros(0)}
    out = ramplus_tl([a, b], [1.0, 1.0], r=1.0, alpha=1.0)
    assert out["s"].shape == () and float(out["s"]) == 0.5 and out["e"].shape == (0,)


def test_errors_name_what_is_wrong() -> None:
    two = [{"w": torch.zeros(3)}, {"w": torch.ones(3)}]
    with pytest.raises(sk.ShiftkitError, match="no weights"):
        ramplus_tl(two, [1.0, 2.0])
    with pytest.raises(sk.ShiftkitError, match="1 or more"):
        ramplus_tl([], [])
    for name, bad in (("r", float("nan")), ("alpha", "0.2"), ("epsilon", True), ("r", float("inf"))):
        with pytest.raises(sk.ShiftkitError, match=f"ramplus_tl {name} must be"):
            ramplus_tl(two, [1.0, 1.0], **{name: bad})
    with pytest.raises(sk.ShiftkitError):
        sk.merge([_shift(t) for t in two], method="ramplus_tl", weights=[1.0, 0.5])


def test_spec_reads_as_in_mergekit() -> None:
    spec = sk.get_merge_method("ramplus_tl")
    assert not spec.base_is_input and spec.needs_base and spec.weighting == "none"
    assert spec.per_input == () and spec.recipe_required == ()
    assert {p: spec.recipe_default(p) for p in ("r", "alpha", "epsilon")} == {
        "r": 0.1,
        "alpha": 0.2,
        "epsilon": 1e-5,
    }


# --- mergekit's tensor function as the oracle ------------------------------------------------------------
PARAMS = [
    {},  # mergekit's defaults
    {"r": 0.5, "alpha": 3.0, "epsilon": 0.004},
    {"r": 2.0, "alpha": 10.0, "epsilon": 0.0},
    {"r": 0.3, "alpha": -0.5, "epsilon": 0.002},
    {"r": -0.4, "alpha": 0.7, "epsilon": 0.01},
]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("params", PARAMS, ids=[str(i) for i in range(len(PARAMS))])
def test_matches_mergekit(mk_methods: dict[str, ModuleType], n: int, params: dict[str, float]) -> None:
    g = torch.Generator().manual_seed(n)
    differs = False
    for shape in [(40, 30), (300,), (3, 5, 7), (2, 1)]:
        base = torch.randn(shape, generator=g) * 0.02
        keep = torch.rand((n, *shape), generator=g) < (0.5 if base.numel() > 10 else 1.0)
        taus = [torch.randn(shape, generator=g) * 0.01 * keep[i] for i in range(n)]
        theirs = _mergekit(mk_methods, base, taus, **params)
        # mergekit forms τ = θ_i − θ0 from the weights: give ours the same shifts
        shifts = [_shift({"w": (base + t) - base}) for t in taus]
        ours = sk.merge(shifts, method="ramplus_tl", **params).tensors["w"]
        torch.testing.assert_close(
            base + ours, theirs, atol=1e-7, rtol=1e-6, msg=lambda m, s=shape: f"{s}: {m}"
        )
        differs |= not torch.equal(
            ours, ram_tensor([s.tensors["w"] for s in shifts], params.get("epsilon", 1e-5))
        )
    assert differs or n == 1, "no entry was reinforced: the comparison would not tell RAM+ from RAM"


def test_unchanged_tensor_at_epsilon_zero_is_finite(mk_methods: dict[str, ModuleType]) -> None:
    """The one deviation: at ε = 0 a shift that leaves the tensor unchanged has ρ = 0/0 in mergekit, which
    turns its whole merge into NaN; here it has no lone changes to rescale and the rest merges as usual."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, generator=g) * 0.02
    tau = torch.randn(8, 6, generator=g) * 0.01 * (torch.rand(8, 6, generator=g) < 0.5)
    zero = torch.zeros(8, 6)
    theirs = _mergekit(mk_methods, base, [tau, zero], epsilon=0.0)
    assert bool(theirs.isnan().all())
    ours = ramplus_tl_tensor([tau, zero], epsilon=0.0)
    torch.testing.assert_close(ours, tau)  # all of τ's changes are lone ones, ρ = 0, λ = 1
    # at mergekit's default ε the same inputs agree
    theirs = _mergekit(mk_methods, base, [tau, zero])
    torch.testing.assert_close(base + ramplus_tl_tensor([(base + tau) - base, zero]), theirs)


# --- sk.merge end to end ----------------------------------------------------------------------------------
def test_sk_merge_applies() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    tvs = [
        _shift(
            {
                k: torch.randn(v.shape, generator=g) * 0.01 * (torch.rand(v.shape, generator=g) < 0.5)
                for k, v in base.items()
            }
        )
        for _ in range(3)
    ]
    merged = sk.merge(tvs, method="ramplus_tl", r=0.5, alpha=2.0)
    for k, v in base.items():
        want = ramplus_tl_tensor([t.tensors[k] for t in tvs], r=0.5, alpha=2.0)
        assert torch.equal(merged.tensors[k], want), k
        assert merged.tensors[k].shape == v.shape
    target = torch.nn.Linear(6, 4)
    target.load_state_dict(base)
    sk.apply_(target, merged)
    torch.testing.assert_close(target.weight.detach(), base["weight"] + merged.tensors["weight"])


# --- recipes: mergekit's run_merge against sk.merge_recipe ------------------------------------------------
@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llamas(tmp_path_factory.mktemp("ramplus_llamas"))


RECIPES: list[tuple[str, list[str], dict[str, Any]]] = [
    ("defaults", ["ft0", "ft1", "ft2"], {}),
    ("one-model", ["ft2"], {"r": 0.5, "alpha": 2.0}),
    ("sparse-contributions", ["ft0", "ft1", "ft2"], {"r": 0.5, "alpha": 3.0, "epsilon": 0.008}),
    (
        "gradient-and-filters",
        ["ft0", "ft1", "ft2"],
        {
            "epsilon": 0.006,
            "r": [0.0, 0.4, 1.5],
            "alpha": [
                {"filter": "mlp", "value": [0.1, 4.0]},
                {"filter": "self_attn", "value": 0.5},
                {"value": 2.0},
            ],
        },
    ),
]


@pytest.mark.parametrize(("models", "params"), [r[1:] for r in RECIPES], ids=[r[0] for r in RECIPES])
def test_recipe_matches_mergekit(
    mergekit: ModuleType, llamas: dict[str, Path], models: list[str], params: dict[str, Any], tmp_path: Path
) -> None:
    recipe: dict[str, Any] = {
        "merge_method": "ramplus_tl",
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas[m])} for m in models],
        "dtype": "float32",
    }
    if params:
        recipe["parameters"] = params
    theirs = run_mergekit(mergekit, recipe, tmp_path / "mergekit")
    ours = run_shiftkit(recipe, tmp_path)
    assert_same_tensors(ours, theirs)
    base = read_folder(llamas["base"])
    moved = max(float((t - base[k]).abs().max()) for k, t in theirs.items())
    assert moved > 1e-3, "the merge left the base unchanged: the comparison would prove nothing"
