"""``shiftkit inspect``: what a shift file holds (method, config, tensors, bytes, base shapes)."""

from __future__ import annotations

import argparse
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
    from shiftkit.core.io import load, read_metadata
    from shiftkit.core.shift import DELTA, split_key

    meta = read_metadata(path)
    shift = load(path)
    modules: dict[str, dict[str, list[int]]] = {name: {} for name in shift.base}
    for key, t in shift.tensors.items():
        if shift.method == DELTA:
            modules.setdefault(key, {})["delta"] = list(t.shape)
        else:
            name, role = split_key(key, shift.base)
            modules[name][role] = list(t.shape)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in shift.tensors.values()})
    return {
        "file": path,
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
