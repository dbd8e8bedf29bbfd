"""Lazy checkpoint readers and a streaming sharded safetensors writer for ``shiftkit merge``.

Inputs (:func:`open_checkpoint`): a Hugging Face model folder (``config.json`` + ``model.safetensors``, or
``model-0000k-of-0000N.safetensors`` shards + ``model.safetensors.index.json``), a single ``.safetensors``
file, or a shiftkit shift file (``method="delta"``: the tensors are τ; ``method="lora"``: τ = ΔW per weight).
Pickle checkpoints (``.bin``, ``.pt``) are refused: loading them can run arbitrary code.

Tensors are read one at a time with ``os.preadv`` straight into a fresh tensor, from the offsets in the
safetensors header, instead of through a memory map: mapped pages of every input shard would stay resident
and count in the process's RSS, while a positional read keeps memory at the tensors in flight.

The writer (:class:`ShardedWriter`, in ``_shards.py``) streams the safetensors layout shard by shard, so no
shard is ever held in memory. :func:`align_keys` and :class:`ShiftReader` apply the key policy
(``on_missing=``) and form the float32 shifts ``τ_t = θ_t − θ0`` of one tensor at a time (never in a bf16/fp16
base dtype).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shiftkit.core.encoding import decoded, decoded_tensor, encoded_layout
from shiftkit.core.registry import get_method
from shiftkit.errors import CorruptFileError, ShiftkitError, ShiftMismatchError, TiedWeightsError
from shiftkit.merging.stream.shards import ST_TO_TORCH, ShardedWriter, dtype_name, parse_size

__all__ = [
    "Checkpoint",
    "KeyLayout",
    "ShardedWriter",
    "ShiftReader",
    "TensorInfo",
    "align_keys",
    "dtype_name",
    "open_checkpoint",
    "parse_size",
    "read_safetensors_header",
]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, byte count, shape and dtype.

    Example:
        >>> info = read_safetensors_header(Path("model.safetensors"))[0]["model.norm.weight"]
        >>> info.shape, info.dtype
        ((512,), torch.float32)
    """

    file: Path
    start: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header without reading any tensor data.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``({name: TensorInfo}, metadata)``.

    Raises:
        CorruptFileError: truncated file, bad JSON, unknown dtype or offsets outside the file.

    Example:
        >>> infos, meta = read_safetensors_header(Path("model.safetensors"))
        >>> infos["lm_head.weight"].shape
        (32000, 512)
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or n + 8 > size:
            raise CorruptFileError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptFileError(f"{path}: safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = ST_TO_TORCH[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(f"{path}: bad header entry for {name!r} ({err!r})") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0 or 8 + n + end > size:
            raise CorruptFileError(f"{path}: tensor {name!r} has offsets outside the file or a wrong size")
        infos[name] = TensorInfo(path, 8 + n + begin, end - begin, shape, dtype)
    return infos, {str(k): str(v) for k, v in dict(meta).items()}


class Checkpoint:
    """A lazily read model (θ) or shift (τ): tensor names, shapes and dtypes, and :meth:`read`.

    Attributes:
        path: the folder or file.
        kind: ``"hf-folder"``, ``"safetensors"``, ``"shift:delta"`` or ``"shift:<method>"`` (a shift whose
            method defines its weight changes alone, such as LoRA: read through the method's dense hook).
        is_shift: True when the tensors are shifts τ rather than weights θ.

    Example:
        >>> with open_checkpoint("runs/ft1") as ck:
        ...     w = ck.read("model.embed_tokens.weight", torch.float32)
    """

    def __init__(
        self, path: Path, kind: str, infos: dict[str, TensorInfo], shift: Any = None, encoded: Any = None
    ) -> None:
        self.path = path
        # a compressed delta (sk.compress): its tensors decode one at a time as they are read
        self._encoded = encoded
        self._layout = {} if encoded is None else encoded_layout(encoded)
        self.kind = kind
        self.is_shift = kind.startswith("shift:")
        self.infos = infos
        self.config_path = path / "config.json" if path.is_dir() and (path / "config.json").exists() else None
        self._shift = shift  # a factored shift: its ΔW per weight comes from the method's dense hook
        self._dense = None if shift is None else get_method(shift.method).dense
        self._dense_keys: list[str] = [] if self._dense is None else list(self._dense.names(shift))
        self._fds: dict[Path, int] = {}
        self._keyset = set(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._keyset

    def keys(self) -> list[str]:
        """Tensor names (for a factored shift such as LoRA: the weights it changes).

        Example:
            >>> "lm_head.weight" in ck.keys()
            True
        """
        if self._encoded is not None:
            return list(self._layout)
        return list(self._dense_keys) if self._dense is not None else list(self.infos)

    def shape(self, key: str) -> tuple[int, ...] | None:
        """Shape of ``key`` (``None`` for factored shifts: known only once ΔW is computed).

        Example:
            >>> ck.shape("model.norm.weight")
            (512,)
        """
        if key in self._layout:
            return self._layout[key][0]
        return self.infos[key].shape if key in self.infos else None

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key`` (float32 for the ΔW of a factored shift).

        Example:
            >>> ck.dtype("model.norm.weight")
            torch.bfloat16
        """
        if key in self._layout:
            return self._layout[key][1]
        return self.infos[key].dtype if key in self.infos else torch.float32

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (stored size).

        Example:
            >>> ck.nbytes
            281067520
        """
        if self._encoded is not None:
            return int(self._encoded.nbytes)
        return sum(i.nbytes for i in self.infos.values())

    def read(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """Read tensor ``key`` into a fresh CPU tensor, converted to ``dtype`` if given.

        Example:
            >>> ck.read("lm_head.weight", torch.float32).shape
            torch.Size([32000, 512])
        """
        if self._encoded is not None:
            t = decoded_tensor(self._encoded, key)
            return t.to(dtype) if dtype is not None else t
        if self._dense is not None:
            t = self._dense.tensor(self._shift, key)
            return t.to(dtype) if dtype is not None else t
        info = self.infos[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        self._pread(key, out, info.start, info.nbytes)
        return out if dtype is None or dtype == info.dtype else out.to(dtype)

    def can_read_rows(self, key: str) -> bool:
        """Whether :meth:`read_rows` can read part of ``key`` (a stored tensor, not a factored shift's ΔW)."""
        return self._dense is None and key in self.infos and len(self.infos[key].shape) >= 1

    def read_rows(self, key: str, start: int, stop: int, dtype: torch.dtype | None = None) -> Tensor:
        """Rows ``start:stop`` (first dimension) of tensor ``key`` into a fresh CPU tensor.

        The largest tensors (embeddings, heads) are merged in row blocks this way, so the base's copy of
        them is never held whole next to the models' (see :mod:`~shiftkit.merging.stream.runner`).

        Example:
            >>> ck.read_rows("lm_head.weight", 0, 1024, torch.float32).shape
            torch.Size([1024, 512])
        """
        if not self.can_read_rows(key):
            raise ShiftkitError(f"{self.path}: {key!r} cannot be read in row blocks")
        info = self.infos[key]
        rows = info.shape[0]
        if not 0 <= start <= stop <= rows:
            raise ShiftkitError(f"{self.path}: rows {start}:{stop} of {key!r} are outside 0:{rows}")
        row_bytes = info.nbytes // rows if rows else 0
        out = torch.empty((stop - start, *info.shape[1:]), dtype=info.dtype)
        self._pread(key, out, info.start + start * row_bytes, (stop - start) * row_bytes)
        return out if dtype is None or dtype == info.dtype else out.to(dtype)

    def _pread(self, key: str, out: Tensor, offset: int, nbytes: int) -> None:
        if not nbytes:
            return
        info = self.infos[key]
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        view = out.view(-1).view(torch.uint8).numpy().data
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CorruptFileError(f"{info.file}: truncated while reading {key!r}")
            done += got

    def close(self) -> None:
        """Close the open file descriptors (safe to call twice).

        Example:
            >>> ck.close()
        """
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.kind}, {len(self.keys())} tensors)"


def _open_folder(path: Path) -> Checkpoint:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(f"{index}: not a safetensors index ({err!r})") from None
        infos: dict[str, TensorInfo] = {}
        for fname in sorted(set(weight_map.values())):
            shard = path / fname
            if not shard.exists():
                raise CorruptFileError(f"{index} names shard {fname!r}, which is missing")
            infos.update(read_safetensors_header(shard)[0])
        missing = sorted(set(weight_map) - set(infos))
        if missing:
            raise CorruptFileError(f"{index} lists tensors no shard holds: {missing[:5]}")
        return Checkpoint(path, "hf-folder", infos)
    if (path / "model.safetensors").exists():
        return Checkpoint(path, "hf-folder", read_safetensors_header(path / "model.safetensors")[0])
    if (path / "adapter_config.json").exists():
        raise ShiftkitError(
            f"{path} is a PEFT adapter folder: import it with sk.import_peft and sk.save it as a shift file"
        )
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ShiftkitError(
            f"{path} holds only pickle weights {pickles[:3]}; shiftkit never unpickles (it can run code): "
            "convert them to safetensors (model.save_pretrained(dir, safe_serialization=True))"
        )
    raise ShiftkitError(f"{path} has no model.safetensors or model.safetensors.index.json")


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a model folder, a ``.safetensors`` file or a shift file for lazy reading.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ShiftkitError: a pickle checkpoint, a PEFT folder, or a shift of a method other than delta/lora.
        CorruptFileError: unreadable headers or index.

    Example:
        >>> ck = open_checkpoint("models/llama-ft")
        >>> len(ck.keys()), ck.kind
        (101, 'hf-folder')
    """
    p = Path(path)
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise ShiftkitError("shiftkit merge needs a little-endian machine")
    if not p.exists():
        raise FileNotFoundError(f"no model folder or file at {p} (shiftkit merge reads local paths only)")
    if p.is_dir():
        return _open_folder(p)
    if p.suffix in _PICKLE_SUFFIXES:
        raise ShiftkitError(
            f"{p} is a pickle checkpoint; shiftkit never unpickles: convert it to safetensors"
        )
    infos, meta = read_safetensors_header(p)
    if "shiftkit" not in meta:
        return Checkpoint(p, "safetensors", infos)
    from shiftkit.core.io import load, read_metadata

    meta = read_metadata(p)
    method = str(meta["method"])
    shift = None
    if meta.get("encoding") is not None:  # a compressed shift: decoded tensor by tensor as it is read
        shift = load(p)
        if method == "delta":
            return Checkpoint(p, "shift:delta", {}, encoded=shift)
        shift = decoded(shift)
    if method == "delta":
        return Checkpoint(p, "shift:delta", infos)
    if get_method(method).dense is not None:
        return Checkpoint(p, f"shift:{method}", {}, shift=load(p) if shift is None else shift)
    raise ShiftkitError(
        f"{p} is a {method!r} shift, whose weight changes need the base weights; merge reads deltas and "
        "shifts that define their changes alone (LoRA): attach it and save sk.to_delta(model) first"
    )


@dataclass
class KeyLayout:
    """Which tensors get merged and which are copied from the base (``on_missing``), from :func:`align_keys`.

    Example:
        >>> lay = align_keys(base, models, "error")
        >>> lay.merged[:1], lay.copied
        (['lm_head.weight'], [])
    """

    merged: list[str]  # floating keys that get a merged shift, sorted
    copied: list[str]  # keys taken from the base as they are (cast if floating)
    present: dict[str, list[int]]  # key -> indices of the models that take part (on_missing="skip")
    ref: Checkpoint  # the checkpoint whose shapes/dtypes define the output


def _refuse_untying(ref: Checkpoint, extra: dict[str, list[str]]) -> None:
    """A model tensor the base lacks because the base ties it (``tie_word_embeddings``): say so."""
    config = ref.path / "config.json" if ref.kind == "hf-folder" else None
    try:
        tied = config is not None and bool(json.loads(config.read_text()).get("tie_word_embeddings"))
    except (OSError, ValueError):
        tied = False
    if not tied:
        return
    names = sorted(extra)[:3]
    raise TiedWeightsError(
        f"{names} are not tensors of their own in the base: it ties its output head to its input embedding "
        f"(tie_word_embeddings: true in {config}) and stores them once. A model or shift that changes the "
        "head apart from the embedding unties them, which a streaming merge does not do: load the base, "
        "sk.attach_ the shift, sk.fold_(model, untie=True) and save_pretrained the result"
    )


#: tensors with one row per token: with a ``tokenizer_source`` their row counts may differ between inputs
VOCAB_TENSOR = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|lm_head|embed_out|output)\.weight$")


def align_keys(
    base: Checkpoint | None, models: list[Checkpoint], on_missing: str, vocab_rows: bool = False
) -> KeyLayout:
    """Align the inputs' tensor names: merged keys, keys copied from the base, participating models per key.

    Non-floating tensors and tensors only the base has are copied. A floating tensor some (not all) models
    lack raises with ``on_missing="error"``; a shift file lacking one means "no change" (a zero shift).
    With ``vocab_rows`` (a recipe with a ``tokenizer_source``) the embedding and head matrices
    (:data:`VOCAB_TENSOR`) may have different row counts: their rows are mapped by token later.

    Raises:
        ShiftMismatchError: a model has a tensor the base lacks, a shape differs, or (``"error"``) a tensor
            is missing from some models.

    Example:
        >>> lay = align_keys(open_checkpoint("base"), [open_checkpoint("ft")], "error")
        >>> len(lay.merged), len(lay.copied)
        (75, 0)
    """
    ref = base if base is not None else models[0]
    ref_keys = set(ref.keys())
    floating = {k for k in ref_keys if ref.dtype(k).is_floating_point}
    extra: dict[str, list[str]] = {}
    present: dict[str, list[int]] = {}
    problems: list[str] = []
    for i, ck in enumerate(models):
        keys = {k for k in ck.keys() if ck.dtype(k).is_floating_point}
        for k in sorted(keys - floating):
            extra.setdefault(k, []).append(str(ck.path))
        for k in keys & floating:
            present.setdefault(k, []).append(i)
            s, rs = ck.shape(k), ref.shape(k)
            if vocab_rows and s is not None and rs is not None and VOCAB_TENSOR.search(k):
                s, rs = s[1:], rs[1:]
            if s is not None and s != rs:
                problems.append(f"{k}: {ck.path.name} {s} vs base {rs}")
    if extra:
        _refuse_untying(ref, extra)
        sample = {k: v for k, v in list(extra.items())[:5]}
        raise ShiftMismatchError(
            f"{len(extra)} tensor(s) are in models but not in the base (or are not floating there): {sample}"
        )
    if problems:
        raise ShiftMismatchError(f"tensor shapes differ from the base: {'; '.join(problems[:5])}")
    n = len(models)
    partial = {
        k: sorted(str(models[i].path) for i in set(range(n)) - set(v))
        for k, v in present.items()
        if len(v) < n and not all(models[i].is_shift for i in set(range(n)) - set(v))
    }
    if partial and on_missing == "error":
        sample = {k: v for k, v in sorted(partial.items())[:5]}
        raise ShiftMismatchError(
            f"{len(partial)} tensor(s) are missing from some models (model paths lacking them): {sample}; "
            "set 'shiftkit: {on_missing: zero}' (missing = no change) or 'skip' (merge those that have it)"
        )
    merged = sorted(present)
    copied = sorted(ref_keys - set(merged))
    if on_missing != "skip":
        present = {k: list(range(n)) for k in merged}
    return KeyLayout(merged, copied, present, ref)


class ShiftReader:
    """Reads the float32 ``θ0[key]`` and ``τ_t[key] = θ_t[key] − θ0[key]`` of one tensor on ``device``.

    Example:
        >>> rd = ShiftReader(base, models, torch.device("cpu"))
        >>> theta0 = rd.theta0("lm_head.weight", (32000, 512))
        >>> taus = rd.taus("lm_head.weight", theta0, [0, 1, 2])
    """

    def __init__(self, base: Checkpoint | None, models: list[Checkpoint], device: torch.device) -> None:
        self.base, self.models, self.device = base, models, device

    def theta0(self, key: str, shape: tuple[int, ...]) -> Tensor:
        """θ0[key] in float32 (zeros without a base: baseless linear averages weights).

        Example:
            >>> rd.theta0("model.norm.weight", (512,)).dtype
            torch.float32
        """
        if self.base is None:  # baseless linear: θ0 = 0, so τ_t = θ_t
            return torch.zeros(shape, dtype=torch.float32, device=self.device)
        return self.base.read(key, torch.float32).to(self.device)

    def taus(self, key: str, theta0: Tensor, which: list[int]) -> list[Tensor]:
        """Fresh float32 τ_t for every model (zeros for models not in ``which`` or lacking ``key``).

        Raises:
            ShiftkitError: an input tensor has NaN or Inf.

        Example:
            >>> len(rd.taus("model.norm.weight", theta0, [0, 1, 2]))
            3
        """
        out: list[Tensor] = []
        for i in range(len(self.models)):
            ck = self.models[i]
            if i not in which or key not in ck:
                out.append(torch.zeros_like(theta0))
            elif self.base is not None and ck.path == self.base.path:
                out.append(torch.zeros_like(theta0))
            elif ck.is_shift:
                tau = ck.read(key, torch.float32).to(self.device)
                if tuple(tau.shape) != tuple(theta0.shape):
                    raise ShiftMismatchError(
                        f"{ck.path}: {key} has shape {tuple(tau.shape)}, base {theta0.shape}"
                    )
                out.append(tau)
            else:
                out.append(ck.read(key, torch.float32).to(self.device).sub_(theta0))
            # one reduction per tensor (not an elementwise mask): NaN/Inf make the sum non-finite
            if not bool(torch.isfinite(out[-1].sum())) and not bool(torch.isfinite(out[-1]).all()):
                raise ShiftkitError(f"{ck.path}: tensor {key!r} (or the base's) has NaN or Inf")
        return out
