"""``shiftkit inspect``: what a shift file holds (method, config, tensors, bytes, base shapes)."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

EXAMPLE = """example:
  shiftkit inspect runs/demo/lora.safetensors
  shiftkit inspect runs/demo/lora.safetensors --modules --json lora.json
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``inspect``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "inspect",
        help="show what a shift file holds",
        description="Show a shift file's method, config, tensors, bytes and the base shapes it was made for.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="a .safetensors shift file written by shiftkit")
    p.add_argument("--modules", action="store_true", help="list every module with its tensors")
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    return p


def summarize(path: str) -> dict[str, Any]:
    """A JSON-safe summary of the shift file at ``path``."""
    from shiftkit.core.encoding import encoded_layout
    from shiftkit.core.io import load, read_metadata
    from shiftkit.core.shift import DELTA, split_key

    meta = read_metadata(path)
    shift = load(path)
    modules: dict[str, dict[str, list[int]]] = {name: {} for name in shift.base}
    shapes = (
        {k: list(v[0]) for k, v in encoded_layout(shift).items()}
        if shift.encoding is not None
        else {k: list(t.shape) for k, t in shift.tensors.items()}
    )
    for key, shape in shapes.items():
        if shift.method == DELTA:
            modules.setdefault(key, {})["delta"] = shape
        else:
            name, role = split_key(key, shift.base)
            modules[name][role] = shape
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in shift.tensors.values()})
    compressed = None
    if shift.encoding is not None:
        entries = sum(math.prod(s) for s in shapes.values())
        size = os.path.getsize(path)
        compressed = {
            "method": shift.encoding.get("method"),
            "params": shift.encoding.get("params", {}),
            "entries": entries,
            "payload_bytes": shift.nbytes,
            "ratio_vs_fp32": 4 * entries / max(size, 1),
            "ratio_vs_bf16": 2 * entries / max(size, 1),
        }
    return {
        "file": path,
        "compressed": compressed,
        "file_bytes": os.path.getsize(path),
        "method": shift.method,
        "config": meta["config"],
        "format_version": meta["format_version"],
        "shiftkit_version": meta.get("shiftkit_version"),
        "tensors": len(shift.tensors),
        "parameters": shift.numel,
        "tensor_bytes": shift.nbytes,
        "dtypes": dtypes,
        "modules": len(shift.base),
        "base": {name: list(shape) for name, shape in shift.base.items()},
        "module_tensors": modules,
    }


def run(args: argparse.Namespace) -> int:
    """Print the summary of ``args.file``."""
    from shiftkit.cli._table import format_table, write_json

    info = summarize(args.file)
    cfg = info["config"]["config"] if info["config"] else {}
    rows = [
        {"field": "method", "value": info["method"]},
        {"field": "format / shiftkit", "value": f"v{info['format_version']} / {info['shiftkit_version']}"},
        {"field": "modules", "value": info["modules"]},
        {"field": "tensors", "value": info["tensors"]},
        {"field": "parameters", "value": f"{info['parameters']:,}"},
        {"field": "bytes (tensors / file)", "value": f"{info['tensor_bytes']:,} / {info['file_bytes']:,}"},
        {"field": "dtypes", "value": ", ".join(info["dtypes"])},
    ]
    comp = info["compressed"]
    if comp:
        rows += [
            {"field": "compressed", "value": f"{comp['method']} {json.dumps(comp['params'])}"},
            {"field": "decoded entries", "value": f"{comp['entries']:,}"},
            {
                "field": "file vs dense fp32 / bf16",
                "value": f"{comp['ratio_vs_fp32']:.1f}x / {comp['ratio_vs_bf16']:.1f}x smaller",
            },
        ]
    rows += [{"field": f"config.{k}", "value": v} for k, v in cfg.items()]
    print(format_table(rows, ["field", "value"]))
    if args.modules:
        mrows = [
            {
                "module": name,
                "base shape": "x".join(map(str, info["base"].get(name, []))) or "-",
                "tensors": ", ".join(f"{r}{tuple(s)}" for r, s in roles.items()),
            }
            for name, roles in info["module_tensors"].items()
        ]
        print()
        print(format_table(mrows, ["module", "base shape", "tensors"]))
    if args.json:
        write_json(args.json, info)
    return 0
