"""Learnable shift methods: one file each, registered on import (one line per method here)."""

from __future__ import annotations

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

__all__ = [
    "AdapterConfig",
    "BitFitConfig",
    "IA3Config",
    "LinearAdapterConfig",
    "LoRAConfig",
    "PEGOConfig",
    "PSTConfig",
    "PromptTuningConfig",
    "RPSConfig",
    "RecursiveConfig",
    "SSFConfig",
    "SVFitConfig",
    "SubspaceConfig",
]
