"""Training a shift on several processes: ``torchrun ... -m shiftkit learn config.yaml``.

Shift modules are plain ``nn.Module`` s with plain parameters, so PyTorch's own engines train them:

* ``"ddp"``: :class:`~torch.nn.parallel.DistributedDataParallel`; every rank holds the whole model and the
  gradients of the trainable (shift) parameters are averaged across ranks.
* ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) for a base that does not fit one process: every
  parameter, frozen base weights included, is sharded across the ranks (each layer of the model's layer
  stack is one unit, then the root), gathered for its forward and backward and freed again. Only the shift
  parameters train; :func:`gather_full` turns the sharded tensors of ``sk.extract`` back into full ones, and
  rank 0 writes the files.

Each global batch is split row-wise across the ranks (:func:`local_rows`) and each rank's loss is its share
of the global mean (``sum over its rows × world / global rows``), so the averaged gradients equal those of
single-process training on the whole batch: the trained shift is the same, up to float rounding (tested on
2 CPU processes with gloo against one process).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.errors import ShiftkitError

__all__ = ["PARALLEL", "Dist", "gather_full", "init_from_env", "local_rows", "reshard_", "shard_"]

#: the ways :func:`shard_` can spread a model over the ranks
PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank and the number of ranks (1 and 0 without ``torchrun``)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        """True when several processes train together."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that prints and writes files (rank 0)."""
        return self.rank == 0


def init_from_env(timeout_s: float = 600.0) -> Dist:
    """Join the process group ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``, ...).

    Without those variables (or with ``WORLD_SIZE=1``) nothing happens and a one-process :class:`Dist` is
    returned. The backend is NCCL when CUDA is available, else gloo (CPU).

    Example:
        >>> dist = init_from_env()     # under: torchrun --nproc_per_node 2 -m shiftkit learn cfg.yaml
        >>> dist.rank, dist.world
        (0, 2)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    if not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(td.get_rank(), td.get_world_size())


def _layer_stack(model: nn.Module) -> list[nn.Module]:
    """The modules of the model's largest ``nn.ModuleList`` (its transformer layers), or none."""
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best):
            best = list(m)
    return best if len(best) >= 2 else []


def shard_(model: nn.Module, parallel: str, dist: Dist) -> nn.Module:
    """Spread ``model`` over the ranks for training; returns the module to call in the training loop.

    ``"fsdp"`` shards in place (FSDP2: each layer of the largest ``nn.ModuleList`` is one unit, then the
    root) and returns ``model``; ``"ddp"`` returns a :class:`DistributedDataParallel` wrapper around it.
    Call it after the shift is attached and before the optimizer is built: FSDP2 replaces the parameters
    by sharded ones (``sk.shift_parameters(model)`` after this call gives those).

    Raises:
        ShiftkitError: an unknown ``parallel``.

    Example:
        >>> sk.attach_(model, sk.LoRAConfig(r=8))
        >>> runner = shard_(model, "fsdp", init_from_env())
        >>> opt = torch.optim.AdamW(sk.shift_parameters(model), lr=1e-3)
    """
    if parallel not in PARALLEL:
        raise ShiftkitError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if not dist.active:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in _layer_stack(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def reshard_(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back in its sharded state (no-op without FSDP2).

    After a forward without backward (evaluation) FSDP2 keeps the root's parameters gathered, in memory it
    may free at any time: reading them then is undefined. Call this before ``sk.extract`` or
    ``state_dict()`` of a sharded model, which then see the sharded parameters and gather them whole.

    Example:
        >>> accuracy(model, batches); reshard_(model); shift = sk.extract(model)
    """
    for m in model.modules():
        reshard = getattr(m, "reshard", None)
        if callable(reshard) and type(m).__name__.startswith("FSDP"):
            reshard()


def local_rows(batch: Mapping[str, Tensor], dist: Dist) -> tuple[dict[str, Tensor], int]:
    """This rank's rows of a global batch (as even as possible), and the global row count.

    Example:
        >>> mine, n = local_rows({"input_ids": ids, "labels": y}, Dist(rank=1, world=2))
    """
    n = len(next(iter(batch.values())))
    if not dist.active:
        return dict(batch), n
    return {k: torch.tensor_split(v, dist.world)[dist.rank] for k, v in batch.items()}, n


def gather_full(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Full tensors from FSDP2's sharded ones (a collective: every rank must call it); others as they are.

    Example:
        >>> shift = sk.extract(model)   # already gathered: extract calls this
    """
    out: dict[str, Tensor] = {}
    for k, t in tensors.items():
        full: Any = getattr(t, "full_tensor", None)
        out[k] = full() if callable(full) else t
    return out
