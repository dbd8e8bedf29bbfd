"""``sk.compress`` and ``sk.decompress``: every compressor through one pair of functions."""

from __future__ import annotations

from typing import Any

from shiftkit.compression.registry import get_method
from shiftkit.core.encoding import decoded
from shiftkit.core.shift import Shift
from shiftkit.errors import ShiftkitError

__all__ = ["compress", "decompress"]


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
    try:
        return spec.compress(decoded(shift), **params)
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
