"""``compress-vader``: merge-vader's per-domain MiniLM task vectors and LoRA shifts, compressed.

The experts are merge-vader's (the same settings, the same cache): per VADER domain (tweets, movies,
Amazon, NYT) a full fine-tuning task vector ``τ_d`` of the MiniLM encoder and a LoRA shift (r=8 on every
encoder Linear), all read by θ0's frozen probe head. Each is compressed by

* ComPEFT (``sk.compress(method="compeft")``) at densities 0.5 / 0.2 / 0.1 / 0.05, α chosen per expert on
  its own domain's validation split from a small grid (ComPEFT tunes α per task on validation data), with
  the paper's one global top-k and σ, and with ``scope="tensor"`` (top-k, σ and scale per tensor);
* binary-coding quantisation (``method="bcq"``) at 2, 3 and 4 bits (groups of 64 inputs, float16 scales;
  1-D tensors kept as they are);

a LoRA as its own factors (ComPEFT's reference behaviour). Per row: the bytes of the compressed file (the
mean over the four experts) against the dense fp32 and bf16 files of the same tensors, each expert's test
accuracy on its own domain after decompression, their mean and its change against the uncompressed
experts, and the test accuracy of a TIES merge of the four decompressed shifts (λ chosen on validation,
as in merge-vader) against the TIES merge of the uncompressed ones. The target (BENCH.md): at least 16x
smaller than bf16 with at most 1 point of accuracy lost.

Example:
    >>> parser = argparse.ArgumentParser(); add_arguments(parser)
    >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SIZES", "add_arguments", "run", "run_suite", "table_rows", "verdict"]

DOMAINS: tuple[str, ...] = ("tweets", "movies", "amazon", "nyt")
DENSITIES: tuple[float, ...] = (0.5, 0.2, 0.1, 0.05)
BITS: tuple[int, ...] = (2, 3, 4)
#: α values tried per expert on its validation split (ComPEFT's α scales σ; its paper tunes α per task)
ALPHAS: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0)
TARGET_RATIO, TARGET_LOSS = 16.0, 0.01

#: the experts' sizes: merge-vader's, so its cached experts are reused
SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        **{"n_train": 16, "n_val": 8, "n_test": 16, "max_length": 32, "epochs": 1, "probe_epochs": 2},
        **{"kinds": ("lora",), "lora_targets": r".*\.(query|value)"},
    },
    "default": {},
    "full": {"n_train": 768, "n_val": 128, "n_test": 500, "epochs": 3},
}

#: --quick compresses with one setting of each compressor
QUICK_GRID: dict[str, Any] = {"densities": (0.1,), "bits": (3,), "alphas": (1.0, 3.0)}

EPILOG = """\
examples:
  shiftkit bench compress-vader                   # reuses merge-vader's cached experts (or trains them)
  shiftkit bench compress-vader --kinds lora      # the LoRA experts only
  shiftkit bench compress-vader --quick --no-cache
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options to ``parser`` (no torch import)."""
    parser.description = (__doc__ or "").split("\n\nExample:")[0]
    parser.epilog = EPILOG
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: merge-vader's --quick experts")
    size.add_argument("--full", action="store_true", help="merge-vader's --full experts")
    parser.add_argument("--kinds", nargs="+", choices=("full", "lora"), help="experts (default: both)")
    parser.add_argument("--no-merge", action="store_true", help="skip the TIES merges of compressed shifts")
    parser.add_argument("--seed", type=int, default=0, help="data split and head (default 0)")
    parser.add_argument(
        "--out", default="runs/compress-vader", metavar="DIR", help="default: runs/compress-vader"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")
    parser.add_argument("--cache", metavar="DIR", help="expert cache root (default: $SHIFTKIT_CACHE)")
    parser.add_argument("--no-cache", action="store_true", help="train the experts, keep nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the suite: print the table, write results.json and report.html."""
    from shiftkit.bench.report import format_table, write_suite_outputs
    from shiftkit.zoo import cache_dir

    size = "quick" if args.quick else "full" if args.full else "default"
    settings = {**SIZES[size], "seed": args.seed}
    if args.kinds:
        settings["kinds"] = tuple(dict.fromkeys(args.kinds))
    cache = None if args.no_cache else Path(args.cache) if args.cache else cache_dir()
    grid = QUICK_GRID if args.quick else {}
    payload = run_suite(
        settings,
        **grid,
        merge=not args.no_merge,
        cache_root=cache,
        progress=False if args.no_progress else None,
        log=lambda msg: print(f"[compress-vader] {msg}", file=sys.stderr, flush=True),
    )
    payload["settings"]["size"] = size
    rows, columns = table_rows(payload)
    print()
    print(format_table(rows, columns))
    print(f"\n{payload['verdict']}")
    write_suite_outputs(args.out, payload, render_html(payload), args.json)
    return 0


def run_suite(
    settings: dict[str, Any],
    *,
    densities: tuple[float, ...] = DENSITIES,
    bits: tuple[int, ...] = BITS,
    alphas: tuple[float, ...] = ALPHAS,
    merge: bool = True,
    cache_root: Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Read (or train) merge-vader's experts, compress them every way, and return the results payload."""
    import torch

    import shiftkit as sk
    from shiftkit.bench._merge_vader_merges import MergeVaderSettings, _merge_one
    from shiftkit.bench.report import environment
    from shiftkit.core.io import file_size
    from shiftkit.recipes.vader_experts import build_experts, evaluate, load_splits, with_delta

    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    s = MergeVaderSettings(**settings)
    data = load_splits(s)
    experts = build_experts(data, cache_root, progress, say)
    one_grid = s.n_val <= 8  # --quick: the first TIES λ only

    def own_accuracy(d: str, delta: sk.Shift, split: str) -> float:
        batches = data.val_batches if split == "val" else data.test_batches
        with with_delta(data, delta) as model:
            return evaluate(model, {d: batches[d]})[d]

    rows: list[dict[str, Any]] = []
    for kind in s.kinds:
        shifts = experts.full if kind == "full" else experts.lora

        def dense(x: sk.Shift, kind: str = kind) -> sk.Shift:
            return sk.to_delta(x) if kind == "lora" else x

        numel = sum(t.numel() for t in shifts[DOMAINS[0]].tensors.values())
        settings_list: list[tuple[str, str, dict[str, Any]]] = [("none", "fp32 (uncompressed)", {})]
        settings_list.append(("none", "bf16 (cast)", {"bf16": True}))
        settings_list += [("compeft", f"density {p:g}", {"density": p}) for p in densities]
        settings_list += [
            ("compeft", f"density {p:g}, per tensor", {"density": p, "scope": "tensor"}) for p in densities
        ]
        settings_list += [("bcq", f"{b} bits, group 64", {"bits": b, "group_size": 64}) for b in bits]
        base_mean = base_ties = None
        for compressor, label, params in settings_list:
            t = time.perf_counter()
            decoded: dict[str, sk.Shift] = {}
            sizes: list[int] = []
            chosen: list[float] = []
            for d in DOMAINS:
                x = shifts[d]
                if compressor == "none":
                    small = x.to(dtype=torch.bfloat16) if params else x
                    back = small.to(dtype=torch.float32)
                elif compressor == "compeft":

                    def score(cand: sk.Shift, d: str = d) -> float:
                        return own_accuracy(d, dense(cand), "val")

                    small = sk.compress(
                        x, method="compeft", alpha="auto", alpha_grid=alphas, evaluate=score, **params
                    )
                    chosen.append((small.encoding or {})["params"]["alpha"])
                    back = sk.decompress(small)
                else:
                    small = sk.compress(x, method="bcq", **params)
                    back = sk.decompress(small)
                sizes.append(file_size(small))
                decoded[d] = dense(back)
            acc = {d: own_accuracy(d, decoded[d], "test") for d in DOMAINS}
            mean = sum(acc.values()) / len(acc)
            base_mean = mean if base_mean is None else base_mean
            row: dict[str, Any] = {
                "kind": kind,
                "compressor": compressor,
                "setting": label,
                "params": params,
                "bytes": sum(sizes) / len(sizes),
                "ratio_fp32": 4 * numel / (sum(sizes) / len(sizes)),
                "ratio_bf16": 2 * numel / (sum(sizes) / len(sizes)),
                "accuracy": acc,
                "mean": mean,
                "delta": mean - base_mean,
                "alphas": chosen,
            }
            if merge:
                tvs = {d: decoded[d] for d in DOMAINS}
                merged = _merge_one(data, "ties", kind, tvs, one_grid)
                row["ties_mean"] = merged["mean"]
                row["ties_coef"] = merged["coef"]
                base_ties = merged["mean"] if base_ties is None else base_ties
                row["ties_delta"] = merged["mean"] - base_ties
            row["seconds"] = time.perf_counter() - t
            rows.append(row)
            say(f"{kind} {compressor} {label}: {row['ratio_bf16']:.1f}x vs bf16, own-domain mean {mean:.3f}")
    payload: dict[str, Any] = {
        "suite": "compress-vader",
        "title": "compress-vader: MiniLM task vectors and LoRAs compressed (ComPEFT, BCQ), VADER sentiment",
        "settings": {
            **dataclasses.asdict(s),
            "densities": list(densities),
            "bits": list(bits),
            "alphas": list(alphas),
        },
        "domains": list(DOMAINS),
        "rows": rows,
        "cache": {"dir": str(experts.cache_dir) if experts.cache_dir else None, "hit": experts.cached},
        "environment": environment(),
        "timings": {"total_seconds": time.perf_counter() - t0},
        "threads": torch.get_num_threads(),
    }
    payload["verdict"] = verdict(rows)
    return payload


def verdict(rows: list[dict[str, Any]]) -> str:
    """Plain words: the smallest setting per kind that keeps within 1 point, and whether it is ≥ 16x."""
    parts = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        ok = [
            r for r in rows if r["kind"] == kind and r["compressor"] != "none" and r["delta"] >= -TARGET_LOSS
        ]
        if not ok:
            parts.append(f"{kind}: no compressed setting stays within {100 * TARGET_LOSS:g} point")
            continue
        best = max(ok, key=lambda r: r["ratio_bf16"])
        met = "MEETS" if best["ratio_bf16"] >= TARGET_RATIO else "misses"
        parts.append(
            f"{kind}: {best['compressor']} {best['setting']} is {best['ratio_bf16']:.1f}x smaller than bf16 "
            f"at {100 * best['delta']:+.1f} points ({met} the ≥{TARGET_RATIO:g}x at ≤{100 * TARGET_LOSS:g} "
            "point target)"
        )
    return "; ".join(parts) + "."


def table_rows(payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """The results table as formatted strings: ``(rows, columns)``."""
    from shiftkit.bench.report import human_bytes

    domains = payload["domains"]
    columns = ["kind", "compressor", "setting", "bytes", "vs fp32", "vs bf16", *domains, "mean", "Δ"]
    merged = any("ties_mean" in r for r in payload["rows"])
    if merged:
        columns += ["TIES mean", "TIES Δ"]
    out = []
    for r in payload["rows"]:
        row = {
            "kind": r["kind"],
            "compressor": r["compressor"],
            "setting": r["setting"]
            + (f" (α {'/'.join(f'{a:g}' for a in r['alphas'])})" if r["alphas"] else ""),
            "bytes": human_bytes(r["bytes"]),
            "vs fp32": f"{r['ratio_fp32']:.1f}x",
            "vs bf16": f"{r['ratio_bf16']:.1f}x",
            "mean": f"{r['mean']:.3f}",
            "Δ": f"{100 * r['delta']:+.1f}",
        }
        row.update({d: f"{r['accuracy'][d]:.3f}" for d in domains})
        if merged:
            row["TIES mean"] = f"{r['ties_mean']:.3f}" if "ties_mean" in r else ""
            row["TIES Δ"] = f"{100 * r['ties_delta']:+.1f}" if "ties_delta" in r else ""
        out.append(row)
    return out, columns


def render_html(payload: dict[str, Any]) -> str:
    """The report as one self-contained HTML string (every text passes through :func:`html.escape`)."""
    from shiftkit.bench.report import CSS, footer, html_table

    esc = html.escape
    rows, columns = table_rows(payload)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(payload["title"])}</title>
<style>{CSS}</style></head><body>
<h1>{esc(payload["title"])}</h1>
<p>{esc((__doc__ or "").split("Example:")[0].split(chr(10) + chr(10), 1)[1])}</p>
{html_table(rows, columns)}
<p><b>{esc(payload["verdict"])}</b></p>
<p class="note">“bytes”: the mean file size of the four compressed experts; “vs fp32/bf16”: the dense
tensors' size in that dtype divided by it. Accuracy: each expert on its own domain's test split after
decompression; Δ in points against the uncompressed experts. TIES: the four decompressed shifts merged,
λ chosen on validation; mean test accuracy over the domains.</p>
{footer(payload)}
</body></html>
"""
