"""Merge recipes: mergekit-shaped YAML → a validated :class:`ResolvedRecipe` (unknown keys are errors).

Example recipe (``examples/merge_ties.yaml``)::

    plugins: [my_project.merges]    # optional: modules imported first (they register their own methods)
    merge_method: ties              # any name from sk.list_merge_methods()
    base_model: models/base         # HF folder or .safetensors file (θ0)
    models:                         # HF folders, .safetensors files, or shiftkit shift files (τ)
      - model: models/math
        parameters: {weight: 1.0, density: 0.5}
      - model: models/code
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16                 # output dtype (default: the base's); merge math is always float32
    tokenizer_source: base          # copy tokenizer files from "base", a listed model, or null
    shiftkit: {max_shard_size: 2GB, on_missing: error}

A recipe means what it means in mergekit 0.1.5: an omitted parameter takes mergekit's default, not the
paper default that ``sk.merge`` uses (``ties``/``dare_*``/``breadcrumbs*``: ``density`` 1.0, no pruning),
and what mergekit requires is required here (``weight`` for every input of the weighted methods, ``t`` for
``slerp``: a missing one is an error naming the key). ``linear`` with a ``base_model`` averages the base
with the models, as mergekit does (its weight from the top-level ``parameters``). Each method's recipe
contract is its :class:`~shiftkit.merging.registry.MergeSpec`.

mergekit names map to shiftkit's: ``lambda`` → ``lambda_``, ``rescale: true/false`` → ``"l1"``/``"none"``;
``int8_mask`` (a mergekit memory switch with no effect on results) is accepted and ignored. A per-model
``weight`` becomes the weights list; any other per-model parameter must be equal across models (it is then
the method's parameter). Unknown keys and parameters are errors. Relative model paths are looked up from the
current folder, then from the recipe's folder.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiftkit.core.registry import load_plugins
from shiftkit.errors import ShiftkitError
from shiftkit.merging.registry import MergeSpec
from shiftkit.merging.stream.checkpoints import parse_size

__all__ = ["ResolvedRecipe", "load_recipe", "resolve_recipe"]

TOP_KEYS = (
    "plugins",
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "shiftkit",
)
MODEL_KEYS = ("model", "parameters")
SHIFTKIT_KEYS = ("max_shard_size", "on_missing")
#: mergekit features with no shiftkit equivalent: a clear pointer instead of "unknown key"
UNSUPPORTED = {
    "slices": "'slices:' (layer ranges) is not supported; list whole models under 'models:'",
    "tokenizer": "'tokenizer:' (vocabulary unions) is not supported; use 'tokenizer_source:'",
    "chat_template": "'chat_template:' is not supported; edit tokenizer_config.json after merging",
    "modules": "'modules:' is not supported; list whole models under 'models:'",
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
class ResolvedRecipe:
    """A validated merge recipe with absolute paths and every method parameter filled in.

    Attributes:
        method: merge method name.
        base: base model path (θ0), or ``None`` (only for ``linear``).
        models: input paths (models or shift files), in merge order.
        weights: one weight per model.
        params: the method's parameters in shiftkit names (defaults filled).
        out_dtype: ``"float32"``/``"float16"``/``"bfloat16"`` or ``None`` (the base's dtype per tensor).
        tokenizer_source: folder to copy tokenizer files from, or ``None``.
        max_shard_size: bytes per output shard.
        on_missing: ``"error"``, ``"zero"`` or ``"skip"`` for tensors missing from some models (raise, count
            as a zero shift, or merge over the models that have them).
        source: the recipe file, if read from one.
        plugins: modules imported first (the recipe's ``plugins:``): they register user merge methods.

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
    tokenizer_source: Path | None = None
    max_shard_size: int = 2 * 10**9
    on_missing: str = "error"
    source: Path | None = None
    plugins: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data in mergekit's shape (re-loadable with :func:`resolve_recipe`).

        Example:
            >>> r.to_dict()["merge_method"]
            'ties'
        """
        from shiftkit._version import __version__

        params = {("lambda" if k == "lambda_" else k): v for k, v in self.params.items()}
        plugins: dict[str, Any] = {"plugins": list(self.plugins)} if self.plugins else {}
        return {
            **plugins,
            "merge_method": self.method,
            "base_model": None if self.base is None else str(self.base),
            "models": [
                {"model": str(m), "parameters": {"weight": w}}
                for m, w in zip(self.models, self.weights, strict=True)
            ],
            "parameters": params,
            "dtype": self.out_dtype,
            "tokenizer_source": None if self.tokenizer_source is None else str(self.tokenizer_source),
            "shiftkit": {
                "max_shard_size": self.max_shard_size,
                "on_missing": self.on_missing,
                "version": __version__,
            },
        }

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (absolute paths, defaults filled, shiftkit version).

        Example:
            >>> print(r.to_yaml().splitlines()[0])
            merge_method: ties
        """
        import yaml

        head = "# resolved by shiftkit merge: absolute paths, every parameter filled in\n"
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_keys(where: str, got: dict[str, Any], allowed: tuple[str, ...]) -> None:
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


_MISSING: Any = object()


def _weight(value: Any, spec: MergeSpec, where: str) -> float:
    """A model's weight: required where mergekit requires it, else 1.0 by default."""
    if value is _MISSING:
        if "weight" in spec.recipe_required:
            raise ShiftkitError(
                f"{where} has no 'weight': merge method {spec.name!r} needs one for every input, as in "
                "mergekit (set it under the model's parameters, or once under the top-level parameters)"
            )
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ShiftkitError(f"{where}: weight must be a finite number, got {value!r}")
    return float(value)


def _scalar(name: str, value: Any) -> Any:
    if isinstance(value, (list, dict)):
        raise ShiftkitError(
            f"parameter {name!r}: per-layer schedules (lists or filters) are not supported; give one value"
        )
    return value


def _method_spec(method: str) -> MergeSpec:
    from shiftkit.merging.registry import get_merge_method

    return get_merge_method(method)


def _normalise_params(spec: MergeSpec, raw: dict[str, Any]) -> dict[str, Any]:
    """Recipe parameters in shiftkit's names, every omitted one filled with mergekit's default.

    Raises:
        ShiftkitError: an unknown parameter, or a required one (mergekit's ``t``) missing.
    """
    sig = inspect.signature(spec.fn).parameters
    accepted = [p for p in spec.params if p != "base"]
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in IGNORED or k in spec.recipe_ignored:
            continue
        name = ALIASES.get(k, k)
        if name not in accepted:
            raise ShiftkitError(f"merge method {spec.name!r} has no parameter {k!r}; it accepts {accepted}")
        ann = str(sig[name].annotation)
        if "Sequence" not in ann and "Mapping" not in ann:  # list/dict only where the method takes one
            v = _scalar(k, v)
        if name == "rescale" and isinstance(v, bool):  # mergekit: rescale true = L1 matching (since 2024)
            v = "l1" if v else "none"
        out[name] = v
    for name in accepted:
        if name in out:
            continue
        if name in spec.recipe_required:
            raise ShiftkitError(
                f"merge method {spec.name!r} needs parameter {name!r} in the recipe (mergekit requires it: "
                "it has no default)"
            )
        default = spec.recipe_default(name)
        if default is not inspect.Parameter.empty:
            out[name] = default
    return out


def _probe(spec: MergeSpec, n: int, weights: list[float], params: dict[str, Any]) -> None:
    """Run the method on a tiny tensor so bad values fail now, before any checkpoint is read."""
    import torch

    gen = torch.Generator().manual_seed(0)
    probe = [{"probe": torch.randn(8, generator=gen)} for _ in range(n)]
    try:
        spec.fn(probe, weights, **params)
        if spec.multipass is not None:
            spec.multipass(list(weights), **params)
    except ShiftkitError as err:
        raise ShiftkitError(f"recipe parameters rejected by {spec.name!r}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ShiftkitError(f"recipe parameters rejected by {spec.name!r}: {err}") from None


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
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ShiftkitError(
            "the recipe needs 'models:', a non-empty list of {model: path, parameters: {...}}"
        )
    base_ref = data.get("base_model")
    base = None if base_ref is None else _find(base_ref, base_dir, "base_model")
    if base is None and spec.needs_base:
        raise ShiftkitError(
            f"merge_method {method!r} needs 'base_model:' (θ0, the model the shifts start from)"
        )
    top = dict(data.get("parameters") or {})
    top_weight = _scalar("weight", top.pop("weight", _MISSING))
    weight_required = "weight" in spec.recipe_required
    models: list[Path] = []
    weights: list[float] = []
    per_model: dict[str, list[Any]] = {}
    for i, entry in enumerate(entries):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise ShiftkitError(f"models[{i}] must be a mapping {{model: path, parameters: {{...}}}}")
        _check_keys(f"models[{i}]", entry, MODEL_KEYS)
        path = _find(entry.get("model"), base_dir, f"models[{i}].model")
        mparams = dict(entry.get("parameters") or {})
        if path == base and not spec.base_is_input:
            continue  # mergekit: the base is not one of the merged inputs (no weight needed)
        weight = _weight(_scalar("weight", mparams.pop("weight", top_weight)), spec, f"models[{i}] ({path})")
        models.append(path)
        weights.append(weight)
        for k, v in mparams.items():
            per_model.setdefault(k, []).append(v)
    if spec.base_is_input and base is not None and base not in models and weight_required:
        # mergekit's linear: the base model is one of the averaged inputs, weighted like any other
        models.insert(0, base)
        weights.insert(0, _weight(top_weight, spec, f"base_model ({base}), which {method!r} averages in"))
    if not models:
        raise ShiftkitError("the recipe lists no model besides the base")
    if spec.base_is_input and base in models and not weight_required:  # slerp: t = 0 is the base model
        j = models.index(base)
        models.insert(0, models.pop(j))
        weights.insert(0, weights.pop(j))
    for k, values in per_model.items():
        if len(values) != len(models) or any(v != values[0] for v in values):
            raise ShiftkitError(
                f"per-model values of {k!r} ({values}) are not supported for {method!r}: give every model "
                f"the same {k!r} or set it once under 'parameters:'"
            )
        top[k] = values[0]
    if spec.base_is_input and base is not None and base not in models and len(models) == 1:
        models.insert(0, base)  # mergekit's slerp shape, "base_model + one model": t = 0 is the base
        weights.insert(0, 1.0)
    params = _normalise_params(spec, top)
    _probe(spec, len(models), weights, params)
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None and str(dtype) not in DTYPES:
        raise ShiftkitError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES.values()))}")
    sk_opts = dict(data.get("shiftkit") or {})
    sk_opts.pop("version", None)
    _check_keys("shiftkit", sk_opts, SHIFTKIT_KEYS)
    on_missing = sk_opts.get("on_missing", "error")
    if on_missing not in ON_MISSING:
        raise ShiftkitError(f"shiftkit.on_missing must be one of {list(ON_MISSING)}, got {on_missing!r}")
    tok = data.get("tokenizer_source", "base")
    if tok is None or (tok == "base" and (base is None or not base.is_dir())):
        tok_path = None
    elif tok == "base":
        tok_path = base
    else:
        tok_path = _find(tok, base_dir, "tokenizer_source")
    return ResolvedRecipe(
        method=method,
        base=base,
        models=models,
        weights=weights,
        params=params,
        out_dtype=None if dtype is None else DTYPES[str(dtype)],
        tokenizer_source=tok_path,
        max_shard_size=parse_size(sk_opts.get("max_shard_size", DEFAULT_SHARD)),
        on_missing=str(on_missing),
        source=None if source is None else Path(source).resolve(),
        plugins=[str(p) for p in plugins],
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
