"""``shiftkit demo``: every verb in one run (learn, fold, merge, adapt), one table each, and a report.

torch is imported inside :func:`run`, so ``shiftkit demo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

DESCRIPTION = """\
The whole value chain of shiftkit in one run, one table per step:
  learn  adapt the pretrained MiniLM text encoder to sentiment on one VADER domain (tweets) with a linear
         probe, full fine-tuning, LoRA, SSF and BitFit; test on that domain and the three others (movie
         reviews, Amazon reviews, NYT editorials); save each shift as a file
  fold   fold the LoRA file into the base weights: same accuracy, the base's size and speed
  merge  train one LoRA per domain and merge the four into one model (task arithmetic, breadcrumbs)
  adapt  keep a Fashion-MNIST classifier accurate on a stream of corrupted images at test time
         (no adaptation, test-batch norm statistics, TENT)
Writes <out>/results.json, <out>/report.html (with plots) and <out>/<method>.safetensors. About 4 minutes on
2 CPU cores (--quick: about 20 s); needs the offline assets (make assets).
"""

EPILOG = """\
examples:
  shiftkit demo
  shiftkit demo --out runs/demo --json runs/demo.json
  shiftkit demo --quick --no-progress        # about 20 s: every section on a few sentences and images
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shiftkit demo`` on ``subparsers``.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = add_parser(p.add_subparsers(dest="command"))
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="the end-to-end demo: learn, fold, merge, compress and adapt shifts; tables and an HTML report",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default="runs/demo", metavar="DIR", help="output folder (default: runs/demo)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="every section on a few examples (a first look, tests; < 90 s)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so the demo's staged files are cleaned up on ``kill`` too."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    """Run the demo, print the table and where the report is.

    Example:
        >>> ns = argparse.Namespace(out="runs/demo", quick=True, json=None, no_progress=True)
        >>> run(ns)  # doctest: +SKIP
        0
    """
    from shiftkit.bench.demo import DemoSettings, quick_settings, run_demo, section_tables
    from shiftkit.cli._table import format_table, write_json

    settings = quick_settings() if args.quick else DemoSettings()
    start = time.perf_counter()
    with _terminate_as_interrupt():
        payload = run_demo(
            settings,
            args.out,
            progress=False if args.no_progress else None,
            log=lambda msg: print(f"[demo] {msg}", file=sys.stderr, flush=True),
        )
    for _, heading, rows, columns in section_tables(payload):
        print(f"\n{heading}\n")
        print(format_table(rows, columns))
    print(
        f"\nfinished in {time.perf_counter() - start:.0f} s; report: {args.out}/report.html, "
        f"results: {args.out}/results.json"
    )
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0
