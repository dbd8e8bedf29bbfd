"""LoRA (Hu et al., 2021): the config, the wrappers of Linear / Conv2d / Embedding layers, and the dense
math on saved shifts (``ΔW`` per weight and back to factors). One method, one folder: every LoRA-specific
line lives here; other verbs reach it through the registry (``sk.get_method("lora").dense``)."""

from __future__ import annotations

from shiftkit.methods.lora.config import LoRAConfig
from shiftkit.methods.lora.dense import LORA_DENSE, factorise, lora_delta, lora_kind, lora_param_names
from shiftkit.methods.lora.layers import LoRAConv2d, LoRAEmbedding, LoRALinear

__all__ = [
    "LORA_DENSE",
    "LoRAConfig",
    "LoRAConv2d",
    "LoRAEmbedding",
    "LoRALinear",
    "factorise",
    "lora_delta",
    "lora_kind",
    "lora_param_names",
]
