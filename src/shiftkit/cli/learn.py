"""``shiftkit learn CONFIG.yaml``: train a shift (or full fine-tuning, or a linear probe) from a YAML config.

torch is imported inside :func:`run`, so ``shiftkit learn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Train what a YAML config describes: a zoo model (or your own 'package.module:function' returning
(model, tokenizer)), a zoo dataset, a method (any registered shift method, 'full' or 'probe') and the
training settings. Writes <output>/shift.safetensors (for 'full' and 'probe': their task vector) and
<output>/metrics.json, and prints a result table. With a 'prune:' block (LoRA only) the run is Light-PEFT's:
a short estimation, the base pruned of attention heads and FFN neurons and the LoRA of modules and ranks,
then training of the smaller model; <output>/prune.json lists the removed units (the shift fits the base
rebuilt with shiftkit.compression.prune.prune_(base, **plan)).
"""

EPILOG = """\
config (unknown keys are an error):
  model: minilm                   # zoo name, or "package.module:function" -> (model, tokenizer)
  data: {name: vader, domain: tweets, n_train: 400, n_test: 200, threshold: 0.5, eval_domains: all}
  method: {name: lora, r: 8, lora_alpha: 16, target_modules: [query, value]}   # or ssf, bitfit, full, probe
  train: {epochs: 2, lr: 5.0e-4, batch_size: 16, seed: 0}   # also weight_decay, warmup_ratio,
                                  # grad_clip, eval_every, max_length, parallel (ddp | fsdp)
  output: runs/learn/tweets-lora
  plugins: [my_project.methods]   # optional: modules that register methods of your own
  prune: {estimate_steps: 16, head_ratio: 0.33, ffn_ratio: 0.33, module_ratio: 0.75, rank_ratio: 0.5}
                                  # optional, lora only: Light-PEFT (also l1: the masks' L1 weight)

examples:
  shiftkit learn examples/learn_vader_lora.yaml
  shiftkit learn examples/learn_vader_light_peft.yaml   # Light-PEFT: estimate, prune, train
  shiftkit learn examples/learn_vader_lora.yaml --output runs/my-lora --json runs/my-lora.json
  torchrun --nproc_per_node 2 -m shiftkit learn examples/learn_vader_lora.yaml   # 2 processes (DDP)
      # with train: {parallel: fsdp} the base is sharded over the processes (FSDP2); rank 0 writes the files
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shiftkit learn`` on ``subparsers``.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = add_parser(p.add_subparsers(dest="command"))
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "learn",
        help="train a shift from a YAML config",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG.yaml", help="the run config")
    parser.add_argument("--output", metavar="DIR", help="output folder (overrides the config's 'output')")
    parser.add_argument("--json", metavar="PATH", help="also write the metrics JSON to PATH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Train, then write the shift file and metrics.json atomically, and print the table.

    Example:
        >>> run(argparse.Namespace(config="examples/learn_vader_lora.yaml", output=None, json=None,
        ...                        no_progress=True))  # doctest: +SKIP
        0
    """
    from shiftkit.cli._table import format_table, write_json
    from shiftkit.errors import ShiftkitError
    from shiftkit.recipes.learn_run import load_run_config, run_learn

    config = load_run_config(args.config)
    output = args.output or config.output
    if not output:
        raise ShiftkitError(f"{args.config}: no output folder; set 'output:' in the config or pass --output")
    result = run_learn(config, progress=False if args.no_progress else None)
    if not result.is_main:  # another rank of a torchrun launch: rank 0 writes and prints
        return 0

    import shiftkit as sk

    out = Path(output)
    shift_path = out / "shift.safetensors"
    sk.save(result.shift, shift_path)
    metrics = dict(result.metrics)
    metrics["shift_file"] = str(shift_path)
    metrics["shift_bytes"] = shift_path.stat().st_size
    write_json(out / "metrics.json", metrics)
    if result.prune_plan is not None:  # Light-PEFT: the units removed from the base
        write_json(out / "prune.json", result.prune_plan)
    if args.json:
        write_json(args.json, metrics)

    row: dict[str, Any] = {
        "method": metrics["method"] + (" (light-peft)" if result.prune_plan is not None else ""),
        "trainable": f"{metrics['trainable_params']:,}",
        "% of model": f"{metrics['trainable_pct']:.3g}%",
        **{f"acc {dom}": f"{acc:.3f}" for dom, acc in metrics["accuracy"].items()},
        "train s": f"{metrics['train_seconds']:.1f}",
        "steps": metrics["steps"],
        "final loss": f"{metrics['final_loss']:.3f}",
        "shift KiB": f"{metrics['shift_bytes'] / 1024:.1f}",
    }
    print(format_table([row]))
    written = [shift_path, out / "metrics.json"]
    if result.prune_plan is not None:
        written.append(out / "prune.json")
    print(f"\nwrote {', '.join(map(str, written))}", file=sys.stdout)
    return 0
