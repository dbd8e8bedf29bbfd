"""Every YAML in mergekit's ``examples/`` folder, pointed at local tiny Llamas, means the same in shiftkit.

The recipes are mergekit 0.1.5's examples as published (arcee-ai/mergekit ``examples/*.yml``), with the hub
model names replaced by local checkpoints and the 40-layer ranges of the 13B models scaled to the 6 layers
of :data:`mk_llama.TINY_LLAMA` (``[0, 40]`` → ``[0, 6]``; the 44-layer frankenmerge's ``[0, 24]`` and
``[20, 40]`` → ``[0, 4]`` and ``[2, 6]``, the same overlap of two layers). Each runs three ways:

* in float32 (``dtype: float32``): shiftkit equals mergekit to float rounding;
* as published (``float16`` / ``bfloat16``) with ``shiftkit: {compute_dtype: <dtype>}``: shiftkit rounds the
  inputs as mergekit loads them and gives its output to one unit in the last place (the TIES family, which
  mergekit computes in 16 bits: closer to the exact merge than mergekit);
* as published with shiftkit's default fp32 arithmetic: closer to the float32 result than mergekit's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

from mk_llama import assert_same_tensors, make_llamas, run_mergekit, run_shiftkit

pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

# mergekit's examples/, verbatim but for the model names (MODEL_*) and the layer ranges (see above)
EXAMPLES: dict[str, str] = {
    "arcee_fusion.yml": """
models:
  - model: MODEL_A
  - model: MODEL_B
merge_method: arcee_fusion
base_model: MODEL_A
dtype: bfloat16
""",
    "bio-merge.yml": """
models:
  - model: MODEL_A
    parameters:
      density: 0.5
      weight: 0.5
  - model: MODEL_B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: MODEL_BASE
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    "gradient-slerp.yml": """
slices:
  - sources:
      - model: MODEL_A
        layer_range: [0, 6]
      - model: MODEL_B
        layer_range: [0, 6]
merge_method: slerp
base_model: MODEL_A
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "linear.yml": """
models:
  - model: MODEL_A
    parameters:
      weight: 1.0
  - model: MODEL_C
    parameters:
      weight: 0.3
  - model: MODEL_B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "orcamini-platy-44layer.yml": """
slices:
  - sources:
    - model: MODEL_A
      layer_range: [0, 4]
  - sources:
    - model: MODEL_B
      layer_range: [2, 6]
merge_method: passthrough
dtype: float16
""",
    "ties.yml": """
models:
  - model: MODEL_A
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: MODEL_B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: MODEL_C
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: MODEL_BASE
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llamas(tmp_path_factory.mktemp("examples"))


def _recipe(name: str, llamas: dict[str, Path], **changes: Any) -> dict[str, Any]:
    text = EXAMPLES[name]
    for placeholder, key in (
        ("MODEL_BASE", "base"),
        ("MODEL_A", "ft0"),
        ("MODEL_B", "ft1"),
        ("MODEL_C", "ft2"),
    ):
        text = text.replace(placeholder, str(llamas[key]))
    recipe = yaml.safe_load(text)
    recipe.update(changes)
    return recipe


def _layers(tensors: dict[str, torch.Tensor]) -> int:
    return 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("model.layers."))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_in_float32_equals_mergekit(
    mergekit: ModuleType, llamas: dict[str, Path], name: str, tmp_path: Path
) -> None:
    recipe = _recipe(name, llamas, dtype="float32")
    theirs = run_mergekit(mergekit, copy.deepcopy(recipe), tmp_path / "mergekit")
    ours = run_shiftkit(recipe, tmp_path)
    assert_same_tensors(ours, theirs, atol=2e-7, rtol=1e-5)
    if name == "orcamini-platy-44layer.yml":  # 4 + 4 layers stacked: the output is deeper than its inputs
        assert _layers(ours) == 8
        cfg = yaml.safe_load((tmp_path / "shiftkit" / "config.json").read_text())
        assert cfg["num_hidden_layers"] == 8


# mergekit computes these in the recipe's dtype (TIES: fp16 deltas, votes and sums; arcee_fusion: a bf16
# softmax divergence, mostly rounding noise, and it writes float32 despite `dtype: bfloat16`); shiftkit
# rounds the inputs as mergekit loads them and then computes in float32: closer to the exact merge
LOW_PRECISION_ARITHMETIC = {"arcee_fusion.yml", "bio-merge.yml", "ties.yml"}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in b) ** 0.5


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_as_published_with_compute_dtype_rounds_as_mergekit(
    mergekit: ModuleType, llamas: dict[str, Path], name: str, tmp_path: Path
) -> None:
    recipe = _recipe(name, llamas)
    theirs = run_mergekit(mergekit, copy.deepcopy(recipe), tmp_path / "mergekit")
    ours = run_shiftkit({**recipe, "shiftkit": {"compute_dtype": recipe["dtype"]}}, tmp_path)
    assert sorted(ours) == sorted(theirs)
    if name in LOW_PRECISION_ARITHMETIC:
        exact = run_mergekit(mergekit, _recipe(name, llamas, dtype="float32"), tmp_path / "exact")
        assert _distance(ours, exact) <= _distance(theirs, exact)
        return
    eps = torch.finfo(getattr(torch, recipe["dtype"])).eps
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype, k
        a, b = ours[k].float(), t.float()
        # at most one unit in the last place (fp32 sums in another order round a few entries the other way)
        ulp = eps * torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(t.dtype).tiny)
        assert bool(((a - b).abs() <= ulp * 1.001).all()), k


@pytest.mark.parametrize("name", ["bio-merge.yml", "ties.yml", "linear.yml"])
def test_default_fp32_arithmetic_is_closer_to_the_exact_merge(
    mergekit: ModuleType, llamas: dict[str, Path], name: str, tmp_path: Path
) -> None:
    """With ``dtype: float16`` mergekit rounds the inputs (and TIES its arithmetic) to fp16; shiftkit once."""
    recipe = _recipe(name, llamas)
    exact = run_mergekit(mergekit, _recipe(name, llamas, dtype="float32"), tmp_path / "exact")
    theirs = run_mergekit(mergekit, copy.deepcopy(recipe), tmp_path / "mergekit")
    ours = run_shiftkit(recipe, tmp_path)
    err_ours = sum(float((ours[k].double() - exact[k].double()).norm()) for k in exact)
    err_theirs = sum(float((theirs[k].double() - exact[k].double()).norm()) for k in exact)
    assert err_ours <= err_theirs
