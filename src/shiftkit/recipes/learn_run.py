"""The ``shiftkit learn`` run: its YAML config, and :func:`run_learn`, which executes it.

The config (read with ``yaml.safe_load``; an unknown key anywhere is a :class:`ShiftkitError` naming it)::

    plugins: [my_project.methods]  # optional: modules imported first (they register their own methods)
    model: minilm                  # a zoo text encoder, or "package.module:function" -> (model, tokenizer)
    data:                          # a zoo dataset; only "vader" (4 sentiment domains) for now
      name: vader
      domain: tweets               # tweets | movies | amazon | nyt: the training domain
      n_train: 400
      n_test: 200                  # per evaluated domain
      threshold: 0.5               # |score| > threshold, positive if > threshold
      eval_domains: all            # optional: "all" or a list; default: the training domain only
    method:                        # any registered method and fields of its Config; or "full", "probe"
      name: lora
      r: 8
      lora_alpha: 16
      target_modules: [query, value]
    train: {epochs: 2, lr: 5.0e-4, batch_size: 16, seed: 0}    # fields of TrainConfig
    prune: {estimate_steps: 16}    # optional, method lora only: Light-PEFT (fields of LightPEFTSettings)
    # under torchrun (torchrun --nproc_per_node 2 -m shiftkit learn cfg.yaml) train.parallel picks ddp
    # (default) or fsdp (FSDP2: the base is sharded over the processes); rank 0 writes the files
    output: runs/learn/tweets-lora # <output>/shift.safetensors and <output>/metrics.json

With ``prune:`` the run is Light-PEFT's (:func:`shiftkit.recipes.light_peft.light_peft`): an estimation of
``estimate_steps`` steps, the base pruned of heads and FFN neurons and the LoRA of modules and ranks, then
the ``train:`` run on the smaller model. The base itself is not trained, so the smaller base is the original
one with the units removed: the result's ``prune_plan`` (``<output>/prune.json``: the removed ``heads`` and
``neurons`` per layer) rebuilds it with ``prune_(base, **plan)``, and the shift fits that model.

The method block resolves through the registry (``get_method(name).config_cls``), never through an import
path. When the model has a ``head`` module (a classifier), ``head`` is added to ``modules_to_save`` so it
trains beside the shift. A ``module:function`` model is imported with importlib: that is the user's own
code, named explicitly in their config; it must return ``(model, tokenizer)`` with
``model(input_ids, attention_mask) -> logits``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shiftkit.core.registry import load_plugins
from shiftkit.errors import ShiftkitError
from shiftkit.recipes.learn import TrainConfig
from shiftkit.recipes.light_peft import LightPEFTSettings

if TYPE_CHECKING:
    from shiftkit.core.config import ShiftConfig
    from shiftkit.core.shift import Shift

__all__ = [
    "FULL",
    "PROBE",
    "DataConfig",
    "LearnResult",
    "RunConfig",
    "build_model",
    "load_run_config",
    "method_config",
    "parse_run_config",
    "run_learn",
]

FULL, PROBE = "full", "probe"
_TOP = ("plugins", "model", "data", "method", "train", "prune", "output")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which zoo data to train and evaluate on (see the module docstring)."""

    name: str = "vader"
    domain: str = "tweets"
    n_train: int = 400
    n_test: int = 200
    threshold: float = 0.5
    seed: int = 0
    eval_domains: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A parsed ``shiftkit learn`` config."""

    model: str = "minilm"
    data: DataConfig = field(default_factory=DataConfig)
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: LightPEFTSettings | None = None
    output: str | None = None


_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    want = _SCALARS.get(typ) if isinstance(typ, str) else None
    if want is None:
        return value
    if want is float and isinstance(value, str):
        try:  # PyYAML reads "5e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, want):
        raise ShiftkitError(f"{where} must be {want.__name__}, got {value!r}")
    return value


def _block(raw: Any, cls: type, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ShiftkitError(f"{where} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ShiftkitError(
            f"unknown key(s) in {where}: {', '.join(map(str, unknown))}; known: {sorted(fields)}"
        )
    return {k: _coerce(v, fields[k], f"{where}.{k}") for k, v in raw.items()}


def parse_run_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a loaded YAML mapping into a :class:`RunConfig`.

    Raises:
        ShiftkitError: unknown keys (named), wrong types, or invalid values.

    Example:
        >>> cfg = parse_run_config({"model": "minilm", "method": {"name": "bitfit"}})
    """
    if not isinstance(raw, dict):
        raise ShiftkitError(f"{source}: a learn config is a mapping with keys {', '.join(_TOP)}")
    unknown = sorted(map(str, set(raw) - set(_TOP)))
    if unknown:
        raise ShiftkitError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_TOP)}")
    plugins = raw.get("plugins") or []
    if isinstance(plugins, str) or not isinstance(plugins, list):
        raise ShiftkitError(f"{source}: plugins is a list of module names, got {plugins!r}")
    load_plugins(plugins)  # a user's module registers its own learnable methods first
    model = raw.get("model", "minilm")
    if not isinstance(model, str) or not model:
        raise ShiftkitError(f"{source}: model must be a zoo name or 'package.module:function', got {model!r}")
    data = _block(raw.get("data"), DataConfig, f"{source}: data")
    if "eval_domains" in data:
        ev = data["eval_domains"]
        if ev == "all":
            from shiftkit.zoo import VADER_DOMAINS

            ev = list(VADER_DOMAINS)
        if isinstance(ev, str):
            ev = [ev]
        if not isinstance(ev, list) or not all(isinstance(d, str) for d in ev):
            raise ShiftkitError(f"{source}: data.eval_domains must be 'all' or a list of domains, got {ev!r}")
        data["eval_domains"] = tuple(ev)
    method_raw = raw.get("method", {"name": "lora"})
    if isinstance(method_raw, str):
        method_raw = {"name": method_raw}
    if not isinstance(method_raw, dict) or not isinstance(method_raw.get("name"), str):
        raise ShiftkitError(f"{source}: method must be a mapping with a 'name' (e.g. lora, ssf, full, probe)")
    options = {k: v for k, v in method_raw.items() if k != "name"}
    output = raw.get("output")
    if output is not None and not isinstance(output, str):
        raise ShiftkitError(f"{source}: output must be a folder path, got {output!r}")
    prune = None
    if "prune" in raw:
        if method_raw["name"] != "lora":
            raise ShiftkitError(f"{source}: prune (Light-PEFT) needs method lora, not {method_raw['name']!r}")
        prune = _block(raw["prune"], LightPEFTSettings, f"{source}: prune")
    try:
        cfg = RunConfig(
            model=model,
            data=DataConfig(**data),
            method=method_raw["name"],
            method_options=options,
            train=TrainConfig(**_block(raw.get("train"), TrainConfig, f"{source}: train")),
            prune=None if prune is None else LightPEFTSettings(**prune),
            output=output,
        )
    except TypeError as err:
        raise ShiftkitError(f"{source}: {err}") from None
    method_config(cfg.method, cfg.method_options, head=False)  # validate the method block now
    return cfg


def load_run_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and validate a ``shiftkit learn`` YAML file (``yaml.safe_load``).

    Example:
        >>> cfg = load_run_config("examples/learn_vader_lora.yaml")
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ShiftkitError(f"no learn config at {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ShiftkitError(f"{p} is not valid YAML: {err}") from None
    return parse_run_config(raw, str(p))


def method_config(name: str, options: dict[str, Any], *, head: bool) -> ShiftConfig | None:
    """The registered method's config built from ``options`` (``None`` for ``full`` and ``probe``).

    Args:
        name: a registered method name, ``"full"`` or ``"probe"``.
        options: fields of the method's config.
        head: add ``"head"`` to ``modules_to_save`` (the model is a classifier with a ``head``).

    Raises:
        ShiftkitError: unknown fields (named) or invalid values; UnknownMethodError for unknown names.
    """
    if name in (FULL, PROBE):
        if options:
            raise ShiftkitError(f"method {name!r} takes no options, got {', '.join(map(str, options))}")
        return None
    from shiftkit.core.registry import get_method

    cls = get_method(name).config_cls
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(options) - known))
    if unknown:
        raise ShiftkitError(
            f"unknown key(s) for method {name!r}: {', '.join(unknown)}; known: {sorted(known)}"
        )
    opts = dict(options)
    if head:
        saved = opts.get("modules_to_save") or ()
        saved = (saved,) if isinstance(saved, str) else tuple(saved)
        opts["modules_to_save"] = saved if "head" in saved else (*saved, "head")
    try:
        return cls(**opts)
    except TypeError as err:
        raise ShiftkitError(f"invalid options for method {name!r}: {err}") from None


def build_model(spec: str, num_labels: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a zoo encoder name or a ``package.module:function`` factory.

    Args:
        spec: ``"minilm"`` (a :class:`~shiftkit.recipes.models.TextClassifier` on the zoo encoder) or
            ``"package.module:function"``, called without arguments.
        num_labels: classes of a zoo classifier.
        seed: seed of a zoo classifier's head.

    Raises:
        ShiftkitError: the factory cannot be imported or does not return ``(model, tokenizer)``.

    Example:
        >>> model, tok = build_model("my_project.models:sentiment_classifier")
    """
    from shiftkit.recipes.loading import resolve_model

    if ":" not in spec:
        from shiftkit.recipes.models import text_classifier

        return text_classifier(spec, num_labels=num_labels, seed=seed)
    model, tok = resolve_model(spec)
    if tok is None:
        raise ShiftkitError(
            f"model factory {spec!r} must return (nn.Module, tokenizer); it gave no tokenizer"
        )
    return model, tok


@dataclass
class LearnResult:
    """What :func:`run_learn` produced: the shift to save and the metrics to report."""

    shift: Shift
    metrics: dict[str, Any]
    is_main: bool = True  # under torchrun: whether this process writes the files (rank 0)
    #: with ``prune:``, the units removed from the base: ``{"heads": {...}, "neurons": {...}}``
    prune_plan: dict[str, Any] | None = None


def run_learn(config: RunConfig, *, progress: bool | None = None) -> LearnResult:
    """Train what ``config`` describes and return the shift and its metrics (nothing is written).

    ``full`` and ``probe`` return their task vector (``sk.task_vector(base, tuned)``, only the head's
    tensors for the probe); a registered method returns ``sk.extract(model)``.

    Example:
        >>> res = run_learn(load_run_config("examples/learn_vader_lora.yaml"))
        >>> sk.save(res.shift, "shift.safetensors")
    """
    import torch

    import shiftkit as sk
    from shiftkit import zoo
    from shiftkit.recipes.distributed import gather_full, init_from_env, reshard_, shard_
    from shiftkit.recipes.learn import accuracy, encode_texts, eval_batches, text_batches, train
    from shiftkit.recipes.light_peft import light_peft

    d, tc = config.data, config.train
    if d.name != "vader":
        raise ShiftkitError(f"data.name {d.name!r} is not supported; the learn recipe reads: vader")
    domains = list(dict.fromkeys((d.domain, *d.eval_domains)))
    bad = [x for x in domains if x not in zoo.VADER_DOMAINS]
    if bad:
        raise ShiftkitError(f"unknown VADER domain(s) {bad}; known: {', '.join(zoo.VADER_DOMAINS)}")
    model, tok = build_model(config.model, num_labels=2, seed=tc.seed)
    has_head = isinstance(getattr(model, "head", None), torch.nn.Module)
    mcfg = method_config(config.method, config.method_options, head=has_head)
    if config.method == PROBE and not has_head:
        raise ShiftkitError("method 'probe' trains the model's 'head' module, and this model has none")

    def split(dom: str, n_train: int) -> tuple[Any, Any, Any, Any]:
        try:
            return zoo.vader_split(dom, n_train=n_train, n_test=d.n_test, threshold=d.threshold, seed=d.seed)
        except ValueError as err:  # asked for more sentences than the domain has
            raise ShiftkitError(f"data ({dom}): {err}") from None

    tr_x, tr_y, _, _ = split(d.domain, d.n_train)
    train_data = encode_texts(tok, tr_x, tr_y, tc.max_length)
    tests = {}
    for dom in domains:
        _, _, te_x, te_y = split(dom, 0)  # the test set does not depend on n_train (vader_split's policy)
        tests[dom] = eval_batches(encode_texts(tok, te_x, te_y, tc.max_length))

    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    total = sum(p.numel() for p in model.parameters())
    torch.manual_seed(tc.seed)  # some shifts draw their initialisation (LoRA's A, SSF's γ/β)
    dist = init_from_env()  # several processes under torchrun: DDP or FSDP2 (train.parallel)
    found = None
    if config.prune is not None and mcfg is not None:
        if dist.active:
            raise ShiftkitError("prune (Light-PEFT) runs in one process; launch it without torchrun")
        from shiftkit.methods.lora.config import LoRAConfig

        assert isinstance(mcfg, LoRAConfig)  # parse_run_config allows prune with lora only
        batches = text_batches(train_data, tc.batch_size)
        found = light_peft(model, mcfg, batches, config.prune, tc, progress=progress)  # attaches the LoRA
        total = found.base_params[1]
    elif mcfg is not None:
        sk.attach_(model, mcfg)
    else:
        for p in model.parameters():
            p.requires_grad_(config.method == FULL)
        if config.method == PROBE:
            for p in model.head.parameters():
                p.requires_grad_(True)
    runner = shard_(model, tc.parallel, dist)  # FSDP2 replaces the parameters: collect them afterwards
    if mcfg is not None:
        params = sk.shift_parameters(model)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)

    def eval_fn() -> dict[str, float]:
        return {"accuracy": accuracy(runner, tests[d.domain])}

    start = time.perf_counter()
    res = train(
        runner,
        params,
        text_batches(train_data, tc.batch_size),
        eval_fn,
        tc,
        progress=progress,
        desc=f"learn {config.method}",
        dist=dist,
    )
    acc = {dom: accuracy(runner, batches) for dom, batches in tests.items()}
    reshard_(model)  # FSDP2: back to the sharded parameters, gathered whole by extract / gather_full
    if mcfg is not None:
        shift = sk.extract(model)  # gathered whole from every rank's shard under FSDP2
    else:
        tuned = gather_full(model.state_dict())
        names = (
            list(base_state) if config.method == FULL else [k for k in base_state if k.startswith("head.")]
        )
        shift = sk.task_vector({k: base_state[k] for k in names}, {k: tuned[k] for k in names})
    metrics = {
        "model": config.model,
        "method": config.method,
        "method_options": copy.deepcopy(config.method_options),
        "data": dataclasses.asdict(d),
        "train": dataclasses.asdict(tc),
        "trainable_params": n_train,
        "total_params": total,
        "trainable_pct": 100.0 * n_train / total,
        "accuracy": acc,
        "train_seconds": res.seconds,
        "total_seconds": time.perf_counter() - start,
        "steps": res.steps,
        "final_loss": res.losses[-1],
        "losses": res.losses,
        "evals": [{"step": s, **m} for s, m in res.evals],
        "torch_version": torch.__version__,
        "shiftkit_version": sk.__version__,
        "processes": dist.world,
        "parallel": tc.parallel if dist.active else None,
    }
    plan = None
    if found is not None:
        plan = {"heads": found.heads, "neurons": found.neurons}
        metrics["prune"] = {
            **dataclasses.asdict(config.prune or LightPEFTSettings()),
            "heads_removed": sum(len(v) for v in found.heads.values()),
            "neurons_removed": sum(len(v) for v in found.neurons.values()),
            "lora_modules_removed": found.modules,
            "lora_params": list(found.shift_params),
            "base_params": list(found.base_params),
            "estimate_seconds": found.estimate.seconds,
            "estimate_steps_run": found.estimate.steps,
        }
    return LearnResult(shift, metrics, is_main=dist.is_main, prune_plan=plan)
