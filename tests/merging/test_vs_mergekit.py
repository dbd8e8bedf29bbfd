"""sk.merge against mergekit 0.1.5 (LGPL, a dev dependency used here as an external oracle only).

A tiny random Llama is saved as Hugging Face folders: a base and three fine-tunes (base + noise with dense,
opposite-sign and sparse structure). mergekit merges the folders in-process (``run_merge`` on CPU); shiftkit
merges the task vectors of the same files with ``sk.merge`` and adds the result to the base. The seeded data
has no magnitude tie at any TIES threshold (asserted: mergekit's argsort and shiftkit's stable sort could
keep different tied entries), so both must agree to 1e-6 in float32.

DARE: mergekit draws its keep-masks with ``torch.bernoulli`` from the global RNG. The tests hand mergekit
shiftkit's own masks (``dare_keep_mask(shape, density, key_seed(seed, key, i))``) in the order it asks for
them, so the drop, the L1 rescale and the merge are compared exactly. ``semantics="paper"`` TIES has no
mergekit counterpart (the hand-computed tests in test_merge_methods.py cover it); ``semantics="peft"`` is
checked against the real peft package in test_vs_peft_merge_utils.py.

mergekit's trim keeps at least one entry of every tensor (k = max(1, ⌊density·n⌋)); so does
``semantics="mergekit"`` (a tensor smaller than 1/density is tested on its own). Every recipe also goes
through the streaming ``merge_recipe`` and must give the same tensors.

mergekit is imported inside a fixture (its import takes seconds): if it is not installed the tests error,
they never skip — it is pinned in the ``dev`` extra.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from shiftkit.merging.sparsify import dare_keep_mask, key_seed

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
WEIGHTS = [1.0, 0.5, 2.0]  # ≠ 1, so weighting and weight normalisation are exercised
ATOL = 1e-6

# mergekit 0.1.5 imports numpy.core (deprecated in numpy 2) when it loads
pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")


def _load_folder(path: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _shift(tensors: dict[str, Tensor]) -> Shift:
    return Shift(DELTA, None, tensors, {k: tuple(v.shape) for k, v in tensors.items()})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Base + 3 fine-tunes saved as HF folders; their state dicts and task vectors read back from disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mk_models")
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shifts: list[dict[str, Tensor]] = [{}, {}, {}]
    for k, v in base.items():
        dense = torch.randn(v.shape, generator=g) * 0.01
        flip = torch.rand(v.shape, generator=g) < 0.5
        # 2nd: opposite sign to the 1st on half the coordinates (sign conflicts for TIES), plus noise
        opposite = torch.where(flip, -0.8 * dense, 0.5 * dense) + torch.randn(v.shape, generator=g) * 0.004
        # 3rd: sparse (70 % exact zeros; zeros never vote and never count)
        sparse = torch.randn(v.shape, generator=g) * 0.02 * (torch.rand(v.shape, generator=g) < 0.3)
        for i, s in enumerate((dense, opposite, sparse)):
            shifts[i][k] = s
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"])
    for i, s in enumerate(shifts):
        paths[f"ft{i}"] = root / f"ft{i}"
        model.save_pretrained(paths[f"ft{i}"], state_dict={k: base[k] + s[k] for k in base})
    states = {name: _load_folder(p) for name, p in paths.items()}
    tvs = [sk.task_vector(states["base"], states[f"ft{i}"]) for i in range(3)]
    return {"root": root, "paths": paths, "states": states, "tvs": tvs}


def _recipe(
    models: dict[str, Any],
    method: str,
    per_model: list[dict[str, Any]],
    parameters: dict[str, Any],
    *,
    base: bool = True,
) -> dict[str, Any]:
    entries = [
        {"model": str(models["paths"][f"ft{i}"]), "parameters": p}
        for i, p in enumerate(per_model)
        if p is not None
    ]
    recipe: dict[str, Any] = {"merge_method": method, "models": entries, "dtype": "float32"}
    if base:
        recipe["base_model"] = str(models["paths"]["base"])
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def _run_mergekit(mk: ModuleType, recipe: dict[str, Any], out: Path) -> dict[str, Tensor]:
    config = mk.config.MergeConfiguration.model_validate(recipe)
    options = mk.options.MergeOptions(
        cuda=False, lazy_unpickle=False, quiet=True, copy_tokenizer=False, write_model_card=False
    )
    mk.merge.run_merge(config, str(out), options)
    return _load_folder(out)


def _check(models: dict[str, Any], merged: Shift, got: dict[str, Tensor], what: str) -> None:
    base = models["states"]["base"]
    assert set(got) == set(base), f"{what}: keys differ {sorted(set(got) ^ set(base))[:4]}"
    moved = 0.0
    for k, b in base.items():
        expected = b + merged.tensors[k]
        torch.testing.assert_close(got[k], expected, atol=ATOL, rtol=0, msg=lambda m, k=k: f"{what} {k}: {m}")
        moved = max(moved, float((got[k] - b).abs().max()))
    assert moved > 1e-3, f"{what}: the merge left the base unchanged"


def _compare(
    mk: ModuleType, models: dict[str, Any], recipe: dict[str, Any], merged: Shift, tmp_path: Path
) -> None:
    _check(models, merged, _run_mergekit(mk, recipe, tmp_path / "mergekit"), "mergekit")
    from shiftkit.merging.stream.runner import merge_recipe

    path = tmp_path / "recipe.yml"  # shiftkit's own streaming merge of the same recipe file
    path.write_text(yaml.safe_dump(recipe))
    merge_recipe(path, tmp_path / "shiftkit", progress=False)
    _check(models, merged, _load_folder(tmp_path / "shiftkit"), "shiftkit streaming")


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(mergekit: ModuleType, models: dict[str, Any], tmp_path: Path, normalize: bool) -> None:
    merged = sk.merge(models["tvs"], method="linear", weights=WEIGHTS, normalize=normalize)
    recipe = _recipe(models, "linear", [{"weight": w} for w in WEIGHTS], {"normalize": normalize}, base=False)
    if not normalize:
        # mergekit's unnormalised linear is Σ w_t θ_t; θ0 + Σ w_t τ_t adds the base with weight 1 − Σ w_t
        recipe["models"].append(
            {"model": str(models["paths"]["base"]), "parameters": {"weight": 1 - sum(WEIGHTS)}}
        )
    _compare(mergekit, models, recipe, merged, tmp_path)


@pytest.mark.parametrize(("lam", "normalize"), [(1.0, False), (0.7, False), (0.7, True)])
def test_task_arithmetic(
    mergekit: ModuleType, models: dict[str, Any], tmp_path: Path, lam: float, normalize: bool
) -> None:
    merged = sk.merge(
        models["tvs"], method="task_arithmetic", weights=WEIGHTS, lambda_=lam, normalize=normalize
    )
    params = {"lambda": lam, "normalize": normalize}
    recipe = _recipe(models, "task_arithmetic", [{"weight": w} for w in WEIGHTS], params)
    _compare(mergekit, models, recipe, merged, tmp_path)


@pytest.mark.parametrize(
    ("density", "normalize", "weights", "lam"),
    [
        (0.5, True, WEIGHTS, 1.0),
        (0.5, False, WEIGHTS, 0.8),
        (1.0, True, WEIGHTS, 1.0),
        (0.5, True, [1.0] * 3, 1.0),
    ],
)
def test_ties_mergekit_semantics(
    mergekit: ModuleType,
    models: dict[str, Any],
    tmp_path: Path,
    density: float,
    normalize: bool,
    weights: list[float],
    lam: float,
) -> None:
    merged = sk.merge(
        models["tvs"],
        method="ties",
        weights=weights,
        density=density,
        semantics="mergekit",
        normalize=normalize,
        lambda_=lam,
    )
    for tv in models["tvs"]:  # a tie at the threshold would make the kept set implementation-defined
        for k, t in tv.tensors.items():
            mags = t.abs().reshape(-1).sort(descending=True).values
            n_keep = int(density * mags.numel())
            if 0 < n_keep < mags.numel() and mags[n_keep] > 0:
                assert mags[n_keep - 1] > mags[n_keep], f"magnitude tie at the threshold of {k}"
    per_model = [{"weight": w, "density": density} for w in weights]
    recipe = _recipe(models, "ties", per_model, {"normalize": normalize, "lambda": lam})
    _compare(mergekit, models, recipe, merged, tmp_path)
    if density < 1.0:  # the trim mattered: TIES differs from TIES without trimming
        untrimmed = sk.merge(models["tvs"], method="ties", weights=weights, density=1.0, normalize=normalize)
        assert not merged.allclose(untrimmed, atol=1e-4)


def test_ties_trim_of_a_tensor_smaller_than_one_over_density(mergekit: ModuleType) -> None:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    base, tuned = torch.zeros(3), torch.tensor([0.5, -2.0, 1.0])
    group = TensorGroup.from_tensors([base, tuned], ids=["base", "ft"], base_index=0)
    (theirs,) = registry.get("ties")([group], parameters={"weight": [1.0], "density": [0.2]})
    ours = sk.merge([_shift({"w": tuned - base})], method="ties", density=0.2, semantics="mergekit")
    torch.testing.assert_close(base + ours.tensors["w"], theirs, atol=ATOL, rtol=0)


class _MaskFeed:
    """Hands mergekit shiftkit's DARE keep-masks, in the order mergekit draws them.

    mergekit's ``GeneralizedTaskArithmeticMerge.merge_group`` sparsifies the non-base inputs of one tensor
    in order, each with one ``torch.bernoulli(full_like(delta, density))`` call; a spy on ``merge_group``
    records the tensor name and the inputs' order, and the ``bernoulli`` of mergekit's ``sparsify`` module
    returns the matching shiftkit mask instead of a random draw.
    """

    def __init__(self, mk: ModuleType, models: dict[str, Any], density: float, seed: int) -> None:
        self.index = {str(models["paths"][f"ft{i}"]): i for i in range(3)}
        self.density, self.seed = density, seed
        self.queue: list[tuple[str, int]] = []
        self.calls = 0
        self.gta = importlib.import_module("mergekit.merge_methods.generalized_task_arithmetic")

    def merge_group(self, original: Any) -> Any:
        def spy(method: Any, group: Any, /, **params: Any) -> Tensor:
            self.queue = [(group.metadata.name, self.index[str(e.id.model.path)]) for e in group.non_base]
            out = original(method, group, **params)
            if self.density < 1.0:
                assert not self.queue, f"mergekit drew fewer masks than inputs for {group.metadata.name}"
            return out

        return spy

    def bernoulli(self, probs: Tensor) -> Tensor:
        key, i = self.queue.pop(0)
        assert torch.all(probs == self.density), "mergekit asked for a mask of another density"
        self.calls += 1
        return dare_keep_mask(probs.shape, self.density, key_seed(self.seed, key, i)).to(probs.dtype)

    def install(self, monkeypatch: pytest.MonkeyPatch, sparsify: ModuleType) -> None:
        cls = self.gta.GeneralizedTaskArithmeticMerge
        monkeypatch.setattr(cls, "merge_group", self.merge_group(cls.merge_group))
        proxy = _TorchProxy(self.bernoulli)
        monkeypatch.setattr(sparsify, "torch", proxy)


class _TorchProxy(ModuleType):
    """``torch`` as seen by one module, with ``bernoulli`` replaced."""

    def __init__(self, bernoulli: Any) -> None:
        super().__init__("torch")
        self.bernoulli = bernoulli

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@pytest.fixture
def mask_feed(mergekit: ModuleType, models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def make(density: float, seed: int) -> _MaskFeed:
        feed = _MaskFeed(mergekit, models, density, seed)
        feed.install(monkeypatch, mergekit.sparsify)
        return feed

    yield make


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize(("density", "rescale"), [(0.5, True), (0.3, False), (1.0, True)])
def test_dare_with_shiftkit_masks(
    mergekit: ModuleType,
    models: dict[str, Any],
    mask_feed: Any,
    tmp_path: Path,
    method: str,
    density: float,
    rescale: bool,
) -> None:
    seed = 0  # shiftkit's default seed, so a recipe without a seed draws the same masks in shiftkit
    feed = mask_feed(density, seed)
    merged = sk.merge(
        models["tvs"],
        method=method,
        weights=WEIGHTS,
        density=density,
        rescale="l1" if rescale else "none",
        seed=seed,
        lambda_=0.9,
    )
    per_model = [{"weight": w, "density": density} for w in WEIGHTS]
    recipe = _recipe(models, method, per_model, {"rescale": rescale, "lambda": 0.9})
    _compare(mergekit, models, recipe, merged, tmp_path)
    n_keys = len(models["states"]["base"])
    # density 1: no drop at all, mergekit draws no mask
    assert feed.calls == (0 if density >= 1.0 else 3 * n_keys)


@pytest.mark.parametrize(("t", "base_listed"), [(0.3, True), (0.75, True), (0.3, False)])
def test_slerp_of_weights(
    mergekit: ModuleType, models: dict[str, Any], tmp_path: Path, t: float, base_listed: bool
) -> None:
    base, tv = models["states"]["base"], models["tvs"][0]
    zero = _shift({k: torch.zeros_like(v) for k, v in tv.tensors.items()})
    # mergekit slerps full weights from the base (t=0) to the other model (t=1)
    merged = sk.merge([zero, tv], method="slerp", t=t, base=base)
    recipe = _recipe(models, "slerp", [{}, None, None], {"t": t})
    if base_listed:  # both recipe shapes mergekit accepts: the base also listed under models, or not
        recipe["models"].insert(0, {"model": str(models["paths"]["base"])})
    _compare(mergekit, models, recipe, merged, tmp_path)
