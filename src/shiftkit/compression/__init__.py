"""shiftkit.compression: store and ship shifts small (ComPEFT, binary-coding quantisation, hashed sharing,
early pruning), one file per compressor, each registered by one decorator
(:mod:`~shiftkit.compression.registry`).

Importing this package registers the built-in compressors.
"""

from __future__ import annotations

from shiftkit.compression import bcq as bcq
from shiftkit.compression import compeft as compeft
from shiftkit.compression import rows as rows
from shiftkit.compression.api import compress, decompress, quantize_
from shiftkit.compression.registry import (
    COMPRESS_METHODS,
    CompressSpec,
    get_method,
    list_methods,
    register_method,
)

__all__ = [
    "COMPRESS_METHODS",
    "CompressSpec",
    "compress",
    "decompress",
    "get_method",
    "list_methods",
    "quantize_",
    "register_method",
]
