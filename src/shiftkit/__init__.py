"""shiftkit: learn, fold, merge, compress and adapt parameter shifts on any PyTorch ``nn.Module``.

Example:
    >>> import shiftkit as sk
    >>> sk.attach_(model, sk.LoRAConfig(r=8, target_modules=["query", "value"]))
    >>> opt = torch.optim.AdamW(sk.shift_parameters(model), lr=1e-3)

The public names are loaded lazily (PEP 562), so ``import shiftkit`` and ``shiftkit --help`` do not
import torch; the first use of a name imports its module, and each registry imports its built-in methods
on its first look-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shiftkit._version import __version__

# public name -> module that defines it
_API: dict[str, str] = {
    # values, configs, registries
    "Shift": "shiftkit.core.shift",
    "ShiftConfig": "shiftkit.core.config",
    "LoRAConfig": "shiftkit.methods.lora",
    "SSFConfig": "shiftkit.methods.ssf",
    "BitFitConfig": "shiftkit.methods.bitfit",
    "SVFitConfig": "shiftkit.methods.svfit",
    "IA3Config": "shiftkit.methods.ia3",
    "AdapterConfig": "shiftkit.methods.adapter",
    "PromptTuningConfig": "shiftkit.methods.prompt_tuning",
    "LinearAdapterConfig": "shiftkit.methods.linear_adapter",
    "PEGOConfig": "shiftkit.methods.pego",
    "SubspaceConfig": "shiftkit.methods.subspace",
    "RecursiveConfig": "shiftkit.methods.recursive",
    "RPSConfig": "shiftkit.methods.rps",
    "PSTConfig": "shiftkit.methods.pst",
    "export_peft": "shiftkit.interop.peft",
    "import_peft": "shiftkit.interop.peft",
    "list_methods": "shiftkit.core.registry",
    "register_method": "shiftkit.core.registry",
    "get_method": "shiftkit.core.registry",
    "MethodSpec": "shiftkit.core.registry",
    # learn / fold
    "attach_": "shiftkit.core.attach",
    "detach_": "shiftkit.core.attach",
    "extract": "shiftkit.core.attach",
    "fold_": "shiftkit.core.attach",
    "shift_parameters": "shiftkit.core.attach",
    "named_shift_parameters": "shiftkit.core.attach",
    "regularization_loss": "shiftkit.core.attach",
    "save": "shiftkit.core.io",
    "load": "shiftkit.core.io",
    # deltas
    "task_vector": "shiftkit.core.delta",
    "to_delta": "shiftkit.core.delta",
    "apply_": "shiftkit.core.delta",
    # merging
    "merge": "shiftkit.merging.in_memory",
    "list_merge_methods": "shiftkit.merging.registry",
    "register_merge_method": "shiftkit.merging.registry",
    "get_merge_method": "shiftkit.merging.registry",
    "MergeSpec": "shiftkit.merging.registry",
    "list_compress_methods": "shiftkit.compression.registry",
    "compress": "shiftkit.compression.api",
    "decompress": "shiftkit.compression.api",
    "quantize_": "shiftkit.compression.api",
    "merge_recipe": "shiftkit.merging.stream.runner",
    "MergeSummary": "shiftkit.merging.stream.runner",
    "merge_lora": "shiftkit.merging.lowrank",
    "extract_lora": "shiftkit.merging.stream.extract_lora",
    "LoraExtractSummary": "shiftkit.merging.stream.extract_lora",
    "lora_to_delta": "shiftkit.merging.lowrank",
    "LoraMergeResult": "shiftkit.merging.lowrank",
    "learn_atlas": "shiftkit.merging.atlas.method",
    "AtlasResult": "shiftkit.merging.atlas.method",
    "ShiftPool": "shiftkit.merging.routing.pool",
    "KeyQueryRouter": "shiftkit.merging.routing.routers",
    "LearnedRouter": "shiftkit.merging.routing.routers",
    "attach_router_": "shiftkit.merging.routing.attach",
    "detach_router_": "shiftkit.merging.routing.attach",
    "train_router": "shiftkit.merging.routing.attach",
    # errors
    "ShiftkitError": "shiftkit.errors",
    "NotFoldableError": "shiftkit.errors",
    "ShiftMismatchError": "shiftkit.errors",
    "TargetNotFoundError": "shiftkit.errors",
    "TiedWeightsError": "shiftkit.errors",
    "UnknownMethodError": "shiftkit.errors",
    "CorruptFileError": "shiftkit.errors",
    "AssetNotFoundError": "shiftkit.errors",
}

#: public names whose object has another name in its module
_ALIASES = {"list_compress_methods": "list_methods"}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    module_name = _API.get(name)
    if module_name is None:
        raise AttributeError(f"module 'shiftkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from shiftkit.compression.api import compress, decompress, quantize_
    from shiftkit.compression.registry import list_methods as list_compress_methods
    from shiftkit.core.attach import (
        attach_,
        detach_,
        extract,
        fold_,
        named_shift_parameters,
        shift_parameters,
    )
    from shiftkit.core.config import ShiftConfig
    from shiftkit.core.delta import apply_, task_vector, to_delta
    from shiftkit.core.io import load, save
    from shiftkit.core.registry import MethodSpec, get_method, list_methods, register_method
    from shiftkit.core.shift import Shift
    from shiftkit.errors import (
        AssetNotFoundError,
        CorruptFileError,
        NotFoldableError,
        ShiftkitError,
        ShiftMismatchError,
        TargetNotFoundError,
        TiedWeightsError,
        UnknownMethodError,
    )
    from shiftkit.interop.peft import export_peft, import_peft
    from shiftkit.merging.atlas.method import AtlasResult, learn_atlas
    from shiftkit.merging.in_memory import merge
    from shiftkit.merging.lowrank import LoraMergeResult, lora_to_delta, merge_lora
    from shiftkit.merging.registry import (
        MergeSpec,
        get_merge_method,
        list_merge_methods,
        register_merge_method,
    )
    from shiftkit.merging.routing.attach import attach_router_, detach_router_, train_router
    from shiftkit.merging.routing.pool import ShiftPool
    from shiftkit.merging.routing.routers import KeyQueryRouter, LearnedRouter
    from shiftkit.merging.stream.extract_lora import LoraExtractSummary, extract_lora
    from shiftkit.merging.stream.runner import MergeSummary, merge_recipe
    from shiftkit.methods.adapter import AdapterConfig
    from shiftkit.methods.bitfit import BitFitConfig
    from shiftkit.methods.ia3 import IA3Config
    from shiftkit.methods.linear_adapter import LinearAdapterConfig
    from shiftkit.methods.lora import LoRAConfig
    from shiftkit.methods.pego import PEGOConfig
    from shiftkit.methods.prompt_tuning import PromptTuningConfig
    from shiftkit.methods.pst import PSTConfig
    from shiftkit.methods.recursive import RecursiveConfig
    from shiftkit.methods.rps import RPSConfig
    from shiftkit.methods.ssf import SSFConfig
    from shiftkit.methods.subspace import SubspaceConfig
    from shiftkit.methods.svfit import SVFitConfig
