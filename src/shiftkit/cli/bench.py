"""``shiftkit bench <suite>``: run a quality benchmark suite (table, results.json, HTML report).

A suite is a module of :mod:`shiftkit.bench` exposing ``add_arguments(parser)`` and ``run(args) -> int``;
:data:`SUITES` maps its command-line name to the module path. Suite modules are imported only when their
suite runs (or prints its own ``--help``), so ``shiftkit bench --help`` and ``shiftkit bench list`` need
neither torch nor the suite modules, and a suite that is missing from an install fails only itself.
Contract for suite modules: import torch inside functions, never at module level.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
from typing import Any

#: suite name -> module path; order is the order of ``shiftkit bench list``
SUITES: dict[str, str] = {
    "peft-vader": "shiftkit.bench.peft_vader",
    "recursive": "shiftkit.bench.recursive",
    "intrinsic-dim": "shiftkit.bench.intrinsic_dim",
    "merge-vader": "shiftkit.bench.merge_vader",
    "compress-vader": "shiftkit.bench.compress_vader",
    "tta-fmnist-c": "shiftkit.bench.tta_fmnist_c",
    "continual-text": "shiftkit.bench.continual_text",
    "rewarm": "shiftkit.bench.rewarm",
    "edit-smollm2": "shiftkit.bench.edit_smollm2",
}

#: one line per suite for ``--help`` and ``list`` (kept here so listing imports nothing)
SUMMARIES: dict[str, str] = {
    "peft-vader": "every learnable method, full fine-tuning, a probe: MiniLM on VADER in and across domains",
    "recursive": "relaxed recursive transformers: layer tying + depth-wise LoRA",
    "intrinsic-dim": "intrinsic dimension: accuracy of training in random subspaces of growing size",
    "merge-vader": "per-domain MiniLM task vectors (full, LoRA) merged by every method, and routed",
    "compress-vader": "merge-vader's task vectors and LoRAs compressed (ComPEFT, BCQ): bytes vs accuracy",
    "tta-fmnist-c": "test-time adaptation: Fashion-MNIST-C (15 corruptions) and MNIST -> digits, error %",
    "continual-text": "six text tasks in sequence: what continual strategies keep of MiniLM's zero-shot",
    "rewarm": "continued pre-training of SmolLM2: LR re-warming, infinite schedules, replay; perplexity",
    "edit-smollm2": "Model Surgery (steer sentiment, keep perplexity) and CHES + DPO on SmolLM2",
}

DESCRIPTION = (
    "Run a quality benchmark suite: it prints a table and writes runs/<suite>/results.json and\n"
    "runs/<suite>/report.html (charts). Options after the suite name belong to the suite: see\n"
    "'shiftkit bench <suite> --help'.\n\nsuites:\n"
    + "\n".join(f"  {name:<14}{text}" for name, text in SUMMARIES.items())
    + "\n  list          print the suites and whether this install has them"
)

EPILOG = """\
examples:
  shiftkit bench list
  shiftkit bench peft-vader                       # ~10 min on 2 CPU cores
  shiftkit bench peft-vader --quick --methods lora bitfit
  shiftkit bench peft-vader --train-domain movies --out runs/pv-movies --json runs/pv-movies.json
  shiftkit bench peft-vader --help                # the suite's own options
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shiftkit bench`` on ``subparsers``.

    The suite's own options are collected unparsed and handed to the suite's parser in :func:`run`.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = add_parser(p.add_subparsers(dest="command"))
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="run a benchmark suite (peft-vader, ...): table, JSON and HTML report",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suite", metavar="<suite>", help=f"one of: {', '.join(SUITES)}, or 'list'")
    parser.add_argument("suite_args", nargs=argparse.REMAINDER, metavar="...", help="the suite's options")
    return parser


def suite_parser(name: str) -> tuple[argparse.ArgumentParser, Any]:
    """The argument parser of suite ``name`` and its module (imported here, not at parse time).

    Raises:
        ShiftkitError: ``name`` is not a suite, or its module is not part of this install.

    Example:
        >>> parser, module = suite_parser("peft-vader")
        >>> args = parser.parse_args(["--quick"])
    """
    from shiftkit.errors import ShiftkitError

    path = SUITES.get(name)
    if path is None:
        close = difflib.get_close_matches(name, list(SUITES), n=2)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ShiftkitError(f"unknown suite {name!r}.{hint} Known: {', '.join(SUITES)} (or 'list')")
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as err:
        if err.name is not None and path.startswith(err.name):
            raise ShiftkitError(
                f"suite {name!r} is not available in this install ({path} is missing)"
            ) from None
        raise
    parser = argparse.ArgumentParser(
        prog=f"shiftkit bench {name}",
        description=(module.__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser, module


def _available(path: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(path) is not None
    except ModuleNotFoundError:
        return False


def run(args: argparse.Namespace) -> int:
    """List the suites, or parse the suite's options and run it.

    Example:
        >>> run(argparse.Namespace(suite="list", suite_args=[]))  # doctest: +SKIP
        0
    """
    from shiftkit.cli._table import format_table

    if args.suite == "list":
        rows = [
            {
                "suite": name,
                "status": "available" if _available(path) else "missing",
                "module": path,
                "what": SUMMARIES.get(name, ""),
            }
            for name, path in SUITES.items()
        ]
        print(format_table(rows))
        return 0
    from shiftkit.cli.demo import _terminate_as_interrupt

    parser, module = suite_parser(args.suite)
    suite_args = parser.parse_args(args.suite_args)  # --help / bad options: exits here, like argparse does
    with _terminate_as_interrupt():  # `kill` cleans up staged outputs (and worker processes) like Ctrl-C
        return int(module.run(suite_args))
