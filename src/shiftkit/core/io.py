"""One self-describing ``.safetensors`` file per shift; atomic writes; never pickle.

Layout: tensors keyed as in :class:`~shiftkit.core.shift.Shift`, and one metadata entry ``"shiftkit"``
holding JSON ``{"method", "config", "format_version", "shiftkit_version", "base": {name: shape}}``, plus
``"aliases": {name: stored name}`` when the shift holds one tensor under several names (a task vector of a
model with tied weights): the tensor is stored once and every name gets it back on load. A compressed
shift (``sk.compress``) adds ``"encoding"`` (see :class:`~shiftkit.core.shift.Shift`) and stores its encoded
payload as the tensors, so the file is as small as the encoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

from shiftkit._fileio import atomic_write_bytes
from shiftkit.core.config import config_to_dict
from shiftkit.core.encoding import COMPRESS_METHODS, encoded_layout
from shiftkit.core.registry import config_from_dict
from shiftkit.core.shift import DELTA, Shift, split_key
from shiftkit.errors import CorruptFileError, ShiftkitError

__all__ = ["FORMAT_VERSION", "atomic_save_tensors", "file_size", "load", "read_metadata", "save"]

FORMAT_VERSION = 1
META_KEY = "shiftkit"


def _version() -> str:
    from shiftkit._version import __version__

    return __version__


def _clean(tensors: dict[str, Any]) -> dict[str, Any]:
    """CPU, contiguous, unshared tensors (safetensors refuses shared storage): duplicates are cloned."""
    seen: set[tuple[int, int]] = set()
    clean = {}
    for k, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if (
            key in seen
            or not t.is_contiguous()
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        ):
            t = t.contiguous().clone()
        seen.add(key)
        clean[k] = t
    return clean


def atomic_save_tensors(
    tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str]
) -> None:
    """Write a safetensors file atomically: a temp file in the same folder, fsync, then rename.

    An interrupted write leaves any previous file at ``path`` intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # serialise in memory and write our own temp file (safetensors' save_file would leave an anonymous
    # temp file of its own behind if the process is killed mid-write)
    atomic_write_bytes(target, serialize(_clean(tensors), metadata=metadata))


def _file_parts(shift: Shift) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and metadata of ``shift``'s file."""
    if not isinstance(shift, Shift):
        raise ShiftkitError(f"sk.save expects a Shift, got {type(shift).__name__}")
    meta = {
        "method": shift.method,
        "config": None if shift.config is None else config_to_dict(shift.config),
        "format_version": FORMAT_VERSION,
        "shiftkit_version": _version(),
        "base": {k: list(v) for k, v in shift.base.items()},
    }
    if shift.encoding is not None:
        meta["encoding"] = shift.encoding
    aliases = shift.aliases()
    if aliases:
        meta["aliases"] = aliases
    tensors = {k: t for k, t in shift.tensors.items() if k not in aliases}
    return tensors, {META_KEY: json.dumps(meta, separators=(",", ":"))}


def save(shift: Shift, path: str | os.PathLike[str]) -> None:
    """Save ``shift`` as one safetensors file (config JSON in the metadata), atomically.

    Example:
        >>> sk.save(sk.extract(model), "lora.safetensors")
    """
    tensors, metadata = _file_parts(shift)
    atomic_save_tensors(tensors, path, metadata)


def file_size(shift: Shift) -> int:
    """The bytes :func:`save` would write for ``shift`` (serialised in memory; nothing touches the disk).

    Example:
        >>> file_size(sk.compress(tv, method="compeft", density=0.1))
        1642642
    """
    tensors, metadata = _file_parts(shift)
    return len(serialize(_clean(tensors), metadata=metadata))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``shiftkit`` metadata of a shift file, without loading its tensors.

    Raises:
        CorruptFileError: truncated or corrupt file, or a safetensors file that shiftkit did not write.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no shift file at {p}")
    if p.is_dir():
        raise CorruptFileError(f"{p} is a folder, not a shift file (a PEFT adapter? use sk.import_peft)")
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptFileError(f"{p} is not a readable safetensors file ({err})") from None
    if raw is None:
        raise CorruptFileError(
            f"{p} is a safetensors file without shiftkit metadata: not a shift file "
            "(a Hugging Face PEFT adapter folder is read with sk.import_peft)"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{p}: shiftkit metadata is not valid JSON ({err})") from None
    missing = {"method", "config", "format_version", "base"} - set(meta) if isinstance(meta, dict) else {"*"}
    if missing:
        raise CorruptFileError(f"{p}: shiftkit metadata lacks {sorted(missing)}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise CorruptFileError(
            f"{p}: format_version {meta['format_version']!r} is newer than this shiftkit reads "
            f"({FORMAT_VERSION}); upgrade shiftkit"
        )
    return meta


def load(path: str | os.PathLike[str]) -> Shift:
    """Load a shift file written by :func:`save`.

    Raises:
        CorruptFileError: truncated, corrupt or foreign file, or tensors that disagree with the metadata.
        UnknownMethodError: the file's method is not registered in this shiftkit.

    Example:
        >>> shift = sk.load("lora.safetensors")
        >>> sk.attach_(fresh_model, shift)
    """
    meta = read_metadata(path)
    try:
        config = None if meta["config"] is None else config_from_dict(meta["config"])
        base = {str(k): tuple(int(s) for s in v) for k, v in dict(meta["base"]).items()}
    except CorruptFileError:
        raise
    except ShiftkitError as err:
        if type(err) is ShiftkitError:
            raise CorruptFileError(f"{path}: {err}") from None
        raise
    except (TypeError, ValueError, AttributeError) as err:
        raise CorruptFileError(f"{path}: malformed shiftkit metadata ({err})") from None
    method = str(meta["method"])
    if method != DELTA and config is None:
        raise CorruptFileError(f"{path}: method {method!r} needs a config, the file has none")
    if config is not None and type(config).method != method:
        raise CorruptFileError(
            f"{path}: the file says method {method!r} but holds a {type(config).method!r} config"
        )
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptFileError(f"{path}: cannot read tensors ({err})") from None
    aliases = meta.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise CorruptFileError(f"{path}: 'aliases' must map names to stored names")
    for alias, stored in aliases.items():
        if stored not in tensors or alias in tensors:
            raise CorruptFileError(f"{path}: alias {alias!r} of {stored!r} does not fit the stored tensors")
        tensors[str(alias)] = tensors[stored]
    encoding = meta.get("encoding")
    if encoding is not None:
        if not isinstance(encoding, dict) or not isinstance(encoding.get("method"), str):
            raise CorruptFileError(f"{path}: 'encoding' must be an object naming its compressor")
        COMPRESS_METHODS.get(encoding["method"])  # UnknownMethodError names the known compressors
        shift = Shift(method, config, tensors, base, encoding)
        encoded_layout(shift)  # CorruptFileError for a garbled tensor table
        return shift
    if method != DELTA:
        for key in tensors:
            try:
                split_key(key, base)
            except ShiftkitError:
                raise CorruptFileError(f"{path}: tensor {key!r} belongs to no module in 'base'") from None
    return Shift(method, config, tensors, base)
