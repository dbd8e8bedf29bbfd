"""Learnable shift methods: one file each, registered on import (one line per method here)."""

from __future__ import annotations

from shiftkit.methods.bitfit import BitFitConfig
from shiftkit.methods.lora import LoRAConfig
from shiftkit.methods.ssf import SSFConfig

__all__ = ["BitFitConfig", "LoRAConfig", "SSFConfig"]
