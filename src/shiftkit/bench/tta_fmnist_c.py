"""``shiftkit bench tta-fmnist-c``: test-time adaptation under corruption and natural shift, error % per
method in the anchors' format (CIFAR10-C tables of the TENT paper and the mariodoebler benchmark).

Source model: ImageNet EfficientNet-Lite0 fine-tuned on Fashion-MNIST (32×32 RGB, cached). Target data:
Fashion-MNIST test images under the 15 corruptions at severity 5 (``shiftkit.data.corrupt`` with the
CIFAR-10-C constants, made for 32 px), the same seeded subset of ``per_domain`` images for every corruption,
as CIFAR-10-C uses the same 10,000 images. Streams (``shiftkit.data.streams``), batch ``batch_size``:

* ``episodic``: the 15 corruptions in the standard order, reset at every corruption (TENT's table).
* ``continual``: the same order, never reset (the mariodoebler benchmark's default).
* ``correlated``: each corruption sorted by label (Dirichlet δ = 0), reset at every corruption.

Plus the natural shift MNIST-5k → sklearn digits: a second source model trained on MNIST-5k (4,500 images),
tested on all 1,797 digits in one shuffled stream.

Sizes: the default (12–15 minutes on 2 cores, plus about 12 minutes the first time to train and
cache the two source models) uses 1,000 images per corruption, batch 50; ``--quick`` 100 images and 3
corruptions (a smoke run); ``--full`` all 10,000 test images per corruption at the anchors' batch 200 and
a source model trained on the whole training set. Every run states its sizes in the output.

Example:
    >>> parser = argparse.ArgumentParser(); add_arguments(parser)
    >>> run(parser.parse_args(["--quick"]))   # doctest: +SKIP
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

__all__ = ["SETTINGS", "SIZES", "add_arguments", "render_html", "run", "run_suite", "table_rows"]

SETTINGS = ("episodic", "continual", "correlated")

SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "per_domain": 100,
        "batch_size": 50,
        "corruptions": ("gaussian_noise", "defocus_blur", "contrast"),
        "n_train": 4000,
        "epochs": 1,
        "mnist_epochs": 1,
        "fisher_images": 200,
    },
    "default": {
        "per_domain": 1000,
        "batch_size": 50,
        "corruptions": None,
        "n_train": 30000,
        "epochs": 2,
        "mnist_epochs": 10,
        "fisher_images": 500,
    },
    "full": {
        "per_domain": 10000,
        "batch_size": 200,
        "corruptions": None,
        "n_train": 59000,
        "epochs": 2,
        "mnist_epochs": 10,
        "fisher_images": 2000,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options to ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
    """
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="100 images × 3 corruptions (smoke run, ~3 min)")
    size.add_argument(
        "--full", action="store_true", help="all 10,000 images per corruption, batch 200 (hours)"
    )
    parser.add_argument(
        "--methods", nargs="+", metavar="NAME", help="subset of the registered methods (default: all)"
    )
    parser.add_argument(
        "--settings", nargs="+", choices=SETTINGS, help="subset of the streams (default: all)"
    )
    parser.add_argument("--per-domain", type=int, metavar="N", help="images per corruption (overrides size)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="stream batch size (overrides size)")
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6), help="corruption severity")
    parser.add_argument("--no-digits", action="store_true", help="skip MNIST-5k -> digits")
    parser.add_argument("--seed", type=int, default=0, help="subset, corruption noise, source training")
    parser.add_argument(
        "--out", default="runs/tta-fmnist-c", metavar="DIR", help="default: runs/tta-fmnist-c"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")
    parser.add_argument("--cache", metavar="DIR", help="source-model cache root (default: $SHIFTKIT_CACHE)")
    parser.add_argument("--no-cache", action="store_true", help="train the source models, keep nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _method_params(name: str, fisher_batches: list[Any]) -> dict[str, Any]:
    """The suite's options for a method, from its spec: source batches where it takes them (EATA's Fisher
    term), and the source model as the inner method of a wrapper (label shift's prior correction)."""
    from shiftkit import adapt

    spec = adapt.get_method(name)
    params: dict[str, Any] = {}
    if spec.source_data is not None:
        params[spec.source_data] = fisher_batches
    if spec.wraps is not None:
        params[spec.wraps] = "source"
    return params


def _run_methods(
    source: Any,
    stream: Any,
    methods: list[str],
    fisher_batches: list[Any],
    progress: bool | None,
    label: str,
    say: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    from shiftkit import adapt

    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        model = copy.deepcopy(source)
        tta = adapt.make(m, model, **_method_params(m, fisher_batches))
        run = adapt.evaluate(tta, stream, progress=progress, desc=f"{label}: {m}")
        out[m] = {k: v for k, v in run.to_dict().items() if k != "stream"}
        say(f"{label} {m}: mean error {run.mean_error:.1f} % ({run.seconds:.0f} s)")
    return out


def run_suite(
    settings: dict[str, Any],
    methods: list[str] | None = None,
    streams: list[str] | None = None,
    digits: bool = True,
    cache_root: Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the suite and return the results payload (``results.json``).

    Args:
        settings: a :data:`SIZES` entry plus ``seed`` and ``severity``; optional overrides:
            ``mnist_n_train`` (MNIST-5k images the digits source trains on, default 4,500) and ``digits_n``
            (digits tested, default all 1,797). The tests shrink every size this way.
        methods: subset of ``adapt.list_methods()`` (default: every registered method).
        streams: subset of :data:`SETTINGS` (default all).
        digits: also run MNIST-5k → digits.
        cache_root: source-model cache root (``None``: train, keep nothing).
        progress: tqdm bars (``None``: on a terminal only).
        log: receives one line per stage.

    Returns:
        ``{"settings", "corruptions", "results": {setting: {method: run}}, "digits", "sources", ...}``.

    Example:
        >>> payload = run_suite({**SIZES["quick"], "seed": 0, "severity": 5})  # doctest: +SKIP
    """
    import numpy as np
    import torch

    from shiftkit import adapt
    from shiftkit.bench.report import environment
    from shiftkit.data import CORRUPTIONS, corrupted_domains, grey28_to_rgb32
    from shiftkit.data import streams as st
    from shiftkit.recipes.image_source import SourceSettings, digits_images, source_model
    from shiftkit.zoo import load_dataset

    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    seed, severity = int(settings["seed"]), int(settings["severity"])
    known = adapt.list_methods()  # every registered method, in suite order
    methods = list(methods or known)
    unknown = sorted(set(methods) - set(known))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {known}")
    chosen_streams = list(streams or SETTINGS)
    corruptions = tuple(settings["corruptions"] or CORRUPTIONS)

    fm_settings = SourceSettings("fashion-mnist", settings["n_train"], settings["epochs"], seed)
    source, fm_info = source_model(fm_settings, cache_root, progress, say)
    xtr, _, xte, yte = load_dataset("fashion-mnist")
    n = min(int(settings["per_domain"]), len(yte))
    idx = np.sort(np.random.default_rng(seed).permutation(len(yte))[:n])
    x, y = grey28_to_rgb32(xte[idx]), torch.as_tensor(yte[idx])
    fidx = np.random.default_rng(seed + 1).permutation(len(xtr) - 1000)[: settings["fisher_images"]]
    fisher_x = grey28_to_rgb32(xtr[fidx])
    fisher_batches = list(fisher_x.split(settings["batch_size"]))

    t = time.perf_counter()
    domains = corrupted_domains(x, y, corruptions, severity, seed)
    corrupt_seconds = time.perf_counter() - t
    say(
        f"corrupted {n} images × {len(corruptions)} corruptions (severity {severity}) "
        f"in {corrupt_seconds:.0f} s"
    )
    clean = {"clean": (x, y)}

    bs = int(settings["batch_size"])
    makers = {
        "episodic": lambda d: st.episodic(d, bs),
        "continual": lambda d: st.continual(d, bs),
        "correlated": lambda d: st.correlated(d, bs, delta=0.0, seed=seed, reset_each_domain=True),
    }
    results: dict[str, dict[str, Any]] = {}
    describe: dict[str, Any] = {}
    for name in chosen_streams:
        stream = makers[name](domains)
        describe[name] = stream.describe()
        results[name] = _run_methods(source, stream, methods, fisher_batches, progress, name, say)
    clean_runs = _run_methods(
        source, st.continual(clean, bs), ["source"], fisher_batches, progress, "clean", say
    )

    digits_block: dict[str, Any] | None = None
    if digits:
        n_mnist = int(settings.get("mnist_n_train", 4500))
        mn_settings = SourceSettings("mnist5k", n_mnist, settings["mnist_epochs"], seed)
        mnist_source, mn_info = source_model(mn_settings, cache_root, progress, say)
        dx, dy = digits_images()
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(dy), generator=g)[: settings.get("digits_n")]  # None: all 1,797
        dstream = st.continual({"digits": (dx[perm], dy[perm])}, bs)
        mx = load_dataset("mnist5k")[0]  # ordered by class: take a random 500 for the Fisher estimate
        mn_fisher = list(
            grey28_to_rgb32(mx[np.random.default_rng(seed).permutation(len(mx))[:500]]).split(bs)
        )
        digits_block = {
            "source_info": mn_info,
            "stream": dstream.describe(),
            "results": _run_methods(mnist_source, dstream, methods, mn_fisher, progress, "digits", say),
        }

    fp = hashlib.sha256(np.ascontiguousarray(idx).tobytes()).hexdigest()[:12]
    return {
        "suite": "tta-fmnist-c",
        "title": "shiftkit tta-fmnist-c: test-time adaptation, error %",
        "settings": {**settings, "corruptions": list(corruptions), "per_domain": n, "subset_sha": fp},
        "corruptions": list(corruptions),
        "methods": methods,
        "streams": describe,
        "results": results,
        "clean": clean_runs["source"],
        "source": fm_info,
        "digits": digits_block,
        "environment": environment(),
        "timings": {"corrupt_seconds": corrupt_seconds, "total_seconds": time.perf_counter() - t0},
    }


def table_rows(payload: dict[str, Any], setting: str) -> tuple[list[dict[str, str]], list[str]]:
    """One stream's table (method × corruption error %, plus the mean), as strings.

    Example:
        >>> rows, columns = table_rows(payload, "episodic")
        >>> columns[:2]
        ['method', 'mean']
    """
    short = {c: c.split("_")[0][:8] for c in payload["corruptions"]}
    columns = ["method", "mean", *short.values()]
    rows = []
    for m, run in payload["results"][setting].items():
        row = {"method": m, "mean": f"{run['mean_error']:.1f}"}
        row.update({short[c]: f"{run['errors'][c]:.1f}" for c in payload["corruptions"]})
        rows.append(row)
    return rows, columns


def summary_rows(payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """Mean error % per method and stream, plus digits and speed: the README's table.

    Example:
        >>> rows, columns = summary_rows(payload)
    """
    streams = list(payload["results"])
    columns = ["method", *streams]
    if payload.get("digits"):
        columns.append("mnist→digits")
    columns.append("img/s")
    rows = []
    for m in payload["methods"]:
        row = {"method": m}
        for s in streams:
            row[s] = f"{payload['results'][s][m]['mean_error']:.1f}"
        if payload.get("digits"):
            row["mnist→digits"] = f"{payload['digits']['results'][m]['mean_error']:.1f}"
        first = payload["results"][streams[0]][m] if streams else None
        row["img/s"] = f"{first['images_per_second']:.0f}" if first else ""
        rows.append(row)
    return rows, columns


def _describe(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    src = payload["source"]
    return (
        f"Fashion-MNIST test, {s['per_domain']} images per corruption (subset {s['subset_sha']}), "
        f"{len(payload['corruptions'])} corruptions at severity {s['severity']}, batch {s['batch_size']}, "
        f"seed {s['seed']}. Source: EfficientNet-Lite0 fine-tuned on {s['n_train']} Fashion-MNIST images "
        f"({s['epochs']} epoch(s)); clean error {payload['clean']['mean_error']:.1f} % on the same subset."
        + ("" if not src.get("cached") else " (source model from the cache)")
    )


def render_html(payload: dict[str, Any]) -> str:
    """The report as one self-contained HTML string (every text is escaped).

    Example:
        >>> text = render_html(json.loads(Path("runs/tta-fmnist-c/results.json").read_text()))
    """
    from shiftkit.bench.report import CSS, footer, html_table

    esc = html.escape
    srows, scols = summary_rows(payload)
    parts = [f"<h2>Mean error % per stream</h2>{html_table(srows, scols)}"]
    for s in payload["results"]:
        rows, cols = table_rows(payload, s)
        parts.append(
            f"<h2>{esc(s)}</h2><p>{esc(json.dumps(payload['streams'][s]))}</p>{html_table(rows, cols)}"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(payload["title"])}</title>
<style>{CSS}</style></head><body>
<h1>{esc(payload["title"])}</h1>
<p>{esc(_describe(payload))}</p>
{"".join(parts)}
<p class="note">Online protocol: every batch is predicted, then adapted on; error % = 100·(1 − accuracy),
mean over corruptions. Anchors (CIFAR10-C, WRN-28, severity 5): source 43.5, norm 20.4, TENT 18.6 (reset per
corruption); correlated stream: TENT 87.6, LAME 11.3 (RN-26 GN).</p>
{footer(payload)}
</body></html>
"""


def run(args: argparse.Namespace) -> int:
    """Run the suite from parsed options: print the tables, write results.json and report.html.

    Example:
        >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
        0
    """
    from shiftkit._fileio import atomic_write_text
    from shiftkit.bench.report import format_table
    from shiftkit.zoo import cache_dir

    size = "quick" if args.quick else "full" if args.full else "default"
    settings = {**SIZES[size], "seed": args.seed, "severity": args.severity, "size": size}
    if args.per_domain:
        settings["per_domain"] = args.per_domain
    if args.batch_size:
        settings["batch_size"] = args.batch_size
    from shiftkit import adapt

    picked = [m for item in args.methods or () for m in item.split(",") if m]
    bad = sorted(set(picked) - set(adapt.list_methods()))
    if bad:
        print(
            f"shiftkit bench tta-fmnist-c: unknown method(s) {bad}; choose from {adapt.list_methods()}",
            file=sys.stderr,
        )
        return 2
    cache = None if args.no_cache else Path(args.cache) if args.cache else cache_dir()
    payload = run_suite(
        settings,
        methods=picked or None,
        streams=args.settings,
        digits=not args.no_digits,
        cache_root=cache,
        progress=False if args.no_progress else None,
        log=lambda msg: print(f"[tta-fmnist-c] {msg}", file=sys.stderr, flush=True),
    )
    print(f"\n{_describe(payload)}\n")
    rows, columns = summary_rows(payload)
    print("Mean error % (lower is better):")
    print(format_table(rows, columns))
    for s in payload["results"]:
        rows, columns = table_rows(payload, s)
        print(f"\n{s} (error % per corruption):")
        print(format_table(rows, columns))
    out = Path(args.out)
    text = json.dumps(payload, indent=2, default=str) + "\n"
    atomic_write_text(out / "results.json", text)
    atomic_write_text(out / "report.html", render_html(payload))
    print(f"\nfinished in {payload['timings']['total_seconds']:.0f} s; report: {out / 'report.html'}")
    if args.json:
        atomic_write_text(args.json, text)
        print(f"wrote {args.json}")
    return 0
