"""``edit-smollm2``: Model Surgery and CHES on SmolLM2-135M-Instruct with offline data, sized for 2 CPU cores.

**Surgery** (Wang et al., NAACL 2025): a behaviour probe learns positive vs negative VADER sentences (movie,
product and tweet domains; label 1 = negative) on the frozen model's mean-pooled last hidden state; its
negative-class row ``v`` is written into the ``k`` gate-projection rows most anti-aligned with it
(``W[i] += α v``). For each (k, α) the model samples continuations of 20 neutral prompts (same seed for
every row) and two judges read them: the probe (on the unedited model's features) and VADER's own lexicon
scorer from the ``vaderSentiment`` package (compound ``<= -0.05`` counts as negative), a judge that is not
ours. Perplexity on held-out Guardian headlines measures what the edit keeps. Negative α steers towards
the behaviour, as a control. The paper's claim: the behaviour moves while perplexity barely does.

**CHES** (Razin et al., ICLR 2025): a preference set from VADER reviews (the prompt asks for a positive
review; preferred: a positive sentence; dispreferred: a negative sentence, or for a quarter of the pairs
the same positive sentence with one word deleted). LN-CHES is computed with the model before any
training; the report gives how many near-duplicates rank highest. Then a short DPO run (full fine-tuning)
on the ``m`` highest-LN-CHES pairs and, from the same start, on the ``m`` lowest, and the change of the
preferred and dispreferred responses' log-probabilities on the trained pairs: the paper's likelihood
displacement predicts a lower preferred log-probability after training on the most alike pairs.

Example:
    >>> parser = argparse.ArgumentParser(); add_arguments(parser)
    >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import copy
import html
import math
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SIZES", "add_arguments", "ches_rows", "run", "run_suite", "surgery_rows"]

SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "probe_per_class": 12,
        "probe_epochs": 10,
        "probe_lr": 1e-3,
        "prompts": 4,
        "samples": 2,
        "new_tokens": 8,
        "ppl_texts": 16,
        "edits": [[0.05, 5.0]],
        "pairs": 12,
        "near": 4,
        "m": 4,
        "dpo": {"epochs": 1, "batch_size": 4, "lr": 5e-6, "beta": 0.1},
    },
    "default": {
        "probe_per_class": 200,
        "probe_epochs": 10,
        "probe_lr": 1e-3,
        "prompts": 20,
        "samples": 16,
        "new_tokens": 24,
        "ppl_texts": 200,
        "edits": [[0.02, 1.0], [0.02, 2.0], [0.02, 5.0], [0.05, 2.0], [0.05, 5.0], [0.05, -5.0]],
        "pairs": 120,
        "near": 30,
        "m": 16,
        "dpo": {"epochs": 4, "batch_size": 8, "lr": 5e-6, "beta": 0.1},
    },
}

EPILOG = """\
examples:
  shiftkit bench edit-smollm2                 # surgery at 6 (k, alpha) + CHES and two DPO runs (~20 min)
  shiftkit bench edit-smollm2 --quick         # smoke test
  shiftkit bench edit-smollm2 --skip-ches     # the surgery table only
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options to ``parser`` (no torch import)."""
    parser.description = (__doc__ or "").split("\n\nExample:")[0]
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true", help="smoke test: a few texts, one edit, tiny DPO")
    parser.add_argument("--skip-surgery", action="store_true", help="only the CHES part")
    parser.add_argument("--skip-ches", action="store_true", help="only the surgery part")
    parser.add_argument("--seed", type=int, default=0, help="data, probe and sampling seed (default 0)")
    parser.add_argument(
        "--out", default="runs/edit-smollm2", metavar="DIR", help="default: runs/edit-smollm2"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """Run the suite: print the tables, write results.json and report.html."""
    from shiftkit.bench.report import format_table, write_suite_outputs

    size = "quick" if args.quick else "default"
    settings = {**SIZES[size], "seed": args.seed, "size": size}
    payload = run_suite(
        settings,
        surgery=not args.skip_surgery,
        ches=not args.skip_ches,
        log=lambda msg: print(f"[edit-smollm2] {msg}", file=sys.stderr, flush=True),
    )
    for part, fn in (("surgery", surgery_rows), ("ches", ches_rows)):
        if payload.get(part):
            rows, columns = fn(payload)
            print()
            print(format_table(rows, columns))
    for line in payload["verdicts"]:
        print(f"\n{line}")
    write_suite_outputs(args.out, payload, render_html(payload), args.json)
    return 0


def run_suite(
    settings: dict[str, Any],
    *,
    surgery: bool = True,
    ches: bool = True,
    model_factory: Callable[[], tuple[Any, Any]] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Run the parts asked for and return the results payload (see the module docstring)."""
    import torch

    from shiftkit import zoo
    from shiftkit.bench.report import environment
    from shiftkit.recipes.edit_lm import load_causal_lm

    start = time.perf_counter()
    torch.manual_seed(settings["seed"])
    model, tok = model_factory() if model_factory is not None else load_causal_lm("smollm2-135m")
    payload: dict[str, Any] = {"suite": "edit-smollm2", "settings": settings, "verdicts": []}
    if surgery:
        heads = zoo.load_dataset("guardian-headlines")
        payload["surgery"] = _surgery(model, tok, settings, heads[: settings["ppl_texts"]], log)
        n = settings["prompts"] * settings["samples"]
        payload["verdicts"].append(_surgery_verdict(payload["surgery"], n))
    if ches:
        payload["ches"] = _ches(model, tok, settings, log)
        payload["verdicts"].append(_ches_verdict(payload["ches"]))
    payload["environment"] = environment()
    payload["timings"] = {"total_seconds": time.perf_counter() - start}
    return payload


def _surgery(
    model: Any, tok: Any, s: dict[str, Any], ppl_texts: list[str], log: Callable[[str], None]
) -> dict[str, Any]:
    from shiftkit import edit
    from shiftkit.recipes.edit_lm import NEUTRAL_PROMPTS, steer_table, vader_behaviour

    t0 = time.perf_counter()
    texts, labels = vader_behaviour(s["probe_per_class"], seed=s["seed"])
    probe = edit.train_probe(
        model, tok, texts, labels, epochs=s["probe_epochs"], lr=s["probe_lr"], seed=s["seed"]
    )
    log(
        f"probe: held-out accuracy {probe.accuracy:.3f} on {probe.n_held_out} texts "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    edits: dict[str, Any] = {"unedited": None}
    for k, alpha in s["edits"]:
        edits[f"k={k:g} alpha={alpha:g}"] = edit.surgery(model, probe.direction, k=k, alpha=alpha)
    rows = steer_table(
        model,
        tok,
        probe,
        edits,
        NEUTRAL_PROMPTS[: s["prompts"]],
        ppl_texts=ppl_texts,
        samples=s["samples"],
        max_new_tokens=s["new_tokens"],
        seed=s["seed"],
        log=log,
    )
    for row, (k, alpha) in zip(rows[1:], s["edits"], strict=True):
        row["k"], row["alpha"] = k, alpha
    return {
        "probe_accuracy": probe.accuracy,
        "probe_train_accuracy": probe.train_accuracy,
        "probe_texts": len(texts),
        "direction_norm": float(probe.direction.norm()),
        "gate_rows": sum(int(c.numel()) for c in edit.gate_cosines(model, probe.direction).values()),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def _surgery_verdict(part: dict[str, Any], n: int) -> str:
    """The largest drop of the VADER-judged negative share among the edits with alpha > 0, whether it exceeds
    twice the standard error of the difference (``n`` samples per row), and what it cost in perplexity."""
    base = part["rows"][0]
    steered = [r for r in part["rows"][1:] if r.get("alpha", 0) > 0]
    if not steered:
        return "surgery: no edit with alpha > 0 was run"
    best = min(steered, key=lambda r: r["judge_negative"])
    p0, p1 = base["judge_negative"], best["judge_negative"]
    se = math.hypot(_se(p0, n), _se(p1, n))
    ppl_change = 100 * (best["perplexity"] / base["perplexity"] - 1)
    control = [r for r in part["rows"][1:] if r.get("alpha", 0) < 0]
    return (
        f"surgery ({best['edit']}, {best['rows']} of {part['gate_rows']} gate rows): VADER-judged negative "
        f"continuations {100 * p0:.1f} % -> {100 * p1:.1f} % ("
        + ("beyond" if p0 - p1 > 2 * se else "within")
        + f" two standard errors, {100 * 2 * se:.1f} points, of {n} samples per row), perplexity "
        f"{base['perplexity']:.2f} -> {best['perplexity']:.2f} ({ppl_change:+.1f} %)"
        + "".join(f"; control {r['edit']}: {100 * r['judge_negative']:.1f} % negative" for r in control)
    )


def _auroc(scores: list[float], positive: list[bool]) -> float:
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return float("nan")
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def _ches(model: Any, tok: Any, s: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from shiftkit import edit
    from shiftkit.recipes.causal_lm import DPOSettings, dpo_train, response_logprobs
    from shiftkit.recipes.edit_lm import vader_preferences

    t0 = time.perf_counter()
    data = vader_preferences(s["pairs"], s["near"], seed=s["seed"])
    scores = edit.ches(model, tok, data.prompts, data.chosen, data.rejected)
    raw = edit.ches(model, tok, data.prompts, data.chosen, data.rejected, length_normalized=False)
    n_near = sum(data.near)
    top = edit.select_pairs(scores, n_near, quantile=1.0).tolist()
    out: dict[str, Any] = {
        "pairs": len(data.prompts),
        "near_duplicates": n_near,
        "near_in_top": sum(data.near[i] for i in top),
        "auroc_ln_ches": _auroc(scores.tolist(), data.near),
        "auroc_ches": _auroc(raw.tolist(), data.near),
        # the spec's two baselines: last-token hidden-state inner product, minus normalised edit distance
        "auroc_last_state": _auroc(
            edit.last_state_similarity(model, tok, data.prompts, data.chosen, data.rejected).tolist(),
            data.near,
        ),
        "auroc_edit_distance": _auroc(
            edit.edit_distance_similarity(tok, data.chosen, data.rejected).tolist(), data.near
        ),
        "scores_seconds": time.perf_counter() - t0,
        "dpo": [],
    }
    log(
        f"LN-CHES: {out['near_in_top']} of the {n_near} highest pairs are near-duplicates "
        f"({out['scores_seconds']:.0f} s)"
    )
    dpo = DPOSettings(**s["dpo"], seed=s["seed"])
    for name, q in (("highest LN-CHES", 1.0), ("lowest LN-CHES", 0.0)):
        t1 = time.perf_counter()
        idx = edit.select_pairs(scores, s["m"], quantile=q).tolist()
        p, c, r = ([seq[i] for i in idx] for seq in (data.prompts, data.chosen, data.rejected))
        trained = copy.deepcopy(model)
        before_c, before_r = response_logprobs(trained, tok, p, c), response_logprobs(trained, tok, p, r)
        losses = dpo_train(trained, tok, p, c, r, dpo)
        after_c, after_r = response_logprobs(trained, tok, p, c), response_logprobs(trained, tok, p, r)
        del trained
        row = {
            "pairs": name,
            "m": len(idx),
            "near_duplicates": sum(data.near[i] for i in idx),
            "mean_ln_ches": float(scores[idx].mean()),
            "chosen_logp_before": float(before_c.mean()),
            "chosen_logp_change": float((after_c - before_c).mean()),
            "chosen_lowered": int((after_c < before_c).sum()),
            "rejected_logp_change": float((after_r - before_r).mean()),
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "seconds": time.perf_counter() - t1,
        }
        out["dpo"].append(row)
        log(
            f"DPO on the {name} pairs: preferred log-prob {row['chosen_logp_change']:+.2f}, dispreferred "
            f"{row['rejected_logp_change']:+.2f} ({row['seconds']:.0f} s)"
        )
    out["seconds"] = time.perf_counter() - t0
    return out


def _ches_verdict(part: dict[str, Any]) -> str:
    high, low = part["dpo"]
    more = high["chosen_logp_change"] < low["chosen_logp_change"]
    return (
        f"CHES: {part['near_in_top']} of the {part['near_duplicates']} highest-LN-CHES pairs are the "
        "near-duplicates "
        f"(AUROC {part['auroc_ln_ches']:.3f}; CHES {part['auroc_ches']:.3f}, last-state inner product "
        f"{part['auroc_last_state']:.3f}, edit distance {part['auroc_edit_distance']:.3f}); after DPO the "
        "preferred log-prob changed by "
        f"{high['chosen_logp_change']:+.2f} on the highest-LN-CHES pairs vs {low['chosen_logp_change']:+.2f} "
        "on the lowest: "
        + (
            "lower on the most alike pairs, as the paper predicts"
            if more
            else "NOT lower on the most alike pairs"
        )
        + ("" if high["chosen_logp_change"] < 0 else " (though it did not fall below its start)")
    )


def _se(p: float, n: int) -> float:
    """Standard error of a share ``p`` of ``n`` samples (binomial)."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def surgery_rows(payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """One row per edit: rows changed, shift size, negative shares by both judges, perplexity."""
    base_ppl = payload["surgery"]["rows"][0]["perplexity"]
    n = payload["settings"]["prompts"] * payload["settings"]["samples"]
    rows = [
        {
            "edit": r["edit"],
            "rows": str(r["rows"]),
            "shift": f"{r['bytes'] / 1024:.1f} KiB",
            "probe neg %": f"{100 * r['probe_undesired']:.1f}",
            "VADER neg %": f"{100 * r['judge_negative']:.1f} ± {100 * _se(r['judge_negative'], n):.1f}",
            "VADER mean": f"{r['judge_mean']:+.3f}",
            "perplexity": f"{r['perplexity']:.2f}",
            "Δppl %": f"{100 * (r['perplexity'] / base_ppl - 1):+.1f}",
        }
        for r in payload["surgery"]["rows"]
    ]
    return rows, ["edit", "rows", "shift", "probe neg %", "VADER neg %", "VADER mean", "perplexity", "Δppl %"]


def ches_rows(payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """One row per DPO run: which pairs, how alike, and how the responses' log-probabilities moved."""
    rows = [
        {
            "trained on": r["pairs"],
            "m": str(r["m"]),
            "near-dups": str(r["near_duplicates"]),
            "mean LN-CHES": f"{r['mean_ln_ches']:.1f}",
            "Δ log p(preferred)": f"{r['chosen_logp_change']:+.2f}",
            "preferred lowered": f"{r['chosen_lowered']}/{r['m']}",
            "Δ log p(dispreferred)": f"{r['rejected_logp_change']:+.2f}",
            "DPO loss": f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
        }
        for r in payload["ches"]["dpo"]
    ]
    columns = list(rows[0]) if rows else []
    return rows, columns


def render_html(payload: dict[str, Any]) -> str:
    """The report: both tables, sample continuations and the verdicts."""
    from shiftkit.bench.report import html_table, suite_page

    body = ""
    if payload.get("surgery"):
        rows, columns = surgery_rows(payload)
        body += "<h2>Model Surgery</h2>" + html_table(rows, columns)
        body += "<h3>First continuations per edit</h3><ul>"
        for r in payload["surgery"]["rows"]:
            body += (
                f"<li><b>{html.escape(r['edit'])}</b>: "
                + " | ".join(html.escape(t) for t in r["examples"])
                + "</li>"
            )
        body += "</ul>"
    if payload.get("ches"):
        rows, columns = ches_rows(payload)
        body += "<h2>CHES and DPO</h2>" + html_table(rows, columns)
    body += "".join(f"<p>{html.escape(v)}</p>" for v in payload["verdicts"])
    s = payload["settings"]
    intro = (
        f"SmolLM2-135M-Instruct, seed {s['seed']}, size {s['size']}: probe on {s['probe_per_class']} "
        "sentences per "
        f"class and domain, {s['prompts']} prompts x {s['samples']} samples of {s['new_tokens']} tokens; "
        f"{s['pairs']} + {s['near']} preference pairs, DPO on m = {s['m']}."
    )
    return suite_page("edit-smollm2", intro, payload, body)
