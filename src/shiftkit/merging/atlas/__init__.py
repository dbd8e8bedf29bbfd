"""aTLAS (Zhang et al., NeurIPS 2024, https://arxiv.org/abs/2407.18298): task vectors combined with learned
block-wise coefficients. The merge method ``atlas`` (given coefficients) and ``sk.learn_atlas`` (learning
them) are in :mod:`~shiftkit.merging.atlas.method`; the resident blocks, partitions and objectives in
:mod:`~shiftkit.merging.atlas.blocks`."""

from __future__ import annotations

from shiftkit.merging.atlas.method import AtlasResult, atlas, atlas_partition, learn_atlas

__all__ = ["AtlasResult", "atlas", "atlas_partition", "learn_atlas"]
