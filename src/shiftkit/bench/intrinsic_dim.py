"""``intrinsic-dim``: accuracy of training in random subspaces of growing size, and the task's ``d_int90``.

The task is sklearn's 8×8 handwritten digits (1,797 images, 10 classes; pixels / 16, flattened to 64
inputs) with a fixed random split. The model is a 64-64-64-10 ReLU MLP (D = 8,970 parameters) trained from
a fixed random initialisation ``θ0``, as in the paper's MNIST experiments (Li et al., ICLR 2018,
arXiv:1804.08838). :func:`shiftkit.recipes.intrinsic.intrinsic_dimension` trains all D parameters once
(``p_full``), then only ``d`` of ``θ = θ0 + P d`` (Fastfood ``P``) for each ``dim`` of the grid, and reports
the smallest ``dim`` whose best test accuracy reaches 90 % of ``p_full`` (also interpolated linearly between
the bracketing grid points). Both runs use the same epochs, batches and seed; each has its own learning rate
(both tuned by a sweep on this task, see :class:`IntrinsicDimSettings`).

Example:
    >>> parser = argparse.ArgumentParser(); add_arguments(parser)
    >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["SIZES", "IntrinsicDimSettings", "add_arguments", "render_html", "run", "run_suite", "table_rows"]


@dataclass(frozen=True, kw_only=True)
class IntrinsicDimSettings:
    """What the suite trains and how.

    Attributes:
        dims: the subspace sizes (log-spaced 1-2-5 steps from 10 to 1000, about 0.1 % to 11 % of D).
        hidden: width of the MLP's two hidden layers (D = h² + 76h + 10 = 8,970 at 64).
        epochs: passes over the training images, for the full run and every subspace run alike.
        lr: peak learning rate of ``d``. A sweep over {1e-2, 3e-2, 0.1, 0.3, 1} (40 epochs): 0.1 and 0.3
            are best across the grid; 1.0 diverges at dim ≥ 500.
        full_lr: peak learning rate of full training; the best of {1e-3, 3e-3, 1e-2, 3e-2, 0.1} (0.980).
        batch_size: images per step.
        n_test: held-out test images (the rest of the 1,797 train unless ``n_train`` caps them).
        n_train: training images (``None``: all that are not test images).
        projection: ``"fastfood"``, ``"sparse"`` or ``"dense"``.
        seed: the split, ``θ0``, the projections and the shuffling.
        threshold: the fraction of ``p_full`` to reach (0.9: ``d_int90``).
        threads: torch intra-op threads while the suite runs. One: these 64-wide matrices gain nothing
            from a second thread, and on busy shared cores two threads made a training step 9-75× slower
            (1.9 ms vs 17 ms per step measured; the full run took 128 s instead of 1.7 s).
    """

    dims: tuple[int, ...] = (10, 20, 50, 100, 200, 500, 1000)
    hidden: int = 64
    epochs: int = 40
    lr: float = 0.1
    full_lr: float = 3e-2
    batch_size: int = 64
    n_test: int = 497
    n_train: int | None = None
    projection: str = "fastfood"
    seed: int = 0
    threshold: float = 0.9
    threads: int = 1


#: ``--quick`` (seconds, for tests) and default run sizes (IntrinsicDimSettings overrides)
SIZES: dict[str, dict[str, Any]] = {
    "quick": {"dims": (10, 100), "hidden": 16, "epochs": 2, "n_test": 128, "n_train": 256},
    "default": {},
}

EPILOG = """\
examples:
  shiftkit bench intrinsic-dim                          # 8 trainings, about a minute on 2 CPU cores
  shiftkit bench intrinsic-dim --dims 50 100 150 200 300 --epochs 60
  shiftkit bench intrinsic-dim --projection sparse --seed 1 --out runs/id-sparse
  shiftkit bench intrinsic-dim --quick --no-progress    # seconds
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
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (seconds)")
    parser.add_argument("--dims", type=int, nargs="+", metavar="D", help="grid (default 10 20 50 ... 1000)")
    parser.add_argument("--epochs", type=int, metavar="N", help="epochs of every run (default 40)")
    parser.add_argument("--lr", type=float, help="learning rate of the subspace runs (default 0.1)")
    parser.add_argument("--full-lr", type=float, help="learning rate of full training (default 0.03)")
    parser.add_argument("--hidden", type=int, metavar="H", help="MLP hidden width (default 64)")
    parser.add_argument("--projection", choices=("fastfood", "sparse", "dense"), help="default fastfood")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny matrices)")
    parser.add_argument("--seed", type=int, default=0, help="split, θ0, projection, shuffling (default 0)")
    parser.add_argument(
        "--out", default="runs/intrinsic-dim", metavar="DIR", help="default: runs/intrinsic-dim"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _settings(args: argparse.Namespace) -> IntrinsicDimSettings:
    base: dict[str, Any] = dict(SIZES["quick" if args.quick else "default"])
    given = {
        "dims": tuple(args.dims) if args.dims else None,
        "epochs": args.epochs,
        "lr": args.lr,
        "full_lr": args.full_lr,
        "hidden": args.hidden,
        "projection": args.projection,
    }
    base.update({k: v for k, v in given.items() if v is not None})
    return IntrinsicDimSettings(**base, seed=args.seed, threads=args.threads)


def run_suite(
    s: IntrinsicDimSettings, progress: bool | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Load the digits, build ``θ0``, run :func:`~shiftkit.recipes.intrinsic.intrinsic_dimension`.

    Returns:
        The JSON payload: ``settings``, ``result`` (grid, accuracies, ``p_full``, ``d_int90``...),
        ``environment`` and ``timings``.
    """
    import torch

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _run(s, start, progress, log)
    finally:
        torch.set_num_threads(threads)


def _run(
    s: IntrinsicDimSettings, start: float, progress: bool | None, log: Callable[[str], None] | None
) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn

    import shiftkit as sk
    from shiftkit.recipes.intrinsic import intrinsic_dimension
    from shiftkit.recipes.learn import TrainConfig, tensor_batches
    from shiftkit.zoo import load_dataset

    images, labels = load_dataset("digits")
    x = torch.from_numpy(images.reshape(len(images), -1) / 16.0).float()
    y = torch.from_numpy(labels)
    order = torch.from_numpy(np.random.default_rng(s.seed).permutation(len(x)))
    test, train_idx = order[: s.n_test], order[s.n_test :]
    if s.n_train is not None:
        train_idx = train_idx[: s.n_train]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)  # θ0: torch's default (Kaiming-uniform) init, fixed by the seed
        h = s.hidden
        model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    steps = math.ceil(len(train_idx) / s.batch_size)

    def config(lr: float) -> TrainConfig:
        # evaluate every epoch and keep the best, as the paper does; short warm-up, cosine decay
        return TrainConfig(
            epochs=s.epochs, lr=lr, batch_size=s.batch_size, warmup_ratio=0.05, eval_every=steps, seed=s.seed
        )

    result = intrinsic_dimension(
        model,
        tensor_batches(x[train_idx], y[train_idx], s.batch_size),
        list(tensor_batches(x[test], y[test], 512, shuffle=False)),
        s.dims,
        train_config=config(s.lr),
        full_config=config(s.full_lr),
        projection=s.projection,
        seed=s.seed,
        threshold=s.threshold,
        progress=progress,
        log=log,
    )
    settings = {**dataclasses.asdict(s), "n_train": len(train_idx), "steps_per_epoch": steps}
    return {
        "suite": "intrinsic-dim",
        "title": "Intrinsic dimension: an MLP on 8×8 digits in random subspaces",
        "settings": settings,
        "result": result.to_dict(),
        "environment": {
            "torch": torch.__version__,
            "shiftkit": sk.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "timings": {"total_seconds": time.perf_counter() - start},
    }


def table_rows(payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """The results table as strings: one row for full training, then one per ``dim``."""
    r = payload["result"]
    total, p_full, target = r["num_params"], r["p_full"], r["target"]
    columns = ["run", "trainable", "% of D", "accuracy", "% of full", f"≥ {r['threshold']:.0%}", "train s"]
    rows = [
        {
            "run": "full",
            "trainable": f"{total:,}",
            "% of D": "100%",
            "accuracy": f"{p_full:.4f}",
            "% of full": "100.0%",
            f"≥ {r['threshold']:.0%}": "",
            "train s": f"{r['full_seconds']:.1f}",
        }
    ]
    for dim, acc, sec in zip(r["dims"], r["accuracy"], r["seconds"], strict=True):
        rows.append(
            {
                "run": f"dim {dim}",
                "trainable": f"{dim:,}",
                "% of D": f"{100 * dim / total:.3g}%",
                "accuracy": f"{acc:.4f}",
                "% of full": f"{100 * acc / p_full:.1f}%" if p_full > 0 else "n/a",
                f"≥ {r['threshold']:.0%}": "yes" if acc >= target else "no",
                "train s": f"{sec:.1f}",
            }
        )
    return rows, columns


def summary(payload: dict[str, Any]) -> str:
    """One sentence: ``d_int90`` (grid and interpolated) against ``D``."""
    r = payload["result"]
    name = f"d_int{round(100 * r['threshold'])}"
    if r["d_int90"] is None:
        return f"{name}: no dim of the grid reached {r['target']:.4f} (= {r['threshold']:.0%} of p_full)"
    return (
        f"{name} = {r['d_int90']} on the grid (interpolated {r['d_int90_interpolated']:.0f}) of "
        f"D = {r['num_params']:,} parameters; target accuracy {r['target']:.4f} = {r['threshold']:.0%} of "
        f"p_full {r['p_full']:.4f}"
    )


def _chart_svg(r: dict[str, Any]) -> str:
    """Accuracy against dim (log axis), with p_full and the 90 % target as horizontal lines."""
    w, h, left, right, top, bottom = 720, 320, 60, 700, 20, 280
    lo, hi = math.log10(min(r["dims"])), math.log10(max(r["dims"]))
    span = hi - lo or 1.0

    def px(dim: float) -> float:
        return left + (math.log10(dim) - lo) / span * (right - left)

    def py(acc: float) -> float:
        return bottom - acc * (bottom - top)

    esc = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{right}" y2="{py(v):.1f}" stroke="#ddd"/>')
        parts.append(
            f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.2f}</text>'
        )
    for dim in r["dims"]:
        parts.append(
            f'<text x="{px(dim):.1f}" y="{bottom + 16}" text-anchor="middle" font-size="11">{dim}</text>'
        )
    for value, label, dash in (
        (r["p_full"], "full", "6,3"),
        (r["target"], f"{r['threshold']:.0%} of full", "2,3"),
    ):
        y = py(value)
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#D55E00" '
            f'stroke-dasharray="{dash}"/>'
        )
        parts.append(
            f'<text x="{right}" y="{y - 4:.1f}" text-anchor="end" font-size="11">{esc(label)}</text>'
        )
    points = " ".join(f"{px(d):.1f},{py(a):.1f}" for d, a in zip(r["dims"], r["accuracy"], strict=True))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#0072B2" stroke-width="2"/>')
    parts += [
        f'<circle cx="{px(d):.1f}" cy="{py(a):.1f}" r="3.5" fill="#0072B2"/>'
        for d, a in zip(r["dims"], r["accuracy"], strict=True)
    ]
    if r["d_int90_interpolated"] is not None:
        x = px(r["d_int90_interpolated"])
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#009E73"/>')
    parts.append(
        f'<text x="{(left + right) / 2}" y="{h - 4}" text-anchor="middle" font-size="12">'
        "dim (log scale)</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(payload: dict[str, Any]) -> str:
    """The report as one self-contained HTML string (every text passes through :func:`html.escape`)."""
    esc = html.escape
    rows, columns = table_rows(payload)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{esc(row[c])}</td>" for c in columns) + "</tr>" for row in rows)
    s, env = payload["settings"], payload["environment"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(payload["title"])}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}.note{{color:#555}}</style></head><body>
<h1>{esc(payload["title"])}</h1>
<p>{esc(summary(payload))}.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
{_chart_svg(payload["result"])}
<p class="note">{esc(str(s["n_train"]))} training / {esc(str(s["n_test"]))} test images, hidden width
{esc(str(s["hidden"]))}, {esc(str(s["epochs"]))} epochs of batch {esc(str(s["batch_size"]))}, lr
{esc(str(s["lr"]))} (subspace) and {esc(str(s["full_lr"]))} (full), {esc(str(s["projection"]))} projection,
seed {esc(str(s["seed"]))}; accuracy is the best of the per-epoch test evaluations. torch
{esc(str(env["torch"]))}, {esc(str(env["threads"]))} threads; whole run
{payload["timings"]["total_seconds"]:.0f} s.</p>
</body></html>
"""


def run(args: argparse.Namespace) -> int:
    """Run the suite from parsed options: print the table and ``d_int90``, write results.json and report.html.

    Example:
        >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
        0
    """
    from shiftkit.bench.report import format_table, write_suite_outputs

    payload = run_suite(
        _settings(args),
        progress=False if args.no_progress else None,
        log=lambda msg: print(f"[intrinsic-dim] {msg}", file=sys.stderr, flush=True),
    )
    rows, columns = table_rows(payload)
    print(format_table(rows, columns))
    print(summary(payload))
    write_suite_outputs(args.out, payload, render_html(payload), args.json)
    return 0
