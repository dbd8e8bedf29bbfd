"""Tiny local Llama checkpoints and the two runners, for tests that hold shiftkit's merges against mergekit.

mergekit 0.1.5 is a dev dependency used as an oracle only (``src/`` never imports it). A test builds a base
and a few fine-tunes with :func:`make_llamas`, writes one recipe, runs it through mergekit's ``run_merge``
(:func:`run_mergekit`) and through ``sk.merge_recipe`` (:func:`run_shiftkit`), and compares every tensor
(:func:`assert_same_tensors`).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

import shiftkit as sk

#: a 6-layer Llama small enough to merge in milliseconds (untied head, grouped-query attention)
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 6,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": False,
}


def make_llamas(root: Path, n_tuned: int = 3, seed: int = 0, **config: Any) -> dict[str, Path]:
    """A base Llama and ``n_tuned`` fine-tunes of it saved as Hugging Face folders under ``root``.

    Fine-tune 0 has a dense shift, 1 one that mostly disagrees in sign with 0, 2 a sparse one (40 % of
    the entries), further ones dense again. Returns ``{"base": path, "ft0": path, ...}``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config}))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 7)
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"])
    for i in range(n_tuned):
        tuned = {}
        for k, v in base.items():
            d = torch.randn(v.shape, generator=g) * 0.01
            if i == 1:
                d = -0.7 * d + torch.randn(v.shape, generator=g) * 0.005
            if i == 2:
                d = d * (torch.rand(v.shape, generator=g) < 0.4)
            tuned[k] = v + d
        paths[f"ft{i}"] = root / f"ft{i}"
        model.save_pretrained(paths[f"ft{i}"], state_dict=tuned)
    return paths


def read_folder(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``folder``."""
    out: dict[str, Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_mergekit(mk: ModuleType, recipe: dict[str, Any], out: Path, **options: Any) -> dict[str, Tensor]:
    """Run ``recipe`` (a mergekit YAML as a dict) through mergekit's ``run_merge`` on CPU into ``out``."""
    config = mk.config.MergeConfiguration.model_validate(recipe)
    opts = {
        "cuda": False,
        "lazy_unpickle": False,
        "quiet": True,
        "copy_tokenizer": False,
        "write_model_card": False,
        **options,
    }
    mk.merge.run_merge(config, str(out), mk.options.MergeOptions(**opts))
    return read_folder(out)


def run_shiftkit(recipe: dict[str, Any], tmp: Path, name: str = "shiftkit") -> dict[str, Tensor]:
    """Write ``recipe`` to YAML and run it through ``sk.merge_recipe`` into ``tmp / name``."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    sk.merge_recipe(path, tmp / name, progress=False)
    return read_folder(tmp / name)


def assert_same_tensors(
    ours: dict[str, Tensor], theirs: dict[str, Tensor], atol: float = 1e-6, rtol: float = 1e-5
) -> None:
    """Same keys, shapes and dtypes, values within ``atol + rtol·|theirs|``."""
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        assert ours[k].dtype == theirs[k].dtype, k
        torch.testing.assert_close(ours[k], theirs[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")
