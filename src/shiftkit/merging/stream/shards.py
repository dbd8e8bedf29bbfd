"""Streaming sharded safetensors writer (private; used through :mod:`shiftkit.merging.stream.checkpoints`).

The safetensors layout (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length, a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`` padded with spaces to
a multiple of 8, then each tensor's raw little-endian bytes in header order. Shapes and dtypes are known
before any tensor is computed, so each shard's header is written first and its tensors are appended one by
one: no shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError, ShiftMismatchError

__all__ = ["ST_TO_TORCH", "ShardedWriter", "dtype_name", "parse_size"]

ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the spelling of ``config.json`` and recipes).

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def parse_size(size: str | int) -> int:
    """Parse a shard size: an int (bytes) or ``"500MB"``, ``"2GB"`` (decimal, as HF) or ``"1GiB"``.

    Example:
        >>> parse_size("2GB"), parse_size("1MiB"), parse_size(4096)
        (2000000000, 1048576, 4096)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = m.group(2).upper() if m else "?"
        if m is None or unit not in _SIZE_UNITS:
            raise ShiftkitError(f"bad size {size!r}: use bytes or e.g. '500MB', '2GB', '1GiB'")
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ShiftkitError(f"size must be positive, got {size!r}")
    return value


class ShardedWriter:
    """Stream tensors into ``model.safetensors`` or ``model-0000k-of-0000N.safetensors`` + index.

    The layout (order, shapes, dtypes) is fixed up front; :meth:`write` must then be called once per entry
    in that order with a tensor of the announced shape and dtype.

    Args:
        folder: output folder (must exist).
        entries: ``(name, shape, dtype)`` in write order.
        max_shard_size: bytes per shard; a tensor larger than that gets a shard of its own.
        metadata: ``__metadata__`` strings (``{"format": "pt"}`` is always added).
        single_name: file name when everything fits one shard (``None``: always shard-style names).

    Example:
        >>> w = ShardedWriter(out, [("w", (2, 2), torch.float32)], 2 * 10**9, {})
        >>> w.write("w", torch.zeros(2, 2)); files = w.finish()
    """

    def __init__(
        self,
        folder: Path,
        entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_size: int,
        metadata: dict[str, str],
        single_name: str | None = "model.safetensors",
    ) -> None:
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        used = 0
        for name, shape, dtype in entries:
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * dtype.itemsize
            if shards[-1] and used + nbytes > max_shard_size:
                shards.append([])
                used = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            used += nbytes
        n = len(shards)
        if n == 1 and single_name is not None:
            names = [single_name]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.folder = folder
        self.files = [folder / nm for nm in names]
        self._meta = {"format": "pt", **metadata}
        self._shards = shards
        self._order = [e[0] for s in shards for e in s]
        self._spec = {e[0]: (e[1], e[2]) for s in shards for e in s}
        self._shard_of = {e[0]: i for i, s in enumerate(shards) for e in s}
        self._pos = 0
        self._fh: BinaryIO | None = None
        self._current = -1
        self.bytes_written = 0
        self.total_size = sum(e[3] for s in shards for e in s)

    def _open(self, i: int) -> None:
        self._close_current()
        header: dict[str, Any] = {}
        offset = 0
        for name, shape, dtype, nbytes in self._shards[i]:
            header[name] = {
                "dtype": _TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        header["__metadata__"] = self._meta
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.files[i], "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self.bytes_written += 8 + len(raw)
        self._current = i

    def _close_current(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def write(self, name: str, tensor: Tensor) -> None:
        """Append ``tensor`` (CPU; the announced shape and dtype) as entry ``name``.

        Example:
            >>> w.write("model.norm.weight", torch.ones(512, dtype=torch.bfloat16))
        """
        if self._pos >= len(self._order) or self._order[self._pos] != name:
            expected = self._order[self._pos] if self._pos < len(self._order) else "(none)"
            raise ShiftkitError(f"writer got {name!r} out of order; expected {expected!r}")
        shape, dtype = self._spec[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ShiftMismatchError(
                f"{name}: announced {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        shard = self._shard_of[name]
        if shard != self._current:
            self._open(shard)
        assert self._fh is not None
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._fh.write(t.view(-1).view(torch.uint8).numpy().data)
        self.bytes_written += t.numel() * t.element_size()
        self._pos += 1

    def finish(self) -> list[Path]:
        """Close the last shard, write the index when sharded, and return the written files.

        Example:
            >>> files = w.finish()
        """
        if self._pos != len(self._order):
            raise ShiftkitError(f"writer finished after {self._pos} of {len(self._order)} tensors")
        if not self._order:  # an empty checkpoint still gets a valid (empty) file
            self._open(0)
        self._close_current()
        written = list(self.files)
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.files[i].name for name, i in self._shard_of.items()},
            }
            path = self.folder / "model.safetensors.index.json"
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            path.write_text(text)
            self.bytes_written += len(text.encode())
            written.append(path)
        return written

    def abort(self) -> None:
        """Close any open file without finishing (the caller removes the temp folder).

        Example:
            >>> w.abort(); shutil.rmtree(tmp)
        """
        if self._fh is not None:
            self._fh.close()
            self._fh = None
