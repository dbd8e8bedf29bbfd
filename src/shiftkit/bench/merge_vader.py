"""``merge-vader``: per-domain task vectors on MiniLM merged by every merge method, and routed per input.

MiniLM (mean pooling + a linear head) on VADER's four sentiment domains (tweets, movie reviews, Amazon
reviews, NYT editorials; binary ``|score| > 0.5``). All models share one start θ0: the pretrained encoder
plus ONE head trained as a linear probe on all four domains. The head then stays frozen: every task
vector ``τ_d = θ_d − θ0`` is a change of the encoder read by the same head, so the vectors share one label
space and a merge ``θ = θ0 + merge(τ_1..τ_4)`` needs no head of its own.

Rows:

* ``θ0``; per domain a full fine-tuning expert and a LoRA expert (r=8, α=16 on every encoder Linear), each
  tested on its own domain and the three others; the multi-task models (full / LoRA on the union of the
  domains) as the upper reference; the "oracle" that uses each domain's own expert on that domain (it needs
  the domain label at test time);
* every method of ``sk.list_merge_methods()`` on the four full task vectors and on the four exact LoRA
  ``ΔW = (α/r) B A`` (slerp takes two inputs: the tweets and movies vectors). Each method's main
  coefficient takes ≤ 3 values, chosen on a validation split (mean accuracy over the domains), never on
  the test split; aTLAS learns block-wise coefficients on that labelled validation split (mixing all
  domains), and once more unsupervised (entropy of the predictions, labels unused);
* routing (when ``shiftkit.merging.routing.attach`` is installed): the four LoRA experts as a ``ShiftPool``
  with a FedIns-style key-query router (keys = each domain's centroid of θ0's pooled features on its
  training sentences, top-k by cosine, k and the total weight chosen on validation) and a PSEC-style
  learned router (an MLP on θ0's features giving the mixing weights, trained on the validation split).

Columns: test accuracy per domain, their mean, and ``mixed``: every test sentence of every domain shuffled
into one stream (batches mixing domains). A merged model's per-sentence predictions do not depend on the
batch, so its ``mixed`` is its accuracy over all test sentences; the routers run on the shuffled stream
itself. Plus the chosen coefficient and the seconds (training, or merging + the validation grid).

Example:
    >>> parser = argparse.ArgumentParser(); add_arguments(parser)
    >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SIZES", "add_arguments", "render_html", "run", "run_suite", "table_rows"]

DOMAINS: tuple[str, ...] = ("tweets", "movies", "amazon", "nyt")

#: ``--quick`` / default / ``--full`` sizes (MergeVaderSettings overrides), per domain. The default trains
#: 10 models (4 + 1 full, 4 + 1 LoRA) of 64 steps (the two multi-task ones 256) and evaluates ~45 models on
#: 4 x 64 validation and 4 x 200 test sentences. Measured with OMP_NUM_THREADS=1 on 2 CPU cores shared with
#: other jobs (load 1-4), the LoRA experts cached and the full ones trained (7.4 min): 20.5 min wall,
#: 19 CPU-min, peak RSS 3.4 GB. A LoRA expert trains in 28-43 s (its multi-task model 142 s), a full one in
#: 47-71 s (207 s). With torch's 2 threads while another job held a core, training ran ~10x slower
#: (threads spinning on a busy core): set OMP_NUM_THREADS=1 on a shared machine. ``--quick``: 106 s at
#: load 3 (1 thread).
SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        **{"n_train": 16, "n_val": 8, "n_test": 16, "max_length": 32, "epochs": 1, "probe_epochs": 2},
        **{"atlas_epochs": 1, "router_epochs": 2, "grid": "one", "kinds": ("lora",)},
        # LoRA on query/value only: the same code paths with 6x smaller dense deltas to merge, so the smoke
        # test stays well inside pytest's 300 s timeout on a loaded 2-core machine
        "lora_targets": r".*\.(query|value)",
    },
    "default": {},
    "full": {"n_train": 768, "n_val": 128, "n_test": 500, "epochs": 3},
}

EPILOG = """\
examples:
  shiftkit bench merge-vader                     # ~25 min on 2 CPU cores; a rerun reuses the cached experts
  shiftkit bench merge-vader --methods ties pcb  # only these merge rows (experts and references always run)
  shiftkit bench merge-vader --quick --no-cache  # smoke test, < 2 min
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options to ``parser`` (no torch import).

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--quick"]).quick
        True
    """
    parser.description = (__doc__ or "").split("\n\nExample:")[0]
    parser.epilog = EPILOG
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 16 sentences per domain, 1 step, LoRA on query/value",
    )
    size.add_argument(
        "--full", action="store_true", help="768 train / 128 val / 500 test per domain, 3 epochs"
    )
    parser.add_argument(
        "--methods", nargs="+", metavar="NAME", help="only these merge methods (default: all)"
    )
    parser.add_argument("--no-routing", action="store_true", help="skip the routed-pool rows")
    parser.add_argument(
        "--kinds", nargs="+", choices=("full", "lora"), help="experts to train and merge (default: both)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data split, head, shuffling, DARE (default 0)")
    parser.add_argument("--out", default="runs/merge-vader", metavar="DIR", help="default: runs/merge-vader")
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")
    parser.add_argument("--cache", metavar="DIR", help="expert cache root (default: $SHIFTKIT_CACHE)")
    parser.add_argument("--no-cache", action="store_true", help="train the experts, keep nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the suite from parsed options: print the table, write results.json and report.html.

    Example:
        >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
        0
    """
    from shiftkit.bench.report import format_table, write_suite_outputs
    from shiftkit.zoo import cache_dir

    size = "quick" if args.quick else "full" if args.full else "default"
    settings = {**SIZES[size], "seed": args.seed}
    if args.kinds:
        settings["kinds"] = tuple(dict.fromkeys(args.kinds))
    picked = [m for item in args.methods or () for m in item.split(",") if m]
    cache = None if args.no_cache else Path(args.cache) if args.cache else cache_dir()
    payload = run_suite(
        settings,
        methods=picked or None,
        routing=not args.no_routing,
        cache_root=cache,
        progress=False if args.no_progress else None,
        log=lambda msg: print(f"[merge-vader] {msg}", file=sys.stderr, flush=True),
    )
    payload["settings"]["size"] = size
    rows, columns = table_rows(payload)
    print(f"\n{summary(payload)}\n")
    print(format_table(rows, columns))
    for f in payload["failed"]:
        print(f"  FAILED {f['row']}: {f['error']}")
    for s in payload["skipped"]:
        print(f"  skipped {s['row']}: {s['reason']}")
    print(f"\n{payload['verdict']}")
    write_suite_outputs(args.out, payload, render_html(payload), args.json)
    return 0


def _merge_methods(picked: list[str] | None) -> list[str]:
    import shiftkit as sk

    known = sk.list_merge_methods()
    if picked is not None:
        unknown = [m for m in picked if m not in known]
        if unknown:
            raise sk.ShiftkitError(f"unknown merge method(s) {unknown}; known: {', '.join(known)}")
        return [m for m in known if m in picked]
    # by default, the methods that merge the four domain experts at once, and slerp on a pair (not the
    # two-input nuslerp, nearswap, arcee_fusion or the one-input passthrough: recipe methods for a base and
    # one model, or for slices)
    return [m for m in known if m == "slerp" or (sk.get_merge_method(m).max_inputs or 4) >= 4]


def run_suite(
    settings: dict[str, Any],
    *,
    methods: list[str] | None = None,
    routing: bool = True,
    cache_root: Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or read) θ0 and the experts, merge and route them, and return the results payload.

    Args:
        settings: :class:`~shiftkit.bench._merge_vader_merges.MergeVaderSettings` fields.
        methods: merge methods to run (default: every registered one).
        routing: add the routed-pool rows (needs ``shiftkit.merging.routing.attach``).
        cache_root: where the experts are cached (``None``: nowhere).
        progress: tqdm bars (``None``: only on a terminal).
        log: receives one line per stage.

    Example:
        >>> payload = run_suite(SIZES["quick"], cache_root=None)
        >>> payload["rows"][0]["row"]
        'θ0: pretrained encoder + probe head'
    """
    import torch

    from shiftkit.bench._merge_vader_merges import MergeVaderSettings, merge_rows, model_row
    from shiftkit.bench.report import environment
    from shiftkit.recipes.vader_experts import build_experts, load_splits

    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    s = MergeVaderSettings(**settings)
    chosen = _merge_methods(methods)
    data = load_splits(s)
    experts = build_experts(data, cache_root, progress, say)
    train_s = time.perf_counter() - t0
    rows = [
        model_row(
            data,
            "θ0: pretrained encoder + probe head",
            "base",
            "-",
            None,
            seconds=experts.info["theta0_head"]["seconds"],
            notes="the start of every expert",
        )
    ]
    for kind, tvs in (("full", experts.full), ("lora", experts.lora_delta)):
        if not tvs:
            continue
        for n in [*DOMAINS, "multi"]:
            label = f"{kind} multi-task (all domains)" if n == "multi" else f"{kind} expert: {n}"
            group = "multi" if n == "multi" else "expert"
            rows.append(
                model_row(data, label, group, kind, tvs[n], seconds=experts.info[f"{kind}-{n}"]["seconds"])
            )
        own = {d: next(r for r in rows if r["row"] == f"{kind} expert: {d}")["accuracy"][d] for d in DOMAINS}
        rows.append(_oracle_row(data, kind, own))
        say(f"{kind}: experts and multi-task tested")
    merged, failed = merge_rows(data, experts, chosen, progress=bool(progress), log=say)
    rows += merged
    skipped: list[dict[str, str]] = []
    if routing:
        try:
            from shiftkit.bench._merge_vader_routes import route_rows
        except ImportError as err:
            skipped.append({"row": "lora routed pool", "reason": f"routing not installed: {err}"})
        else:
            routed, rfailed = route_rows(data, experts, progress=bool(progress), log=say)
            rows += routed
            failed += rfailed
    payload = {
        "suite": "merge-vader",
        "title": "merge-vader: per-domain MiniLM task vectors merged and routed, VADER sentiment",
        "settings": {**dataclasses.asdict(s), "merge_methods": chosen},
        "domains": list(DOMAINS),
        "rows": rows,
        "failed": failed,
        "skipped": skipped,
        "cache": {"dir": str(experts.cache_dir) if experts.cache_dir else None, "hit": experts.cached},
        "train_info": experts.info,
        "environment": environment(),
        "timings": {"train_seconds": train_s, "total_seconds": time.perf_counter() - t0},
        "threads": torch.get_num_threads(),
    }
    payload["verdict"] = verdict(rows)
    return payload


def _oracle_row(data: Any, kind: str, own: dict[str, float]) -> dict[str, Any]:
    from shiftkit.recipes.vader_experts import pooled

    row: dict[str, Any] = {"row": f"{kind} oracle: own expert per domain", "group": "oracle", "kind": kind}
    row["accuracy"] = own
    row.update(mean=sum(own.values()) / len(own), mixed=pooled(own, data), coef="", seconds=0.0)
    row["notes"] = "each domain's own expert (needs the test domain label; an upper bound for routing)"
    return row


def verdict(rows: list[dict[str, Any]]) -> str:
    """Plain words: does the best router match or beat the best static LoRA merge on the mixed stream?

    Example:
        >>> verdict(payload["rows"])
        'mixed-domain stream: the best router (...) beats the best static LoRA merge (...); ...'
    """
    routes = [r for r in rows if r["group"] == "route"]
    merges = [r for r in rows if r["group"] == "merge" and r["kind"] == "lora"]
    if not routes or not merges:
        return "mixed-domain stream: no router and LoRA merge rows to compare."
    br, bm = max(routes, key=lambda r: r["mixed"]), max(merges, key=lambda r: r["mixed"])
    diff = br["mixed"] - bm["mixed"]
    word = "beats" if diff > 0 else "matches" if diff == 0 else "is BELOW"
    text = (
        f"mixed-domain stream: the best router ({br['row']}, {br['mixed']:.3f}) {word} the best static "
        f"LoRA merge ({bm['row']}, {bm['mixed']:.3f}); difference {diff:+.3f}."
    )
    full = [r for r in rows if r["group"] == "merge" and r["kind"] == "full"]
    if full:
        bf = max(full, key=lambda r: r["mixed"])
        text += f" Best full fine-tuning merge: {bf['row']}, {bf['mixed']:.3f}."
    return text


def summary(payload: dict[str, Any]) -> str:
    """What was trained and tested, in two lines.

    Example:
        >>> print(summary(payload))
    """
    s = payload["settings"]
    cache = payload["cache"]
    return (
        f"MiniLM on VADER, 4 domains: {s['n_train']} train / {s['n_val']} validation / {s['n_test']} test "
        f"sentences per domain, {s['epochs']} epoch(s) of batch {s['batch_size']} per expert (lr full "
        f"{s['full_lr']:g}, LoRA {s['lora_lr']:g}, r={s['lora_r']} on "
        f"{s.get('lora_targets', 'query/value')}), seed {s['seed']}, size "
        f"{s.get('size', '?')}.\nθ0 = encoder + one probe head trained on all domains, frozen afterwards "
        f"(shared label space for every task vector). Experts "
        f"{'from the cache' if cache['hit'] else 'trained'}; "
        f"coefficients chosen on validation only; {payload['threads']} threads."
    )


def table_rows(payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """The results table as formatted strings: ``(rows, columns)``.

    Example:
        >>> rows, columns = table_rows(payload)
        >>> columns[-3:]
        ['mixed', 'coef', 'seconds']
    """
    domains = payload["domains"]
    columns = ["row", *domains, "mean", "mixed", "coef", "seconds"]
    out = []
    for r in payload["rows"]:
        row = {"row": r["row"], "mean": f"{r['mean']:.3f}", "mixed": f"{r['mixed']:.3f}", "coef": r["coef"]}
        row.update({d: f"{r['accuracy'][d]:.3f}" for d in domains})
        row["seconds"] = f"{r['seconds']:.1f}" if r["seconds"] else ""
        out.append(row)
    return out, columns


def _chart(payload: dict[str, Any], kind: str) -> str:
    from shiftkit.bench.report import accuracy_chart_svg

    keep = [r for r in payload["rows"] if r["kind"] in (kind, "-") and r["group"] != "expert"]
    run = {
        "train_domain": f"{kind} experts, merged / routed",
        "domains": [*payload["domains"], "mixed"],
        "methods": [{"method": r["row"], "accuracy": {**r["accuracy"], "mixed": r["mixed"]}} for r in keep],
    }
    return accuracy_chart_svg(run)


def render_html(payload: dict[str, Any]) -> str:
    """The report as one self-contained HTML string (every text passes through :func:`html.escape`).

    Example:
        >>> html_text = render_html(json.loads(Path("runs/merge-vader/results.json").read_text()))
    """
    from shiftkit.bench.report import CSS, footer, html_table

    esc = html.escape
    rows, columns = table_rows(payload)
    notes = "".join(
        f"<li><b>{esc(r['row'])}</b>: {esc(str(r.get('notes', '')))}"
        + (f"; validation {esc(json.dumps(r['val_scores']))}" if r.get("val_scores") else "")
        + "</li>"
        for r in payload["rows"]
        if r.get("notes")
    )
    problems = [f"<li>FAILED {esc(f['row'])}: {esc(f['error'])}</li>" for f in payload["failed"]]
    problems += [f"<li>skipped {esc(s['row'])}: {esc(s['reason'])}</li>" for s in payload["skipped"]]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(payload["title"])}</title>
<style>{CSS}</style></head><body>
<h1>{esc(payload["title"])}</h1>
<p>{esc(summary(payload))}</p>
{html_table(rows, columns)}
<ul>{"".join(problems)}</ul>
<p><b>{esc(payload["verdict"])}</b></p>
<p class="note">“mixed”: all test sentences of all domains shuffled into one stream; merged models are
per-sentence, so theirs is the accuracy over all test sentences; routers run on the shuffled batches.
“coef”: the grid value chosen on the validation split; “seconds”: training (experts), or merging and the
validation grid (merges), or router training.</p>
{_chart(payload, "full")}
{_chart(payload, "lora")}
<h2>Rows</h2><ul>{notes}</ul>
{footer(payload)}
</body></html>
"""
