"""``sk.compress`` and ``sk.decompress``: every compressor through one pair of functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from shiftkit.compression import bcq
from shiftkit.compression.registry import get_method
from shiftkit.core.encoding import decoded
from shiftkit.core.shift import Shift
from shiftkit.errors import ShiftkitError, UnknownMethodError

__all__ = ["QUANTIZERS", "call_compressor", "compress", "decompress", "quantize_"]

#: model quantisers of ``sk.quantize_``: name → ``quantize(model, **params)``
QUANTIZERS = {"bcq": bcq.quantize_model_}


def compress(shift: Shift, method: str = "compeft", **params: Any) -> Shift:
    """Compress ``shift`` with a registered compressor (``sk.list_compress_methods()``).

    The result is a :class:`Shift` whose tensors are the encoded payload (``nbytes`` and the file size are
    the encoded bytes); ``sk.save``/``sk.load`` store it like any shift, and ``sk.apply_``, ``sk.attach_``,
    ``sk.merge`` and ``ShiftPool`` accept it as the shift it encodes.

    Args:
        shift: a delta (``sk.task_vector``), a LoRA or an (IA)³ shift; an already compressed shift is
            decoded first.
        method: compressor name (``"compeft"``, ``"bcq"``, ...).
        **params: the compressor's parameters (``density=0.1`` for ComPEFT, ``bits=3`` for BCQ, ...).

    Raises:
        UnknownMethodError: no compressor of that name.
        ShiftkitError: bad parameters, or a shift that is not a change of the weights.

    Example:
        >>> small = sk.compress(sk.task_vector(base, tuned), method="compeft", density=0.1)
        >>> sk.save(small, "task.compeft.safetensors")
        >>> sk.apply_(base, sk.load("task.compeft.safetensors"))
    """
    spec = get_method(method)
    if not isinstance(shift, Shift):
        raise ShiftkitError(f"sk.compress expects a Shift, got {type(shift).__name__}")
    return call_compressor(method, spec.compress, decoded(shift), **params)


def call_compressor(method: str, fn: Callable[..., Shift], source: Any, **params: Any) -> Shift:
    """``fn(source, **params)``, with a parameter the compressor does not take reported as a ShiftkitError
    naming the compressor (``sk.compress`` and ``shiftkit compress``, in memory or streamed)."""
    try:
        return fn(source, **params)
    except TypeError as err:
        if "unexpected keyword" in str(err) or "positional argument" in str(err):
            raise ShiftkitError(f"compressor {method!r}: {err}") from None
        raise


def decompress(shift: Shift) -> Shift:
    """The shift a compressed shift encodes, with dense tensors (an uncompressed shift is returned as is).

    Example:
        >>> tv = sk.decompress(sk.load("task.compeft.safetensors"))
        >>> tv.method
        'delta'
    """
    if not isinstance(shift, Shift):
        raise ShiftkitError(f"sk.decompress expects a Shift, got {type(shift).__name__}")
    return decoded(shift)


def quantize_(model: nn.Module, method: str = "bcq", **params: Any) -> nn.Module:
    """Quantise a model's Linear layers in place (``"bcq"``: binary-coded layers with lookup-table matmuls).

    Args:
        model: any ``nn.Module``.
        method: the quantiser (``"bcq"``).
        **params: the quantiser's parameters (``bits=3``, ``group_size=64``, ``calib=batches``, ...; see
            :func:`shiftkit.compression.bcq.quantize_model_`).

    Returns:
        ``model``.

    Example:
        >>> sk.quantize_(model, method="bcq", bits=3, calib=[tok(texts, return_tensors="pt")])
    """
    if method not in QUANTIZERS:
        raise UnknownMethodError(f"unknown quantiser {method!r}. Known: {', '.join(sorted(QUANTIZERS))}.")
    if not isinstance(model, nn.Module):
        raise ShiftkitError(f"sk.quantize_ expects an nn.Module, got {type(model).__name__}")
    try:
        return QUANTIZERS[method](model, **params)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ShiftkitError(f"quantiser {method!r}: {err}") from None
        raise
