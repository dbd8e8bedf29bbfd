"""``shiftkit edit surgery|ches``: change one behaviour of a language model with a small, reversible shift
(Model Surgery), or score preference pairs by how alike their responses look to the model (CHES).

torch is imported inside :func:`run`, so ``shiftkit edit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

DESCRIPTION = """\
surgery: train a behaviour probe on labelled texts (label 1 = the behaviour to remove) on the frozen model,
  write its direction into the k gate-projection rows most anti-aligned with it, save the edit as a small
  delta shift (sk.apply_ applies it; sk.load reads it), and print before/after figures: the share of
  sampled continuations the probe (and, for sentiment, VADER's own scorer) flags, and perplexity on
  held-out texts of the acceptable class.
ches: score each preference pair {"prompt", "chosen", "rejected"} of a JSON-lines file by LN-CHES (or
  CHES with --raw) with the model as it is; pairs are printed most alike first (those most likely to
  lower the preferred response's likelihood under DPO).
"""

EPILOG = """\
examples:
  shiftkit edit surgery --data vader --k 0.05 --alpha 5 --out runs/edit/less-negative.safetensors
  shiftkit edit surgery --data texts.jsonl --k 4096 --out runs/edit/mine.safetensors   # label 1 = to remove
  shiftkit edit ches pairs.jsonl --top 20 --json runs/edit/ches.json
  shiftkit edit ches pairs.jsonl --select 64 --quantile 0 --json runs/edit/keep.json   # the 64 least alike
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``shiftkit edit`` on ``subparsers``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "edit",
        help="edit a language model's behaviour (Model Surgery) or score preference pairs (CHES)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="tool", metavar="<tool>", required=True)
    s = sub.add_parser(
        "surgery",
        help="probe + reversible row edit",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--model", default="smollm2-135m", help="zoo name or HF model folder (default smollm2-135m)"
    )
    s.add_argument(
        "--data",
        default="vader",
        help="'vader' (VADER sentences, label 1 = --undesired) or a file: .jsonl {text, label} or "
        "label<TAB>text lines",
    )
    s.add_argument(
        "--undesired", default="negative", choices=("negative", "positive"), help="vader: which class"
    )
    s.add_argument("--per-class", type=int, default=200, help="vader: sentences per class and domain (200)")
    s.add_argument("--k", type=float, default=0.02, help="rows to edit: a count, or a fraction < 1 (0.02)")
    s.add_argument("--alpha", type=float, default=1.0, help="step along the direction (1.0; < 0 reverses)")
    s.add_argument("--modules", nargs="+", default=["gate_proj"], help="weights to edit (default gate_proj)")
    s.add_argument("--epochs", type=int, default=10, help="probe epochs (10)")
    s.add_argument("--lr", type=float, default=1e-4, help="probe learning rate (1e-4, the reference's)")
    s.add_argument("--prompts", help="a file of prompts, one per line (default: 20 neutral openings)")
    s.add_argument("--samples", type=int, default=4, help="continuations sampled per prompt (4)")
    s.add_argument("--max-new-tokens", type=int, default=24, help="tokens per continuation (24)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="the edit's shift file (.safetensors)")
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    s.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    c = sub.add_parser(
        "ches",
        help="score preference pairs by CHES / LN-CHES",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("pairs", metavar="PAIRS.jsonl", help='JSON lines {"prompt", "chosen", "rejected"}')
    c.add_argument(
        "--model", default="smollm2-135m", help="zoo name or HF model folder (default smollm2-135m)"
    )
    c.add_argument("--raw", action="store_true", help="CHES instead of the length-normalised LN-CHES")
    c.add_argument("--include-final-token", action="store_true", help="the reference script's off-by-one")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--max-length", type=int, default=512, help="prompt + response tokens kept (512)")
    c.add_argument("--top", type=int, default=20, help="rows printed (20; 0 = all)")
    c.add_argument("--select", type=int, metavar="M", help="also pick M pairs by the window rule")
    c.add_argument("--quantile", type=float, default=0.0, help="--select: window centre (0 = least alike)")
    c.add_argument("--json", metavar="PATH", help="write every score (and the selection) as JSON")
    return p


def _short(text: str, n: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _surgery(args: argparse.Namespace) -> int:
    from pathlib import Path

    import shiftkit as sk
    from shiftkit import edit
    from shiftkit.cli._table import format_table, write_json
    from shiftkit.errors import ShiftkitError
    from shiftkit.recipes.edit_lm import (
        NEUTRAL_PROMPTS,
        edited_rows,
        load_causal_lm,
        read_labelled,
        steer_table,
        vader_behaviour,
        vader_judge,
    )

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ShiftkitError(f"{out} exists; pass --force to replace it")
    vader = args.data == "vader"
    texts, labels = (
        vader_behaviour(args.per_class, undesired=args.undesired, seed=args.seed)
        if vader
        else read_labelled(args.data)
    )
    prompts = list(NEUTRAL_PROMPTS)
    if args.prompts:
        prompts = [ln for ln in Path(args.prompts).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not prompts:
            raise ShiftkitError(f"{args.prompts}: no prompts")
    k: int | float = int(args.k) if args.k >= 1 else args.k
    model, tok = load_causal_lm(args.model)
    start = time.perf_counter()
    print(f"training the probe on {len(texts)} texts ...", file=sys.stderr, flush=True)
    probe = edit.train_probe(model, tok, texts, labels, epochs=args.epochs, lr=args.lr, seed=args.seed)
    shift = edit.surgery(model, probe.direction, k=k, alpha=args.alpha, modules=args.modules)
    out.parent.mkdir(parents=True, exist_ok=True)
    sk.save(shift, out)
    held = [t for t, lab in zip(texts, labels, strict=True) if lab == 0][-100:]
    log = lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)  # noqa: E731
    rows = steer_table(
        model,
        tok,
        probe,
        {"before": None, "after": shift},
        prompts,
        ppl_texts=held,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        judge=vader_judge if vader else None,
        seed=args.seed,
        log=log,
    )
    table = [
        {
            "model": r["edit"],
            "probe-flagged %": f"{100 * r['probe_undesired']:.1f}",
            **(
                {"VADER negative %": f"{100 * r['judge_negative']:.1f}"}
                if vader and args.undesired == "negative"
                else {}
            ),
            **({"VADER mean": f"{r['judge_mean']:+.3f}"} if vader else {}),
            "perplexity": f"{r['perplexity']:.2f}",
        }
        for r in rows
    ]
    print(f"probe: held-out accuracy {probe.accuracy:.3f} ({probe.n_held_out} texts)")
    print(f"edit: {edited_rows(shift)} rows, alpha {args.alpha:g}, {shift.nbytes / 1024:.1f} KiB -> {out}")
    print()
    print(format_table(table, list(table[0])))
    print(f"\nsample after: {_short(rows[1]['examples'][0], 100)!r}  ({time.perf_counter() - start:.0f} s)")
    if args.json:
        write_json(args.json, {"probe_accuracy": probe.accuracy, "rows": rows, "shift": str(out)})
    return 0


def _ches(args: argparse.Namespace) -> int:
    from shiftkit import edit
    from shiftkit.cli._table import format_table, write_json
    from shiftkit.recipes.edit_lm import load_causal_lm, read_pairs

    data = read_pairs(args.pairs)
    model, tok = load_causal_lm(args.model)
    scores = edit.ches(
        model,
        tok,
        data.prompts,
        data.chosen,
        data.rejected,
        length_normalized=not args.raw,
        batch_size=args.batch_size,
        max_length=args.max_length,
        include_final_token=args.include_final_token,
    )
    name = "CHES" if args.raw else "LN-CHES"
    valid = [i for i in range(len(scores)) if scores[i] == scores[i]]
    order = sorted(valid, key=lambda i: -float(scores[i]))
    shown = order if args.top == 0 else order[: args.top]
    table = [
        {
            "rank": str(r + 1),
            "pair": str(i),
            name: f"{float(scores[i]):.3f}",
            "chosen": _short(data.chosen[i]),
            "rejected": _short(data.rejected[i]),
        }
        for r, i in enumerate(shown)
    ]
    print(f"{len(valid)} of {len(scores)} pairs scored; most alike first")
    print(format_table(table, ["rank", "pair", name, "chosen", "rejected"]))
    payload: dict[str, Any] = {
        "score": name,
        "scores": [None if i not in valid else float(scores[i]) for i in range(len(scores))],
        "order_most_alike_first": order,
    }
    if args.select is not None:
        picked = edit.select_pairs(scores, args.select, args.quantile).tolist()
        payload["selected"] = picked
        print(
            f"\nselected {len(picked)} pairs around quantile {args.quantile:g}: {picked[:20]}"
            + (" ..." if len(picked) > 20 else "")
        )
    if args.json:
        write_json(args.json, payload)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``shiftkit edit <tool>``."""
    return _surgery(args) if args.tool == "surgery" else _ches(args)
