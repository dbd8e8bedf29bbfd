"""``shiftkit fold``: bake a shift file into a base model and write the plain folded weights."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLE = """example:
  shiftkit fold lora.safetensors --model shiftkit.recipes.models:minilm_classifier --output runs/folded
  shiftkit fold my_shift.safetensors --model mypkg.models:build --output out/ --json fold.json
  shiftkit fold head_lora.safetensors --model smollm2-135m --output out/ --untie

--untie: a shift of a module whose weight another module shares (SmolLM2's lm_head is tied to its input
embedding) gets its own copy of that weight; without it such a fold is refused, since it would change both.

The model spec is a zoo name (shiftkit zoo list), "package.module:function", or a Hugging Face model folder.
Writes <output>/model.safetensors (the folded state dict, written atomically), and for a transformers model
its config.json (from_pretrained(<output>) then loads the folded model), and prints what was folded.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fold``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "fold",
        help="bake a shift into a model's weights (zero inference overhead)",
        description="Attach a shift file to its base model, fold it into the weights and save the result.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shift", help="shift file (.safetensors) written by shiftkit")
    p.add_argument("--model", required=True, help="base model: zoo name, module:function, or HF folder")
    p.add_argument("--output", required=True, help="folder for model.safetensors")
    p.add_argument(
        "--untie",
        action="store_true",
        help="give a targeted module whose weight is tied to another module its own weight",
    )
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Fold ``args.shift`` into ``args.model`` and write ``<output>/model.safetensors``."""
    import time
    from pathlib import Path

    from shiftkit.cli._table import format_table, write_json
    from shiftkit.core import attach_, fold_, get_method, load
    from shiftkit.core.io import atomic_save_tensors
    from shiftkit.errors import TiedWeightsError
    from shiftkit.recipes.loading import resolve_model

    shift = load(args.shift)
    spec = get_method(shift.method)
    model, _ = resolve_model(args.model)
    before = sum(p.numel() for p in model.parameters())
    tensors_before = len(list(model.parameters()))  # named_parameters() lists a tied tensor once
    t0 = time.perf_counter()
    attach_(model, shift)
    try:
        fold_(model, untie=args.untie)
    except TiedWeightsError as err:
        raise TiedWeightsError(str(err).replace("Pass untie=True", "Pass --untie")) from None
    seconds = time.perf_counter() - t0
    after = sum(p.numel() for p in model.parameters())
    tensors_after = len(list(model.parameters()))
    out = Path(args.output) / "model.safetensors"
    state = {k: v for k, v in model.state_dict().items()}
    atomic_save_tensors(state, out, {"format": "pt", "shiftkit_folded": Path(args.shift).name})
    to_json = getattr(getattr(model, "config", None), "to_json_string", None)
    if callable(to_json):  # a transformers model: its config too (untied when --untie untied its head)
        from shiftkit._fileio import atomic_write_text

        atomic_write_text(out.parent / "config.json", to_json())
    info = {
        "shift": args.shift,
        "method": spec.name,
        "model": args.model,
        "modules": len(shift.base),
        "params_before": before,
        "params_after": after,
        "weight_tensors": f"{tensors_before} -> {tensors_after}",
        "fold_seconds": round(seconds, 4),
        "output": str(out),
    }
    print(format_table([info], list(info)))
    if args.json:
        write_json(args.json, info)
    return 0
