"""``shiftkit adapt``: run test-time adaptation methods over a shifted stream and print their error %."""

from __future__ import annotations

import argparse
import json
from typing import Any

EXAMPLE = """examples:
  shiftkit adapt --method source norm tent                     # Fashion-MNIST-C, 15 corruptions, continual
  shiftkit adapt --method tent --set tent.lr=5e-4 --stream episodic --corruptions gaussian_noise fog
  shiftkit adapt --method source lame tent --stream correlated --delta 0.1 --per-domain 200
  shiftkit adapt --model mnist5k-source --data digits --corruptions none --method source norm tent eata
  shiftkit adapt --model mypkg.models:build --data mypkg.data:load --method sar --stream mixed
  shiftkit adapt --plugin mypkg.tta --method mine tent          # a method registered in your own module

Models: "fmnist-source" (default) and "mnist5k-source" are EfficientNet-Lite0 (the zoo's ImageNet weights)
fine-tuned on Fashion-MNIST / MNIST-5k at 32x32, as in 'shiftkit bench tta-fmnist-c' (trained on first use:
about 5 and 2.5 minutes on 2 cores, then cached); any other zoo name or "package.module:function" is
loaded as given and must map the data's images (N, 3, 32, 32) in [0, 1] to (N, K) class scores.
Data: fashion-mnist (test split), mnist5k, digits (sklearn, resized to 28x28 and padded), or
"package.module:function" returning (x, y) tensors. Corruptions (ImageNet-C definitions with the CIFAR-10-C
constants) make one domain each; 'none' keeps the data as one clean domain.
Method options: --set NAME.KEY=VALUE (or KEY=VALUE with a single --method); VALUE is JSON, else a string.
Streams: episodic (reset per domain), continual, gradual (severity 1..5..1), mixed, correlated (--delta).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``adapt``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "adapt",
        help="test-time adaptation: run methods over a shifted stream, print error %%",
        description="Run test-time adaptation methods online over a corrupted or naturally shifted stream "
        "and print their error % per domain (lower is better), the anchors' metric.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", nargs="+", default=["source", "norm", "tent"], metavar="NAME")
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (it registers its own methods with @adapt.register_method)",
    )
    p.add_argument("--set", action="append", default=[], metavar="[NAME.]KEY=VALUE", help="method option")
    p.add_argument(
        "--model", default="fmnist-source", help="fmnist-source, mnist5k-source, zoo, module:function"
    )
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist, mnist5k, digits, module:function")
    p.add_argument("--corruptions", nargs="+", default=["all"], metavar="NAME", help="'all', 'none' or names")
    p.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    p.add_argument("--stream", default="continual", help="episodic, continual, gradual, mixed, correlated")
    p.add_argument("--delta", type=float, default=0.0, help="correlated stream: Dirichlet δ (0 = sorted)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-domain", type=int, default=500, help="images per domain (seeded subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/adapt", metavar="DIR", help="results.json + report.html")
    p.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")
    p.add_argument("--no-progress", action="store_true")
    return p


def _parse_sets(sets: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    from shiftkit.errors import ShiftkitError

    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ShiftkitError(f"--set {item!r}: expected [NAME.]KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        name, dot, opt = key.partition(".")
        if not dot:
            if len(methods) != 1:
                raise ShiftkitError(
                    f"--set {item!r}: name the method (e.g. {methods[0]}.{key}=...) with several"
                )
            name, opt = methods[0], key
        if name not in out:
            raise ShiftkitError(f"--set {item!r}: method {name!r} is not among --method {' '.join(methods)}")
        out[name][opt] = value
    return out


def _load_data(spec: str, seed: int, n: int) -> tuple[Any, Any]:
    import numpy as np
    import torch

    from shiftkit.errors import ShiftkitError
    from shiftkit.recipes.image_source import image_data

    x: torch.Tensor
    y: torch.Tensor
    if spec in ("fashion-mnist", "mnist5k", "digits"):
        x, y = image_data(spec)
    elif ":" in spec:
        import importlib

        mod, _, fn = spec.partition(":")
        try:
            out = getattr(importlib.import_module(mod), fn)()
        except (ImportError, AttributeError) as err:
            raise ShiftkitError(f"cannot load data factory {spec!r}: {err}") from None
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ShiftkitError(f"data factory {spec!r} must return (x, y) tensors, got {type(out).__name__}")
        x, y = torch.as_tensor(out[0]), torch.as_tensor(out[1])
    else:
        raise ShiftkitError(f"unknown --data {spec!r}; use fashion-mnist, mnist5k, digits or module:function")
    if n < len(y):
        idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:n])
        x, y = x[idx], y[idx]
    return x, y


def _load_model(spec: str, progress: bool | None) -> Any:
    from shiftkit.recipes.image_source import SourceSettings, source_model
    from shiftkit.recipes.loading import resolve_model
    from shiftkit.zoo import cache_dir

    if spec in ("fmnist-source", "mnist5k-source"):
        s = SourceSettings() if spec == "fmnist-source" else SourceSettings("mnist5k", 4500, 10)
        model, _ = source_model(s, cache_dir(), progress, log=lambda m: print(f"[adapt] {m}", flush=True))
        return model
    model, _ = resolve_model(spec)
    return model.eval()


def run(args: argparse.Namespace) -> int:
    """Build the stream, run every method on a fresh copy of the model, print and save the table."""
    import copy
    from pathlib import Path

    from shiftkit import adapt
    from shiftkit.cli._table import format_table, write_json
    from shiftkit.core.registry import load_plugins
    from shiftkit.data import CORRUPTIONS, corrupted_domains, make_stream
    from shiftkit.errors import ShiftkitError

    load_plugins(args.plugin)
    for m in args.method:
        if m not in adapt.list_methods():
            raise ShiftkitError(f"unknown adapt method {m!r}; known: {', '.join(adapt.list_methods())}")
    params = _parse_sets(args.set, args.method)
    progress = False if args.no_progress else None
    x, y = _load_data(args.data, args.seed, args.per_domain)
    names = (
        list(CORRUPTIONS)
        if args.corruptions == ["all"]
        else []
        if args.corruptions == ["none"]
        else args.corruptions
    )
    for c in names:
        if c not in CORRUPTIONS:
            raise ShiftkitError(f"unknown corruption {c!r}; known: {', '.join(CORRUPTIONS)} (or all / none)")
    options: dict[str, Any] = {}
    if args.stream == "correlated":
        options = {"delta": args.delta, "seed": args.seed}
    elif args.stream == "mixed":
        options = {"seed": args.seed}
    if args.stream == "gradual":
        if not names:
            raise ShiftkitError("the gradual stream needs corruptions (severities 1..5 of each)")
        by_severity = {sev: corrupted_domains(x, y, tuple(names), sev, args.seed) for sev in range(1, 6)}
        graded = {c: {sev: by_severity[sev][c] for sev in range(1, 6)} for c in names}
        stream = make_stream("gradual", graded, args.batch_size)
    else:
        domains = corrupted_domains(x, y, tuple(names), args.severity, args.seed)
        stream = make_stream(args.stream, domains or {args.data: (x, y)}, args.batch_size, **options)
    model = _load_model(args.model, progress)
    runs = []
    for m in args.method:
        tta = adapt.make(m, copy.deepcopy(model), **params[m])
        runs.append(adapt.evaluate(tta, stream, progress=progress, desc=m))
    doms = list(runs[0].errors)
    columns = ["method", "mean", "overall", *doms, "img/s"]
    rows = [
        {
            "method": r.method,
            "mean": f"{r.mean_error:.1f}",
            "overall": f"{r.overall_error:.1f}",
            **{d: f"{r.errors[d]:.1f}" for d in doms},
            "img/s": f"{r.images_per_second:.0f}",
        }
        for r in runs
    ]
    desc = stream.describe()
    print(
        f"{args.data} ({len(y)} images per domain), model {args.model}, stream {args.stream}, "
        f"batch {args.batch_size}; error % (lower is better)"
    )
    print(format_table(rows, columns))
    payload = {
        "command": "adapt",
        "model": args.model,
        "data": args.data,
        "stream": desc,
        "params": params,
        "runs": [r.to_dict() for r in runs],
    }
    out = Path(args.out)
    write_json(out / "results.json", payload)
    _write_report(out / "report.html", payload, rows, columns)
    print(f"report: {out / 'report.html'}")
    if args.json:
        write_json(args.json, payload)
    return 0


def _write_report(path: Any, payload: dict[str, Any], rows: list[dict[str, str]], columns: list[str]) -> None:
    import html

    from shiftkit._fileio import atomic_write_text
    from shiftkit.bench.report import CSS, html_table

    esc = html.escape
    title = f"shiftkit adapt: {payload['data']} / {payload['model']}"
    atomic_write_text(
        path,
        f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{CSS}</style></head><body>
<h1>{esc(title)}</h1><p>Error % per domain, online (predict, then adapt).</p>
{html_table(rows, columns)}
<p class="note">stream: {esc(json.dumps(payload["stream"]))}<br>
options: {esc(json.dumps(payload["params"]))}</p>
</body></html>
""",
    )
