"""Compression throughput (BENCH.md ``compress_throughput``): how fast shiftkit compresses and decompresses
a 135M-parameter delta streamed from two checkpoints, with peak memory; and the BCQ lookup-table matmul
against the dense fp32 matmul on SmolLM2's Linear shapes.

Inputs: SmolLM2-135M-Instruct's cached fp32 folder (``shiftkit zoo prepare smollm2-135m``, done by
``make assets``) as the base, and a synthetic fine-tune written once to ``.cache/bench/compress_throughput``
(every tensor plus Gaussian noise of 1 % of its standard deviation): a delta of 134.5M entries, 538 MB in
fp32. Each measurement runs in a fresh process (``--worker``), alternating, ``--reps`` times:

* ``compress``: ``shiftkit compress FT OUT --base BASE`` (ComPEFT at density 0.1; BCQ at 3 bits, group 64,
  5 refinement rounds) — reading both checkpoints tensor by tensor, encoding, writing the file;
* ``decompress``: ``sk.load`` the compressed file and decode every tensor one at a time;

MB/s = the dense fp32 delta's size (4 bytes per entry) / seconds; peak RSS from ``getrusage``.
The matmul part times ``lut_matmul`` and ``x @ Wᵀ`` on the four SmolLM2 shapes at batch 1 and 16 in one
process, alternating, median of ``--reps``; the lookup output is compared with the dense one first.

Run: ``.venv/bin/python benchmarks/compress_throughput.py`` (~8 min; ``--quick``: 1 repetition, ComPEFT only).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

SCRIPT = Path(__file__).resolve()
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench" / "compress_throughput"
JOBS: dict[str, list[str]] = {
    "compeft": ["--method", "compeft", "--density", "0.1"],
    "bcq": ["--method", "bcq", "--bits", "3", "--group-size", "64", "--param", "rounds=5"],
}
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


def _inputs() -> tuple[Path, Path]:
    """The base folder and the synthetic fine-tune (written once)."""
    import torch
    from safetensors.torch import load_file, save_file

    from shiftkit.zoo import smollm2_cache_dir

    base = smollm2_cache_dir()
    if not (base / "model.safetensors").exists():
        raise SystemExit(
            "SmolLM2's fp32 folder is missing: run `make assets` (shiftkit zoo prepare smollm2-135m)"
        )
    ft = CACHE / "ft"
    if not (ft / "model.safetensors").exists():
        ft.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        state = load_file(str(base / "model.safetensors"))
        noisy = {}
        for k, v in state.items():
            v = v.float()
            noisy[k] = (v + 0.01 * v.std() * torch.randn(v.shape, generator=g)).contiguous()
        save_file(noisy, str(ft / "model.safetensors"), metadata={"format": "pt"})
        (ft / "config.json").write_text((base / "config.json").read_text())
    return base, ft


def _worker(args: argparse.Namespace) -> int:
    C.setup_worker()
    import shiftkit as sk
    from shiftkit.cli import main as cli
    from shiftkit.core.encoding import decoded_tensors, encoded_layout

    out = CACHE / f"{args.job}.safetensors"
    if args.phase == "compress":
        t = time.perf_counter()
        rc = cli(["compress", args.ft, str(out), "--base", args.base, "--force", "--quiet", *JOBS[args.job]])
        seconds = time.perf_counter() - t
        if rc != 0:
            raise SystemExit(f"shiftkit compress failed ({rc})")
    else:
        t = time.perf_counter()
        shift = sk.load(out)
        for _name, _tensor in decoded_tensors(shift):
            pass
        seconds = time.perf_counter() - t
    numel = sum(math.prod(s) for s, _ in encoded_layout(sk.load(out)).values())  # after the timing
    C.emit(
        {"seconds": seconds, "numel": numel, "file_bytes": out.stat().st_size, "peak_rss_mb": C.peak_rss_mb()}
    )
    return 0


def _matmul(reps: int) -> list[dict[str, Any]]:
    C.setup_worker()
    import torch

    from shiftkit.compression._bcq import lut_matmul, pack_codes, quantize_weight
    from shiftkit.compression.bcq import BCQLinear

    def timed(fn: Any, inner: int) -> float:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner

    rows = []
    g = torch.Generator().manual_seed(0)
    for fin, fout in SHAPES:
        w = torch.randn(fout, fin, generator=g) * 0.02
        alpha, codes = quantize_weight(w, 3, 64, rounds=5)
        packed, a = pack_codes(codes), alpha.permute(2, 0, 1).contiguous()
        dense = BCQLinear(packed, a, 64, fin, None).dequantize()
        for batch in (1, 16):
            x = torch.randn(batch, fin, generator=g)
            ref = x @ dense.T
            diff = float((lut_matmul(x, packed, a, 64, fin) - ref).abs().max() / ref.abs().max())
            inner = 200 if batch == 1 else 50
            td, tl = [], []
            for _ in range(reps):
                td.append(timed(lambda x=x, w=dense: x @ w.T, inner))
                tl.append(timed(lambda x=x, p=packed, a=a, fin=fin: lut_matmul(x, p, a, 64, fin), inner))
            d, lu = statistics.median(td), statistics.median(tl)
            rows.append(
                {
                    "shape": f"{fin}→{fout}",
                    "batch": batch,
                    "dense_us": d * 1e6,
                    "lut_us": lu * 1e6,
                    "lut_over_dense": lu / d,
                    "max_rel_diff": diff,
                    "dense_samples": td,
                    "lut_samples": tl,
                }
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=("compress", "decompress"), help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--ft", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)
    if args.quick:
        args.reps = 1
    jobs = ["compeft"] if args.quick else list(JOBS)
    C.setup_worker()
    base, ft = _inputs()
    samples: dict[str, list[dict[str, Any]]] = {
        f"{j}:{p}": [] for j in jobs for p in ("compress", "decompress")
    }
    for rep in range(args.reps):
        for j in jobs:
            for phase in ("compress", "decompress"):
                r = C.run_worker(
                    SCRIPT,
                    ["--worker", "--job", j, "--phase", phase, "--base", str(base), "--ft", str(ft)],
                    timeout=1800,
                )
                samples[f"{j}:{phase}"].append(r)
                C.log(f"rep {rep + 1}: {j} {phase} {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB")
    rows = []
    for key, runs in samples.items():
        j, phase = key.split(":")
        secs = statistics.median(r["seconds"] for r in runs)
        numel = runs[0]["numel"]
        rows.append(
            {
                "compressor": j,
                "phase": phase,
                "seconds": secs,
                "MB_per_s": 4 * numel / 1e6 / secs,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "file_mb": runs[0]["file_bytes"] / 1e6,
                "delta_fp32_mb": 4 * numel / 1e6,
                "samples": [r["seconds"] for r in runs],
            }
        )
    mm = _matmul(max(3, args.reps))
    payload = {"throughput": rows, "matmul": mm, "environment": C.environment(), "reps": args.reps}
    path = C.write_json("compress_throughput", payload)
    print(
        C.format_table(
            [
                {
                    "compressor": r["compressor"],
                    "phase": r["phase"],
                    "s": f"{r['seconds']:.1f}",
                    "MB/s (fp32 delta)": f"{r['MB_per_s']:.0f}",
                    "peak RSS MiB": f"{r['peak_rss_mb']:.0f}",
                    "file MB": f"{r['file_mb']:.1f}",
                }
                for r in rows
            ],
            ["compressor", "phase", "s", "MB/s (fp32 delta)", "peak RSS MiB", "file MB"],
        )
    )
    print()
    print(
        C.format_table(
            [
                {
                    "shape": r["shape"],
                    "batch": r["batch"],
                    "dense µs": f"{r['dense_us']:.0f}",
                    "lookup µs": f"{r['lut_us']:.0f}",
                    "lookup / dense": f"{r['lut_over_dense']:.1f}x",
                    "max rel diff": f"{r['max_rel_diff']:.1e}",
                }
                for r in mm
            ],
            ["shape", "batch", "dense µs", "lookup µs", "lookup / dense", "max rel diff"],
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
