r"""Write a preference-pair file for ``shiftkit edit ches`` from the offline VADER corpus.

Each line of ``runs/edit/pairs.jsonl`` is ``{"prompt", "chosen", "rejected", "near"}``: the prompt asks for a
positive movie or product review, the preferred response is a positive review sentence and the dispreferred
one a negative sentence, or (``near: true``) the same positive sentence with one word deleted: the
near-duplicates that CHES should rank as the most alike.

Run from the repository root::

    python examples/make_vader_pairs.py --pairs 120 --near 30
    shiftkit edit ches runs/edit/pairs.jsonl --top 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shiftkit._fileio import atomic_write_text
from shiftkit.recipes.edit_lm import vader_preferences


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=120, help="positive vs negative pairs (120)")
    parser.add_argument("--near", type=int, default=30, help="near-duplicate pairs (30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/edit/pairs.jsonl")
    args = parser.parse_args()
    data = vader_preferences(args.pairs, args.near, seed=args.seed)
    lines = [
        json.dumps({"prompt": p, "chosen": c, "rejected": r, "near": n})
        for p, c, r, n in zip(data.prompts, data.chosen, data.rejected, data.near, strict=True)
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pairs ({sum(data.near)} near-duplicates) to {args.out}")


if __name__ == "__main__":
    main()
