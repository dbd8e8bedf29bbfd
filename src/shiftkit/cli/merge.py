"""``shiftkit merge RECIPE OUT``: stream-merge checkpoints as a mergekit-shaped YAML recipe says.

torch and the merge engine are imported inside :func:`run`, so ``shiftkit merge --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
Merge fine-tuned checkpoints tensor by tensor (task arithmetic, TIES, DARE, DELLA, SCE, SLERP, NuSLERP,
Karcher, passthrough frankenmerges, linear soups, and any registered merge method) over sharded safetensors
folders, without loading whole models: memory stays at a few tensors. mergekit recipes run as they are:
slices and layer ranges, per-layer gradients, filters, per-model parameters, tokenizer_source / tokenizer:
blocks for fine-tunes with added tokens. OUT is a new model folder (sharded safetensors + index,
config.json, tokenizer files and the resolved recipe shiftkit_merge.yaml), or a path ending in
.safetensors for the merged delta as a shift file.
Nothing is left behind if the merge fails or is interrupted.
"""

EPILOG = """\
recipe (mergekit's shape and meaning: mergekit's defaults apply, e.g. density 1.0 = no pruning, and what
mergekit requires is required, e.g. every model's weight; unknown keys are an error):
  merge_method: ties
  base_model: models/base                  # HF folder or .safetensors file
  models:                                  # HF folders, .safetensors files or shiftkit shift files
    - model: models/math
      parameters: {weight: 1.0, density: 0.5}
    - model: models/code
      parameters: {weight: 0.5, density: 0.5}
  parameters: {lambda: 1.0}               # a list is a gradient over the layers: {t: [0, 0.5, 1]}
  dtype: bfloat16                          # output dtype (default: the base's); the math is float32
  tokenizer_source: union                  # base | union | a model path: rows mapped by token
  shiftkit: {max_shard_size: 2GB, on_missing: error, compute_dtype: float32}

examples (examples/merge_ties.yaml documents every key; these inputs come from
python examples/make_merge_inputs.py: SmolLM2-135M and 3 fine-tunes as sharded folders):
  shiftkit merge examples/merge_smollm2_ties.yaml runs/merged --dry-run
  shiftkit merge examples/merge_smollm2_ties.yaml runs/merged --max-shard-size 100MB --json runs/merge.json
  shiftkit merge examples/merge_smollm2_ties.yaml runs/merged_delta.safetensors --force
  shiftkit merge examples/merge_smollm2_gradient_slerp.yaml runs/slerp      # mergekit's gradient-slerp
  shiftkit merge examples/merge_smollm2_frankenmerge.yaml runs/deep         # slices + passthrough
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shiftkit merge`` on ``subparsers``.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = add_parser(p.add_subparsers(dest="command"))
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "merge",
        help="stream-merge checkpoints from a YAML recipe (TIES, DARE, task arithmetic, SLERP, ...)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", metavar="RECIPE.yaml", help="the merge recipe")
    parser.add_argument("out", metavar="OUT", help="output model folder, or a .safetensors delta shift file")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT (after success)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    parser.add_argument("--max-shard-size", metavar="SIZE", help="bytes per shard, e.g. 500MB (default 2GB)")
    parser.add_argument("--device", default="cpu", help="where the merge math runs: cpu (default), cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    """Run (or dry-run) the merge and print the result table.

    Example:
        >>> run(argparse.Namespace(recipe="r.yaml", out="out", dry_run=True, force=False, json=None,
        ...                        max_shard_size=None, device="cpu", no_progress=True))  # doctest: +SKIP
        0
    """
    from shiftkit.cli._table import format_table, write_json
    from shiftkit.merging.stream.runner import merge_recipe

    summary = merge_recipe(
        args.recipe,
        args.out,
        dry_run=args.dry_run,
        progress=not args.no_progress,
        device=args.device,
        force=args.force,
        max_shard_size=args.max_shard_size,
    )
    params = ", ".join(f"{k}={v}" for k, v in summary.params.items())
    if args.dry_run:
        print(f"plan: {summary.method}({params}); {summary.passes} pass(es) over the tensors\n")
        rows = [
            {
                "role": i["role"],
                "path": i["path"],
                "kind": i["kind"],
                "tensors": i["tensors"],
                "size": _size(int(i["bytes"])),
            }
            for i in summary.inputs
        ]
        print(format_table(rows))
        print(
            f"\nwould merge {summary.tensors} tensors, copy {summary.copied} from the base "
            f"({summary.parameters:,} parameters) into:"
        )
        for path in summary.outputs:
            print(f"  {path}")
    else:
        row = {
            "method": summary.method,
            "merged": summary.tensors,
            "copied": summary.copied,
            "parameters": f"{summary.parameters:,}",
            "passes": summary.passes,
            "written": _size(summary.bytes_written),
            "seconds": round(summary.seconds, 2),
            "output": str(args.out),
        }
        print(format_table([row]))
    if args.json:
        write_json(args.json, summary.as_dict())
    return 0
