"""Merge recipes: mergekit-shaped YAML → a validated :class:`ResolvedRecipe` (unknown keys are errors).

Example recipe (``examples/merge_ties.yaml``)::

    plugins: [my_project.merges]    # optional: modules imported first (they register their own methods)
    merge_method: ties              # any name from sk.list_merge_methods()
    base_model: models/base         # HF folder or .safetensors file (θ0)
    models:                         # HF folders, .safetensors files, or shiftkit shift files (τ)
      - model: models/math
        parameters: {weight: 1.0, density: 0.5}
      - model: models/code
        parameters: {weight: [0, 0.5, 1], density: 0.7}    # a gradient over the layers
    parameters:
      normalize: true
      lambda: [{filter: mlp, value: 1.2}, {value: 1.0}]     # by tensor name
    dtype: bfloat16                 # output dtype (default: the base's); merge math is float32
    tokenizer_source: base          # base | union | a model path | null
    shiftkit: {max_shard_size: 2GB, on_missing: error, compute_dtype: float32}

or, instead of ``models:``, layer ranges of models stacked or merged slice by slice::

    slices:
      - sources:
          - {model: models/a, layer_range: [0, 24]}
      - sources:
          - {model: models/b, layer_range: [20, 40]}
    merge_method: passthrough       # a 44-layer model from layers 0-23 of a and 20-39 of b

A recipe means what it means in mergekit 0.1.5: an omitted parameter takes mergekit's default, not the
paper default that ``sk.merge`` uses (``ties``/``dare_*``/``breadcrumbs*``: ``density`` 1.0, no pruning),
and what mergekit requires is required here (``weight`` for every input of the weighted methods, ``t`` for
``slerp``: a missing one is an error naming the key). ``linear`` with a ``base_model`` averages the base
with the models, as mergekit does (its weight from the top-level ``parameters``). A parameter may be a
gradient or a list of filters (:mod:`~shiftkit.merging.stream.settings`); a parameter the method takes per
input (``MergeSpec.per_input``: ``weight``, TIES's ``density``, ...) may differ between models. Each method's
recipe contract is its :class:`~shiftkit.merging.registry.MergeSpec`.

mergekit names map to shiftkit's: ``lambda`` → ``lambda_``, ``rescale: true/false`` → ``"l1"``/``"none"``;
``int8_mask`` (a mergekit memory switch with no effect on results) is accepted and ignored. mergekit's
``dtype`` is the type it loads the inputs in (and, for the TIES family, runs its arithmetic in); here inputs
are read as stored, the arithmetic is float32 and ``dtype`` is the output type, rounded once (more
accurate). ``shiftkit: {compute_dtype: float16}`` rounds the inputs to that type first, as mergekit loads
them: ``linear``, ``slerp`` and ``passthrough`` then give mergekit's output to one unit in the last place;
the TIES family stays closer to the exact merge than mergekit's 16-bit arithmetic.
Relative model paths are looked up from the current folder, then from the recipe's folder.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiftkit.core.registry import load_plugins
from shiftkit.errors import ShiftkitError
from shiftkit.merging.registry import MergeSpec
from shiftkit.merging.stream.checkpoints import parse_size
from shiftkit.merging.stream.settings import UNSET, is_constant, resolve, validate_setting

__all__ = ["RecipeSlice", "ResolvedRecipe", "SliceSource", "load_recipe", "resolve_recipe"]

TOP_KEYS = (
    "plugins",
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "shiftkit",
)
MODEL_KEYS = ("model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
SHIFTKIT_KEYS = ("max_shard_size", "on_missing", "compute_dtype")
#: mergekit features with no shiftkit equivalent: a clear pointer instead of "unknown key"
UNSUPPORTED = {
    "modules": "'modules:' (per-module recipes of multi-module models) is not supported; use 'models:' or "
    "'slices:'",
}
ALIASES = {"lambda": "lambda_"}
IGNORED = ("int8_mask",)  # mergekit stores masks as int8 to save memory; results are identical
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
ON_MISSING = ("error", "zero", "skip")
#: default shard size: HF's save_pretrained default of recent releases
DEFAULT_SHARD = "2GB"


@dataclass
class SliceSource:
    """One input of a slice: a model (or shift file), its layers, and its own parameters (raw settings).

    Attributes:
        model: the folder or file.
        layer_range: ``(start, stop)`` of the layers it gives the slice, or ``None`` for the whole model
            (the ``models:`` syntax: every tensor under its own name).
        settings: the model's own ``parameters`` (scalars, gradients or filters), first in precedence.
    """

    model: Path
    layer_range: tuple[int, int] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeSlice:
    """A run of output layers merged from the same sources (the whole model for ``models:`` recipes).

    Attributes:
        inputs: the merge's inputs, in order (the base among them only where the method takes it as an input:
            ``linear`` averages it, ``slerp`` starts from it).
        base: θ0's source (model and layer range), or ``None``.
        settings: the slice's own ``parameters`` (between the inputs' and the recipe's in precedence).
    """

    inputs: list[SliceSource]
    base: SliceSource | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int | None:
        """Layers of the slice (``None``: the whole model)."""
        r = self.inputs[0].layer_range
        return None if r is None else r[1] - r[0]


@dataclass
class ResolvedRecipe:
    """A validated merge recipe with absolute paths and every method parameter filled in.

    Attributes:
        method: merge method name.
        base: base model path (θ0), or ``None`` (only for ``linear`` and ``passthrough``).
        models: merge inputs of a ``models:`` recipe in order; of a ``slices:`` recipe, every distinct input.
        weights: one weight per model (where the weights are the same for every tensor; else their values
            for an unnamed tensor at depth 0, for display).
        params: the method's parameters in shiftkit names, defaults filled (likewise).
        out_dtype: ``"float32"``/``"float16"``/``"bfloat16"`` or ``None`` (the base's dtype per tensor).
        tokenizer_source: ``None`` (the donor's tokenizer files are copied: the base's, else the first
            model's), ``"base"``, ``"union"`` or a model path: the merged model's vocabulary
            (:mod:`~shiftkit.merging.stream.vocab`); models whose vocabularies differ from it get their
            embedding and head rows mapped by token.
        max_shard_size: bytes per output shard.
        on_missing: ``"error"``, ``"zero"`` or ``"skip"`` for tensors missing from some models (raise, count
            as a zero shift, or merge over the models that have them).
        source: the recipe file, if read from one.
        plugins: modules imported first (the recipe's ``plugins:``): they register user merge methods.
        slices: the merge as slices (a ``models:`` recipe is one slice over the whole model).
        sliced: the recipe used ``slices:`` (layer ranges).
        settings: the top-level ``parameters`` as written (scalars, gradients, filters).
        compute_dtype: the dtype the inputs are rounded to before the float32 arithmetic (default float32).
        tokenizer_tokens: the ``tokenizer: {tokens: ...}`` block (per-token embedding sources).
        pad_to_multiple_of: pad the merged vocabulary to a multiple of this (``tokenizer:`` block).
        chat_template: a Jinja chat template, a named one, ``"auto"``, or ``None``.

    Example:
        >>> r = load_recipe("examples/merge_ties.yaml")
        >>> r.method, r.weights
        ('ties', [1.0, 0.5])
    """

    method: str
    base: Path | None
    models: list[Path]
    weights: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    out_dtype: str | None = None
    tokenizer_source: Path | str | None = None
    max_shard_size: int = 2 * 10**9
    on_missing: str = "error"
    source: Path | None = None
    plugins: list[str] = field(default_factory=list)
    slices: list[RecipeSlice] = field(default_factory=list)
    sliced: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    compute_dtype: str = "float32"
    tokenizer_tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if not self.slices:  # built by hand (tests, the Python API): one whole-model slice
            base = None if self.base is None else SliceSource(self.base)
            inputs = [SliceSource(m, None, {"weight": w}) for m, w in zip(self.models, self.weights)]
            self.slices = [RecipeSlice(inputs, base, {})]
            self.settings = {("lambda" if k == "lambda_" else k): v for k, v in self.params.items()}

    @property
    def spec(self) -> MergeSpec:
        """The merge method's registry entry."""
        return _method_spec(self.method)

    @property
    def constant(self) -> bool:
        """Every parameter and weight is one value for every tensor (no gradient, no filter)."""
        levels = [self.settings, *(s.settings for s in self.slices)]
        levels += [i.settings for s in self.slices for i in s.inputs]
        return all(is_constant(v) for level in levels for v in level.values())

    def tensor_params(self, slice_index: int, tensor: str, t: float) -> tuple[list[float], dict[str, Any]]:
        """The weights and parameters of one tensor of one slice (gradients at depth ``t``, filters on
        ``tensor``): per-input parameters as one value per input (a single value when all are equal).

        Raises:
            ShiftkitError: a required parameter (mergekit's ``weight``, ``t``) is unset for this tensor, or
                an input sets a shared parameter to a value the others do not.

        Example:
            >>> weights, params = recipe.tensor_params(0, "model.layers.3.mlp.up_proj.weight", 0.25)
        """
        return _tensor_params(self.spec, self.slices[slice_index], self.settings, tensor, t, strict=True)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data in mergekit's shape (re-loadable with :func:`resolve_recipe`).

        Example:
            >>> r.to_dict()["merge_method"]
            'ties'
        """
        from shiftkit._version import __version__

        def src(s: SliceSource) -> dict[str, Any]:
            out: dict[str, Any] = {"model": str(s.model)}
            if s.layer_range is not None:
                out["layer_range"] = list(s.layer_range)
            if s.settings:
                out["parameters"] = dict(s.settings)
            return out

        top = dict(self.settings)
        for k, v in self.params.items():  # every parameter filled in: the defaults too
            name = "lambda" if k == "lambda_" else k
            if name not in top and k not in top and not isinstance(v, list):
                top[name] = v
        out: dict[str, Any] = {"plugins": list(self.plugins)} if self.plugins else {}
        out["merge_method"] = self.method
        out["base_model"] = None if self.base is None else str(self.base)
        if self.sliced:
            slices = []
            for s in self.slices:
                sources = [src(i) for i in s.inputs]
                if s.base is not None and all(i.model != s.base.model for i in s.inputs):
                    sources.append(src(s.base))
                entry: dict[str, Any] = {"sources": sources}
                if s.settings:
                    entry["parameters"] = dict(s.settings)
                slices.append(entry)
            out["slices"] = slices
        else:
            out["models"] = [src(i) for i in self.slices[0].inputs if i.model != self.base or i.settings]
        out["parameters"] = top
        out["dtype"] = self.out_dtype
        tok: Any = self.tokenizer_source
        out["tokenizer_source"] = None if tok is None else str(tok)
        if self.tokenizer_tokens or self.pad_to_multiple_of:
            del out["tokenizer_source"]
            out["tokenizer"] = {"source": "base" if tok is None else str(tok)}
            if self.tokenizer_tokens:
                out["tokenizer"]["tokens"] = self.tokenizer_tokens
            if self.pad_to_multiple_of:
                out["tokenizer"]["pad_to_multiple_of"] = self.pad_to_multiple_of
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        out["shiftkit"] = {
            "max_shard_size": self.max_shard_size,
            "on_missing": self.on_missing,
            "compute_dtype": self.compute_dtype,
            "version": __version__,
        }
        return out

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (absolute paths, defaults filled, shiftkit version).

        Example:
            >>> print(r.to_yaml().splitlines()[1])
            merge_method: ties
        """
        import yaml

        head = "# resolved by shiftkit merge: absolute paths, every parameter filled in\n"
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_keys(where: str, got: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for k in got:
        if k in UNSUPPORTED and where == "recipe":
            raise ShiftkitError(UNSUPPORTED[k])
    unknown = sorted(str(k) for k in set(got) - set(allowed))
    if unknown:
        raise ShiftkitError(f"unknown {where} key(s) {unknown}; allowed: {list(allowed)}")


def _find(ref: Any, base_dir: Path | None, what: str) -> Path:
    if not isinstance(ref, (str, os.PathLike)) or not str(ref):
        raise ShiftkitError(f"{what} must be a path, got {ref!r}")
    p = Path(ref).expanduser()
    tried = [p if p.is_absolute() else Path.cwd() / p]
    if not p.is_absolute() and base_dir is not None:
        tried.append(base_dir / p)
    for cand in tried:
        if cand.exists():
            return cand.resolve()
    raise ShiftkitError(
        f"{what} {str(ref)!r} not found (looked at {[str(t) for t in tried]}); shiftkit merge reads local "
        "model folders, .safetensors files and shift files only (no hub downloads)"
    )


def _method_spec(method: str) -> MergeSpec:
    from shiftkit.merging.registry import get_merge_method

    return get_merge_method(method)


def _accepted(spec: MergeSpec) -> list[str]:
    return [p for p in spec.params if p != "base"]


def _recipe_name(name: str) -> str:
    return ALIASES.get(name, name)


def _check_settings(spec: MergeSpec, where: str, settings: Any) -> dict[str, Any]:
    """A ``parameters:`` mapping: known names (mergekit's or shiftkit's), well-formed values."""
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise ShiftkitError(f"{where}: 'parameters' must be a mapping, got {settings!r}")
    accepted = _accepted(spec)
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if k in IGNORED or k in spec.recipe_ignored:
            continue
        if _recipe_name(k) not in accepted and k != "weight":
            raise ShiftkitError(f"merge method {spec.name!r} has no parameter {k!r}; it accepts {accepted}")
        validate_setting(k, v)
        out[str(k)] = v
    return out


def _weight(value: Any, spec: MergeSpec, where: str, strict: bool) -> float:
    """An input's weight: required where mergekit requires it, else 1.0 by default."""
    if value is UNSET:
        if "weight" in spec.recipe_required and strict:
            raise ShiftkitError(
                f"{where} has no 'weight': merge method {spec.name!r} needs one for every input, as in "
                "mergekit (set it under the model's parameters, or once under the top-level parameters)"
            )
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ShiftkitError(f"{where}: weight must be a finite number, got {value!r}")
    return float(value)


def _convert(spec: MergeSpec, name: str, value: Any) -> Any:
    """A recipe value in shiftkit's terms (``rescale: true`` → ``"l1"``; ints of float parameters)."""
    if name == "rescale" and isinstance(value, bool):  # mergekit: rescale true = L1 matching (since 2024)
        return "l1" if value else "none"
    default = spec.params.get(name, inspect.Parameter.empty)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _tensor_params(
    spec: MergeSpec,
    sl: RecipeSlice,
    top: Mapping[str, Any],
    tensor: str,
    t: float,
    *,
    strict: bool,
) -> tuple[list[float], dict[str, Any]]:
    shared_levels = [sl.settings, top]
    weights = [
        _weight(resolve("weight", [i.settings, *shared_levels], tensor, t), spec, f"input {i.model}", strict)
        for i in sl.inputs
    ]
    params: dict[str, Any] = {}
    for name in _accepted(spec):
        if name == "weights":
            continue
        keys = [k for k in ("lambda", name) if _recipe_name(k) == name] if name == "lambda_" else [name]
        per_input = [
            next((v for k in keys if (v := resolve(k, [i.settings], tensor, t)) is not UNSET), UNSET)
            for i in sl.inputs
        ]
        shared = next((v for k in keys if (v := resolve(k, shared_levels, tensor, t)) is not UNSET), UNSET)
        values = [shared if v is UNSET else v for v in per_input]
        if any(v is not UNSET for v in per_input) and any(v is UNSET for v in values):
            default = spec.recipe_default(name)
            values = [default if v is UNSET else v for v in values]
        if all(v is UNSET for v in values):
            if name in spec.recipe_required and strict:
                raise ShiftkitError(
                    f"merge method {spec.name!r} needs parameter {name!r} in the recipe (mergekit requires "
                    f"it: it has no default){f' for tensor {tensor!r}' if tensor else ''}"
                )
            default = spec.recipe_default(name)
            if default is not inspect.Parameter.empty:
                params[name] = default
            continue
        values = [_convert(spec, name, v) for v in values]
        if len(set(map(repr, values))) == 1:
            params[name] = values[0]
        elif name in spec.per_input:
            params[name] = values
        else:
            raise ShiftkitError(
                f"per-model values of {name!r} ({values}) are not supported for {spec.name!r}: give every "
                f"model the same {name!r} or set it once under 'parameters:'"
            )
    return weights, params


def _probe(spec: MergeSpec, n: int, weights: list[float], params: dict[str, Any]) -> None:
    """Run the method on a tiny tensor so bad values fail now, before any checkpoint is read."""
    import torch

    gen = torch.Generator().manual_seed(0)
    probe = [{"probe": torch.randn(8, generator=gen)} for _ in range(n)]
    extra = {"base": {"probe": torch.randn(8, generator=gen)}} if spec.takes_base else {}
    try:
        spec.fn(probe, weights, **params, **extra)
        if spec.multipass is not None:
            spec.multipass(list(weights), **params)
    except ShiftkitError as err:
        raise ShiftkitError(f"recipe parameters rejected by {spec.name!r}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ShiftkitError(f"recipe parameters rejected by {spec.name!r}: {err}") from None


def check_params(spec: MergeSpec, weights: list[float], params: dict[str, Any], _seen: set[str]) -> None:
    """Probe a method once per distinct (weights, parameters) combination (``_seen`` remembers them)."""
    key = repr((weights, sorted(params.items())))
    if key not in _seen:
        _seen.add(key)
        _probe(spec, len(weights), weights, params)


def _entry(raw: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    entry = {"model": raw} if isinstance(raw, str) else raw
    if not isinstance(entry, dict):
        raise ShiftkitError(f"{where} must be a mapping {{model: path, parameters: {{...}}}}")
    _check_keys(where, entry, keys)
    return entry


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        raise ShiftkitError(
            f"{where}.layer_range must be [start, stop] with 0 <= start < stop, got {value!r}"
        )
    return int(value[0]), int(value[1])


def _order_inputs(
    spec: MergeSpec, inputs: list[SliceSource], base: SliceSource | None, where: str
) -> tuple[list[SliceSource], SliceSource | None]:
    """The merge's inputs in order, with the base among them only where the method takes it as an input."""
    if base is not None and not spec.base_is_input:
        inputs = [i for i in inputs if i.model != base.model]  # the base is θ0, not a merged input
    elif base is not None:
        listed = [i for i in inputs if i.model == base.model]
        others = [i for i in inputs if i.model != base.model]
        if listed:
            inputs = [listed[0], *others]  # slerp: t = 0 is the base; linear: it is averaged like any input
        else:  # mergekit merges the base model's tensor with the others even when it is not listed
            inputs = [SliceSource(base.model, base.layer_range, {}), *others]
    if not inputs:
        raise ShiftkitError(f"{where} lists no model besides the base")
    return inputs, base


def _whole_model_slice(
    spec: MergeSpec, entries: Any, base: Path | None, base_dir: Path | None
) -> RecipeSlice:
    if not isinstance(entries, list) or not entries:
        raise ShiftkitError(
            "the recipe needs 'models:', a non-empty list of {model: path, parameters: {...}}"
        )
    inputs = []
    for i, raw in enumerate(entries):
        entry = _entry(raw, f"models[{i}]", MODEL_KEYS)
        path = _find(entry.get("model"), base_dir, f"models[{i}].model")
        inputs.append(SliceSource(path, None, _check_settings(spec, f"models[{i}]", entry.get("parameters"))))
    ordered, bsrc = _order_inputs(spec, inputs, None if base is None else SliceSource(base), "the recipe")
    return RecipeSlice(ordered, bsrc, {})


def _layer_slices(spec: MergeSpec, raw: Any, base: Path | None, base_dir: Path | None) -> list[RecipeSlice]:
    if not isinstance(raw, list) or not raw:
        raise ShiftkitError("'slices:' must be a non-empty list of {sources: [{model, layer_range}, ...]}")
    out = []
    for j, sraw in enumerate(raw):
        where = f"slices[{j}]"
        if not isinstance(sraw, dict):
            raise ShiftkitError(f"{where} must be a mapping {{sources: [...], parameters: {{...}}}}")
        _check_keys(where, sraw, SLICE_KEYS)
        sources_raw = sraw.get("sources")
        if not isinstance(sources_raw, list) or not sources_raw:
            raise ShiftkitError(f"{where} needs 'sources:', a non-empty list of {{model, layer_range}}")
        sources = []
        for i, src_raw in enumerate(sources_raw):
            w = f"{where}.sources[{i}]"
            entry = _entry(src_raw, w, SOURCE_KEYS)
            if "layer_range" not in entry:
                raise ShiftkitError(f"{w} needs 'layer_range: [start, stop]'")
            path = _find(entry.get("model"), base_dir, f"{w}.model")
            settings = _check_settings(spec, w, entry.get("parameters"))
            sources.append(SliceSource(path, _layer_range(entry["layer_range"], w), settings))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources if s.layer_range is not None}
        if len(lengths) > 1:
            raise ShiftkitError(
                f"{where}: every source of a slice must give the same number of layers, got "
                f"{[list(s.layer_range or ()) for s in sources]}"
            )
        sbase = (
            base if sraw.get("base_model") is None else _find(sraw["base_model"], base_dir, f"{where}.base")
        )
        bsrc = None
        if sbase is not None:
            match = [s for s in sources if s.model == sbase]
            if not match:
                if spec.needs_base:
                    raise ShiftkitError(
                        f"{where}: the base model {sbase} is not one of the slice's sources; list it with "
                        "the layer range whose weights are θ0 for these layers"
                    )
            else:
                bsrc = match[0]
        if bsrc is None and spec.needs_base:
            raise ShiftkitError(f"merge_method {spec.name!r} needs a base model in every slice ({where})")
        ordered, bsrc = _order_inputs(spec, sources, bsrc, where)
        out.append(RecipeSlice(ordered, bsrc, _check_settings(spec, where, sraw.get("parameters"))))
    return out


def _check_counts(spec: MergeSpec, slices: list[RecipeSlice]) -> None:
    for j, sl in enumerate(slices):
        n = len(sl.inputs)
        if n < spec.min_inputs or (spec.max_inputs is not None and n > spec.max_inputs):
            want = (
                f"exactly {spec.min_inputs}"
                if spec.max_inputs == spec.min_inputs
                else f"{spec.min_inputs} or more"
                if spec.max_inputs is None
                else f"{spec.min_inputs} to {spec.max_inputs}"
            )
            where = f" in slices[{j}]" if len(slices) > 1 else ""
            raise ShiftkitError(
                f"{spec.name} merges {want} inputs, got {n}{where} ({[str(i.model.name) for i in sl.inputs]})"
            )


def _tokenizer_options(data: Mapping[str, Any], base: Path | None, base_dir: Path | None) -> dict[str, Any]:
    tok_block = data.get("tokenizer")
    if tok_block is not None and data.get("tokenizer_source") is not None:
        raise ShiftkitError("give either 'tokenizer_source:' or a 'tokenizer:' block, not both (as mergekit)")
    tokens: dict[str, Any] | None = None
    pad: int | None = None
    if tok_block is not None:
        if not isinstance(tok_block, dict):
            raise ShiftkitError(f"'tokenizer:' must be a mapping, got {tok_block!r}")
        _check_keys("tokenizer", tok_block, TOKENIZER_KEYS)
        source = tok_block.get("source", "union")
        tokens = dict(tok_block.get("tokens") or {}) or None
        pad = tok_block.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise ShiftkitError(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    else:
        source = data.get("tokenizer_source")  # absent or null: the donor's tokenizer files are copied
    if source is None:
        path: Path | str | None = None
    elif source in ("base", "union"):
        path = str(source)
    else:
        path = _find(source, base_dir, "tokenizer_source")
    template = data.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ShiftkitError(f"'chat_template:' must be a string, got {template!r}")
    return {
        "tokenizer_source": path,
        "tokenizer_tokens": tokens,
        "pad_to_multiple_of": pad,
        "chat_template": template,
    }


def resolve_recipe(data: dict[str, Any], source: str | os.PathLike[str] | None = None) -> ResolvedRecipe:
    """Validate recipe data (a parsed YAML mapping) and resolve paths, weights and parameters.

    Args:
        data: the recipe mapping (see the module docstring).
        source: the recipe file, for relative paths and messages.

    Returns:
        A :class:`ResolvedRecipe`.

    Raises:
        ShiftkitError: unknown keys or parameters, missing base, unsupported mergekit features, bad values.
        UnknownMethodError: ``merge_method`` is not registered.

    Example:
        >>> r = resolve_recipe({"merge_method": "task_arithmetic", "base_model": "base",
        ...                     "models": [{"model": "ft1"}, {"model": "ft2"}]})
        >>> r.weights
        [1.0, 1.0]
    """
    if not isinstance(data, dict):
        raise ShiftkitError(f"a merge recipe is a mapping, got {type(data).__name__}")
    _check_keys("recipe", data, TOP_KEYS)
    plugins = data.get("plugins") or []
    if isinstance(plugins, str) or not isinstance(plugins, list):
        raise ShiftkitError(f"'plugins:' is a list of module names, got {plugins!r}")
    load_plugins(plugins)  # a user's module registers its own merge methods before the look-up
    base_dir = Path(source).resolve().parent if source is not None else None
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise ShiftkitError("the recipe needs 'merge_method: <name>' (see shiftkit.list_merge_methods())")
    spec = _method_spec(method)
    if ("models" in data) == ("slices" in data):
        raise ShiftkitError(
            "the recipe needs exactly one of 'models:' (whole models) or 'slices:' (layer ranges)"
        )
    base_ref = data.get("base_model")
    base = None if base_ref is None else _find(base_ref, base_dir, "base_model")
    if base is None and spec.needs_base:
        raise ShiftkitError(
            f"merge_method {method!r} needs 'base_model:' (θ0, the model the shifts start from)"
        )
    settings = _check_settings(spec, "parameters", data.get("parameters"))
    sliced = "slices" in data
    if sliced:
        slices = _layer_slices(spec, data["slices"], base, base_dir)
    else:
        slices = [_whole_model_slice(spec, data["models"], base, base_dir)]
    _check_counts(spec, slices)
    weights, params = _tensor_params(spec, slices[0], settings, "", 0.0, strict=False)
    seen: set[str] = set()
    if all(
        is_constant(v)
        for level in [
            settings,
            *(s.settings for s in slices),
            *(i.settings for s in slices for i in s.inputs),
        ]
        for v in level.values()
    ):
        for sl in slices:  # constant everywhere: check the values now, before any checkpoint is read
            w, p = _tensor_params(spec, sl, settings, "", 0.0, strict=True)
            check_params(spec, w, p, seen)
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None and str(dtype) not in DTYPES:
        raise ShiftkitError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES.values()))}")
    sk_opts = dict(data.get("shiftkit") or {})
    sk_opts.pop("version", None)
    _check_keys("shiftkit", sk_opts, SHIFTKIT_KEYS)
    on_missing = sk_opts.get("on_missing", "error")
    if on_missing not in ON_MISSING:
        raise ShiftkitError(f"shiftkit.on_missing must be one of {list(ON_MISSING)}, got {on_missing!r}")
    compute = str(sk_opts.get("compute_dtype", "float32"))
    if compute not in DTYPES:
        raise ShiftkitError(
            f"unknown shiftkit.compute_dtype {compute!r}; use one of {sorted(set(DTYPES.values()))}"
        )
    tok = _tokenizer_options(data, base, base_dir)
    if sliced:
        models = list(dict.fromkeys(i.model for s in slices for i in s.inputs))
    else:
        models = [i.model for i in slices[0].inputs]
    return ResolvedRecipe(
        method=method,
        base=base,
        models=models,
        weights=weights if not sliced else [],
        params=params,
        out_dtype=None if dtype is None else DTYPES[str(dtype)],
        max_shard_size=parse_size(sk_opts.get("max_shard_size", DEFAULT_SHARD)),
        on_missing=str(on_missing),
        source=None if source is None else Path(source).resolve(),
        plugins=[str(p) for p in plugins],
        slices=slices,
        sliced=sliced,
        settings=settings,
        compute_dtype=DTYPES[compute],
        **tok,
    )


def load_recipe(path: str | os.PathLike[str]) -> ResolvedRecipe:
    """Read and resolve a YAML merge recipe.

    Raises:
        FileNotFoundError: no file at ``path``.
        ShiftkitError: invalid YAML or recipe (see :func:`resolve_recipe`).

    Example:
        >>> recipe = load_recipe("examples/merge_ties.yaml")
        >>> recipe.params["density"]
        0.5
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no recipe file at {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ShiftkitError(f"{p}: not valid YAML ({err})") from None
    return resolve_recipe(data, source=p)
