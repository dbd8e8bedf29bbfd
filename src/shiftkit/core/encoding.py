"""Compressed shifts: the registry of compressors and the one decode step every entry point shares.

A compressed shift is an ordinary :class:`~shiftkit.core.shift.Shift` whose ``encoding`` is set: its
``method``, ``config`` and ``base`` describe the shift it decodes to (a delta, a LoRA, an (IA)³ shift), its
``tensors`` hold the encoded payload (what ``nbytes`` and the file size count), and ``encoding`` says how to
read them::

    {"method": "compeft", "params": {...}, "tensors": {name: {"shape": [...], "dtype": "float32"}}, ...}

The registry lives here, below every verb, so that ``sk.apply_``, ``sk.attach_``, ``sk.merge`` and
``ShiftPool`` decode a compressed input without importing ``shiftkit.compression`` (which registers the
built-in compressors on the first look-up, like every registry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from shiftkit.core.registry import Registry
from shiftkit.core.shift import Shift
from shiftkit.errors import CorruptFileError, ShiftkitError

__all__ = [
    "COMPRESS_METHODS",
    "CompressSpec",
    "decoded",
    "decoded_tensor",
    "decoded_tensors",
    "dtype_from_name",
    "dtype_name",
    "encoded_layout",
]

#: ``compress(shift, **params) -> Shift`` (the encoded shift)
CompressFn = Callable[..., Shift]


@dataclass(frozen=True)
class CompressSpec:
    """What the registry knows about a compressor.

    Attributes:
        name: registry name, equal to the compressor's file name (``"compeft"``).
        compress: ``compress(shift, **params) -> Shift``, the encoded shift.
        decompress: ``decompress(encoded) -> Shift``, the shift it encodes, with dense tensors.
        decompress_tensor: ``decompress_tensor(encoded, name) -> Tensor``, one decoded tensor (streaming
            decode, tensor by tensor); ``None`` when only the whole shift decodes.
        stream: ``stream(source, **params) -> Shift``: the same compression of a streamed source (a
            :class:`shiftkit.compression._source.Source`, tensors read one at a time), for compressing a
            fine-tuned model's delta without holding it; ``None`` when the compressor needs the whole shift.
        lossless: parameter values under which ``decompress(compress(s))`` equals ``s`` exactly (property
            tests use them); empty when no setting is lossless.
    """

    name: str
    compress: CompressFn
    decompress: Callable[[Shift], Shift]
    decompress_tensor: Callable[[Shift, str], Tensor] | None = None
    stream: Callable[..., Shift] | None = None
    lossless: Mapping[str, Any] = field(default_factory=dict)


COMPRESS_METHODS: Registry[CompressSpec] = Registry("compression method", package="shiftkit.compression")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (the names compressed files store)."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ShiftkitError(f"compressed shifts hold floating tensors; got {name}")
    return name


def dtype_from_name(name: Any) -> torch.dtype:
    """The dtype a compressed file names (``CorruptFileError`` for an unknown name)."""
    if name not in _DTYPES:
        raise CorruptFileError(f"compressed shift names an unknown dtype {name!r}")
    return _DTYPES[str(name)]


def encoded_layout(shift: Shift) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of the tensors a compressed shift decodes to, in their order.

    Raises:
        CorruptFileError: the encoding metadata lacks or garbles its tensor table.
    """
    enc = shift.encoding
    if enc is None:
        raise ShiftkitError("this shift is not compressed")
    table = enc.get("tensors")
    if not isinstance(table, Mapping):
        raise CorruptFileError(f"compressed ({enc.get('method')!r}) shift has no tensor table")
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    try:
        for name, info in table.items():
            shape = tuple(int(s) for s in info["shape"])
            if any(s < 0 for s in shape):
                raise ValueError(f"negative size in {shape}")
            out[str(name)] = (shape, dtype_from_name(info["dtype"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"compressed shift: malformed tensor table ({err})") from None
    return out


def _spec(shift: Shift) -> CompressSpec:
    enc = shift.encoding or {}
    return COMPRESS_METHODS.get(str(enc.get("method")))


def decoded(shift: Shift) -> Shift:
    """``shift`` itself when it is not compressed, else the shift its payload decodes to.

    Example:
        >>> dense = decoded(sk.load("task.compeft.safetensors"))
    """
    if not isinstance(shift, Shift) or shift.encoding is None:
        return shift
    out = _spec(shift).decompress(shift)
    if out.encoding is not None:
        raise ShiftkitError(f"compressor {shift.encoding.get('method')!r} decoded to a compressed shift")
    return out


def decoded_tensor(shift: Shift, name: str) -> Tensor:
    """One tensor of a compressed shift, decoded alone when the compressor can (else the whole shift)."""
    spec = _spec(shift)
    if spec.decompress_tensor is not None:
        return spec.decompress_tensor(shift, name)
    return decoded(shift)[name]


def decoded_tensors(shift: Shift) -> Iterator[tuple[str, Tensor]]:
    """``(name, dense tensor)`` pairs, decoded one at a time when the compressor can (streaming merges).

    For a shift that is not compressed this is ``shift.tensors.items()``.
    """
    if shift.encoding is None:
        yield from shift.tensors.items()
        return
    spec = _spec(shift)
    if spec.decompress_tensor is None:
        yield from decoded(shift).tensors.items()
        return
    for name in encoded_layout(shift):
        yield name, spec.decompress_tensor(shift, name)
