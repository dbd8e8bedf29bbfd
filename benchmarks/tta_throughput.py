"""Test-time adaptation throughput on EfficientNet-Lite0: images/s of the source forward, ``norm`` (BN
statistics), TENT and LAME, as ratios to the source forward (BENCH.md targets: norm ≥ 0.95×, LAME ≥ 0.8×,
TENT ≥ 0.33×).

Work: the zoo's ImageNet EfficientNet-Lite0 (4.65M parameters, 49 BatchNorm2d) with a 10-class head, in
eval mode, on random images at two sizes — 224 px (its native size, batch 16) and 32 px (the
``tta-fmnist-c`` suite's size, batch 64). ``source`` is ``model(x)`` under ``torch.no_grad()``; the others
are ``shiftkit.adapt.make(name, model)`` called on the batch (predict and adapt: TENT includes its
backward pass and Adam step over the 42,016 BN affine parameters; LAME its features hook, affinity matrix
and solver).

Every repetition is a fresh process that builds one model per variant (same weights), checks ``norm`` and
``source`` outputs differ only through the BN statistics (``norm`` equals the model run with
``BatchNorm2d`` in train mode, to 1e-4 relative), then times the variants in interleaved rounds with a
rotating order (A B C D, B C D A, ...); ratios are taken per process and summarised by median and range.

Run: ``.venv/bin/python benchmarks/tta_throughput.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

SCRIPT = Path(__file__).resolve()
VARIANTS = ("source", "norm", "tent", "lame")
SHAPES = {"224": (16, 224), "32": (64, 32)}  # case -> (batch, pixels)
DEFAULTS = {"224": (4, 2), "32": (6, 4)}  # (rounds, batches per variant per round)


# --- inside a worker ------------------------------------------------------------------------------------
def run_worker(case: str, rounds: int, per_round: int) -> None:
    C.setup_worker()
    import torch

    from shiftkit import adapt
    from shiftkit.zoo import load_model

    batch, px = SHAPES[case]
    base, _ = load_model("efficientnet-lite0", num_classes=10)
    base.eval()
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(batch, 3, px, px, generator=g) * 2 - 1 for _ in range(per_round)]

    plain = copy.deepcopy(base)
    variants: dict[str, Any] = {}

    def source(x: Any) -> Any:
        with torch.no_grad():
            return plain(x)

    variants["source"] = source
    for name in ("norm", "tent", "lame"):
        variants[name] = adapt.make(name, copy.deepcopy(base))

    # check: norm = the model with its BatchNorm layers in train mode (batch statistics)
    ref = copy.deepcopy(base)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
    with torch.no_grad():
        expect = ref(xs[0])
    got = variants["norm"](xs[0])
    checks = {"norm_vs_train_mode_bn": float((got - expect).abs().max() / expect.abs().max())}
    ok = checks["norm_vs_train_mode_bn"] < 1e-4  # relative: 49 layers of float32 statistics, two formulas

    for fn in variants.values():  # warm-up
        fn(xs[0])
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    order = list(VARIANTS)
    for r in range(rounds):
        rot = order[r % len(order) :] + order[: r % len(order)]
        for name in rot:
            for x in xs:
                t0 = time.perf_counter()
                variants[name](x)
                times[name].append(time.perf_counter() - t0)
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    C.emit(
        {
            "checks": checks,
            "ok": ok,
            "images_per_s": ips,
            "rss_peak_mb": C.peak_rss_mb(),
            "loadavg": os.getloadavg(),
        }
    )


# --- the parent ----------------------------------------------------------------------------------------
def bench_case(case: str, reps: int, rounds: int, per_round: int) -> dict[str, Any]:
    args = ["--worker", case, "--rounds", str(rounds), "--per-round", str(per_round)]

    def describe(r: dict[str, Any]) -> str:
        return " ".join(f"{k}={v:.0f}" for k, v in r["images_per_s"].items()) + " img/s"

    runs = C.alternate(SCRIPT, {case: args}, reps, describe)[case]
    bad = [r["checks"] for r in runs if not r["ok"]]
    if bad:
        raise C.BenchError(f"[{case}] norm is not BN in train mode: {bad[0]}")
    ips = {k: C.summarize([r["images_per_s"][k] for r in runs]) for k in VARIANTS}
    ratios = {
        f"{k}/source": C.summarize([r["images_per_s"][k] / r["images_per_s"]["source"] for r in runs])
        for k in VARIANTS[1:]
    }
    return {
        "batch": SHAPES[case][0],
        "pixels": SHAPES[case][1],
        "reps": reps,
        "rounds": rounds,
        "batches_per_round": per_round,
        "images_per_s": ips,
        "ratios_paired": ratios,
        "runs": runs,
    }


TARGETS = {"norm": 0.95, "lame": 0.8, "tent": 0.33}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, 2 rounds")
    p.add_argument("--sizes", nargs="+", choices=sorted(SHAPES), default=["224", "32"])
    p.add_argument("--reps", type=int, help="fresh-process repetitions (default 5; --quick 2)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per repetition")
    p.add_argument("--per-round", type=int, help="batches per variant per round")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        run_worker(a.worker, a.rounds, a.per_round)
        return 0
    reps = a.reps or (2 if a.quick else 5)
    payload: dict[str, Any] = {"benchmark": "tta_throughput", "environment": C.environment(), "sizes": {}}
    payload["targets"] = TARGETS
    t_start = time.perf_counter()
    for case in a.sizes:
        rounds, per_round = DEFAULTS[case]
        rounds = a.rounds or (2 if a.quick else rounds)
        per_round = a.per_round or per_round
        C.log(f"[{case} px] {reps} fresh processes × {rounds} rounds × {per_round} batches per variant")
        payload["sizes"][case] = bench_case(case, reps, rounds, per_round)
    payload["elapsed_s"] = time.perf_counter() - t_start
    path = C.write_json("tta_throughput", payload)

    rows, parts = [], []
    for case, res in payload["sizes"].items():
        for k in VARIANTS:
            r = res["ratios_paired"].get(f"{k}/source")
            rows.append(
                {
                    "pixels": case,
                    "batch": res["batch"],
                    "method": k,
                    "images/s": C.fmt_range(res["images_per_s"][k], digits=0),
                    "× source": "1" if r is None else C.fmt_range(r, digits=3),
                    "target": "" if k == "source" else f"≥ {TARGETS[k]}",
                }
            )
            if r is not None:
                parts.append(f"{k}@{case}px {r['median']:.2f}× (target ≥ {TARGETS[k]})")
    print("tta_throughput: " + ", ".join(parts))
    print(C.format_table(rows, ["pixels", "batch", "method", "images/s", "× source", "target"]))
    print(f"wrote {path} ({payload['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
