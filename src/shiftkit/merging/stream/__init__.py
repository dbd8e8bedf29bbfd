"""Streaming checkpoint merges (``shiftkit merge RECIPE OUT``, ``sk.merge_recipe``).

* :mod:`~shiftkit.merging.stream.recipe`: mergekit-shaped YAML → a validated, resolved recipe;
* :mod:`~shiftkit.merging.stream.checkpoints` / :mod:`~shiftkit.merging.stream.shards`: lazy tensor-by-tensor
  reads of HF folders, safetensors files and shift files; sharded atomic writes;
* :mod:`~shiftkit.merging.stream.runner`: the engine (one tensor name at a time, or statistics passes first);
* :mod:`~shiftkit.merging.stream.multipass`: the protocol of methods that need whole-model statistics;
* :mod:`~shiftkit.merging.stream.order_stats`: the exact streaming k-th value behind them;
* :mod:`~shiftkit.merging.stream.kernels`: in-place block kernels of TIES and DARE-TIES.
"""

from __future__ import annotations

from shiftkit.merging.stream.recipe import ResolvedRecipe, load_recipe, resolve_recipe
from shiftkit.merging.stream.runner import MergeSummary, merge_recipe

__all__ = ["MergeSummary", "ResolvedRecipe", "load_recipe", "merge_recipe", "resolve_recipe"]
