"""``shiftkit compress IN OUT``: compress a shift file, or a fine-tuned model against its base, into a small
shift file (ComPEFT, binary-coding quantisation, any registered compressor).

torch is imported inside :func:`run`, so ``shiftkit compress --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

DESCRIPTION = """\
Compress a shift for storage and shipping. IN is a shift file (a dense delta from sk.task_vector, a LoRA,
an (IA)3 shift) or, with --base, a fine-tuned model (HF folder or .safetensors file) whose difference from
BASE is compressed tensor by tensor, streaming like `shiftkit merge`: memory stays at a few tensors.
OUT is a shift file (.safetensors) holding the encoded payload; sk.load, sk.apply_, sk.merge, ShiftPool,
`shiftkit merge` and `shiftkit inspect` read it like any shift.
"""

EPILOG = """\
examples (the shift files come from `shiftkit demo`, the folders from `python examples/make_merge_inputs.py`):
  shiftkit compress runs/demo/full.safetensors runs/full.compeft.safetensors --method compeft --density 0.05
  shiftkit compress runs/demo/lora.safetensors runs/lora.small.safetensors --density 0.5
  shiftkit compress runs/demo/lora.safetensors runs/lora.bcq.safetensors --method bcq --bits 3 --group-size 64
  shiftkit compress runs/merge-inputs/movies runs/movies.compeft.safetensors --base runs/merge-inputs/base
  shiftkit compress IN OUT --method mine --param bits=4 --param scheme='"fast"'   # any registered compressor
  shiftkit compress --list
  shiftkit inspect runs/full.compeft.safetensors
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shiftkit compress`` on ``subparsers``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "compress",
        help="compress a shift file or a fine-tuned model's delta (ComPEFT, BCQ, ...)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", nargs="?", help="a shift file, or a fine-tuned model with --base")
    p.add_argument("out", metavar="OUT", nargs="?", help="the compressed shift file (.safetensors)")
    p.add_argument("--base", help="the base model IN was fine-tuned from (compress IN − BASE)")
    p.add_argument("--method", default="compeft", help="compressor (default compeft; see --list)")
    p.add_argument("--density", type=float, help="compeft: fraction of entries kept, in (0, 1] (0.1)")
    p.add_argument("--alpha", type=float, help="compeft: scale factor on σ (1.0; -1 prune only, -2 STC)")
    p.add_argument("--payload", choices=("auto", "golomb", "bitmap"), help="compeft: position code")
    p.add_argument(
        "--scope", choices=("global", "tensor"), help="compeft: one top-k over the shift or per tensor"
    )
    p.add_argument("--as-delta", action="store_true", help="compress a LoRA's dense ΔW, not its factors")
    p.add_argument("--bits", type=int, help="bcq: bits per weight (binary codes per group)")
    p.add_argument("--group-size", type=int, help="bcq: entries sharing one scale vector (-1: a whole row)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any compressor parameter, VALUE as JSON (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="list the registered compressors and exit")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return p


def _params(args: argparse.Namespace) -> dict[str, Any]:
    from shiftkit.errors import ShiftkitError

    params: dict[str, Any] = {}
    for key in ("density", "alpha", "payload", "scope", "bits", "group_size"):
        value = getattr(args, key, None)
        if value is not None:
            params[key] = value
    if args.as_delta:
        params["as_delta"] = True
    for item in args.param:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ShiftkitError(f"--param takes KEY=VALUE with VALUE as JSON, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw  # a bare word is a string
    return params


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def run(args: argparse.Namespace) -> int:
    """Compress ``args.input`` into ``args.out`` and print sizes and ratios."""
    from pathlib import Path

    from shiftkit.cli._table import format_table, write_json
    from shiftkit.compression.registry import get_method, list_methods
    from shiftkit.errors import ShiftkitError

    if args.list:
        print("\n".join(list_methods()))
        return 0
    if args.input is None or args.out is None:
        raise ShiftkitError("give IN and OUT (or --list for the compressors)")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ShiftkitError(f"{out} exists; pass --force to replace it")
    if out.suffix != ".safetensors":
        raise ShiftkitError(f"OUT must be a .safetensors shift file, got {out}")
    spec = get_method(args.method)
    params = _params(args)
    t0 = time.perf_counter()
    if args.base is not None:
        if spec.stream is None:
            raise ShiftkitError(
                f"compressor {args.method!r} needs the whole shift in memory: build it with sk.task_vector "
                "and compress the shift file instead of a model folder"
            )
        shift = _compress_checkpoint(
            args.input, args.base, args.method, spec.stream, params, progress=not args.quiet
        )
    else:
        from shiftkit.compression.api import compress
        from shiftkit.core.io import load

        shift = compress(load(args.input), method=args.method, **params)
    from shiftkit.core.encoding import encoded_layout
    from shiftkit.core.io import save

    save(shift, out)
    seconds = time.perf_counter() - t0
    numel = sum(math.prod(shape) for shape, _ in encoded_layout(shift).values())
    info = {
        "input": args.input,
        "base": args.base,
        "out": str(out),
        "method": args.method,
        "params": (shift.encoding or {}).get("params", params),
        "entries": numel,
        "payload_bytes": shift.nbytes,
        "file_bytes": out.stat().st_size,
        "ratio_vs_fp32": 4 * numel / max(out.stat().st_size, 1),
        "ratio_vs_bf16": 2 * numel / max(out.stat().st_size, 1),
        "seconds": seconds,
    }
    if args.json:
        write_json(args.json, info)
    if not args.quiet:
        rows = [
            {"field": "method", "value": f"{args.method} {json.dumps(info['params'])}"},
            {"field": "entries", "value": f"{numel:,}"},
            {"field": "dense fp32 / bf16", "value": f"{_size(4 * numel)} / {_size(2 * numel)}"},
            {"field": "payload / file", "value": f"{_size(shift.nbytes)} / {_size(info['file_bytes'])}"},
            {
                "field": "ratio vs fp32 / bf16",
                "value": f"{info['ratio_vs_fp32']:.1f}x / {info['ratio_vs_bf16']:.1f}x",
            },
            {"field": "time", "value": f"{seconds:.1f} s"},
        ]
        print(format_table(rows, ["field", "value"]))
    return 0


def _compress_checkpoint(
    tuned_path: str, base_path: str, method: str, stream: Any, params: dict[str, Any], *, progress: bool
) -> Any:
    """Compress ``tuned − base`` read tensor by tensor from two checkpoints (float32 changes)."""
    import torch
    from tqdm.auto import tqdm

    from shiftkit.compression._source import Source
    from shiftkit.compression.api import call_compressor
    from shiftkit.errors import ShiftMismatchError
    from shiftkit.merging.stream.checkpoints import open_checkpoint

    with open_checkpoint(tuned_path) as tuned, open_checkpoint(base_path) as base:
        if tuned.is_shift or base.is_shift:
            raise ShiftMismatchError(
                "--base compresses a fine-tuned model against its base model: give two models "
                "(a shift file is compressed without --base)"
            )
        names = [k for k in tuned.keys() if tuned.dtype(k).is_floating_point]
        missing = [k for k in names if k not in base]
        if missing:
            raise ShiftMismatchError(f"the base has no tensor {missing[0]!r} ({len(missing)} missing)")
        bad = [k for k in names if tuned.shape(k) != base.shape(k)]
        if bad:
            raise ShiftMismatchError(
                f"{bad[0]!r} is {tuned.shape(bad[0])} in the tuned model and {base.shape(bad[0])} in the "
                "base (resized vocabularies are merged with `shiftkit merge`'s tokenizer options first)"
            )
        bar = tqdm(unit="tensor read", desc="compress", disable=not progress)

        def read(name: str) -> torch.Tensor:
            bar.update(1)
            return tuned.read(name, torch.float32) - base.read(name, torch.float32)

        layout = {k: (tuple(tuned.shape(k) or ()), torch.float32) for k in names}
        src = Source("delta", None, {k: s for k, (s, _) in layout.items()}, 0.0, layout, names, read)
        try:
            return call_compressor(method, stream, src, **params)
        finally:
            bar.close()
