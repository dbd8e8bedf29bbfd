"""Hugging Face PEFT adapter folders ↔ shiftkit shifts: LoRA, (IA)³ and prompt tuning (PEFT 0.21.2 layout).

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (Linear, Conv2d: the same layouts as
shiftkit's ``lora_A (r, in[, kh, kw])``, ``lora_B (out, r[, 1, 1])``), ``<module>.lora_embedding_A`` /
``_B`` (Embedding: ``(r, num_embeddings)`` and ``(dim, r)``, shiftkit's ``lora_A`` / ``lora_B``),
``<module>.ia3_l`` and ``prompt_embeddings``; a ``modules_to_save`` module stores its tensors as
``<module>.<param>`` (shiftkit: ``<module>.saved.<param>``). The math is identical on both sides, so a
conversion only renames keys and translates the config.

``prefix`` maps module names: the PEFT base model is the submodule ``prefix`` of the shiftkit model
(``"encoder"`` for a :class:`~shiftkit.recipes.models.TextClassifier` around a BERT).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from shiftkit._fileio import atomic_write_text
from shiftkit.core.attach import extract
from shiftkit.core.io import atomic_save_tensors
from shiftkit.core.patterns import exact_patterns
from shiftkit.core.registry import get_method
from shiftkit.core.shift import Shift, split_key
from shiftkit.core.targets import find_input_embeddings, iter_base_modules, match_names
from shiftkit.core.wrapper import is_shift_module
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.interop.peft.read import (
    CONFIG_NAME,
    PEFT_TYPES,
    WEIGHTS_NAME,
    read_adapter,
    warn_if_dilated,
)

__all__ = ["export_peft", "import_peft"]

#: PEFT task types (PEFT picks the model wrapper from the one in the config)
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


# --- export ----------------------------------------------------------------------------------------------
def export_peft(
    shift: Shift | nn.Module,
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    prefix: str = "",
) -> None:
    """Write ``shift`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    A new folder appears complete or not at all (written beside it, then renamed); in an existing folder
    the weights and then the config are each replaced atomically, other files are left alone.

    Args:
        shift: a ``lora``, ``ia3`` or ``prompt_tuning`` shift (``sk.extract(model)``, ``sk.load``), or a
            model with one attached.
        path: the adapter folder.
        model: the model the shift belongs to. LoRA tensors of an ``nn.Linear`` and an ``nn.Embedding``
            of the same square shape look alike but have different PEFT names: without a model a square
            base is taken for a Linear (embedding tables have far more rows than columns).
        task_type: PEFT's task type (``"CAUSAL_LM"``, ``"FEATURE_EXTRACTION"``, ``"SEQ_CLS"``, ...). Required
            for prompt tuning, because PEFT picks the model wrapper that prepends the prompt from it;
            defaults to the prompt-tuning config's own ``task_type``. A task type whose PEFT wrapper treats
            ``token_type_ids`` differently from the shift's (PEFT's causal-LM, feature-extraction and
            question-answering wrappers drop them) is refused when the config names one and warned
            about when it does not.
        base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
        prefix: name of the PEFT base model inside the shifted model (``"encoder"``); ``""`` for the root.

    Raises:
        ShiftkitError: another method, a config PEFT cannot express, or modules outside ``prefix``.

    Example:
        >>> sk.export_peft(model, "my-adapter", task_type="CAUSAL_LM")   # or a Shift
        >>> peft_model = PeftModel.from_pretrained(base, "my-adapter")
    """
    if isinstance(shift, nn.Module):
        model, shift = shift, extract(shift)
    if not isinstance(shift, Shift) or shift.method not in PEFT_TYPES:
        got = shift.method if isinstance(shift, Shift) else type(shift).__name__
        raise ShiftkitError(f"export_peft writes lora, ia3 and prompt_tuning shifts, got {got!r}")
    if task_type is None and isinstance(shift, Shift) and shift.method == "prompt_tuning":
        task_type = getattr(shift.config, "task_type", None)
    if task_type is not None and task_type not in TASK_TYPES:
        raise ShiftkitError(f"task_type must be one of {TASK_TYPES} or None, got {task_type!r}")
    prefix = prefix.strip(".")
    prompt = shift.method == "prompt_tuning"
    key_prefix = "base_model." if prompt else "base_model.model."
    tensors: dict[str, Tensor] = {}
    saved: dict[str, None] = {}  # PEFT names of modules_to_save, in order
    by_module: dict[str, dict[str, Tensor]] = {}
    for key, value in shift.tensors.items():
        fqn, role = split_key(key, shift.base)
        if role.startswith("saved."):
            name = _peft_name(fqn, prefix)
            saved[name] = None
            tensors[f"{key_prefix}{name}.{role[len('saved.') :]}"] = value
        else:
            by_module.setdefault(fqn, {})[role] = value
    body: dict[str, Any] = {
        "peft_type": PEFT_TYPES[shift.method],
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": list(saved) or None,
        "revision": None,
        "auto_mapping": None,
    }
    if shift.method == "lora":
        body.update(_export_lora(shift, by_module, tensors, model, prefix))
    elif shift.method == "ia3":
        body.update(_export_ia3(shift, by_module, tensors, prefix))
    else:
        body.update(_export_prompt(shift, by_module, tensors, task_type, model))
    _write_folder(Path(path), tensors, json.dumps(body, indent=2, sort_keys=True) + "\n")


def _peft_name(fqn: str, prefix: str) -> str:
    if not prefix:
        return fqn
    if not fqn.startswith(prefix + "."):
        raise ShiftkitError(f"module {fqn!r} is not inside the PEFT base model {prefix!r} (prefix)")
    return fqn[len(prefix) + 1 :]


def _is_embedding(fqn: str, a: Tensor, b: Tensor, base: tuple[int, ...], model: nn.Module | None) -> bool:
    if model is not None:
        module = dict(iter_base_modules(model)).get(fqn)
        if module is not None:
            return isinstance(module.base if is_shift_module(module) else module, nn.Embedding)
    linear = tuple(base) == (b.shape[0], a.shape[1])  # weight (out, in)
    embedding = tuple(base) == (a.shape[1], b.shape[0])  # table (num_embeddings, dim)
    if not (linear or embedding):
        raise ShiftMismatchError(f"LoRA tensors of {fqn!r} do not fit its recorded shape {tuple(base)}")
    # both fit a square base: that is a Linear (an embedding table has far more rows than columns)
    return not linear


def _export_lora(
    shift: Shift,
    by_module: dict[str, dict[str, Tensor]],
    out: dict[str, Tensor],
    model: nn.Module | None,
    prefix: str,
) -> dict[str, Any]:
    config: Any = shift.config  # a LoRAConfig (method "lora")
    modules = dict(iter_base_modules(model)) if model is not None else {}
    for fqn, roles in by_module.items():
        name, a, b = _peft_name(fqn, prefix), roles["lora_A"], roles["lora_B"]
        conv = modules.get(fqn)
        if conv is not None and is_shift_module(conv):
            conv = conv.get_submodule("base")
        if isinstance(conv, nn.Conv2d):
            warn_if_dilated(fqn, conv, "runs in")
        if a.dim() == 2 and _is_embedding(fqn, a, b, shift.base[fqn], model):
            out[f"base_model.model.{name}.lora_embedding_A"] = a
            out[f"base_model.model.{name}.lora_embedding_B"] = b
        else:
            out[f"base_model.model.{name}.lora_A.weight"] = a
            out[f"base_model.model.{name}.lora_B.weight"] = b
    alpha = config.lora_alpha
    # per-module ranks / alphas keyed by PEFT module name (anchored where a plain name would also match a
    # longer one: PEFT reads the keys as name-suffix patterns, and the file's keys are sorted)
    names = [_peft_name(f, prefix) for f in by_module]
    ranks = exact_patterns({_peft_name(f, prefix): config.rank_of(f) for f in by_module}, names, config.r)
    alphas = exact_patterns(
        {_peft_name(f, prefix): config.alpha_of(f) for f in by_module}, names, config.lora_alpha
    )
    alphas = {k: _number(v) for k, v in alphas.items()}
    return {
        "r": config.r,
        "lora_alpha": _number(alpha),
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "init_lora_weights": config.init_lora_weights,
        "target_modules": sorted(_peft_name(f, prefix) for f in by_module),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "rank_pattern": {k: int(v) for k, v in ranks.items()},
        "alpha_pattern": alphas,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
    }


def _number(x: float) -> float:
    """An integral float as an int (PEFT's configs write ``16``, not ``16.0``)."""
    return int(x) if float(x).is_integer() else x


def _feedforward(fqn: str, scale: Tensor, base: tuple[int, ...], config: Any) -> bool:
    shape = tuple(scale.shape)
    if shape != ((base[0], 1) if scale.dim() == 2 else (1, base[0], *[1] * (scale.dim() - 2))):
        return True  # not the output-side shape
    if scale.dim() == 2 and shape != (1, base[1]):
        return False  # a Linear whose input side would have another shape
    # the input side may have this shape too (a conv with C_in = C_out): the config decided at attach
    feedforward = config.feedforward_modules
    return feedforward is not None and bool(match_names([fqn], feedforward))


def _export_ia3(
    shift: Shift, by_module: dict[str, dict[str, Tensor]], out: dict[str, Tensor], prefix: str
) -> dict[str, Any]:
    config: Any = shift.config  # an IA3Config (method "ia3")
    names, feedforward = [], []
    for fqn, roles in by_module.items():
        name = _peft_name(fqn, prefix)
        out[f"base_model.model.{name}.ia3_l"] = roles["ia3_l"]
        names.append(name)
        if _feedforward(fqn, roles["ia3_l"], shift.base[fqn], config):
            feedforward.append(name)
    return {
        "target_modules": sorted(names),
        "feedforward_modules": sorted(feedforward),
        "init_ia3_weights": config.init_ia3_weights,
        "fan_in_fan_out": False,
        "exclude_modules": None,
    }


def _export_prompt(
    shift: Shift,
    by_module: dict[str, dict[str, Tensor]],
    out: dict[str, Tensor],
    task_type: str | None,
    model: nn.Module | None,
) -> dict[str, Any]:
    config: Any = shift.config  # a PromptTuningConfig (method "prompt_tuning")
    drop_types = get_method("prompt_tuning").config_cls.DROP_TOKEN_TYPES  # type: ignore[attr-defined]
    prompts = [roles["prompt_embeddings"] for roles in by_module.values() if "prompt_embeddings" in roles]
    if len(prompts) != 1:
        raise ShiftkitError(f"a PEFT prompt-tuning adapter holds one prompt; this shift has {len(prompts)}")
    if task_type is None or task_type == "SEQ_2_SEQ_LM":
        raise ShiftkitError(
            "export_peft needs task_type for prompt tuning (PEFT prepends the prompt in its task wrapper): "
            f"one of {[t for t in TASK_TYPES if t != 'SEQ_2_SEQ_LM']}"
        )
    drops = task_type in drop_types
    if config.task_type is not None and drops != (config.task_type in drop_types):
        raise ShiftkitError(
            f"the prompt was trained with task_type={config.task_type!r}; PEFT's {task_type} wrapper treats "
            "token_type_ids differently (it "
            + ("drops them" if drops else "prepends zeros")
            + "), so the adapter would compute something else: export with that task type"
        )
    if config.task_type is None and drops and _takes_token_types(model):
        warnings.warn(
            f"PEFT's {task_type} wrapper drops token_type_ids, while this shift (task_type=None) prepends "
            "zeros to them: on inputs with token_type_ids (sentence pairs) PEFT will compute something "
            f"else; set PromptTuningConfig(task_type={task_type!r}) when training to match it",
            stacklevel=3,
        )
    out["prompt_embeddings"] = prompts[0]
    text = config.init_text is not None and config.tokenizer_name_or_path is not None
    return {
        "num_virtual_tokens": prompts[0].shape[0],
        "token_dim": prompts[0].shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": None,  # PEFT reads these from the base model's config when loading
        "num_layers": None,
        "prompt_tuning_init": "TEXT" if text else config.init.upper(),
        "prompt_tuning_init_text": config.init_text if text else None,
        "tokenizer_name_or_path": config.tokenizer_name_or_path if text else None,
        "tokenizer_kwargs": None,
    }


def _takes_token_types(model: nn.Module | None) -> bool:
    """Whether the model that owns the input embedding accepts ``token_type_ids`` (unknown: True)."""
    if model is None:
        return True
    owners = find_input_embeddings(model)
    return any("token_type_ids" in inspect.signature(o.forward).parameters for _, o in owners.values())


def _write_folder(target: Path, tensors: dict[str, Tensor], config_json: str) -> None:
    if target.exists() and not target.is_dir():
        raise ShiftkitError(f"{target} exists and is not a folder")
    meta = {"format": "pt"}  # what PEFT (via safetensors' save_file) records
    if target.is_dir():
        # weights first: a reader that sees the new config also sees the new weights
        atomic_save_tensors(tensors, target / WEIGHTS_NAME, meta)
        atomic_write_text(target / CONFIG_NAME, config_json)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        atomic_save_tensors(tensors, tmp / WEIGHTS_NAME, meta)
        atomic_write_text(tmp / CONFIG_NAME, config_json)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes a private folder; an adapter is an ordinary one
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_peft(path: str | os.PathLike[str], *, model: nn.Module | None = None, prefix: str = "") -> Shift:
    """Read a PEFT adapter folder (LoRA, (IA)³ or prompt tuning) as a shiftkit :class:`Shift`.

    Attach the result with ``sk.attach_(model, shift)``; it computes what the PEFT adapter computes. The
    config lists the adapted modules by full name.

    Args:
        path: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        model: the model the shift is for. Required for (IA)³ and prompt tuning, whose files do not hold
            the layer shapes (or, for prompts, the embedding's name); for LoRA it checks names and shapes.
        prefix: name of the PEFT base model inside ``model`` (``"encoder"``); ``""`` for the root.

    Raises:
        ShiftkitError: missing files, an unsupported ``peft_type`` or option (named), or ``model`` needed.
        CorruptFileError: unreadable JSON or safetensors, or keys that are not PEFT adapter keys.
        ShiftMismatchError: the adapter does not fit ``model``.

    Example:
        >>> shift = sk.import_peft("my-adapter", model=base)
        >>> sk.attach_(base, shift)
    """
    return read_adapter(Path(path), model, prefix)
