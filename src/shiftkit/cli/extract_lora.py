"""``shiftkit extract-lora BASE TUNED OUT``: a LoRA shift from the difference of two checkpoints (SVD).

torch and the extraction engine are imported inside :func:`run`, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
Extract a LoRA shift from a base and a fine-tuned model (Hugging Face folders of safetensors, sharded or
not, with the same tensors), as mergekit-extract-lora does: per 2-D Linear weight, ΔW = W_tuned − W_base and
its truncated SVD in float32, A = √S_r·V_rᵀ, B = U_r·√S_r, lora_alpha = r (scale 1). Streams tensor by tensor:
memory stays at a few tensors plus the factors. By default every 2-D weight except the input embeddings and
the output head is a LoRA target; other tensors that changed (norms, biases, embeddings) are saved at full
value as modules_to_save (mergekit's default) or left out with --skip-others.

OUT ending in .safetensors is a shiftkit LoRA shift file (sk.load, sk.attach_); any other OUT (or --peft) is
a PEFT adapter folder that peft.PeftModel.from_pretrained(base_model, OUT) loads. Nothing is left behind if
the extraction fails or is interrupted.
"""

EPILOG = """\
examples:
  shiftkit extract-lora models/base models/tuned runs/lora.safetensors --rank 32
  shiftkit extract-lora models/base models/tuned runs/adapter --peft --energy 0.9 --rank 128 --dtype bfloat16
  shiftkit extract-lora models/base models/tuned runs/attn.safetensors --target 'self_attn' --json runs/x.json

--energy E picks per layer the smallest rank whose singular values keep the fraction E of Σσ² (--rank is the
cap). The table lists the layers with the largest relative error ‖ΔW − BA‖/‖ΔW‖ (--top N).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shiftkit extract-lora`` on ``subparsers``.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = add_parser(p.add_subparsers(dest="command"))
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "extract-lora",
        help="extract a LoRA shift from a base and a fine-tuned checkpoint (truncated SVD, like mergekit)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base", metavar="BASE", help="base model folder")
    parser.add_argument("tuned", metavar="TUNED", help="fine-tuned model folder (same tensors as BASE)")
    parser.add_argument("out", metavar="OUT", help="a .safetensors shift file, or a PEFT adapter folder")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (the cap with --energy; default 32)")
    parser.add_argument(
        "--energy", type=float, metavar="E", help="per layer, keep this fraction of Σσ² (in (0, 1])"
    )
    parser.add_argument("--peft", action="store_true", help="write a PEFT adapter folder (OUT is a folder)")
    parser.add_argument(
        "--target",
        action="append",
        metavar="REGEX",
        help="only modules whose name matches (re.search; repeatable) are LoRA targets",
    )
    parser.add_argument(
        "--exclude", action="append", metavar="REGEX", help="modules never LoRA'd (repeatable)"
    )
    parser.add_argument(
        "--embed-lora",
        action="store_true",
        help="LoRA the input embeddings and the output head too (default: saved in full when changed)",
    )
    parser.add_argument(
        "--skip-others",
        action="store_true",
        help="leave out changed non-target tensors (norms, biases) instead of saving them in full",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "float64"),
        help="dtype of the output tensors (default: the tuned model's)",
    )
    parser.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default), cuda")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT (after success)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="layers shown in the table (10)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return parser


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    """Extract the LoRA shift and print the worst layers and the totals.

    Example:
        >>> run(argparse.Namespace(base="b", tuned="t", out="lora.safetensors", rank=16, energy=None,
        ...     peft=False, target=None, exclude=None, embed_lora=False, skip_others=False, dtype=None,
        ...     device="cpu", force=False, json=None, top=10, quiet=True))  # doctest: +SKIP
        0
    """
    from shiftkit.cli._table import format_table, write_json
    from shiftkit.merging.stream.extract_lora import extract_lora

    summary = extract_lora(
        args.base,
        args.tuned,
        args.out,
        rank=args.rank,
        energy=args.energy,
        targets=args.target,
        exclude=args.exclude,
        embed_lora=args.embed_lora,
        others="skip" if args.skip_others else "save",
        peft=True if args.peft else None,
        dtype=args.dtype,
        device=args.device,
        force=args.force,
        progress=not args.quiet,
    )
    if not args.quiet:
        rows = [
            {
                "layer": layer.name,
                "shape": "x".join(str(s) for s in layer.shape),
                "rank": layer.rank,
                "rel. error": f"{layer.error:.2e}",
                "energy kept": f"{layer.energy:.6f}",
            }
            for layer in summary.worst(args.top)
        ]
        print(f"worst {len(rows)} of {len(summary.layers)} layers by relative error ‖ΔW − BA‖/‖ΔW‖:")
        print(format_table(rows))
        total = {
            "LoRA layers": len(summary.layers),
            "rank": summary.rank,
            "max error": f"{summary.max_error:.2e}",
            "saved": len(summary.saved),
            "skipped": len(summary.skipped),
            "unchanged": len(summary.unchanged),
            "parameters": f"{summary.parameters:,}",
            "size": _size(summary.bytes_written),
            "seconds": round(summary.seconds, 2),
            "output": str(args.out),
        }
        print()
        print(format_table([total]))
        for name, why in list(summary.skipped.items())[:10]:
            print(f"skipped {name}: {why}")
    if args.json:
        write_json(args.json, summary.as_dict())
    return 0
