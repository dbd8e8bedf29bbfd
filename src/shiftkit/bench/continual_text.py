"""``continual-text``: six text tasks learned one after another by MiniLM, and what each continual strategy
keeps of its zero-shot skill (MTIL's protocol carried to the encoder we have; spec adapt-continual.md
§6.14–6.15).

No CLIP model installs offline, so the zero-shot classifier is MiniLM itself: a sentence is classified by
its cosine similarity to each label's description ("This text is positive.", "This was said by a
Republican.") — :class:`~shiftkit.recipes.continual.ZeroShotTextClassifier`. The tasks, in training order:

1. ``tweets`` — VADER tweets, negative / positive;
2. ``rt`` — Rotten Tomatoes snippets, rotten review / fresh review / plot synopsis;
3. ``debates`` — the 2016 US debates, a Democrat's / a Republican's statement;
4. ``movies``, 5. ``amazon``, 6. ``nyt`` — the other VADER domains, negative / positive.

Each method trains the sequence (every task ``epochs`` passes over ``n_train`` balanced sentences) and
tests every task after each one: the accuracy matrix ``A[t, d]``; Transfer / Avg / Last / forgetting are
:func:`shiftkit.continual.mtil_metrics` with the zero-shot row. ZSCL's reference data is unlabelled Guardian
headlines (a domain none of the tasks uses). Rows: zero-shot; sequential fine-tuning of the whole encoder
and of a LoRA; LwF; ZSCL (distillation + weight ensemble, each alone); FPF; k-FPF; WiSE-FT. The MTIL anchor
(CLIP ViT-B/16, 11 image tasks: zero-shot 69.4 / 65.3 / 65.3, fine-tune 44.6 / 55.9 / 77.3, ZSCL 68.1 /
75.4 / 83.6 for Transfer / Avg / Last) is printed beside it: the same question on other models and data.

Each method's finished run is kept under ``--out`` (``methods/<name>.json``) and its tasks are checkpointed,
so an interrupted suite resumes where it stopped.

Example:
    >>> parser = argparse.ArgumentParser(); add_arguments(parser)
    >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import html
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ANCHOR", "METHODS", "SIZES", "TASKS", "add_arguments", "run", "run_suite", "table_rows"]

#: name -> (source, label descriptions)
TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tweets": ("vader:tweets", ("This text is negative.", "This text is positive.")),
    "rt": (
        "rotten-tomatoes",
        (
            "This is a negative movie review.",
            "This is a positive movie review.",
            "This is a summary of a movie's plot.",
        ),
    ),
    "debates": ("debates-2016", ("This was said by a Democrat.", "This was said by a Republican.")),
    "movies": ("vader:movies", ("This text is negative.", "This text is positive.")),
    "amazon": ("vader:amazon", ("This text is negative.", "This text is positive.")),
    "nyt": ("vader:nyt", ("This text is negative.", "This text is positive.")),
}

#: row -> (strategy, options, shift): the shift is "full" (every encoder weight) or "lora"
METHODS: dict[str, tuple[str, dict[str, Any], str]] = {
    "zero-shot": ("", {}, "none"),
    "finetune": ("finetune", {}, "full"),
    "finetune-lora": ("finetune", {}, "lora"),
    "lwf": ("lwf", {}, "full"),
    "zscl": ("zscl", {"avg_freq": 4}, "full"),
    "zscl-distill": ("zscl", {"we": False}, "full"),
    "zscl-we": ("zscl", {"distill": 0.0, "l2": 0.0, "avg_freq": 4}, "full"),
    "fpf": ("fpf", {}, "full"),
    "k_fpf": ("k_fpf", {"every": 32}, "full"),
    "wise_ft": ("wise_ft", {}, "full"),
}

#: MTIL (Zheng et al. 2023, Table 1, order I): Transfer / Avg / Last, %
ANCHOR: dict[str, tuple[float, float, float]] = {
    "zero-shot": (69.4, 65.3, 65.3),
    "finetune": (44.6, 55.9, 77.3),
    "zscl": (68.1, 75.4, 83.6),
}

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"n_train": 16, "n_test": 16, "n_reference": 16, "epochs": 1, "max_length": 32},
    "default": {"n_train": 256, "n_test": 200, "n_reference": 256, "epochs": 2, "max_length": 64},
    "full": {"n_train": 512, "n_test": 400, "n_reference": 512, "epochs": 3, "max_length": 64},
}
#: optimiser settings: ZSCL's AdamW (no weight decay, warm-up then cosine) at a rate that moves MiniLM in a
#: few dozen steps; LoRA takes the larger steps of peft-vader's LoRA plan
LR = {"full": 2e-5, "lora": 1e-3}
BATCH = 16

EPILOG = """\
examples:
  shiftkit bench continual-text                          # every method (about 20 min on 2 cores)
  shiftkit bench continual-text --methods finetune zscl  # some rows
  shiftkit bench continual-text --quick                  # smoke test
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options to ``parser`` (no torch import)."""
    parser.description = (__doc__ or "").split("\n\nExample:")[0]
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 16 sentences per task")
    size.add_argument("--full", action="store_true", help="512 training sentences per task, 3 epochs")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="rows (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="data split and training order (default 0)")
    parser.add_argument(
        "--out", default="runs/continual-text", metavar="DIR", help="default: runs/continual-text"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="ignore finished methods and checkpoints in --out"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the suite: print the table, write results.json and report.html."""
    from shiftkit.bench.report import format_table, write_suite_outputs

    size = "quick" if args.quick else "full" if args.full else "default"
    settings = {**SIZES[size], "seed": args.seed, "size": size}
    methods = list(dict.fromkeys(args.methods)) if args.methods else list(METHODS)
    out = Path(args.out)
    payload = run_suite(
        settings,
        methods,
        out,
        fresh=args.fresh,
        progress=False if args.no_progress else None,
        log=lambda msg: print(f"[continual-text] {msg}", file=sys.stderr, flush=True),
    )
    rows, columns = table_rows(payload)
    print()
    print(format_table(rows, columns))
    print(f"\n{payload['verdict']}")
    write_suite_outputs(args.out, payload, render_html(payload), args.json)
    return 0


def _balanced(texts: list[str], labels: Any, n_train: int, n_test: int, seed: int) -> tuple[Any, ...]:
    """Disjoint class-balanced train/test splits (the test set first, independent of ``n_train``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    classes = sorted(set(int(y) for y in labels))
    perms = [rng.permutation(np.flatnonzero(np.asarray(labels) == c)) for c in classes]
    k = len(classes)
    te_n = [n_test // k + (1 if i < n_test % k else 0) for i in range(k)]
    tr_n = [n_train // k + (1 if i < n_train % k else 0) for i in range(k)]
    for c, p in enumerate(perms):
        if te_n[c] + tr_n[c] > len(p):
            raise ValueError(f"class {classes[c]} has {len(p)} examples, {te_n[c] + tr_n[c]} asked")
    te = rng.permutation(np.concatenate([p[: te_n[c]] for c, p in enumerate(perms)]))
    tr = rng.permutation(np.concatenate([p[te_n[c] : te_n[c] + tr_n[c]] for c, p in enumerate(perms)]))
    lab = np.asarray(labels)
    return [texts[i] for i in tr], lab[tr], [texts[i] for i in te], lab[te]


def _load_task(name: str, s: dict[str, Any], tok: Any) -> Any:
    from shiftkit import zoo
    from shiftkit.recipes.continual import ContinualTask
    from shiftkit.recipes.learn import encode_texts, eval_batches, text_batches

    source, labels = TASKS[name]
    if source.startswith("vader:"):
        tr_x, tr_y, te_x, te_y = zoo.vader_split(
            source.split(":")[1], n_train=s["n_train"], n_test=s["n_test"], seed=s["seed"]
        )
    else:
        texts, y = (
            zoo.load_dataset(source, plot=True) if source == "rotten-tomatoes" else zoo.load_dataset(source)
        )
        tr_x, tr_y, te_x, te_y = _balanced(texts, y, s["n_train"], s["n_test"], s["seed"])
    train = text_batches(encode_texts(tok, tr_x, tr_y, s["max_length"]), BATCH)
    test = eval_batches(encode_texts(tok, te_x, te_y, s["max_length"]))
    return ContinualTask(name, labels, train, test)


def run_suite(
    settings: dict[str, Any],
    methods: list[str],
    out: Path,
    *,
    fresh: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run ``methods`` over the task sequence; each finished method is kept in ``out/methods``.

    Returns:
        The payload: settings, one entry per method (matrix, zero-shot row, metrics, seconds, peak memory),
        the anchor, the verdict and the timings.
    """
    import shutil

    import torch

    import shiftkit as sk
    from shiftkit import continual, zoo
    from shiftkit._fileio import atomic_write_text
    from shiftkit.bench._suite import RssPeak
    from shiftkit.bench.report import environment
    from shiftkit.recipes.continual import ZeroShotTextClassifier, evaluate_tasks, run_sequence
    from shiftkit.recipes.learn import TrainConfig, encode_texts, eval_batches

    start = time.perf_counter()
    torch.manual_seed(settings["seed"])
    encoder, tok = zoo.load_model("minilm")
    log("loading the tasks: " + ", ".join(TASKS))
    tasks = [_load_task(name, settings, tok) for name in TASKS]
    headlines = zoo.load_dataset("guardian-headlines")[: settings["n_reference"]]
    ref = [
        {k: v for k, v in b.items() if k != "labels"}
        for b in eval_batches(
            encode_texts(tok, headlines, [0] * len(headlines), settings["max_length"]), BATCH
        )
    ]
    base = ZeroShotTextClassifier(encoder, tok, [t.labels for t in tasks]).eval()
    zs = ZeroShotTextClassifier
    if fresh and out.exists():
        shutil.rmtree(out / "methods", ignore_errors=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    results: dict[str, Any] = {}
    for name in methods:
        strategy_name, options, shift = METHODS[name]
        # what a kept result must have been run with (another size or seed is run again)
        fingerprint = {"settings": settings, "strategy": strategy_name, "options": options, "shift": shift,
                       "lr": LR.get(shift), "tasks": list(TASKS)}  # fmt: skip
        tag = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:10]
        done = out / "methods" / f"{name}.json"
        if done.is_file():
            kept = json.loads(done.read_text())
            if kept.get("fingerprint") == fingerprint:
                results[name] = kept
                log(f"{name}: finished in an earlier run (kept)")
                continue
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        with RssPeak() as meter:
            if shift == "none":  # zero-shot: the pretrained model on every task, before and after "training"
                row = evaluate_tasks(model, tasks, zs.set_task_of)
                res_d: dict[str, Any] = {
                    "accuracy": [row] * len(tasks), "zero_shot": row,
                    "metrics": continual.mtil_metrics([row] * len(tasks), zero_shot=row), "train_seconds": [],
                }  # fmt: skip
            else:
                torch.manual_seed(settings["seed"])
                if shift == "lora":
                    sk.attach_(model, sk.LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear"))
                else:
                    for p in model.parameters():
                        p.requires_grad_(True)
                tc = TrainConfig(
                    epochs=settings["epochs"], lr=LR[shift], weight_decay=0.0, batch_size=BATCH,
                    seed=settings["seed"], max_length=settings["max_length"],
                )  # fmt: skip
                res = run_sequence(
                    model, tasks, continual.make(strategy_name, **options), tc, set_task=zs.set_task_of,
                    features=zs.features_of, reference=ref, initial=base,
                    checkpoint_dir=out / "checkpoints" / f"{name}-{tag}", progress=progress,
                )  # fmt: skip
                res_d = {
                    "accuracy": res.accuracy, "zero_shot": res.zero_shot, "metrics": res.metrics,
                    "train_seconds": res.train_seconds, "resumed_tasks": res.resumed_tasks,
                }  # fmt: skip
        res_d.update(
            method=name, strategy=strategy_name, options=options, shift=shift, fingerprint=fingerprint,
            seconds=time.perf_counter() - t0, peak_rss_mb=meter.peak_mb,
        )  # fmt: skip
        m = res_d["metrics"]
        figures = f"transfer {m['transfer']:.3f}, avg {m['avg']:.3f}, last {m['last']:.3f}"
        log(f"{name}: {figures} ({res_d['seconds']:.0f} s)")
        atomic_write_text(done, json.dumps(res_d, default=str) + "\n")
        results[name] = res_d
    payload: dict[str, Any] = {
        "suite": "continual-text",
        "settings": settings,
        "tasks": {n: {"source": TASKS[n][0], "labels": list(TASKS[n][1])} for n in TASKS},
        "methods": results,
        "anchor": {k: list(v) for k, v in ANCHOR.items()},
        "environment": environment(),
        "timings": {"total_seconds": time.perf_counter() - start},
    }
    payload["verdict"] = verdict(payload)
    return payload


def verdict(payload: dict[str, Any]) -> str:
    """The issue's criterion: ZSCL's Transfer within 2 points of zero-shot and its Last within 2 points of
    sequential fine-tuning."""
    m = payload["methods"]
    if not all(k in m for k in ("zero-shot", "finetune", "zscl")):
        return "verdict: needs the zero-shot, finetune and zscl rows"
    z, f, s = (m[k]["metrics"] for k in ("zero-shot", "finetune", "zscl"))
    keep = s["transfer"] >= z["transfer"] - 0.02
    learn = s["last"] >= f["last"] - 0.02
    return (
        f"ZSCL Transfer {100 * s['transfer']:.1f} vs zero-shot {100 * z['transfer']:.1f} "
        f"({'within' if keep else 'NOT within'} 2 points); Last {100 * s['last']:.1f} vs fine-tuning "
        f"{100 * f['last']:.1f} ({'within' if learn else 'NOT within'} 2 points)"
    )


def table_rows(payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """One row per method: Transfer / Avg / Last / forgetting (%), seconds, peak memory, the MTIL anchor."""
    rows = []
    for name, r in payload["methods"].items():
        m = r["metrics"]
        anchor = ANCHOR.get(name)
        rows.append(
            {
                "method": name,
                "transfer": f"{100 * m['transfer']:.1f}",
                "avg": f"{100 * m['avg']:.1f}",
                "last": f"{100 * m['last']:.1f}",
                "forgetting": f"{100 * m['forgetting']:.1f}",
                "seconds": f"{r['seconds']:.0f}",
                "peak MB": f"{r['peak_rss_mb']:.0f}",
                "MTIL anchor T/A/L": " / ".join(f"{v:.1f}" for v in anchor) if anchor else "",
            }
        )
    return rows, [
        "method",
        "transfer",
        "avg",
        "last",
        "forgetting",
        "seconds",
        "peak MB",
        "MTIL anchor T/A/L",
    ]


def _heatmap_svg(name: str, a: list[list[float]], tasks: list[str]) -> str:
    cell, left, top = 34, 70, 40
    n = len(tasks)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + cell * n + 10}" '
        f'height="{top + cell * n + 10}" font-family="sans-serif" font-size="10">',
        f'<text x="{left}" y="14" font-size="12">{html.escape(name)}</text>',
    ]
    for d, t in enumerate(tasks):
        parts.append(f'<text x="{left + d * cell + 2}" y="{top - 6}">{html.escape(t[:6])}</text>')
    for t_i, row in enumerate(a):
        parts.append(f'<text x="4" y="{top + t_i * cell + 20}">after {html.escape(tasks[t_i][:6])}</text>')
        for d, v in enumerate(row):
            shade = int(255 - 200 * max(0.0, min(1.0, v)))
            x, y = left + d * cell, top + t_i * cell
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                f'fill="rgb({shade},{shade},255)"/><text x="{x + 4}" y="{y + 20}">{100 * v:.0f}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def render_html(payload: dict[str, Any]) -> str:
    """The report: the table beside the anchor and one accuracy-matrix heat map per method."""
    from shiftkit.bench.report import html_table, suite_page

    rows, columns = table_rows(payload)
    tasks = list(payload["tasks"])
    maps = "".join(_heatmap_svg(n, r["accuracy"], tasks) for n, r in payload["methods"].items())
    s = payload["settings"]
    intro = (
        f"MiniLM as a zero-shot classifier (cosine similarity to label descriptions), tasks in order "
        f"{', '.join(tasks)}; {s['n_train']} training sentences per task, {s['epochs']} epochs, "
        f"{s['n_test']} test sentences per task, seed {s['seed']}."
    )
    body = f"{html_table(rows, columns)}<h2>Accuracy matrices (row: after task t; column: task d)</h2>{maps}"
    return suite_page("continual-text", intro, payload, body)
