"""The registry of compressors: one :class:`CompressSpec` per name, registered by :func:`register_method`.

A compressor is one file in this package with one decorator on its ``compress`` function::

    @register_method("mine", decompress=mine_decompress, lossless={"bits": 32})
    def mine(shift: Shift, *, bits: int = 4) -> Shift: ...

``compress(shift, **params)`` returns a new :class:`~shiftkit.core.shift.Shift` holding the encoded payload
(what ``shift.nbytes`` and the file size count); ``decompress(shift)`` returns the dense delta it encodes.
Everything else (``sk.compress``, ``shiftkit compress``, the conformance tests) reads the spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shiftkit.core.registry import Registry
from shiftkit.core.shift import Shift

__all__ = ["COMPRESS_METHODS", "CompressSpec", "get_method", "list_methods", "register_method"]

#: ``compress(shift, **params) -> Shift`` (the encoded shift)
CompressFn = Callable[..., Shift]


@dataclass(frozen=True)
class CompressSpec:
    """What the registry knows about a compressor.

    Attributes:
        name: registry name, equal to the compressor's file name (``"compeft"``).
        compress: ``compress(shift, **params) -> Shift``, the encoded shift.
        decompress: ``decompress(encoded) -> Shift``, the dense delta it encodes.
        lossless: parameter values under which ``decompress(compress(s))`` equals ``s`` exactly (property
            tests use them); empty when no setting is lossless.
    """

    name: str
    compress: CompressFn
    decompress: Callable[[Shift], Shift]
    lossless: Mapping[str, Any] = field(default_factory=dict)


COMPRESS_METHODS: Registry[CompressSpec] = Registry("compression method", package="shiftkit.compression")


def register_method(
    name: str, *, decompress: Callable[[Shift], Shift], lossless: Mapping[str, Any] | None = None
) -> Callable[[CompressFn], CompressFn]:
    """Decorator registering a ``compress`` function under ``name`` (from any module, yours included).

    Example:
        >>> @register_method("fp16", decompress=lambda s: s.to(dtype=torch.float32))
        ... def fp16(shift): return shift.to(dtype=torch.float16)
    """

    def deco(fn: CompressFn) -> CompressFn:
        COMPRESS_METHODS.add(name, CompressSpec(name, fn, decompress, dict(lossless or {})))
        return fn

    return deco


def get_method(name: str) -> CompressSpec:
    """The :class:`CompressSpec` registered as ``name`` (``UnknownMethodError`` listing the known ones)."""
    return COMPRESS_METHODS.get(name)


def list_methods() -> list[str]:
    """Names of the registered compressors, sorted (``sk.list_compress_methods()``)."""
    return COMPRESS_METHODS.names()
