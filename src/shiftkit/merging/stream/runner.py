"""Streaming checkpoint merge: ``shiftkit merge recipe.yaml OUT`` (tensor by tensor over sharded safetensors).

For every tensor name ``k`` (sorted order) the engine reads ``θ0[k]`` and the T inputs' ``θ_t[k]``, forms
``τ_t = θ_t − θ0`` in float32 (never in a bf16/fp16 base dtype), merges them with the registered merge
function (tensor-local methods) or the method's :class:`~shiftkit.merging.stream.multipass.MultiPass`
(whole-model statistics: statistics passes first, then the apply pass), and writes ``θ0 + τ`` cast to the
output dtype.
Only the T + 1 input tensors of one name and the result are in memory at a time, whatever the model size.

Outputs: a model folder (sharded safetensors + index, ``config.json`` with the output dtype, tokenizer files,
``shiftkit_merge.yaml``), or — when ``OUT`` ends in ``.safetensors`` — the merged τ as a delta shift file
(``sk.load``-able; recipe saved as ``OUT.recipe.yaml``). Writes go to a temp folder/file beside ``OUT`` that
is renamed into place only when complete; any error or Ctrl-C removes it and leaves no ``OUT``.

Key policy: non-floating tensors and tensors only the base has are copied from the base; a
tensor some (not all) models lack raises (``on_missing="error"``), counts as a zero shift (``"zero"``) or is
merged over the models that have it (``"skip"``). A shift file lacking a tensor means "no change" (zero).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError
from shiftkit.merging.registry import MergeSpec
from shiftkit.merging.stream.checkpoints import (
    Checkpoint,
    KeyLayout,
    ShardedWriter,
    ShiftReader,
    align_keys,
    open_checkpoint,
    parse_size,
)
from shiftkit.merging.stream.recipe import ResolvedRecipe, load_recipe

__all__ = ["MergeSummary", "merge_recipe"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "vocab.txt",
    "chat_template.jinja",
)


@dataclass
class MergeSummary:
    """What a streaming merge did (or, with ``dry_run``, would do).

    Attributes:
        method, params: the merge method and its resolved parameters.
        inputs: one row per input (path, kind, tensors, bytes).
        tensors: tensors merged; copied: tensors copied from the base; parameters: elements written.
        passes: statistics passes + 1 apply pass. bytes_written, seconds: output size and wall time.
        outputs: files written (shards, index, config, tokenizer, recipe). dry_run: nothing was written.

    Example:
        >>> s = merge_recipe("recipe.yaml", "out", progress=False)
        >>> s.tensors, s.passes
        (101, 1)
    """

    method: str
    params: dict[str, Any]
    inputs: list[dict[str, Any]]
    tensors: int = 0
    copied: int = 0
    parameters: int = 0
    passes: int = 1
    bytes_written: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain-data copy (JSON-serialisable).

        Example:
            >>> json.dumps(summary.as_dict())  # doctest: +SKIP
        """
        return json.loads(json.dumps(asdict(self), default=str))


def _multipass_for(recipe: ResolvedRecipe, spec: MergeSpec) -> Any:
    """The method's multi-pass computation for these parameters, or None when it is tensor-local."""
    passes = spec.multipass(list(recipe.weights), **recipe.params) if spec.multipass is not None else None
    if passes is not None and recipe.on_missing == "skip":
        raise ShiftkitError("on_missing='skip' is not supported with multi-pass methods; use 'zero'")
    return passes


def _lean_kernel(recipe: ResolvedRecipe, spec: MergeSpec, passes: Any) -> Any:
    """The method's in-place kernel for these parameters (``MergeSpec.kernel``), or None."""
    if passes is not None or recipe.on_missing == "skip" or spec.kernel is None:
        return None
    return spec.kernel(recipe.params)


def _merge_one(
    spec: MergeSpec,
    passes: Any,
    recipe: ResolvedRecipe,
    key: str,
    taus: list[Tensor],
    theta0: Tensor,
    which: list[int],
) -> Tensor:
    if passes is not None:
        return passes.apply(key, taus, list(recipe.weights))
    ts = [taus[i] for i in which] if len(which) < len(taus) else taus
    ws = [recipe.weights[i] for i in which] if len(which) < len(taus) else list(recipe.weights)
    # weight-space methods (slerp, unnormalised linear) need θ0 itself; without a base θ0 = 0
    extra = {"base": {key: theta0}} if spec.takes_base and recipe.base is not None else {}
    merged = spec.fn([{key: t} for t in ts], ws, **recipe.params, **extra)[key]
    _check_finite(key, merged)
    return merged


def _check_finite(key: str, t: Tensor) -> None:
    # one reduction instead of an elementwise mask: NaN/Inf anywhere make the sum non-finite
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ShiftkitError(f"merged tensor {key!r} has NaN or Inf: check the inputs for NaN/Inf")


def _out_dtype(recipe: ResolvedRecipe, ref: Checkpoint, key: str) -> torch.dtype:
    stored = ref.dtype(key)
    if recipe.out_dtype is None or not stored.is_floating_point:
        return stored
    return getattr(torch, recipe.out_dtype)


def _copy_extras(recipe: ResolvedRecipe, ref: Checkpoint, folder: Path, dtype: str | None) -> list[Path]:
    written: list[Path] = []
    if ref.config_path is not None:
        cfg = json.loads(ref.config_path.read_text())
        if dtype is not None:
            keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
            for k in keys:
                cfg[k] = dtype
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        written.append(folder / "config.json")
        gen = ref.path / "generation_config.json"
        if gen.exists():
            shutil.copyfile(gen, folder / gen.name)
            written.append(folder / gen.name)
    src = recipe.tokenizer_source
    if src is not None and src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, folder / name)
                written.append(folder / name)
    return written


def _finalise(tmp: Path, out: Path, force: bool) -> None:
    old: Path | None = None
    if out.exists() or out.is_symlink():
        if not force:
            raise ShiftkitError(f"{out} already exists; pass force=True (--force) to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def merge_recipe(
    recipe: str | os.PathLike[str] | ResolvedRecipe,
    out: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    force: bool = False,
    max_shard_size: str | int | None = None,
) -> MergeSummary:
    """Merge checkpoints tensor by tensor as ``recipe`` says and write ``out`` atomically.

    Args:
        recipe: a YAML recipe path or a :class:`ResolvedRecipe`.
        out: a new model folder, or a ``.safetensors`` path for the merged delta shift file.
        dry_run: validate and describe the merge without reading tensor data or writing anything.
        progress: tqdm bar over tensors × passes.
        device: where the merge math runs (``"cpu"``, ``"cuda"``); reads and writes stay on the CPU.
        force: replace an existing ``out`` (atomically, after success).
        max_shard_size: override the recipe's shard size (``"500MB"``, bytes).

    Returns:
        A :class:`MergeSummary`.

    Raises:
        ShiftkitError: invalid recipe, ``out`` exists without ``force``, a method needing a missing passes.
        ShiftMismatchError: keys or shapes of the inputs disagree (see the module docstring).

    Example:
        >>> s = merge_recipe("examples/merge_ties.yaml", "runs/merged", progress=False)
        >>> model = AutoModelForCausalLM.from_pretrained("runs/merged")
        >>> s.tensors, s.bytes_written
    """
    from shiftkit.merging.registry import get_merge_method

    t0 = time.perf_counter()
    r = recipe if isinstance(recipe, ResolvedRecipe) else load_recipe(recipe)
    out_path = Path(out).absolute()
    as_shift = out_path.suffix == ".safetensors"
    if (out_path.exists() or out_path.is_symlink()) and not force and not dry_run:
        raise ShiftkitError(f"{out_path} already exists; pass force=True (--force) to replace it")
    if max_shard_size is not None:  # the override is what the saved resolved recipe records
        r = replace(r, max_shard_size=parse_size(max_shard_size))
    shard_size = r.max_shard_size
    spec = get_merge_method(r.method)
    passes = _multipass_for(r, spec)
    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(r.base)) if r.base is not None else None
        models = [stack.enter_context(open_checkpoint(p)) for p in r.models]
        if base is None and any(m.is_shift for m in models):
            raise ShiftkitError("shift-file inputs need 'base_model:' (a shift is relative to a base)")
        if base is not None and base.is_shift:
            raise ShiftkitError(f"base_model {base.path} is a shift file; the base must be a model")
        lay = align_keys(base, models, r.on_missing)
        ref = lay.ref
        summary = MergeSummary(
            method=r.method,
            params=dict(r.params),
            inputs=[
                {
                    "role": role,
                    "path": str(c.path),
                    "kind": c.kind,
                    "tensors": len(c.keys()),
                    "bytes": c.nbytes,
                }
                for role, c in ([("base", base)] if base is not None else []) + [("model", m) for m in models]
            ],
            tensors=len(lay.merged),
            copied=0 if as_shift else len(lay.copied),
            passes=(passes.n_passes if passes is not None else 0) + 1,
            dry_run=dry_run,
        )
        keys = sorted(lay.merged) if as_shift else sorted(lay.merged + lay.copied)
        entries = [(k, tuple(ref.shape(k) or ()), _out_dtype(r, ref, k)) for k in keys]
        summary.parameters = sum(int(torch.Size(s).numel()) for _, s, _ in entries)
        if dry_run:
            summary.outputs = _planned_outputs(out_path, entries, shard_size, as_shift)
            summary.seconds = time.perf_counter() - t0
            return summary
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp"))
        try:
            # one intra-op thread on CPU: the work is block-sized elementwise ops and selections, where
            # OpenMP fork/join costs more than a second core gains, and its spin-waits make a merge several
            # times slower on a busy machine (measured: 110 s → 25 s wall for 70M params under load)
            threads = torch.get_num_threads()
            if torch.device(device).type == "cpu":
                torch.set_num_threads(1)
            try:
                written = _run(
                    r, spec, passes, lay, base, models, entries, tmp, shard_size, as_shift, progress, device
                )
            finally:
                torch.set_num_threads(threads)
            summary.bytes_written = sum(p.stat().st_size for p in written)
            if as_shift:
                _finalise(written[0], out_path, force)
                shutil.rmtree(tmp)
                from shiftkit._fileio import atomic_write_text

                side = out_path.with_name(out_path.name.removesuffix(".safetensors") + ".recipe.yaml")
                atomic_write_text(side, r.to_yaml())
                summary.outputs = [str(out_path), str(side)]
            else:
                (tmp / "shiftkit_merge.yaml").write_text(r.to_yaml())
                written.extend(_copy_extras(r, ref, tmp, r.out_dtype))
                os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; a model folder is readable like any other
                _finalise(tmp, out_path, force)
                summary.outputs = sorted(
                    str(out_path / p.name) for p in [*written, tmp / "shiftkit_merge.yaml"]
                )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    summary.seconds = time.perf_counter() - t0
    return summary


#: prefetch the next tensor's inputs only up to this many elements (32 MiB in float32 per input), so the
#: read-ahead overlaps I/O with compute but never doubles the memory of the largest tensors
_PREFETCH_MAX = 1 << 23


def _prefetched(keys: list[str], load: Any, numel: Any) -> Any:
    """Yield ``(key, load(key))`` while a worker thread reads the next key's inputs (I/O releases the GIL)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shiftkit-read")
    try:
        ahead: Future[Any] | None = None
        for i, k in enumerate(keys):
            got = ahead.result() if ahead is not None else load(k)
            ahead = None
            if i + 1 < len(keys) and numel(keys[i + 1]) <= _PREFETCH_MAX:
                ahead = pool.submit(load, keys[i + 1])
            yield k, got
            del got
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _planned_outputs(
    out: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], shard_size: int, as_shift: bool
) -> list[str]:
    if as_shift:
        return [str(out), str(out.with_name(out.name.removesuffix(".safetensors") + ".recipe.yaml"))]
    probe = ShardedWriter(out, entries, shard_size, {})
    names = [p.name for p in probe.files] + (["model.safetensors.index.json"] if len(probe.files) > 1 else [])
    return [str(out / n) for n in [*names, "shiftkit_merge.yaml"]]


def _run(
    r: ResolvedRecipe,
    spec: MergeSpec,
    passes: Any,
    lay: KeyLayout,
    base: Checkpoint | None,
    models: list[Checkpoint],
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    tmp: Path,
    shard_size: int,
    as_shift: bool,
    progress: bool,
    device: str | torch.device,
) -> list[Path]:
    from tqdm.auto import tqdm

    dev = torch.device(device)
    reader = ShiftReader(base, models, dev)
    weights = list(r.weights)
    n_passes = passes.n_passes if passes is not None else 0
    merged = set(lay.merged)
    lean = _lean_kernel(r, spec, passes)

    def _load(k: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> tuple[Tensor, list]:
        if k not in merged:  # copied from the base as it is (cast to the output dtype)
            return lay.ref.read(k, dtype), []
        theta0 = reader.theta0(k, shape)
        return theta0, reader.taus(k, theta0, lay.present[k])

    def _merge_key(k: str, theta0: Tensor, taus: list[Tensor]) -> Tensor:
        if lean is not None:
            res = torch.zeros_like(theta0) if as_shift else theta0
            lean(res, taus, weights, k)
            _check_finite(k, res)
            return res
        tau = _merge_one(spec, passes, r, k, taus, theta0, lay.present[k])
        return tau if as_shift else theta0.add_(tau)

    def _numel(k: str) -> int:
        return int(torch.Size(lay.ref.shape(k) or ()).numel())

    bar = tqdm(
        total=len(lay.merged) * n_passes + len(entries),
        desc=f"merge {r.method}",
        unit="tensor",
        disable=not progress,
        leave=False,
    )
    with torch.no_grad(), bar:
        for p in range(n_passes):
            observed = _prefetched(lay.merged, lambda k: _load(k, tuple(lay.ref.shape(k) or ())), _numel)
            with closing(observed):  # closing: stop the read-ahead thread on errors too
                for k, (_, taus) in observed:
                    passes.observe(p, k, taus, weights)
                    bar.update(1)
            passes.end_pass(p)
        if as_shift:
            from shiftkit._version import __version__
            from shiftkit.core.io import FORMAT_VERSION, META_KEY

            meta = {
                "method": "delta",
                "config": None,
                "format_version": FORMAT_VERSION,
                "shiftkit_version": __version__,
                "base": {k: list(s) for k, s, _ in entries},
            }
            writer = ShardedWriter(
                tmp, entries, 2**62, {META_KEY: json.dumps(meta)}, single_name="merged.safetensors"
            )
        else:
            writer = ShardedWriter(tmp, entries, shard_size, {})
        try:
            shapes = {k: (shape, dtype) for k, shape, dtype in entries}
            items = _prefetched([k for k, _, _ in entries], lambda k: _load(k, *shapes[k]), _numel)
            with closing(items):
                for k, (theta0, taus) in items:
                    if k in merged:
                        writer.write(k, _merge_key(k, theta0, taus).to(device="cpu", dtype=shapes[k][1]))
                    else:
                        writer.write(k, theta0)
                    del theta0, taus  # before the next read: peak memory is one tensor's inputs, not two
                    bar.update(1)
            return writer.finish()
        except BaseException:
            writer.abort()
            raise
