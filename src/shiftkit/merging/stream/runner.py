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
from collections import Counter
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.registry import MergeSpec
from shiftkit.merging.stream.checkpoints import Checkpoint, ShardedWriter, open_checkpoint, parse_size
from shiftkit.merging.stream.kernels import owns_pool, parallel_in
from shiftkit.merging.stream.plan import Job
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
    if spec.multipass is None:
        return None
    passes = spec.multipass(list(recipe.weights), **recipe.params)
    if passes is None:
        return None
    if recipe.sliced or not recipe.constant:
        raise ShiftkitError(
            f"{spec.name!r} with these parameters needs whole-model statistics, which 'slices:', gradients "
            "and filters do not have: give every parameter one value and list whole models"
        )
    if recipe.on_missing == "skip":
        raise ShiftkitError("on_missing='skip' is not supported with multi-pass methods; use 'zero'")
    return passes


class _Kernels:
    """The method's in-place kernel per distinct parameter set (``MergeSpec.kernel``), or None."""

    def __init__(self, recipe: ResolvedRecipe, spec: MergeSpec, passes: Any) -> None:
        self.spec = spec
        self.off = passes is not None or recipe.on_missing == "skip" or spec.kernel is None
        self.cache: dict[str, Any] = {}

    def get(self, params: dict[str, Any]) -> Any:
        # one value per input is the kernels' business only for the spec's per-input parameters
        if self.off or any(isinstance(v, list) and k not in self.spec.per_input for k, v in params.items()):
            return None
        key = repr(sorted(params.items()))
        if key not in self.cache:
            assert self.spec.kernel is not None
            self.cache[key] = self.spec.kernel(params)
        return self.cache[key]


def _merge_one(
    spec: MergeSpec,
    passes: Any,
    job: Job,
    taus: list[Tensor],
    theta0: Tensor,
    weights: list[float],
    params: dict[str, Any],
) -> Tensor:
    key = job.out
    if passes is not None:
        return passes.apply(key, taus, list(weights))
    which = job.present
    ts = [taus[i] for i in which] if which is not None else taus
    ws = [weights[i] for i in which] if which is not None else list(weights)
    if which is not None:
        params = {k: [v[i] for i in which] if isinstance(v, list) else v for k, v in params.items()}
    # weight-space methods (slerp, unnormalised linear) need θ0 itself; without a base θ0 = 0
    extra = {"base": {key: theta0}} if spec.takes_base and job.base is not None else {}
    merged = spec.fn([{key: t} for t in ts], ws, **params, **extra)[key]
    _check_finite(key, merged)
    return merged


def _check_finite(key: str, t: Tensor) -> None:
    # one reduction instead of an elementwise mask: NaN/Inf anywhere make the sum non-finite
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ShiftkitError(f"merged tensor {key!r} has NaN or Inf: check the inputs for NaN/Inf")


def _check_input(ck: Checkpoint, name: str, tau: Tensor) -> None:
    # one reduction per tensor (not an elementwise mask): NaN/Inf make the sum non-finite
    if not bool(torch.isfinite(tau.sum())) and not bool(torch.isfinite(tau).all()):
        raise ShiftkitError(f"{ck.path}: tensor {name!r} (or the base's) has NaN or Inf")


def _out_dtype(recipe: ResolvedRecipe, ref: Checkpoint, key: str) -> torch.dtype:
    stored = ref.dtype(key)
    if not stored.is_floating_point:
        return stored
    if recipe.out_dtype is None:
        return stored if recipe.compute_dtype == "float32" else getattr(torch, recipe.compute_dtype)
    return getattr(torch, recipe.out_dtype)


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _out_config(
    cfg: dict[str, Any], n_layers: int | None, origin: list[tuple[int, int]] | None, sources: list[Checkpoint]
) -> dict[str, Any]:
    """The donor's config with the output's layer count (``slices:`` recipes) and per-layer lists."""
    if n_layers is None or origin is None:
        return cfg
    keys = [k for k in _LAYER_KEYS if k in cfg] or ["num_hidden_layers"]
    old = cfg.get(keys[0])
    for k in keys:
        cfg[k] = n_layers
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and old is not None and len(layer_types) == old:
        # per-layer attributes follow their source layer (each source's own config when it has them)
        out = []
        for ck_i, layer in origin:
            src = sources[ck_i]
            types = layer_types
            if src.config_path is not None:
                types = json.loads(src.config_path.read_text()).get("layer_types", layer_types)
            out.append(types[layer] if layer < len(types) else layer_types[-1])
        cfg["layer_types"] = out
    return cfg


def _donor(recipe: ResolvedRecipe, cks: list[Checkpoint], index: dict[Path, int]) -> Checkpoint:
    """The checkpoint whose config and side files the output takes: the base, else the first input."""
    if recipe.base is not None:
        return cks[index[recipe.base]]
    return cks[index[recipe.slices[0].inputs[0].model]]


def _copy_extras(
    recipe: ResolvedRecipe,
    donor: Checkpoint,
    folder: Path,
    dtype: str | None,
    layers: tuple[int | None, list[tuple[int, int]] | None],
    cks: list[Checkpoint],
    vocab_size: int | None = None,
) -> list[Path]:
    written: list[Path] = []
    if donor.config_path is not None:
        cfg = json.loads(donor.config_path.read_text())
        if dtype is not None:
            keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
            for k in keys:
                cfg[k] = dtype
        cfg = _out_config(cfg, layers[0], layers[1], cks)
        if vocab_size is not None:
            text_cfg = cfg.get("text_config") if "vocab_size" not in cfg else None
            (text_cfg if isinstance(text_cfg, dict) else cfg)["vocab_size"] = vocab_size
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        written.append(folder / "config.json")
        gen = donor.path / "generation_config.json"
        if gen.exists():
            shutil.copyfile(gen, folder / gen.name)
            written.append(folder / gen.name)
    return written


def _copy_tokenizer(recipe: ResolvedRecipe, donor: Checkpoint, folder: Path) -> list[Path]:
    """Tokenizer files copied as they are: the donor's (the base, else the first input) or a named model's."""
    src_ref = recipe.tokenizer_source
    src = donor.path if src_ref in (None, "base", "union") else src_ref
    written: list[Path] = []
    if isinstance(src, Path) and src.is_dir():
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
    from shiftkit.merging.stream.plan import plan_merge
    from shiftkit.merging.stream.vocab import VocabMap, build_vocab

    t0 = time.perf_counter()
    r = recipe if isinstance(recipe, ResolvedRecipe) else load_recipe(recipe)
    out_path = Path(out).absolute()
    as_shift = out_path.suffix == ".safetensors"
    if as_shift and r.sliced:
        raise ShiftkitError("a 'slices:' recipe builds a model with its own layers: write it to a folder")
    if (out_path.exists() or out_path.is_symlink()) and not force and not dry_run:
        raise ShiftkitError(f"{out_path} already exists; pass force=True (--force) to replace it")
    if max_shard_size is not None:  # the override is what the saved resolved recipe records
        r = replace(r, max_shard_size=parse_size(max_shard_size))
    shard_size = r.max_shard_size
    spec = get_merge_method(r.method)
    passes = _multipass_for(r, spec)
    paths = list(dict.fromkeys([*([r.base] if r.base is not None else []), *_all_paths(r)]))
    with ExitStack() as stack:
        cks = [stack.enter_context(open_checkpoint(p)) for p in paths]
        index = {p: i for i, p in enumerate(paths)}
        base = cks[index[r.base]] if r.base is not None else None
        models = [cks[index[p]] for p in r.models]
        if base is None and any(m.is_shift for m in models):
            raise ShiftkitError("shift-file inputs need 'base_model:' (a shift is relative to a base)")
        if base is not None and base.is_shift:
            raise ShiftkitError(f"base_model {base.path} is a shift file; the base must be a model")
        jobs, origin = plan_merge(r, cks, index)
        vocab: VocabMap | None = None
        if not as_shift and r.tokenizer_source is not None:
            vocab = build_vocab(r, cks, index, jobs)
        merged_jobs = [j for j in jobs if not j.copy]
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
                for role, c in ([("base", base)] if base is not None else [])
                + [("model", cks[index[p]]) for p in paths if p != r.base]
            ],
            tensors=len(merged_jobs),
            copied=0 if as_shift else len(jobs) - len(merged_jobs),
            passes=(passes.n_passes if passes is not None else 0) + 1,
            dry_run=dry_run,
        )
        todo = merged_jobs if as_shift else jobs
        if as_shift:
            todo = sorted(todo, key=lambda j: j.out)
        entries = [
            (
                j.out,
                vocab.shape(j) if vocab is not None else tuple(cks[j.ref[0]].shape(j.ref[1]) or ()),
                _out_dtype(r, cks[j.ref[0]], j.ref[1]),
            )
            for j in todo
        ]
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
                    r,
                    spec,
                    passes,
                    cks,
                    todo,
                    entries,
                    tmp,
                    shard_size,
                    as_shift,
                    progress,
                    device,
                    vocab,
                    workers=threads if torch.device(device).type == "cpu" else 1,
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
                donor = _donor(r, cks, index)
                n_layers = None if origin is None else len(origin)
                size = None if vocab is None else vocab.size
                written.extend(_copy_extras(r, donor, tmp, r.out_dtype, (n_layers, origin), cks, size))
                if vocab is not None:
                    written.extend(vocab.save_tokenizer(tmp))
                else:
                    written.extend(_copy_tokenizer(r, donor, tmp))
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


def _all_paths(r: ResolvedRecipe) -> list[Path]:
    out: list[Path] = []
    for sl in r.slices:
        if sl.base is not None:
            out.append(sl.base.model)
        out.extend(i.model for i in sl.inputs)
    return out


#: prefetch the next tensor's inputs only up to this many elements (32 MiB in float32 per input), so the
#: read-ahead overlaps I/O with compute but never doubles the memory of the largest tensors
_PREFETCH_MAX = 1 << 23
#: elements per row block where the largest tensors are merged with the base read in row blocks
_ROW_BLOCK = 1 << 20


def _prefetched(keys: list[Any], load: Any, numel: Any) -> Any:
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


def _in_order(jobs: list[Any], produce: Any, numel: Any, workers: int) -> Any:
    """Yield ``(job, produce(job))`` in order, small jobs computed ``workers`` at a time.

    Each worker thread runs one tensor's read and merge (torch releases the GIL in its operations, and the
    merge runs with one intra-op thread: see :func:`merge_recipe`), so two cores merge two tensors at once.
    Jobs in flight hold at most ``_PREFETCH_MAX`` elements together; a larger job runs alone, after the
    earlier ones (the memory bound of a one-tensor read-ahead), its kernel splitting its work over the
    idle pool (:func:`~shiftkit.merging.stream.kernels.parallel_in`).
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    if workers <= 1:
        yield from _prefetched(jobs, produce, numel)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shiftkit-merge")
    pending: deque[tuple[Any, Future[Any], int]] = deque()
    in_flight = 0
    try:
        for job in jobs:
            size = int(numel(job))
            big = size > _PREFETCH_MAX
            while pending and (big or len(pending) > workers or in_flight + size > _PREFETCH_MAX):
                j, f, n = pending.popleft()
                in_flight -= n
                yield j, f.result()
            if big:  # the pool is idle: the kernel may split this tensor's work over it
                with parallel_in(pool):
                    got = produce(job)
                yield job, got
                del got
                continue
            pending.append((job, pool.submit(produce, job), size))
            in_flight += size
        while pending:
            j, f, _ = pending.popleft()
            yield j, f.result()
    finally:
        for _, f, _ in pending:
            f.cancel()
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
    cks: list[Checkpoint],
    jobs: list[Job],
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    tmp: Path,
    shard_size: int,
    as_shift: bool,
    progress: bool,
    device: str | torch.device,
    vocab: Any,
    workers: int = 1,
) -> list[Path]:
    from tqdm.auto import tqdm

    from shiftkit.merging.stream.recipe import check_params

    dev = torch.device(device)
    compute = getattr(torch, r.compute_dtype)
    n_passes = passes.n_passes if passes is not None else 0
    kernels = _Kernels(r, spec, passes)
    checked: set[str] = set()
    by_out = {j.out: j for j in jobs}
    merged_jobs = [j for j in jobs if not j.copy]
    out_dtypes = {k: d for k, _, d in entries}

    def _rows(src: tuple[int, str]) -> list[tuple[int, int]]:
        shape = cks[src[0]].shape(src[1]) or (1,)
        step = max(1, _ROW_BLOCK // max(1, int(torch.Size(shape[1:]).numel())))
        return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]

    def _base_rows(job: Job) -> Any:
        assert job.base is not None
        ck, name = cks[job.base[0]], job.base[1]
        for a, z in _rows(job.base):
            yield a, z, ck.read_rows(name, a, z, compute).to(device=dev, dtype=torch.float32)

    def _low_memory(job: Job) -> bool:
        """The largest tensors (embeddings, heads) merged by an in-place kernel: θ0 is read in row blocks
        and never held whole beside the models' copies (one tensor less at the peak)."""
        if as_shift or job.copy or job.base is None or job.present is not None:
            return False
        if _numel(job) <= _PREFETCH_MAX:
            return False
        if vocab is not None and vocab.is_vocab(job):
            return False
        srcs = list(job.inputs)
        if job.base in srcs or len(set(srcs)) != len(srcs) or not cks[job.base[0]].can_read_rows(job.base[1]):
            return False
        if any(cks[c].is_shift or n not in cks[c] for c, n in srcs):
            return False
        _, params = r.tensor_params(job.slice, job.out, job.t)
        return kernels.get(params) is not None

    def _load(job: Job) -> tuple[Tensor | None, list[Tensor]]:
        if job.copy:  # copied as it is (cast to the output dtype)
            return cks[job.ref[0]].read(job.ref[1], out_dtypes.get(job.out)), []
        if _low_memory(job):  # θ0 = None: subtracted (and later added back) in row blocks
            taus_lm = []
            for ck_i, name in job.inputs:
                tau = cks[ck_i].read(name, compute).to(device=dev, dtype=torch.float32)
                for a, z, rows in _base_rows(job):
                    tau[a:z].sub_(rows)
                _check_input(cks[ck_i], name, tau)
                taus_lm.append(tau)
            return None, taus_lm
        wanted = ([job.base] if job.base is not None else []) + [
            (ck_i, name)
            for n, (ck_i, name) in enumerate(job.inputs)
            if (job.present is None or n in job.present) and name in cks[ck_i]
        ]
        # inputs rounded to the compute dtype (as mergekit loads them), arithmetic in float32
        raw = {
            src: cks[src[0]].read(src[1], compute).to(device=dev, dtype=torch.float32)
            for src in dict.fromkeys(wanted)
        }
        if vocab is not None and vocab.is_vocab(job):  # rows rebuilt for the output vocabulary
            models = [src for src in raw if not cks[src[0]].is_shift]
            rebuilt = vocab.rebuild(job, {src[0]: raw[src] for src in models})
            raw.update({src: rebuilt[src[0]] for src in models})
        if job.base is not None:
            theta0 = raw[job.base]
        else:
            shape = vocab.shape(job) if vocab is not None else cks[job.ref[0]].shape(job.ref[1])
            theta0 = torch.zeros(tuple(shape or ()), dtype=torch.float32, device=dev)
        uses = Counter(job.inputs)
        taus: list[Tensor] = []
        for ck_i, name in job.inputs:
            ck = cks[ck_i]
            if (ck_i, name) not in raw:
                taus.append(torch.zeros_like(theta0))
            elif job.base is not None and (ck_i, name) == job.base:
                taus.append(torch.zeros_like(theta0))  # the base as one of the inputs: τ = 0
            elif ck.is_shift:
                tau = raw[(ck_i, name)]
                if tuple(tau.shape) != tuple(theta0.shape):
                    raise ShiftMismatchError(
                        f"{ck.path}: {name} has shape {tuple(tau.shape)}, base {theta0.shape}"
                    )
                taus.append(tau)
            elif uses[(ck_i, name)] == 1:  # read for this job alone: subtract in place (no copy)
                taus.append(raw.pop((ck_i, name)).sub_(theta0))
            else:
                taus.append(raw[(ck_i, name)].clone().sub_(theta0))
            _check_input(ck, name, taus[-1])
        return theta0, taus

    def _merge_job(job: Job, theta0: Tensor | None, taus: list[Tensor]) -> Tensor:
        weights, params = r.tensor_params(job.slice, job.out, job.t)
        check_params(spec, weights, params, checked)
        lean = kernels.get(params) if job.present is None else None
        if theta0 is None:  # _low_memory: the merged shift replaces τ_0, then θ0 is added row block by block
            assert lean is not None
            lean(taus[0], taus, weights, job.out)
            res = taus[0]
            for a, z, rows in _base_rows(job):
                res[a:z].add_(rows)
            _check_finite(job.out, res)
            return res
        if lean is not None:
            res = torch.zeros_like(theta0) if as_shift else theta0
            lean(res, taus, weights, job.out)
            _check_finite(job.out, res)
            return res
        if owns_pool():
            # a large tensor merged by the general path runs alone (the workers are idle): give its
            # element-wise operations every thread
            torch.set_num_threads(workers)
            try:
                tau = _merge_one(spec, passes, job, taus, theta0, weights, params)
            finally:
                torch.set_num_threads(1)
        else:
            tau = _merge_one(spec, passes, job, taus, theta0, weights, params)
        return tau if as_shift else theta0.add_(tau.to(theta0.dtype))

    def _numel(job: Job) -> int:
        return int(torch.Size(cks[job.ref[0]].shape(job.ref[1]) or ()).numel())

    bar = tqdm(
        total=len(merged_jobs) * n_passes + len(entries),
        desc=f"merge {r.method}",
        unit="tensor",
        disable=not progress,
        leave=False,
    )
    with torch.no_grad(), bar:
        for p in range(n_passes):
            observed = _prefetched(merged_jobs, _load, _numel)
            with closing(observed):  # closing: stop the read-ahead thread on errors too
                for job, (_, taus) in observed:
                    passes.observe(p, job.out, taus, r.weights)
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

        def _produce(job: Job) -> Tensor:
            theta0, taus = _load(job)
            if job.copy:
                assert theta0 is not None
                return theta0
            return _merge_job(job, theta0, taus).to(device="cpu", dtype=out_dtypes[job.out])

        try:
            items = _in_order([by_out[k] for k, _, _ in entries], _produce, _numel, workers)
            with closing(items):
                for job, out in items:
                    writer.write(job.out, out)
                    del out  # before the next read: the peak is one large tensor's inputs, not two
                    bar.update(1)
            return writer.finish()
        except BaseException:
            writer.abort()
            raise
