"""The output tensors of a streaming merge and where each comes from: one :class:`Job` per output tensor.

A ``models:`` recipe merges every tensor under its own name (the key policy of
:func:`~shiftkit.merging.stream.checkpoints.align_keys`). A ``slices:`` recipe builds the output's layers
slice by slice, as mergekit 0.1.5 does: output layer ``j`` of a slice merges layer ``start_i + j`` of each
source ``i``; the tensors outside the layers (embeddings, final norm, output head) come from the first slice's
sources when they sit before the layers (names with ``embed``, ``wte``, ``wpe``) and from the last slice's
otherwise. A one-source slice with ``passthrough`` copies layers, so slices can stack layers of several
models into a deeper one.

Layers are found from tensor names: ``<prefix>.<index>.<rest>`` with ``prefix`` ending in ``layers``,
``layer``, ``h``, ``blocks`` or ``block`` (Llama/Mistral/Qwen ``model.layers``, GPT-2 ``transformer.h``,
BERT ``encoder.layer``). Gradients are evaluated at ``t = i / (n − 1)`` of layer ``i`` of an ``n``-layer slice
(``n = 1``: ``t = 1``); tensors outside the layers at ``t = 0``.

Example:
    >>> jobs, out_layers = plan_merge(recipe, checkpoints)
    >>> jobs[0].out, jobs[0].inputs
    ('lm_head.weight', [(1, 'lm_head.weight'), (2, 'lm_head.weight')])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.stream.checkpoints import Checkpoint, align_keys
from shiftkit.merging.stream.recipe import RecipeSlice, ResolvedRecipe, SliceSource

__all__ = ["LAYER_RE", "Job", "layer_of", "plan_merge"]

#: ``<prefix>.<index>.<rest>`` of a tensor inside a layer stack
LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks|block))\.(?P<idx>\d+)\.(?P<rest>.+)$")
#: tensors outside the layers that sit before them (the rest sit after: final norm, output head)
_PRE = re.compile(
    r"(^|\.)(embed[^.]*|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)(\.|$)"
)


def layer_of(key: str) -> tuple[str, int, str] | None:
    """``(prefix, index, rest)`` of a tensor inside a layer stack, else ``None``.

    Example:
        >>> layer_of("model.layers.3.mlp.up_proj.weight")
        ('model.layers', 3, 'mlp.up_proj.weight')
    """
    m = LAYER_RE.match(key)
    return None if m is None else (m["prefix"], int(m["idx"]), m["rest"])


@dataclass
class Job:
    """One output tensor of the merge.

    Attributes:
        out: its name in the output.
        slice: index of the recipe slice whose parameters apply.
        t: depth for gradients (``i / (n − 1)`` of layer ``i`` of an ``n``-layer slice; 0 outside layers).
        base: ``(checkpoint, tensor name)`` of θ0, or ``None`` (θ0 = 0: baseless ``linear``, ``passthrough``).
        inputs: ``(checkpoint, tensor name)`` of each merge input, in the slice's input order.
        names: the inputs' tensor names (for per-input filters).
        present: indices of the inputs that take part (``on_missing="skip"``), ``None`` for all.
        copy: copied as it is from ``ref`` (non-floating tensors, tensors only the base has).
        ref: ``(checkpoint, tensor name)`` whose shape and dtype the output takes.
    """

    out: str
    slice: int
    t: float
    base: tuple[int, str] | None
    inputs: list[tuple[int, str]]
    ref: tuple[int, str]
    present: list[int] | None = None
    copy: bool = False
    names: list[str] = field(default_factory=list)


def _depth(i: int, n: int) -> float:
    return i / (n - 1) if n > 1 else 1.0


def _layers(ck: Checkpoint) -> tuple[str | None, dict[int, list[str]]]:
    """The layer prefix of a checkpoint and, per layer index, its tensors' ``rest`` names in file order."""
    prefixes: dict[str, dict[int, list[str]]] = {}
    for k in ck.keys():
        hit = layer_of(k)
        if hit is not None:
            prefixes.setdefault(hit[0], {}).setdefault(hit[1], []).append(hit[2])
    if not prefixes:
        return None, {}
    prefix = max(prefixes, key=lambda p: sum(len(v) for v in prefixes[p].values()))
    return prefix, prefixes[prefix]


def _whole_model_jobs(
    r: ResolvedRecipe, sl: RecipeSlice, cks: list[Checkpoint], index: dict[Path, int]
) -> list[Job]:
    base_i = None if sl.base is None else index[sl.base.model]
    inputs = [index[i.model] for i in sl.inputs]
    vocab_rows = r.tokenizer_source is not None or bool(r.tokenizer_tokens)
    lay = align_keys(
        None if base_i is None else cks[base_i], [cks[i] for i in inputs], r.on_missing, vocab_rows
    )
    ref_i = base_i if base_i is not None else inputs[0]
    _, layers = _layers(cks[ref_i])
    n_layers = len(layers)
    jobs = []
    for k in sorted(lay.merged + lay.copied):
        hit = layer_of(k)
        t = _depth(hit[1], n_layers) if hit is not None and n_layers else 0.0
        copy = k not in lay.present
        jobs.append(
            Job(
                out=k,
                slice=0,
                t=t,
                base=None if base_i is None else (base_i, k),
                inputs=[(i, k) for i in inputs],
                ref=(ref_i, k),
                present=None if copy or len(lay.present[k]) == len(inputs) else lay.present[k],
                copy=copy,
                names=[k] * len(inputs),
            )
        )
    return jobs


def _start(s: SliceSource) -> int:
    assert s.layer_range is not None
    return s.layer_range[0]


def _end(s: SliceSource) -> int:
    assert s.layer_range is not None
    return s.layer_range[1]


def _check_layers(
    ck: Checkpoint, prefix: str | None, layers: dict[int, list[str]], rng: tuple[int, int]
) -> None:
    if prefix is None:
        raise ShiftkitError(f"{ck.path}: no layer stack found in its tensor names (<prefix>.<index>.<name>)")
    if rng[1] > len(layers):
        raise ShiftkitError(f"{ck.path} has {len(layers)} layers; layer_range {list(rng)} goes past them")


def _sliced_jobs(
    r: ResolvedRecipe, cks: list[Checkpoint], index: dict[Path, int]
) -> tuple[list[Job], list[tuple[int, int]]]:
    """Jobs of a ``slices:`` recipe and, per output layer, the (checkpoint, layer) it was built from."""
    for sl in r.slices:
        for s in [*sl.inputs, *([] if sl.base is None else [sl.base])]:
            if cks[index[s.model]].is_shift:
                raise ShiftkitError(
                    f"{s.model} is a shift file; 'slices:' take models (a shift has no layers of its own)"
                )
    jobs: list[Job] = []
    origin: list[tuple[int, int]] = []
    prefix0: str | None = None
    out_layer = 0

    def members(sl: RecipeSlice) -> tuple[int | None, list[int]]:
        return (None if sl.base is None else index[sl.base.model]), [index[i.model] for i in sl.inputs]

    def outside(j: int, keep: bool) -> None:
        """Tensors outside the layers: those before them from slice 0, the others from the last slice."""
        sl = r.slices[j]
        base_i, inputs = members(sl)
        ref_i = base_i if base_i is not None else inputs[0]
        ref = cks[ref_i]
        for k in ref.keys():
            if layer_of(k) is not None or bool(_PRE.search(k)) != keep:
                continue
            floating = ref.dtype(k).is_floating_point
            have = [n for n, i in enumerate(inputs) if k in cks[i]]
            if floating and len(have) < len(inputs) and r.on_missing == "error":
                lacking = [str(cks[inputs[n]].path) for n in range(len(inputs)) if n not in have]
                raise ShiftMismatchError(
                    f"{k} is missing from {lacking}; set 'shiftkit: {{on_missing: zero}}' or 'skip'"
                )
            jobs.append(
                Job(
                    out=k,
                    slice=j,
                    t=0.0,
                    base=None if base_i is None else (base_i, k),
                    inputs=[(i, k) for i in inputs],
                    ref=(ref_i, k),
                    present=None if len(have) == len(inputs) or r.on_missing != "skip" else have,
                    copy=not floating,
                    names=[k] * len(inputs),
                )
            )

    outside(0, keep=True)
    for j, sl in enumerate(r.slices):
        base_i, inputs = members(sl)
        srcs = [*sl.inputs]
        views = []
        for s in srcs if sl.base is None else [*srcs, sl.base]:
            ck = cks[index[s.model]]
            prefix, layers = _layers(ck)
            assert s.layer_range is not None
            _check_layers(ck, prefix, layers, s.layer_range)
            if prefix0 is None:
                prefix0 = prefix
            elif prefix != prefix0:
                raise ShiftkitError(f"{ck.path}: layers under {prefix!r}, the others under {prefix0!r}")
            views.append((index[s.model], s.layer_range[0], layers))
        n = _end(srcs[0]) - _start(srcs[0])
        first_i, first_start, first_layers = views[0]
        for off in range(n):
            rests = first_layers[first_start + off]
            for ck_i, start, layers in views:
                if sorted(layers[start + off]) != sorted(rests):
                    raise ShiftMismatchError(
                        f"layer {start + off} of {cks[ck_i].path} has other tensors than layer "
                        f"{first_start + off} of {cks[first_i].path}"
                    )
            t = _depth(off, n)
            starts = [_start(s) for s in srcs]
            for rest in rests:
                names = [f"{prefix0}.{start + off}.{rest}" for start in starts]
                base: tuple[int, str] | None = None
                if sl.base is not None and base_i is not None:
                    base = (base_i, f"{prefix0}.{_start(sl.base) + off}.{rest}")
                ref = base if base is not None else (inputs[0], names[0])
                jobs.append(
                    Job(
                        out=f"{prefix0}.{out_layer}.{rest}",
                        slice=j,
                        t=t,
                        base=base,
                        inputs=list(zip(inputs, names)),
                        ref=ref,
                        copy=not cks[ref[0]].dtype(ref[1]).is_floating_point,
                        names=names,
                    )
                )
            origin.append((first_i, first_start + off))
            out_layer += 1
    outside(len(r.slices) - 1, keep=False)
    return jobs, origin


def plan_merge(
    r: ResolvedRecipe, cks: list[Checkpoint], index: dict[Path, int]
) -> tuple[list[Job], list[tuple[int, int]] | None]:
    """Every output tensor of ``r`` as a :class:`Job` and (``slices:`` recipes) the
    ``(checkpoint, layer)`` behind each output layer (``None`` for ``models:`` recipes).

    Args:
        r: the resolved recipe.
        cks: the opened checkpoints. index: their positions by path.

    Raises:
        ShiftkitError / ShiftMismatchError: layer ranges past a model's layers, layers with other tensors,
            tensors missing from some inputs (``on_missing="error"``), shapes that disagree.
    """
    if not r.sliced:
        return _whole_model_jobs(r, r.slices[0], cks, index), None
    jobs, origin = _sliced_jobs(r, cks, index)
    seen: set[str] = set()
    for job in jobs:
        if job.out in seen:
            raise ShiftkitError(f"the slices produce {job.out!r} twice")
        seen.add(job.out)
        shape = cks[job.ref[0]].shape(job.ref[1])
        for ck_i, name in job.inputs:
            if name in cks[ck_i] and cks[ck_i].shape(name) != shape:
                raise ShiftMismatchError(
                    f"{job.out}: {cks[ck_i].path} has {name} of shape {cks[ck_i].shape(name)}, "
                    f"expected {shape}"
                )
    return jobs, origin
