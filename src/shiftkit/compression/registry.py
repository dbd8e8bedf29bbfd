"""The registry of compressors: one :class:`CompressSpec` per name, registered by :func:`register_method`.

A compressor is one file in this package with one decorator on its ``compress`` function::

    @register_method("mine", decompress=mine_decompress, lossless={"bits": 32})
    def mine(shift: Shift, *, bits: int = 4) -> Shift: ...

``compress(shift, **params)`` returns a new :class:`~shiftkit.core.shift.Shift` holding the encoded payload
(what ``shift.nbytes`` and the file size count) with ``encoding`` set; ``decompress(shift)`` returns the
shift it encodes, with dense tensors. Everything else (``sk.compress``, ``shiftkit compress``, the
conformance tests, and every verb that accepts a compressed shift) reads the spec. The registry object
itself lives in :mod:`shiftkit.core.encoding`, below the verbs, so that ``sk.merge`` and ``sk.apply_``
can decode without importing this package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from shiftkit.core.encoding import COMPRESS_METHODS, CompressFn, CompressSpec
from shiftkit.core.shift import Shift

__all__ = ["COMPRESS_METHODS", "CompressSpec", "get_method", "list_methods", "register_method"]


def register_method(
    name: str,
    *,
    decompress: Callable[[Shift], Shift],
    decompress_tensor: Callable[[Shift, str], Tensor] | None = None,
    stream: Callable[..., Shift] | None = None,
    lossless: Mapping[str, Any] | None = None,
) -> Callable[[CompressFn], CompressFn]:
    """Decorator registering a ``compress`` function under ``name`` (from any module, yours included).

    ``decompress_tensor(encoded, name)`` decodes one tensor, so streaming merges decode tensor by tensor;
    ``stream(source, **params)`` compresses a streamed source (``shiftkit compress --base``).

    Example:
        >>> @register_method("mine", decompress=mine_decompress)
        ... def mine(shift: Shift, *, bits: int = 4) -> Shift: ...
    """

    def deco(fn: CompressFn) -> CompressFn:
        COMPRESS_METHODS.add(
            name, CompressSpec(name, fn, decompress, decompress_tensor, stream, dict(lossless or {}))
        )
        return fn

    return deco


def get_method(name: str) -> CompressSpec:
    """The :class:`CompressSpec` registered as ``name`` (``UnknownMethodError`` listing the known ones)."""
    return COMPRESS_METHODS.get(name)


def list_methods() -> list[str]:
    """Names of the registered compressors, sorted (``sk.list_compress_methods()``)."""
    return COMPRESS_METHODS.names()
