"""What a compressor compresses: the tensors of a shift as changes from their base value.

* a delta (``sk.task_vector``): its tensors, base 0;
* a LoRA: the factors themselves, base 0 (ComPEFT's reference behaviour; ``as_delta=True`` compresses the
  dense ``ΔW = s·B A`` instead);
* an (IA)³ shift: the scaling vectors minus 1 (their base is 1).

``modules_to_save`` tensors (trained values, not changes) are carried verbatim. Other methods are refused
with what to do (attach and ``sk.to_delta(model)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from shiftkit.core.config import ShiftConfig
from shiftkit.core.delta import to_delta
from shiftkit.core.encoding import decoded, dtype_name, encoded_layout
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import CorruptFileError, ShiftkitError

__all__ = ["Source", "decode_all", "resolve", "source_of"]

#: methods whose tensors are changes from a known constant: name → base value
_BASE_VALUE = {DELTA: 0.0, "lora": 0.0, "ia3": 1.0}


@dataclass
class Source:
    """The shift to compress, split into what gets encoded and what is carried as it is.

    The encoded tensors are read one at a time through ``read`` (a file-backed source streams them).

    Attributes:
        method, config, base: what the compressed shift decodes to.
        offset: the base value of every encoded tensor (the change is ``tensor − offset``).
        layout: every name the decoded shift has → ``(shape, dtype)``, in order.
        encode: the names whose tensors are encoded (each tensor object once), in order.
        read: ``read(name) -> tensor`` for a name in ``encode``.
        raw: name → tensor stored verbatim (``modules_to_save`` values).
        aliases: name → the earlier name holding the same tensor.
    """

    method: str
    config: ShiftConfig | None
    base: dict[str, tuple[int, ...]]
    offset: float
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]]
    encode: list[str]
    read: Callable[[str], Tensor]
    raw: dict[str, Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def table(self) -> dict[str, dict[str, object]]:
        """The ``tensors`` table of the encoding: every name's shape and dtype."""
        return {k: {"shape": list(s), "dtype": dtype_name(d)} for k, (s, d) in self.layout.items()}

    def numel(self) -> int:
        """Entries of the encoded tensors."""
        return sum(math.prod(self.layout[name][0]) for name in self.encode)


def source_of(shift: Shift, *, as_delta: bool = False, compressor: str) -> Source:
    """Split ``shift`` for ``compressor`` (see the module docstring).

    Raises:
        ShiftkitError: not a Shift, a method whose tensors are not changes, or non-floating tensors.
    """
    if not isinstance(shift, Shift):
        raise ShiftkitError(
            f"{compressor} compresses a Shift (a task vector from sk.task_vector, a LoRA, an (IA)3 shift); "
            f"got {type(shift).__name__}"
        )
    shift = decoded(shift)
    if as_delta and shift.method != DELTA:
        if shift.method != "lora":
            raise ShiftkitError(
                f"as_delta=True turns a LoRA into its dense ΔW; a {shift.method!r} shift needs its base: "
                "attach it and pass sk.to_delta(model)"
            )
        shift = to_delta(shift)
    if shift.method not in _BASE_VALUE:
        raise ShiftkitError(
            f"{compressor} compresses changes of the weights: a delta, a LoRA or an (IA)3 shift. A "
            f"{shift.method!r} shift's tensors are not changes of the weights: attach it to its base and "
            "compress sk.to_delta(model) instead"
        )
    aliases = shift.aliases()
    encode: dict[str, Tensor] = {}
    raw: dict[str, Tensor] = {}
    for k, t in shift.tensors.items():
        if k in aliases:
            continue
        if not t.is_floating_point():
            raise ShiftkitError(f"{compressor} compresses floating tensors; {k!r} is {t.dtype}")
        (raw if ".saved." in k else encode)[k] = t.detach()
    if not encode:
        raise ShiftkitError(f"the {shift.method} shift has no tensors to compress")
    return Source(
        shift.method,
        shift.config,
        dict(shift.base),
        _BASE_VALUE[shift.method],
        {k: (tuple(t.shape), t.dtype) for k, t in shift.tensors.items()},
        list(encode),
        encode.__getitem__,
        raw,
        aliases,
    )


def resolve(shift: Shift, name: str) -> tuple[str, tuple[int, ...], torch.dtype, Tensor | None]:
    """``(stored name, shape, dtype, carried tensor or None)`` of tensor ``name`` of a compressed shift.

    Follows an alias to the name that holds the tensor; returns the verbatim tensor of a carried one.

    Raises:
        ShiftkitError: no such tensor. CorruptFileError: a carried tensor missing from the payload.
    """
    enc = shift.encoding or {}
    layout = encoded_layout(shift)
    if name not in layout:
        raise ShiftkitError(f"the compressed shift has no tensor {name!r}")
    name = str((enc.get("aliases") or {}).get(name, name))
    shape, dtype = layout[name]
    if name in (enc.get("raw") or []):
        try:
            return name, shape, dtype, shift.tensors["raw." + name]
        except KeyError:
            raise CorruptFileError(f"compressed shift lacks the stored tensor {name!r}") from None
    return name, shape, dtype, None


def decode_all(shift: Shift, decode: Callable[[Shift, str], Tensor]) -> Shift:
    """The shift a compressed shift encodes, each tensor decoded once by ``decode`` (aliases share it)."""
    aliases = (shift.encoding or {}).get("aliases") or {}
    done: dict[str, Tensor] = {}
    tensors: dict[str, Tensor] = {}
    for name in encoded_layout(shift):
        head = str(aliases.get(name, name))
        if head not in done:
            done[head] = decode(shift, head)
        tensors[name] = done[head]
    return Shift(shift.method, shift.config, tensors, dict(shift.base))
