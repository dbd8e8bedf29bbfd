"""``shiftkit demo``: train five adaptations of MiniLM on one VADER domain, test on four, write a report.

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
Adapt the pretrained MiniLM text encoder to sentiment on one VADER domain (tweets) with five methods:
a linear probe, full fine-tuning, LoRA, SSF and BitFit. Each is tested on the training domain and on the
three others (movie reviews, Amazon reviews, NYT editorials), saved as a shift file, and folded back into
the base weights. Prints one table; writes <out>/results.json, <out>/report.html (with plots) and
<out>/<method>.safetensors. About 5 minutes on 2 CPU cores; needs the offline assets (make assets).
"""

EPILOG = """\
examples:
  shiftkit demo
  shiftkit demo --out runs/demo --json runs/demo.json
  shiftkit demo --quick --no-progress        # seconds: a few sentences, one short epoch
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shiftkit demo`` on ``subparsers``.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = add_parser(p.add_subparsers(dest="command"))
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="the end-to-end demo: 5 methods on MiniLM + VADER, table and HTML report",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default="runs/demo", metavar="DIR", help="output folder (default: runs/demo)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny variant for tests (seconds)")
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
    from shiftkit.bench.demo import DemoSettings, quick_settings, run_demo
    from shiftkit.bench.report import table_rows
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
    rows, columns = table_rows(payload)
    print(format_table(rows, columns))
    print(
        f"\nfinished in {time.perf_counter() - start:.0f} s; report: {args.out}/report.html, "
        f"results: {args.out}/results.json"
    )
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0
