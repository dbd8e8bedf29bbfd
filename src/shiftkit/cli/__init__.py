"""The ``shiftkit`` command line.

Each subcommand lives in its own module of this package and exposes two functions:
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``. Subcommand modules import
torch (and the rest of shiftkit) only inside ``run``, so ``shiftkit --help`` and ``shiftkit <cmd> --help``
answer without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> module; order is the order shown by --help
SUBCOMMANDS: tuple[str, ...] = (
    "learn",
    "fold",
    "merge",
    "compress",
    "extract_lora",  # the command is "extract-lora"
    "adapt",
    "edit",
    "inspect",
    "bench",
    "zoo",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level argument parser with every subcommand registered."""
    from shiftkit._version import __version__

    parser = argparse.ArgumentParser(
        prog="shiftkit",
        description="Learn, fold, merge, compress and adapt parameter shifts on any PyTorch nn.Module.",
        epilog="Run 'shiftkit <command> --help' for the options and an example of each command.",
    )
    parser.add_argument("--version", action="version", version=f"shiftkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"shiftkit.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(f"shiftkit.cli.{args.command.replace('-', '_')}")
    from shiftkit.errors import ShiftkitError

    try:
        return int(module.run(args))
    except (ShiftkitError, OSError) as err:  # OSError: missing file, permissions, a folder given as file
        print(f"shiftkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shiftkit {args.command}: interrupted; no partial output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
