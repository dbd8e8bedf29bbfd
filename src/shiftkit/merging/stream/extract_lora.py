"""The low-rank LoRA shift between two checkpoints (``sk.extract_lora``, ``shiftkit extract-lora``).

The job of mergekit's ``mergekit-extract-lora``, streamed tensor by tensor over two Hugging Face model folders
(safetensors, sharded or not) that have the same tensors. For every target weight (a 2-D ``weight`` of a
Linear layer, by default every one except the input embeddings and the output head)

* ``ΔW = W_tuned − W_base`` in float32 (never in a bf16/fp16 storage dtype);
* the thin SVD ``ΔW = U S Vᵀ`` in float32, truncated to the layer's rank ``r``;
* the factors split the singular values evenly, as mergekit's default (``--distribute-scale``) does:
  ``A = √S_r V_rᵀ`` ``(r, in)``, ``B = U_r √S_r`` ``(out, r)``: balanced factors lose the least when stored in
  bf16/fp16. The shift's ``lora_alpha = r``, so its scaling is 1 and ``ΔW ≈ B A``.

``B A`` is the best rank-r approximation of ``ΔW`` in Frobenius norm (Eckart–Young), with relative error
``√(Σ_{i>r} σ_i²) / ‖ΔW‖_F``; the error reported for each layer is measured on the stored factors (in float64,
after the cast to the output dtype), so it includes the storage rounding too.

Rank: ``rank=`` fixes r for every layer (capped by the layer's smaller side, as in mergekit); ``energy=e``
picks per layer the smallest r that keeps the fraction e of ``Σ σ_i²`` (``rank`` is then the cap). A shift
file has one r: layers with a smaller rank get zero rows/columns there (exact; their real rank is in the
summary). A PEFT folder stores each layer at its own rank (``rank_pattern`` / ``alpha_pattern``, as mergekit
writes them). Target weights with ``ΔW = 0`` exactly are left out (mergekit writes zero factors for them).

Other tensors (mergekit's choices):

* input embeddings and the output head (``lm_head``) are not LoRA targets unless ``embed_lora=True``
  (mergekit ``--embed-lora``): an embedding table then gets PEFT's embedding layout (``A (r, vocab)``,
  ``B (dim, r)``, ``ΔW = (B A)ᵀ``), the head a Linear's;
* every other floating tensor (norms, biases, embeddings not LoRA'd) that differs between the checkpoints is
  saved at full value as ``modules_to_save`` (``others="save"``, mergekit's default; its whole module is
  saved, from the tuned checkpoint), or left out and reported (``others="skip"``, mergekit
  ``--skip-undecomposable``). mergekit saves these modules even when they did not change; here an unchanged
  module is not written (the result is the same model). A tensor of a LoRA-targeted module that is not its
  weight (the bias of a fine-tuned Linear) cannot be carried by a LoRA shift: it is reported in
  ``skipped`` and warned about (mergekit writes PEFT's ``lora_B.bias`` for it);
* a 2-D weight that ``targets`` / ``exclude`` leave out (and an embedding ``exclude`` names) is dropped and,
  when it changed, reported in ``skipped``, as mergekit drops what its regexes leave out.

Outputs: a path ending in ``.safetensors`` is a shiftkit LoRA shift file (``sk.load``; ``sk.attach_`` it to
the base, or ``sk.apply_(base, sk.to_delta(shift, base=base))``); any other path is a PEFT adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, OUT)``
loads. Both are written atomically (a temp file or folder beside OUT, then a rename).

Memory: one target's two input tensors, ``ΔW`` and its SVD at a time (the next tensor is read ahead on a
thread only while small), plus the factors and the saved modules, which make up the output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shiftkit.core.io import save
from shiftkit.core.patterns import exact_patterns
from shiftkit.core.shift import Shift
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.stream.checkpoints import Checkpoint, open_checkpoint
from shiftkit.merging.stream.runner import _finalise, _prefetched
from shiftkit.methods.lora import LoRAConfig

__all__ = ["ExtractedLayer", "LoraExtractSummary", "extract_lora"]

#: module names (last component) of input embedding tables
_INPUT_EMBEDDING = re.compile(
    r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|embed_in|"
    r"embed_positions|shared|embeddings?)$"
)
#: module names (last component) of output heads (Linear layers over the vocabulary)
_OUTPUT_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)$")
_OTHERS = ("save", "skip")


@dataclass(frozen=True)
class ExtractedLayer:
    """One extracted weight.

    Attributes:
        name: the weight's name, ``<module>.weight``.
        kind: ``"linear"`` or ``"embedding"`` (the LoRA layout).
        shape: the weight's shape.
        rank: the layer's own rank (the shift file may pad it with zeros up to the shift's ``r``).
        error: ``‖ΔW − B A‖_F / ‖ΔW‖_F`` of the stored factors.
        energy: the kept fraction ``Σ_{i≤r} σ_i² / Σ_i σ_i²``.
        norm: ``‖ΔW‖_F``.

    Example:
        >>> layer = summary.layers[0]
        >>> layer.name, layer.rank, f"{layer.error:.1e}"
        ('model.layers.0.mlp.down_proj.weight', 32, '4.1e-02')
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    error: float
    energy: float
    norm: float


@dataclass
class LoraExtractSummary:
    """What :func:`extract_lora` returns.

    Attributes:
        shift: the extracted LoRA :class:`~shiftkit.core.shift.Shift` (``r`` = the largest layer rank).
        layers: one :class:`ExtractedLayer` per LoRA'd weight, in checkpoint order.
        saved: ``modules_to_save``: modules stored at full value, with the tensors that differed.
        skipped: tensors that differ but are in the output neither as factors nor saved, with the reason.
        unchanged: target weights left out because ``ΔW = 0``.
        rank: the shift's ``r`` (the largest layer rank).
        parameters: elements of the output tensors (for a PEFT folder: as stored, each layer at its rank).
        bytes_written: size of the files written (0 when ``out`` is None).
        outputs: the written paths.
        seconds: wall time.

    Example:
        >>> s = sk.extract_lora("base", "tuned", "lora.safetensors", rank=16, progress=False)
        >>> [(l.name, l.rank, l.error) for l in s.worst(3)]
    """

    shift: Shift
    layers: list[ExtractedLayer]
    saved: dict[str, list[str]]
    skipped: dict[str, str]
    unchanged: list[str]
    rank: int
    parameters: int = 0
    bytes_written: int = 0
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_error(self) -> float:
        """The largest per-layer relative error (0.0 with no layers).

        Example:
            >>> summary.max_error < 0.05
            True
        """
        return max((layer.error for layer in self.layers), default=0.0)

    def worst(self, n: int = 10) -> list[ExtractedLayer]:
        """The ``n`` layers with the largest relative error, worst first.

        Example:
            >>> summary.worst(1)[0].error == summary.max_error
            True
        """
        return sorted(self.layers, key=lambda layer: -layer.error)[: max(n, 0)]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (without the tensors).

        Example:
            >>> json.dumps(summary.as_dict())
        """
        return {
            "rank": self.rank,
            "max_error": self.max_error,
            "layers": [asdict(layer) for layer in self.layers],
            "saved": self.saved,
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "parameters": self.parameters,
            "bytes_written": self.bytes_written,
            "outputs": self.outputs,
            "seconds": self.seconds,
        }


# --- validation --------------------------------------------------------------------------------------
def _patterns(value: str | Sequence[str] | None, what: str) -> list[re.Pattern[str]]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ShiftkitError(f"{what} must be regular expressions (strings), got {item!r}")
        try:
            out.append(re.compile(item))
        except re.error as err:
            raise ShiftkitError(f"{what}: {item!r} is not a valid regular expression ({err})") from None
    return out


def _check_rank(rank: int, energy: float | None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ShiftkitError(
            f"rank must be a positive integer (the LoRA rank, or the cap with energy), got {rank!r}"
        )
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, int | float) or not 0.0 < float(energy) <= 1.0
    ):
        raise ShiftkitError(f"energy must be in (0, 1] (the kept fraction of Σσ²), got {energy!r}")


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ShiftkitError(f"the output dtype must be a floating dtype, got {dtype}")
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ShiftkitError(f"unknown output dtype {dtype!r}; use float32, bfloat16, float16 or float64")
    return value


def _open(path: str | os.PathLike[str], role: str) -> Checkpoint:
    p = Path(path)
    if not p.exists():
        raise ShiftkitError(f"{role} model folder {p} does not exist")
    if not p.is_dir():
        raise ShiftkitError(f"{role} model {p} is not a folder (a Hugging Face model folder is expected)")
    return open_checkpoint(p)


def _vocab_size(ck: Checkpoint) -> int | None:
    if ck.config_path is None:
        return None
    try:
        config = json.loads(ck.config_path.read_text())
    except (OSError, ValueError):
        return None
    for c in (config, config.get("text_config") or {}):
        if isinstance(c, dict) and isinstance(c.get("vocab_size"), int):
            return int(c["vocab_size"])
    return None


def _task_type(ck: Checkpoint) -> str | None:
    if ck.config_path is None:
        return None
    try:
        archs = json.loads(ck.config_path.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in archs) else None


def _align(base: Checkpoint, tuned: Checkpoint) -> list[str]:
    kb, kt = set(base.keys()), set(tuned.keys())
    if kb != kt:
        raise ShiftMismatchError(
            f"base {base.path} and tuned {tuned.path} have different tensors: only in base "
            f"{sorted(kb - kt)[:5]}, only in tuned {sorted(kt - kb)[:5]}"
        )
    bad = [
        f"{k}: base {base.shape(k)} vs tuned {tuned.shape(k)}"
        for k in base.keys()
        if base.shape(k) != tuned.shape(k)
    ]
    if bad:
        raise ShiftMismatchError(f"base and tuned shapes differ: {'; '.join(bad[:5])}")
    return list(base.keys())


# --- the plan ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    targets: list[tuple[str, str]]  # (weight name, kind)
    others: list[str]  # floating tensors compared and saved/skipped if they differ
    target_modules: set[str]
    filtered: set[str]  # weights and embeddings left out by targets/exclude: skipped if they differ


def _plan(
    base: Checkpoint,
    keys: list[str],
    include: list[re.Pattern[str]],
    exclude: list[re.Pattern[str]],
    embed_lora: bool,
) -> _Plan:
    """Classify the tensors as mergekit does: LoRA targets, filtered out, or others (saved when changed)."""
    vocab = _vocab_size(base)
    targets: list[tuple[str, str]] = []
    others: list[str] = []
    filtered: set[str] = set()
    for key in keys:
        if not base.dtype(key).is_floating_point:
            continue
        module, _, leaf = key.rpartition(".")
        shape = base.shape(key) or ()
        head = bool(_OUTPUT_HEAD.search(module))
        table = bool(_INPUT_EMBEDDING.search(module))
        vocab_rows = vocab is not None and len(shape) == 2 and shape[0] == vocab
        embedding_like = head or table or vocab_rows
        excluded = any(p.search(module) for p in exclude)
        included = not include or any(p.search(module) for p in include)
        lora_able = leaf == "weight" and len(shape) == 2 and module != ""
        if lora_able and (embed_lora or not embedding_like):
            if included and not excluded:
                targets.append((key, "embedding" if table and not head else "linear"))
            else:  # mergekit drops a Linear its regexes leave out
                filtered.add(key)
                others.append(key)
        else:
            if embedding_like and excluded:  # mergekit: an excluded embedding is not saved either
                filtered.add(key)
            others.append(key)
    return _Plan(targets, others, {k.rpartition(".")[0] for k, _ in targets}, filtered)


# --- the math ----------------------------------------------------------------------------------------
def _layer_rank(s: Tensor, rank: int, energy: float | None) -> tuple[int, float]:
    """The rank to keep from singular values ``s`` (descending) and the kept energy fraction."""
    sq = s.to(torch.float64).square()
    cum = torch.cumsum(sq, 0)
    total = float(cum[-1]) if cum.numel() else 0.0
    if total == 0.0:
        return 0, 1.0
    cap = min(rank, s.numel())
    if energy is None:
        r = cap
    else:
        r = min(int(torch.searchsorted(cum, torch.tensor([energy * total], dtype=torch.float64))[0]) + 1, cap)
    return r, float(cum[r - 1]) / total


def _factorise(
    delta: Tensor, kind: str, rank: int, energy: float | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor, ExtractedLayer | None]:
    """``(A, B, report)`` of one ΔW (float32); ``report`` is None for ``ΔW = 0``."""
    m = delta.T if kind == "embedding" else delta
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r, kept = _layer_rank(s, rank, energy)
    norm = float(torch.linalg.vector_norm(m.to(torch.float64)))
    if r == 0:
        return m.new_zeros(0, m.shape[1]), m.new_zeros(m.shape[0], 0), None
    root = s[:r].sqrt()
    a = (root[:, None] * vh[:r]).to(dtype)
    b = (u[:, :r] * root).to(dtype)
    # the error of what is stored (after the cast), in float64
    err = float(torch.linalg.vector_norm(m.to(torch.float64) - b.to(torch.float64) @ a.to(torch.float64)))
    report = ExtractedLayer("", kind, tuple(delta.shape), r, err / norm, kept, norm)
    return a.cpu(), b.cpu(), report


# --- writing -----------------------------------------------------------------------------------------
def _write_peft(
    shift: Shift,
    ranks: dict[str, int],
    out: Path,
    force: bool,
    base_path: Path,
    task_type: str | None,
) -> tuple[list[Path], int]:
    """Write a PEFT folder with each layer at its own rank; return the files and their element count."""
    from safetensors.torch import load_file

    from shiftkit.core.io import atomic_save_tensors
    from shiftkit.interop.peft import CONFIG_NAME, WEIGHTS_NAME, export_peft

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        folder = tmp / "adapter"
        export_peft(shift, folder, task_type=task_type, base_model_name_or_path=str(base_path))
        r = shift.config.r if isinstance(shift.config, LoRAConfig) else 0
        pattern = {fqn: k for fqn, k in ranks.items() if k != r}
        # keys PEFT reads as name-suffix patterns: anchored where a plain name would match a longer one too
        keys = exact_patterns(pattern, list(ranks), r)
        tensors = load_file(str(folder / WEIGHTS_NAME))
        if pattern:  # store each layer at its own rank, as mergekit does
            for key in list(tensors):
                fqn, _, role = key.removeprefix("base_model.model.").rpartition(".lora_")
                k = pattern.get(fqn)
                if k is None:
                    continue
                t = tensors[key]
                part = role.split(".")[0]  # "A.weight" / "embedding_A" → "A" / "embedding_A"
                tensors[key] = (t[:k] if part.endswith("A") else t[:, :k]).contiguous()
            atomic_save_tensors(tensors, folder / WEIGHTS_NAME, {"format": "pt"})
            config = json.loads((folder / CONFIG_NAME).read_text())
            config["rank_pattern"] = {k: int(v) for k, v in keys.items()}
            config["alpha_pattern"] = {k: int(v) for k, v in keys.items()}
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        numel = sum(t.numel() for t in tensors.values())
        os.chmod(folder, 0o755)
        _finalise(folder, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / CONFIG_NAME, out / WEIGHTS_NAME], numel


# --- the API -----------------------------------------------------------------------------------------
def extract_lora(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    rank: int = 32,
    energy: float | None = None,
    targets: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    embed_lora: bool = False,
    others: str = "save",
    peft: bool | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    force: bool = False,
    progress: bool = True,
) -> LoraExtractSummary:
    """Extract a LoRA shift from the difference of two checkpoints by truncated SVD, streaming.

    See the module docstring for the math (``A = √S_r V_rᵀ``, ``B = U_r √S_r``, ``lora_alpha = r``), which
    tensors become factors, which are saved at full value, and the output formats.

    Args:
        base: the base model's Hugging Face folder (safetensors, sharded or not).
        tuned: the fine-tuned model's folder, with the same tensor names and shapes.
        out: ``*.safetensors``: a shiftkit LoRA shift file; another path: a PEFT adapter folder; ``None``:
            write nothing (the shift is in the summary).
        rank: the LoRA rank of every layer (capped by the layer's smaller side); with ``energy`` the cap.
        energy: per layer, keep the smallest rank whose singular values hold this fraction of ``Σ σ²``,
            in ``(0, 1]``.
        targets: regular expressions (``re.search`` on the module name); only matching 2-D weights are
            LoRA targets (default: every 2-D weight except embeddings and the output head).
        exclude: regular expressions of modules never LoRA'd (they count as "other" tensors).
        embed_lora: LoRA the input embeddings and output head too (mergekit ``--embed-lora``); otherwise
            they are saved at full value when they changed.
        others: ``"save"`` (``modules_to_save``, full value) or ``"skip"`` for non-target tensors that
            changed.
        peft: ``True`` writes a PEFT folder, ``False`` a shift file; ``None`` decides by ``out``'s suffix.
        dtype: dtype of the output tensors (default: the tuned checkpoint's); the math is float32.
        device: where the SVDs run (``"cpu"``, ``"cuda"``); reads and writes stay on the CPU.
        force: replace an existing ``out`` (only once the new one is complete).
        progress: a tqdm bar over the tensors.

    Returns:
        A :class:`LoraExtractSummary` (the shift, per-layer ranks and errors, saved/skipped tensors).

    Raises:
        ShiftkitError: a missing folder, ``rank < 1``, ``energy`` outside ``(0, 1]``, a bad option,
            ``out`` existing without ``force``, NaN/Inf in a tensor, or nothing to extract.
        ShiftMismatchError: the two checkpoints differ in tensor names or shapes.

    Example:
        >>> s = sk.extract_lora("models/base", "models/tuned", "lora.safetensors", rank=16)
        >>> print(s.rank, s.max_error)
        >>> model = AutoModelForCausalLM.from_pretrained("models/base")
        >>> sk.attach_(model, sk.load("lora.safetensors"))        # ≈ the tuned model
        >>> s = sk.extract_lora("models/base", "models/tuned", "adapter", energy=0.9, rank=64)
        >>> peft_model = PeftModel.from_pretrained(model_base, "adapter")
    """
    t0 = time.perf_counter()
    _check_rank(rank, energy)
    if others not in _OTHERS:
        raise ShiftkitError(f"others must be one of {list(_OTHERS)}, got {others!r}")
    include, excluded = _patterns(targets, "targets"), _patterns(exclude, "exclude")
    out_dtype = _dtype(dtype)
    out_path = None if out is None else Path(out).absolute()
    as_peft = False
    if out_path is not None:
        is_file = out_path.suffix == ".safetensors"
        as_peft = not is_file if peft is None else bool(peft)
        if as_peft and is_file:
            raise ShiftkitError(f"a PEFT adapter is a folder; {out_path} ends in .safetensors (drop --peft)")
        if not as_peft and not is_file:
            raise ShiftkitError(f"a shift file is written to a path ending in .safetensors, got {out_path}")
        if (out_path.exists() or out_path.is_symlink()) and not force:
            raise ShiftkitError(f"{out_path} already exists; pass force=True (--force) to replace it")
    dev = torch.device(device)
    with _open(base, "base") as cb, _open(tuned, "tuned") as ct:
        keys = _align(cb, ct)
        plan = _plan(cb, keys, include, excluded, embed_lora)
        if not plan.targets:
            raise ShiftkitError(
                f"no LoRA target: no 2-D weight of {cb.path} matches targets={targets!r}, exclude={exclude!r}"
                + ("" if embed_lora else " (embeddings and the output head need embed_lora=True)")
            )
        shift, summary = _extract(cb, ct, plan, rank, energy, out_dtype, dev, others, progress)
        task_type = _task_type(cb)
    if out_path is not None:
        if as_peft:
            ranks = {layer.name.rpartition(".")[0]: layer.rank for layer in summary.layers}
            files, summary.parameters = _write_peft(
                shift, ranks, out_path, force, Path(base).absolute(), task_type
            )
        else:
            save(shift, out_path)  # atomic: a temp file beside it, then a rename (creates the folder)
            files = [out_path]
        summary.outputs = [str(p) for p in files]
        summary.bytes_written = sum(p.stat().st_size for p in files)
    summary.seconds = time.perf_counter() - t0
    return summary


def _extract(
    cb: Checkpoint,
    ct: Checkpoint,
    plan: _Plan,
    rank: int,
    energy: float | None,
    out_dtype: torch.dtype | None,
    dev: torch.device,
    others: str,
    progress: bool,
) -> tuple[Shift, LoraExtractSummary]:
    from tqdm.auto import tqdm

    kinds = dict(plan.targets)
    filtered_modules = {k.rpartition(".")[0] for k in plan.filtered}

    def load(key: str) -> tuple[Tensor, Tensor]:
        return cb.read(key, torch.float32), ct.read(key, torch.float32)

    def numel(key: str) -> int:
        return int(torch.Size(cb.shape(key) or ()).numel())

    factors: dict[str, tuple[Tensor, Tensor]] = {}
    layers: list[ExtractedLayer] = []
    unchanged: list[str] = []
    changed: dict[str, list[str]] = {}  # module → its non-target tensors that differ
    skipped: dict[str, str] = {}
    order = [k for k, _ in plan.targets] + plan.others
    bar = tqdm(total=len(order), desc="extract-lora", unit="tensor", disable=not progress, leave=False)
    with torch.no_grad(), bar:
        for key, (wb, wt) in _prefetched(order, load, numel):
            delta = wt.sub_(wb).to(dev)
            del wb
            if not bool(torch.isfinite(delta).all()):
                raise ShiftkitError(f"tensor {key!r} has NaN or Inf in {cb.path} or {ct.path}")
            if key in kinds:
                a, b, report = _factorise(delta, kinds[key], rank, energy, out_dtype or ct.dtype(key))
                if report is None:
                    unchanged.append(key)
                else:
                    factors[key] = (a, b)
                    layers.append(_named(report, key))
            elif bool((delta != 0).any()):
                module, _, leaf = key.rpartition(".")
                if key in plan.filtered or module in filtered_modules:
                    skipped[key] = "not a LoRA target (left out by targets/exclude)"
                elif module in plan.target_modules:
                    skipped[key] = f"the {leaf!r} of a LoRA-targeted module (a LoRA shift has no {leaf} term)"
                elif others == "skip":
                    skipped[key] = "not a LoRA target (others='skip')"
                else:
                    changed.setdefault(module, []).append(key)
            del delta
            bar.update(1)
    if not factors:
        raise ShiftkitError(
            f"every target weight is identical in {cb.path} and {ct.path}: there is no LoRA shift to extract"
        )
    if skipped and any(k.rpartition(".")[0] in plan.target_modules for k in skipped):
        lost = [k for k in skipped if k.rpartition(".")[0] in plan.target_modules]
        warnings.warn(
            f"extract_lora: {len(lost)} changed tensor(s) of LoRA-targeted modules cannot be carried by a "
            f"LoRA shift and are left out: {lost[:5]}",
            stacklevel=3,
        )
    r_max = max(layer.rank for layer in layers)
    tensors: dict[str, Tensor] = {}
    base_shapes: dict[str, tuple[int, ...]] = {}
    for key, (a, b) in factors.items():
        fqn = key.rpartition(".")[0]
        k = a.shape[0]
        if k < r_max:  # one r per shift file: zero rows/columns (exact)
            a = torch.cat([a, a.new_zeros(r_max - k, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], r_max - k)], 1)
        tensors[f"{fqn}.lora_A"], tensors[f"{fqn}.lora_B"] = a, b
        base_shapes[fqn] = tuple(cb.shape(key) or ())
    saved: dict[str, list[str]] = {}
    for module, diff in changed.items():
        own = [k for k in plan.others if k.rpartition(".")[0] == module and cb.dtype(k).is_floating_point]
        for name in own:
            tensors[f"{module}.saved.{name.rpartition('.')[2]}"] = ct.read(name, out_dtype or ct.dtype(name))
        shape = next(
            (cb.shape(f"{module}.{leaf}") for leaf in ("weight", "bias") if f"{module}.{leaf}" in cb), ()
        )
        base_shapes[module] = tuple(shape or ())
        saved[module] = diff
    config = LoRAConfig(
        r=r_max,
        lora_alpha=float(r_max),
        target_modules=tuple(sorted(k.rpartition(".")[0] for k in factors)),
        modules_to_save=tuple(sorted(saved)),
    )
    shift = Shift("lora", config, tensors, base_shapes)
    summary = LoraExtractSummary(
        shift=shift,
        layers=layers,
        saved=saved,
        skipped=skipped,
        unchanged=unchanged,
        rank=r_max,
        parameters=shift.numel,
    )
    return shift, summary


def _named(report: ExtractedLayer, name: str) -> ExtractedLayer:
    return ExtractedLayer(
        name, report.kind, report.shape, report.rank, report.error, report.energy, report.norm
    )
