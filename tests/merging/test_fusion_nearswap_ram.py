"""``arcee_fusion``, ``nearswap`` and ``ram``: hand-computed values, mergekit 0.1.5's tensor functions as the
oracle, and recipes run through both tools (mergekit is a dev dependency, an oracle only).
"""

from __future__ import annotations

import importlib
import math
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor

import shiftkit as sk
from mk_llama import assert_same_tensors, make_llamas, read_folder, run_mergekit, run_shiftkit
from shiftkit.core.shift import DELTA, Shift
from shiftkit.merging.arcee_fusion import arcee_fusion, fusion_importance, fusion_mask, fusion_threshold
from shiftkit.merging.nearswap import nearswap, nearswap_tensor
from shiftkit.merging.ram import ram, ram_tensor

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

MK_REPO = Path("/work/.mirror/arcee-ai+mergekit/repo")
#: mergekit's own example (examples/arcee_fusion.yml at the mirrored commit), used when the mirror is absent
EXAMPLE_FALLBACK = """\
models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
"""


def _shift(tensors: dict[str, Tensor]) -> Shift:
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


def _group(mk_base: ModuleType, tensors: list[Tensor]) -> Any:
    """A mergekit TensorGroup with the first tensor as the base."""
    return mk_base.TensorGroup.from_tensors(tensors, base_index=0)


@pytest.fixture(scope="module")
def mk_methods(mergekit: ModuleType) -> dict[str, ModuleType]:
    names = ("arcee_fusion", "nearswap", "ram", "base")
    return {n: importlib.import_module(f"mergekit.merge_methods.{n}") for n in names}


# --- hand-computed values ---------------------------------------------------------------------------------
def test_nearswap_by_hand() -> None:
    a = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    b = torch.tensor([0.5, 2.0, 0.0, 1.0 + 4e-7, -4.0])
    # w = clamp(t / max(|a − b|, 1e-6), 0, 1): 1, 0.5, 1 (|Δ| floored at 1e-6), 1, 0.25
    want = torch.tensor([0.5, 1.0, 0.0, 1.0 + 4e-7, -1.0])
    torch.testing.assert_close(nearswap_tensor(a, b, 1.0), want, atol=0, rtol=0)
    # a negative t clamps the weight to 0: the base everywhere; t = inf takes b everywhere
    torch.testing.assert_close(nearswap_tensor(a, b, -1.0), a, atol=0, rtol=0)
    torch.testing.assert_close(nearswap_tensor(a, b, math.inf), b, atol=0, rtol=0)
    # as a merge of shifts: the first input is the base side
    got = sk.merge([_shift({"w": a}), _shift({"w": b})], method="nearswap", t=1.0)
    torch.testing.assert_close(got.tensors["w"], want, atol=0, rtol=0)


def test_nearswap_moves_no_entry_further_than_t() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    out = nearswap_tensor(a, b, 0.3)
    near = (a - b).abs() <= 0.3
    assert torch.equal(out[near], b[near])
    torch.testing.assert_close((out - a).abs()[~near], torch.full((int((~near).sum()),), 0.3))


def test_ram_by_hand() -> None:
    t1 = torch.tensor([1.0, 2.0, 0.0, 1e-6, 4.0])
    t2 = torch.tensor([3.0, 0.0, 0.0, -3e-6, -1.0])
    t3 = torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0])
    # contributors (|τ| > 1e-5): {1,2,3} → mean 3; {1} → 2; none → 0; none (tiny changes dropped) → 0;
    # {1,2} → 1.5
    torch.testing.assert_close(ram_tensor([t1, t2, t3]), torch.tensor([3.0, 2.0, 0.0, 0.0, 1.5]))
    # ε = 0 keeps every nonzero change: entry 3 is the mean of 1e-6 and −3e-6
    torch.testing.assert_close(ram_tensor([t1, t2, t3], 0.0), torch.tensor([3.0, 2.0, 0.0, -1e-6, 1.5]))
    shifts = [_shift({"w": t}) for t in (t1, t2, t3)]
    got = sk.merge(shifts, method="ram", epsilon=0.5)  # |τ| > 0.5: entry 4 is 4 and −1 → 1.5
    torch.testing.assert_close(got.tensors["w"], torch.tensor([3.0, 2.0, 0.0, 0.0, 1.5]))


def test_fusion_threshold_is_median_plus_one_and_a_half_iqr() -> None:
    # n = 9: Q(q) is the ⌊8q⌋-th smallest: 2, 4, 6 → 4 + 1.5·(6 − 2)
    assert float(fusion_threshold(torch.arange(9.0).flip(0))) == 10.0
    # n = 6: indices ⌊1.25⌋ = 1, ⌊2.5⌋ = 2, ⌊3.75⌋ = 3 (no interpolation)
    assert float(fusion_threshold(torch.tensor([[5.0, 0.0, 1.0], [3.0, 2.0, 4.0]]))) == 2.0 + 1.5 * 2.0


def test_fusion_importance_by_hand() -> None:
    a = torch.zeros(2, 2)
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    e = math.e
    p = [e / (1 + e) + 1e-8, 1 / (1 + e) + 1e-8]
    q = 0.5 + 1e-8
    kl = sum(x * math.log(x / q) for x in p)  # row 0 ≈ 0.0662; row 1: p = q, no divergence
    want = torch.tensor([[kl, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(fusion_importance(a, b), want, atol=1e-7, rtol=1e-5)


def test_arcee_fusion_takes_the_outlying_changes_only() -> None:
    # one row: the divergence is one positive factor, so the mask is |Δ| ≥ Q50 + 1.5·IQR of |Δ|
    delta = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 5.0])  # 0.4 + 1.5·(0.6 − 0.2) = 1.0
    zero = torch.zeros(9)
    want = torch.where(delta >= 1.0, delta, zero)
    got = sk.merge([_shift({"w": zero}), _shift({"w": delta})], method="arcee_fusion")
    torch.testing.assert_close(got.tensors["w"], want, atol=0, rtol=0)
    # with base= the importance sees θ0 + τ; the merged shift is still τ_b where kept and τ_a elsewhere
    theta0 = {"w": torch.linspace(-1.0, 1.0, 9)}
    tau_a = torch.full((9,), 0.01)
    got = sk.merge([_shift({"w": tau_a}), _shift({"w": tau_a + delta})], method="arcee_fusion", base=theta0)
    torch.testing.assert_close(got.tensors["w"], torch.where(delta >= 1.0, tau_a + delta, tau_a))


def test_arcee_fusion_scalar_and_empty_tensors() -> None:
    out = arcee_fusion(
        [{"s": torch.tensor(0.5), "e": torch.zeros(0)}, {"s": torch.tensor(1.5), "e": torch.zeros(0)}],
        [1.0, 1.0],
    )
    assert out["s"].shape == () and float(out["s"]) == 1.5 and out["e"].shape == (0,)


def test_errors_name_what_is_wrong() -> None:
    two = [{"w": torch.zeros(3)}, {"w": torch.ones(3)}]
    with pytest.raises(sk.ShiftkitError, match="needs t="):
        nearswap(two, [1.0, 1.0])
    with pytest.raises(sk.ShiftkitError, match="t must be a number"):
        nearswap(two, [1.0, 1.0], t=float("nan"))
    with pytest.raises(sk.ShiftkitError, match="exactly 2"):
        nearswap([*two, two[0]], [1.0] * 3, t=0.1)
    with pytest.raises(sk.ShiftkitError, match="no weights"):
        nearswap(two, [1.0, 2.0], t=0.1)
    with pytest.raises(sk.ShiftkitError, match="epsilon must be a number"):
        ram(two, [1.0, 1.0], epsilon=float("nan"))
    with pytest.raises(sk.ShiftkitError, match="no weights"):
        ram(two, [1.0, 0.5])
    with pytest.raises(sk.ShiftMismatchError, match="'w'"):
        arcee_fusion(two, [1.0, 1.0], base={"w": torch.zeros(4)})
    with pytest.raises(sk.ShiftkitError, match="exactly 2"):
        sk.merge([_shift(two[0])], method="arcee_fusion")


def test_specs_read_as_in_mergekit() -> None:
    for name in ("arcee_fusion", "nearswap"):
        spec = sk.get_merge_method(name)
        assert spec.base_is_input and spec.needs_base and (spec.min_inputs, spec.max_inputs) == (2, 2)
        assert spec.weighting == "none"
    assert sk.get_merge_method("nearswap").recipe_required == ("t",)
    assert sk.get_merge_method("arcee_fusion").takes_base
    r = sk.get_merge_method("ram")
    assert not r.base_is_input and r.needs_base and r.weighting == "none"
    assert r.recipe_default("epsilon") == 1e-5


# --- mergekit's tensor functions as the oracle -----------------------------------------------------------
def _pair(seed: int, shape: tuple[int, ...], scale: float = 0.01) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g) * 0.02
    return a, a + torch.randn(shape, generator=g) * scale


@pytest.mark.parametrize("shape", [(64, 48), (300,), (3, 5, 7)])
@pytest.mark.parametrize("t", [1e-4, 3e-3, 0.05])
def test_nearswap_matches_mergekit(
    mk_methods: dict[str, ModuleType], shape: tuple[int, ...], t: float
) -> None:
    a, b = _pair(1, shape)
    b[..., 0] = a[..., 0]  # equal entries: |a − b| = 0
    theirs = mk_methods["nearswap"].nearswap_merge([_group(mk_methods["base"], [a, b])], parameters={"t": t})[
        0
    ]
    ours = sk.merge([_shift({"w": torch.zeros_like(a)}), _shift({"w": b - a})], method="nearswap", t=t)
    torch.testing.assert_close(a + ours.tensors["w"], theirs, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(nearswap_tensor(a, b, t), theirs, atol=0, rtol=0)  # weights directly: bitwise


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("epsilon", [1e-5, 0.0, 0.004])
def test_ram_matches_mergekit(mk_methods: dict[str, ModuleType], n: int, epsilon: float) -> None:
    g = torch.Generator().manual_seed(n)
    base = torch.randn(40, 30, generator=g) * 0.02
    taus = [
        torch.randn(40, 30, generator=g) * 0.01 * (torch.rand(40, 30, generator=g) < 0.5) for _ in range(n)
    ]
    group = _group(mk_methods["base"], [base, *(base + t for t in taus)])
    theirs = mk_methods["ram"].ram_merge([group], parameters={"epsilon": epsilon})[0]
    # mergekit forms τ = θ_i − θ0 from the weights: give ours the same shifts
    shifts = [_shift({"w": (base + t) - base}) for t in taus]
    ours = sk.merge(shifts, method="ram", epsilon=epsilon).tensors["w"]
    torch.testing.assert_close(base + ours, theirs, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("shape", [(64, 48), (500,), (4, 6, 32), (1, 1)])
def test_arcee_fusion_matches_mergekit(mk_methods: dict[str, ModuleType], shape: tuple[int, ...]) -> None:
    """Up to 10⁶ entries mergekit's quantiles are exact: the same mask, the same values."""
    a, b = _pair(2, shape)
    theirs = mk_methods["arcee_fusion"].arcee_fusion_merge_method([_group(mk_methods["base"], [a, b])])[0]
    imp = mk_methods["arcee_fusion"]._compute_importance(b, a)
    torch.testing.assert_close(fusion_importance(a, b), imp, atol=0, rtol=0)
    want_mask, _ = mk_methods["arcee_fusion"].DynamicThresholdFusion().compute_fusion_mask(imp)
    assert torch.equal(fusion_mask(a, b), want_mask.bool())
    tau = b - a
    ours = sk.merge(
        [_shift({"w": torch.zeros_like(a)}), _shift({"w": tau})], method="arcee_fusion", base={"w": a}
    )
    torch.testing.assert_close(a + ours.tensors["w"], theirs, atol=1e-7, rtol=1e-6)
    assert 0 < int(want_mask.sum()) < want_mask.numel() or want_mask.numel() == 1


def test_arcee_fusion_large_tensor_quantiles(mk_methods: dict[str, ModuleType]) -> None:
    """Over 10⁶ entries mergekit estimates the quantiles from 10⁶ entries drawn with replacement (torch's
    global generator); shiftkit takes them exactly over all entries. On mergekit's own sample the rule is the
    same bit for bit, and over all entries the two masks differ only near the threshold, on a tiny share."""
    fusion = mk_methods["arcee_fusion"].DynamicThresholdFusion()
    a, b = _pair(3, (1200, 1000))
    scores = fusion_importance(a, b)
    flat = scores.reshape(-1)
    ours_thr = float(fusion_threshold(scores))
    ours_mask = scores >= ours_thr
    for seed in range(3):
        torch.manual_seed(seed)
        theirs_thr = fusion.calculate_dynamic_threshold(scores)
        torch.manual_seed(seed)  # the same draw: mergekit's sample, our quantile rule
        sample = flat[torch.randint(flat.numel(), (1_000_000,))]
        assert float(fusion_threshold(sample)) == float(theirs_thr)
        theirs_mask = scores >= theirs_thr
        assert abs(float(theirs_thr) / ours_thr - 1) < 0.01
        assert float((theirs_mask != ours_mask).float().mean()) < 1e-3
        lo, hi = sorted((ours_thr, float(theirs_thr)))
        differ = flat[(theirs_mask != ours_mask).reshape(-1)]
        assert bool(((differ >= lo) & (differ <= hi)).all())  # only entries between the two thresholds


# --- sk.merge end to end ----------------------------------------------------------------------------------
def test_sk_merge_applies_each_method() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    tvs = [_shift({k: torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}) for _ in range(2)]
    zero = _shift({k: torch.zeros_like(v) for k, v in base.items()})
    for method, inputs, params in (
        ("nearswap", [zero, tvs[0]], {"t": 0.004}),
        ("arcee_fusion", [zero, tvs[0]], {"base": base}),
        ("ram", tvs, {}),
    ):
        merged = sk.merge(inputs, method=method, **params)
        for k, v in base.items():
            tau = merged.tensors[k]
            assert tau.shape == v.shape and bool(torch.isfinite(tau).all()), (method, k)
        assert float(merged.tensors["weight"].abs().max()) > 0, method
        target = torch.nn.Linear(6, 4)
        target.load_state_dict(base)
        sk.apply_(target, merged)
        torch.testing.assert_close(target.weight.detach(), base["weight"] + merged.tensors["weight"])


# --- recipes: mergekit's run_merge against sk.merge_recipe ------------------------------------------------
@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llamas(tmp_path_factory.mktemp("fusion_llamas"))


def _recipe(llamas: dict[str, Path], method: str, models: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas[m])} for m in models],
        "dtype": "float32",
        **extra,
    }


RECIPES: list[tuple[str, str, list[str], dict[str, Any]]] = [
    ("nearswap-base-plus-one", "nearswap", ["ft0"], {"parameters": {"t": 0.005}}),
    ("nearswap-base-listed-second", "nearswap", ["ft1", "base"], {"parameters": {"t": 0.002}}),
    (
        "nearswap-gradient-and-filters",
        "nearswap",
        ["ft0"],
        {
            "parameters": {
                "t": [
                    {"filter": "mlp", "value": [0.0001, 0.001, 0.02]},
                    {"filter": "self_attn", "value": 0.003},
                    {"value": [0.0001, 0.001]},
                ]
            }
        },
    ),
    ("arcee_fusion-base-listed", "arcee_fusion", ["base", "ft1"], {}),
    ("arcee_fusion-base-plus-one", "arcee_fusion", ["ft2"], {}),
    ("ram-minimal", "ram", ["ft0", "ft1", "ft2"], {}),
    ("ram-one-model", "ram", ["ft2"], {}),
    ("ram-epsilon-gradient", "ram", ["ft0", "ft1", "ft2"], {"parameters": {"epsilon": [0.0, 0.012]}}),
]


@pytest.mark.parametrize(("method", "models", "extra"), [r[1:] for r in RECIPES], ids=[r[0] for r in RECIPES])
def test_recipe_matches_mergekit(
    mergekit: ModuleType,
    llamas: dict[str, Path],
    method: str,
    models: list[str],
    extra: dict[str, Any],
    tmp_path: Path,
) -> None:
    recipe = _recipe(llamas, method, models, **extra)
    theirs = run_mergekit(mergekit, recipe, tmp_path / "mergekit")
    ours = run_shiftkit(recipe, tmp_path)
    assert_same_tensors(ours, theirs)
    base = read_folder(llamas["base"])
    moved = max(float((t - base[k]).abs().max()) for k, t in theirs.items())
    assert moved > 1e-3, "the merge left the base unchanged: the comparison would prove nothing"


def test_missing_t_is_an_error_in_both(mergekit: ModuleType, llamas: dict[str, Path], tmp_path: Path) -> None:
    recipe = _recipe(llamas, "nearswap", ["ft0"])
    with pytest.raises(RuntimeError, match="Missing required parameter t"):
        run_mergekit(mergekit, recipe, tmp_path / "mergekit")
    with pytest.raises(sk.ShiftkitError, match="'t'"):
        run_shiftkit(recipe, tmp_path)


def _example() -> dict[str, Any]:
    """mergekit's examples/arcee_fusion.yml (from the mirrored repository when present)."""
    text = EXAMPLE_FALLBACK
    if MK_REPO.exists():
        text = subprocess.run(
            ["git", f"--git-dir={MK_REPO}", "show", "HEAD:examples/arcee_fusion.yml"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    data: dict[str, Any] = yaml.safe_load(text)
    assert data["merge_method"] == "arcee_fusion" and data["base_model"] == data["models"][0]["model"]
    return data


def test_example_recipe_in_float32_matches_mergekit(
    mergekit: ModuleType, llamas: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _example()
    recipe.update(base_model=str(llamas["base"]), dtype="float32")
    recipe["models"] = [{"model": str(llamas["base"])}, {"model": str(llamas["ft0"])}]
    assert_same_tensors(run_shiftkit(recipe, tmp_path), run_mergekit(mergekit, recipe, tmp_path / "mergekit"))


@pytest.mark.parametrize("compute", [None, "bfloat16"])
def test_example_recipe_as_written_bfloat16(
    mergekit: ModuleType,
    mk_methods: dict[str, ModuleType],
    llamas: dict[str, Path],
    tmp_path: Path,
    compute: str | None,
) -> None:
    """``dtype: bfloat16`` means different arithmetic in the two tools, so each is held against mergekit's
    tensor function at its own precision. mergekit rounds the inputs to bfloat16, computes the importance
    in bfloat16 (where a row's divergence, ~5e-5 here, is mostly rounding noise) and writes float32 (its
    mask is a float32 tensor). shiftkit computes in float32 on the stored weights (``shiftkit: {compute_dtype:
    bfloat16}``: on the weights rounded to bfloat16, as mergekit loads them) and writes the recipe's dtype."""
    recipe = _example()
    recipe.update(base_model=str(llamas["base"]))
    recipe["models"] = [{"model": str(llamas["base"])}, {"model": str(llamas["ft0"])}]
    theirs = run_mergekit(mergekit, recipe, tmp_path / "mergekit")
    if compute is not None:
        recipe["shiftkit"] = {"compute_dtype": compute}
    ours = run_shiftkit(recipe, tmp_path)
    base, tuned = read_folder(llamas["base"]), read_folder(llamas["ft0"])
    fuse = mk_methods["arcee_fusion"].arcee_fusion_merge_method
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        a, b = base[k].to(torch.bfloat16), tuned[k].to(torch.bfloat16)
        in_bf16 = fuse([_group(mk_methods["base"], [a, b])])[0]
        assert theirs[k].dtype == torch.float32
        torch.testing.assert_close(theirs[k], in_bf16, atol=0, rtol=0, msg=k)
        if compute is None:
            a, b = base[k], tuned[k]
        in_fp32 = fuse([_group(mk_methods["base"], [a.float(), b.float()])])[0]
        assert ours[k].dtype == torch.bfloat16
        torch.testing.assert_close(ours[k], in_fp32.to(torch.bfloat16), atol=0, rtol=0, msg=k)
