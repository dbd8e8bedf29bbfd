"""Reading Hugging Face PEFT adapter folders (LoRA, (IA)³, prompt tuning) into shiftkit shifts.

Keys are parsed structurally: ``[base_model.model.]<module path>.<role>[.<adapter name>][.weight]`` with the
role one of ``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``, ``ia3_l`` or ``base_layer``
(an embedding table PEFT saves beside the adapter); any other key belongs to a ``modules_to_save`` module.
Prompt-tuning files use the lead ``base_model.`` and the key ``prompt_embeddings``. PEFT options whose
computation shiftkit cannot reproduce are refused by name rather than silently dropped.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from shiftkit.core.attach import module_shape
from shiftkit.core.patterns import module_patterns
from shiftkit.core.registry import get_method
from shiftkit.core.shift import Shift
from shiftkit.core.targets import find_input_embeddings, iter_base_modules
from shiftkit.core.wrapper import is_shift_module
from shiftkit.errors import CorruptFileError, ShiftkitError, ShiftMismatchError

__all__ = ["CONFIG_NAME", "PEFT_TYPES", "WEIGHTS_NAME", "read_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: shiftkit method -> PEFT peft_type
PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING"}

# PEFT LoRA options that change what the adapter computes; shiftkit has no counterpart, so importing an
# adapter that sets one would silently compute something else
_LORA_UNSUPPORTED = (
    "use_dora", "lora_bias", "fan_in_fan_out", "layer_replication",
    "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "use_bdlora",
    "megatron_config", "arrow_config", "kasa_config", "velora_config", "monteclora_config",
)  # fmt: skip
# inits that rewrite the base weights: the adapter only fits the rewritten base
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")
_INIT_NAMES = {"RANDOM": "random", "SAMPLE_VOCAB": "sample_vocab", "TEXT": "text"}
# PEFT role segment -> (shiftkit role, whether a ".weight" segment follows)
_ROLES = {
    "lora_A": ("lora_A", True),
    "lora_B": ("lora_B", True),
    "lora_embedding_A": ("lora_A", False),
    "lora_embedding_B": ("lora_B", False),
    "ia3_l": ("ia3_l", False),
    "base_layer": ("base_layer", True),
}


def read_adapter(path: Path, model: nn.Module | None, prefix: str) -> Shift:
    """The shift in the PEFT adapter folder ``path`` (see :func:`shiftkit.interop.peft.import_peft`)."""
    config, tensors = _read_folder(path)
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES.values():
        raise ShiftkitError(
            f"peft_type {peft_type!r} is not supported: shiftkit imports {list(PEFT_TYPES.values())}"
        )
    prefix = prefix.strip(".")
    modules = _model_modules(model, prefix)
    if peft_type == "PROMPT_TUNING":
        return _read_prompt(config, tensors, model, modules, prefix)
    return _read_tuner(str(peft_type), config, tensors, modules, prefix)


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not folder.is_dir():
        raise ShiftkitError(f"{folder} is not a PEFT adapter folder (no such folder)")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise ShiftkitError(f"{folder} has no {CONFIG_NAME}: not a PEFT adapter folder")
    if not weights_path.is_file():
        pickle = " (only a pickled adapter_model.bin, which shiftkit never unpickles)"
        found = pickle if (folder / "adapter_model.bin").exists() else ""
        raise ShiftkitError(f"{folder} has no {WEIGHTS_NAME}{found}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CorruptFileError(f"{config_path} must hold a JSON object")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptFileError(f"{weights_path} is not a readable safetensors file ({err})") from None
    return config, tensors


def _model_modules(model: nn.Module | None, prefix: str) -> dict[str, nn.Module] | None:
    if model is None:
        return None
    out: dict[str, nn.Module] = {}
    for name, module in iter_base_modules(model):
        base = module.base if is_shift_module(module) else module
        assert isinstance(base, nn.Module)
        out[name] = base
    if prefix and prefix not in out:
        raise ShiftMismatchError(f"the model has no submodule {prefix!r} (prefix)")
    return out


def _shape_of(
    modules: dict[str, nn.Module] | None, fqn: str, kind: type[nn.Module] | None
) -> tuple[int, ...] | None:
    """The recorded shape of module ``fqn`` of the model (``None`` without a model); checks its type."""
    if modules is None:
        return None
    module = modules.get(fqn)
    if module is None:
        near = [n for n in modules if n.endswith(fqn.rsplit(".", 1)[-1])][:3]
        raise ShiftMismatchError(
            f"the adapter adapts {fqn!r}, which the model does not have (similar: {near})"
        )
    if kind is not None and not isinstance(module, kind):
        raise ShiftMismatchError(
            f"the adapter treats {fqn!r} as {kind.__name__}, but it is {type(module).__name__}"
        )
    return module_shape(module)


def _input_embedding(model: nn.Module, prefix: str) -> tuple[str, nn.Module]:
    """``(name, module)`` of the one input embedding of the PEFT base model ``prefix`` inside ``model``."""
    root = model.get_submodule(prefix) if prefix else model
    found = {id(m): n for n, m in root.named_modules()}
    embeddings = [found[i] for i in find_input_embeddings(root) if i in found]
    if len(embeddings) != 1:
        raise ShiftMismatchError(
            f"prompt tuning needs exactly one input embedding (get_input_embeddings()) in "
            f"{prefix or 'the model'}; found {len(embeddings)}: pass prefix=... to pick the base model"
        )
    name = f"{prefix}.{embeddings[0]}" if prefix else embeddings[0]
    return name, root.get_submodule(embeddings[0])


def _check_base_weight(modules: dict[str, nn.Module] | None, fqn: str, weight: Tensor) -> None:
    # PEFT saves an adapted embedding's table with the adapter (save_embedding_layers): it must be the model's
    if modules is None:
        warnings.warn(
            f"the adapter stores base weights for {fqn!r}; shiftkit ignores them (pass model= to check that "
            "they equal the model's)",
            stacklevel=3,
        )
        return
    own = getattr(modules.get(fqn), "weight", None)
    if not isinstance(own, Tensor) or own.shape != weight.shape or not torch.equal(own, weight.to(own.dtype)):
        raise ShiftMismatchError(
            f"the adapter carries its own base weights for {fqn!r} (a resized or retrained embedding); "
            "shiftkit shifts cannot carry base weights"
        )


def _check_options(peft_type: str, config: dict[str, Any]) -> None:
    bad: list[str] = []
    if peft_type == "LORA":
        bad = [o for o in _LORA_UNSUPPORTED if config.get(o) not in (None, False, {}, [], "")]
        if config.get("bias", "none") not in (None, "none"):
            bad.append(f"bias={config['bias']!r}")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            bad.append(f"init_lora_weights={init!r} (it rewrites the base weights)")
    elif peft_type == "IA3" and config.get("fan_in_fan_out"):
        bad.append("fan_in_fan_out")
    elif peft_type == "PROMPT_TUNING":
        if config.get("num_transformer_submodules") not in (None, 1):
            bad.append(f"num_transformer_submodules={config['num_transformer_submodules']}")
        if config.get("task_type") == "SEQ_2_SEQ_LM":
            bad.append("task_type='SEQ_2_SEQ_LM'")
    if bad:
        raise ShiftkitError(
            f"this {peft_type} adapter uses options shiftkit does not support: {', '.join(bad)}"
        )


def _split_key(key: str, prompt: bool) -> tuple[str, str, str | None]:
    """A PEFT key as ``(module path, shiftkit role, adapter name)``; role ``""`` = not an adapter tensor."""
    parts = key.split(".")
    lead = ["base_model"] if prompt else ["base_model", "model"]
    if parts[: len(lead)] == lead:
        parts = parts[len(lead) :]
    if prompt:
        return (
            ("", "prompt_embeddings", None) if parts == ["prompt_embeddings"] else (".".join(parts), "", None)
        )
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] not in _ROLES:
            continue
        role, weight = _ROLES[parts[i]]
        tail = parts[i + 1 :]
        if weight and tail[-1:] == ["weight"]:
            tail = tail[:-1]
        elif weight:
            raise CorruptFileError(f"unexpected adapter tensor {key!r} (expected .../{parts[i]}.weight)")
        if len(tail) > 1:
            raise CorruptFileError(f"unexpected adapter tensor {key!r}")
        if parts[i].startswith("lora_embedding"):
            role = f"embedding:{role}"
        return ".".join(parts[:i]), role, tail[0] if tail else None
    return ".".join(parts), "", None


def _split_saved(path: str, patterns: list[str]) -> tuple[str, str]:
    parts = path.split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        if any(module == m or module.endswith("." + m) for m in patterns):
            return module, ".".join(parts[i:])
    raise CorruptFileError(
        f"tensor {path!r} is neither an adapter tensor nor part of a modules_to_save module ({patterns})"
    )


def _collect(
    config: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, nn.Module] | None, prefix: str
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]]]:
    """Adapter tensors by module and role, and ``modules_to_save`` tensors by module and parameter."""
    prompt = config["peft_type"] == "PROMPT_TUNING"

    def full(name: str) -> str:  # PEFT module name -> name in the shiftkit model
        return f"{prefix}.{name}" if prefix and name else prefix or name

    patterns = [str(m) for m in config.get("modules_to_save") or []]
    adapters: set[str] = set()
    found: dict[str, dict[str, Tensor]] = {}
    saved: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        module, role, adapter = _split_key(key, prompt)
        if adapter is not None:
            adapters.add(adapter)
        if role == "base_layer":
            _check_base_weight(modules, full(module), value)
        elif role:
            found.setdefault(full(module), {})[role] = value
        else:
            name, param = _split_saved(module, patterns)
            if value.is_floating_point():  # PEFT also saves integer buffers (num_batches_tracked)
                saved.setdefault(full(name), {})[param] = value
    if len(adapters) > 1:
        raise ShiftkitError(f"the file holds several adapters ({sorted(adapters)}); save them one by one")
    if not found:
        raise CorruptFileError(f"the file holds no {config['peft_type']} adapter tensors")
    return found, saved


def _saved_part(
    saved: dict[str, dict[str, Tensor]], modules: dict[str, nn.Module] | None
) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]]]:
    tensors, base = {}, {}
    for fqn, params in saved.items():
        own = _shape_of(modules, fqn, None)
        like = params.get("weight", params.get("bias"))
        base[fqn] = own if own is not None else (() if like is None else tuple(like.shape))
        tensors.update({f"{fqn}.saved.{k}": v for k, v in params.items()})
    return tensors, base


def _read_tuner(
    peft_type: str,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    modules: dict[str, nn.Module] | None,
    prefix: str,
) -> Shift:
    _check_options(peft_type, config)
    found, saved = _collect(config, tensors, modules, prefix)
    out, base = _saved_part(saved, modules)
    roles = {"lora_A", "lora_B"} if peft_type == "LORA" else {"ia3_l"}
    for fqn, parts in found.items():
        if {r.removeprefix("embedding:") for r in parts} != roles:
            raise CorruptFileError(f"{fqn!r} has adapter tensors {sorted(parts)}, expected {sorted(roles)}")
    if peft_type == "LORA":
        return _lora_shift(config, found, out, base, modules, prefix)
    if modules is None:
        raise ShiftkitError(
            "importing an (IA)³ adapter needs model=...: the file does not hold the layer shapes"
        )
    patterns = config.get("feedforward_modules")
    feedforward = []
    for fqn, parts in found.items():
        scale = parts["ia3_l"]
        shape = _shape_of(modules, fqn, (nn.Linear, nn.Conv2d, nn.Conv3d))  # type: ignore[arg-type]
        assert shape is not None
        name = fqn[len(prefix) + 1 :] if prefix else fqn
        if isinstance(patterns, str):  # PEFT: a string is a full regex, a list entry a suffix of the name
            is_ff = re.fullmatch(patterns, name) is not None
        elif patterns:
            is_ff = any(name.endswith(t) for t in patterns)
        else:
            is_ff = scale.shape[1] != shape[0] if scale.dim() > 2 else tuple(scale.shape) != (shape[0], 1)
        if is_ff:
            feedforward.append(fqn)
        out[f"{fqn}.ia3_l"], base[fqn] = scale, shape
    ia3_cls: Any = get_method("ia3").config_cls
    ia3 = ia3_cls(
        target_modules=tuple(found),
        feedforward_modules=tuple(feedforward),
        init_ia3_weights=bool(config.get("init_ia3_weights", True)),
        modules_to_save=tuple(saved),
    )
    return Shift("ia3", ia3, out, base)


def _lora_shift(
    config: dict[str, Any],
    found: dict[str, dict[str, Tensor]],
    out: dict[str, Tensor],
    base: dict[str, tuple[int, ...]],
    modules: dict[str, nn.Module] | None,
    prefix: str,
) -> Shift:
    r = config.get("r", 8)
    lora_cls: Any = get_method("lora").config_cls
    # per-module ranks and alphas: PEFT matches the keys (regular expressions) against its own module names,
    # which are shiftkit's without the prefix; each module's values are resolved on that name and stored
    # under shiftkit's names
    alpha = float(config.get("lora_alpha", 8))
    patterns = lora_cls(
        r=r,
        lora_alpha=alpha,
        rank_pattern=config.get("rank_pattern") or {},
        alpha_pattern=config.get("alpha_pattern") or {},
    )
    peft_names = {fqn: fqn[len(prefix) + 1 :] if prefix else fqn for fqn in found}
    ranks = {fqn: patterns.rank_of(name) for fqn, name in peft_names.items()}
    alphas = {fqn: patterns.alpha_of(name) for fqn, name in peft_names.items()}
    for fqn, parts in found.items():
        a = parts.get("lora_A", parts.get("embedding:lora_A"))
        b = parts.get("lora_B", parts.get("embedding:lora_B"))
        assert a is not None and b is not None
        kind: type[nn.Module]
        if "embedding:lora_A" in parts:
            kind, shape = nn.Embedding, (a.shape[1], b.shape[0])
        elif a.dim() == 2:
            kind, shape = nn.Linear, (b.shape[0], a.shape[1])
        elif a.dim() == 4:
            kind, shape = nn.Conv2d, (b.shape[0], *a.shape[1:])
            _check_conv(fqn, a, b, ranks[fqn], modules)
        else:
            raise ShiftkitError(
                f"LoRA on {fqn!r}: lora_A has shape {tuple(a.shape)}; only Linear, Conv2d, Embedding"
            )
        if a.shape[0] != ranks[fqn] or b.shape[1] != ranks[fqn]:
            raise ShiftkitError(f"LoRA on {fqn!r} has rank {a.shape[0]}, the config says r={ranks[fqn]}")
        own = _shape_of(modules, fqn, kind)
        if own is not None and own != shape:
            raise ShiftMismatchError(f"LoRA on {fqn!r} is for shape {shape}, the model's is {own}")
        out[f"{fqn}.lora_A"], out[f"{fqn}.lora_B"], base[fqn] = a, b, shape
    init = config.get("init_lora_weights", True)
    lora = lora_cls(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(config.get("lora_dropout", 0.0)),
        use_rslora=bool(config.get("use_rslora", False)),
        # only a fresh attach uses the init; other PEFT inits (eva, orthogonal) left no trace in the weights
        init_lora_weights=init if init in (True, False, "gaussian") else True,
        target_modules=tuple(found),
        modules_to_save=tuple(k for k in base if k not in found),
        rank_pattern={k: int(v) for k, v in module_patterns(ranks, r).items()},
        alpha_pattern=module_patterns(alphas, alpha),
    )
    return Shift("lora", lora, out, base)


def _check_conv(fqn: str, a: Tensor, b: Tensor, r: int, modules: dict[str, nn.Module] | None) -> None:
    """Name the real reason a Conv2d LoRA cannot be read (groups), and warn about dilated convolutions."""
    conv = modules.get(fqn) if modules is not None else None
    groups = conv.groups if isinstance(conv, nn.Conv2d) else None
    if groups is None and b.shape[1] != r and b.shape[1] > 0 and r % b.shape[1] == 0:
        groups = r // b.shape[1]  # PEFT's lora_B of a grouped conv has r/groups input channels
    if groups is not None and groups != 1:
        raise ShiftkitError(
            f"LoRA on {fqn!r}: the layer is a grouped Conv2d (groups={groups}); shiftkit's LoRA supports "
            "Conv2d with groups=1 only (PEFT's grouped-conv LoRA, whose lora_B is itself grouped, cannot "
            "be folded into the grouped weight either)"
        )
    if isinstance(conv, nn.Conv2d):
        warn_if_dilated(fqn, conv, "was trained with")


def warn_if_dilated(fqn: str, conv: nn.Conv2d, verb: str) -> None:
    """Warn that PEFT's unmerged LoRA branch of a dilated Conv2d computes something else than shiftkit's.

    PEFT 0.21.2 builds ``lora_A`` with the base conv's kernel, stride and padding but not its dilation, so
    its forward either fails on mismatched shapes or, where they happen to fit, computes a different
    branch; shiftkit applies the dilation (what PEFT's own merged weights compute).
    """
    dilated = any(d != 1 for d in conv.dilation) and any(k > 1 for k in conv.kernel_size)
    if dilated:
        warnings.warn(
            f"LoRA on {fqn!r}: the Conv2d is dilated (dilation={tuple(conv.dilation)}); PEFT's unmerged "
            f"LoRA branch ignores the dilation while shiftkit applies it, so an adapter that {verb} PEFT "
            "computes differently in the two (PEFT's merged weights agree with shiftkit)",
            stacklevel=4,
        )


def _read_prompt(
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    model: nn.Module | None,
    modules: dict[str, nn.Module] | None,
    prefix: str,
) -> Shift:
    _check_options("PROMPT_TUNING", config)
    if model is None:
        raise ShiftkitError(
            "importing a prompt-tuning adapter needs model=...: the file does not name the embedding"
        )
    found, saved = _collect(config, tensors, modules, prefix)
    out, base = _saved_part(saved, modules)
    prompt = found[prefix]["prompt_embeddings"]
    fqn, embedding = _input_embedding(model, prefix)
    p = config.get("num_virtual_tokens")
    dim = module_shape(embedding)[1]
    if prompt.dim() != 2 or tuple(prompt.shape) != (p, dim):
        raise ShiftMismatchError(
            f"prompt_embeddings has shape {tuple(prompt.shape)}, expected (num_virtual_tokens={p}, {dim})"
        )
    init = _INIT_NAMES.get(str(config.get("prompt_tuning_init") or "RANDOM"), "random")
    pt_cls: Any = get_method("prompt_tuning").config_cls
    task = config.get("task_type")
    if task not in (*pt_cls.PREPEND_TOKEN_TYPES, *pt_cls.DROP_TOKEN_TYPES):
        raise ShiftkitError(
            f"prompt-tuning adapter with task_type {task!r}: not a PEFT task type shiftkit knows"
        )
    text, tokenizer = config.get("prompt_tuning_init_text"), config.get("tokenizer_name_or_path")
    pt = pt_cls(
        num_virtual_tokens=int(prompt.shape[0]),
        init="random" if init == "text" else init,  # the token ids of a TEXT init are not in the file
        init_text=text if init == "text" else None,
        tokenizer_name_or_path=tokenizer if init == "text" else None,
        task_type=task,  # PEFT's wrapper for this task type decides what happens to token_type_ids
        target_modules=(fqn,),
        modules_to_save=tuple(saved),
    )
    out[f"{fqn}.prompt_embeddings"], base[fqn] = prompt, module_shape(embedding)
    return Shift("prompt_tuning", pt, out, base)
