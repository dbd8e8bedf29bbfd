"""Binary-coding quantisation of SmolLM2-135M (issue: compress; BENCH.md ``compress_throughput`` row's BCQ
part): held-out perplexity of ``sk.quantize_(model, method="bcq")`` at 2 and 3 bits, against
round-to-nearest (RTN, asymmetric min–max per row and group) at the same bits and group size, the bytes of
each, and the CPU time of the lookup-table matmul against the dense fp32 matmul on SmolLM2's Linear shapes.

Data: Rotten Tomatoes snippets (``zoo.load_dataset("rotten-tomatoes")``), shuffled with seed 0; the first
``--eval`` sequences of ``--seq-len`` tokens are held out for perplexity, the next ``--calib`` calibrate
(disjoint). Every Linear except the tied output head is quantised (group size ``--group``); the embedding
stays fp32, as in ShiftAddLLM. Perplexities use the dequantised dense path of the quantised layers (the
lookup path gives the same numbers to float tolerance: ``tests/compression/test_bcq.py`` asserts it); the
matmul timings compare the two paths directly, alternating, median of ``--reps`` repetitions.

Run: ``.venv/bin/python benchmarks/bcq_smollm2.py`` (~10 min on 2 cores; ``--quick``: fewer sequences).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import sys
import time
from typing import Any

import _common as C


def _sequences(tok: Any, texts: list[str], seq_len: int) -> Any:
    import torch

    ids: list[int] = []
    for row in tok(texts, add_special_tokens=False)["input_ids"]:
        ids += [*row, tok.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _ppl(model: Any, seqs: Any) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), 8):
            x = seqs[i : i + 8]
            loss = model(input_ids=x, labels=x).loss
            n = x.shape[0] * (x.shape[1] - 1)
            total, count = total + float(loss) * n, count + n
    return math.exp(total / count)


def _rtn_(model: Any, names: list[str], bits: int, group: int) -> int:
    """Replace each named Linear's weight by its RTN dequantisation; returns the bytes RTN would store."""
    import torch

    from shiftkit.compression._bcq import rtn_quantize

    mods = dict(model.named_modules())
    nbytes = 0
    for n in names:
        w = mods[n].weight
        with torch.no_grad():
            w.copy_(rtn_quantize(w.detach(), bits, group).to(w.dtype))
        nbytes += w.numel() * bits // 8 + 2 * 2 * (w.numel() // group)  # codes + fp16 scale and zero
    return nbytes


def _time(fn: Any, reps: int, inner: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval", type=int, default=32, help="held-out sequences")
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.eval, args.calib, args.reps = 8, 4, 3
    C.setup_worker()
    import torch

    import shiftkit as sk
    from shiftkit import zoo
    from shiftkit.compression._bcq import lut_matmul, pack_codes, quantize_weight
    from shiftkit.compression.bcq import BCQLinear, _linear_targets

    t_start = time.perf_counter()
    model, tok = zoo.load_model("smollm2-135m")
    model.eval()
    texts, _ = zoo.load_dataset("rotten-tomatoes")
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    seqs = _sequences(tok, [texts[i] for i in order], args.seq_len)
    held, calib = seqs[: args.eval], seqs[args.eval : args.eval + args.calib]
    names = _linear_targets(model, None, None)
    n_weights = sum(dict(model.named_modules())[n].weight.numel() for n in names)
    C.log(
        f"SmolLM2-135M: {len(names)} Linear layers, {n_weights:,} weights; "
        f"{len(held)}×{args.seq_len} held out"
    )

    rows: list[dict[str, Any]] = []
    base_ppl = _ppl(model, held)
    rows.append({"method": "fp32", "bits": 32, "bytes": 4 * n_weights, "ppl": base_ppl, "seconds": 0.0})
    C.log(f"fp32: ppl {base_ppl:.2f}")
    for bits in args.bits:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        nbytes = _rtn_(m, names, bits, args.group)
        rows.append(
            {
                "method": "RTN",
                "bits": bits,
                "bytes": nbytes,
                "ppl": _ppl(m, held),
                "seconds": time.perf_counter() - t,
            }
        )
        C.log(f"RTN {bits}-bit: ppl {rows[-1]['ppl']:.2f}")
        for label, cal in (("BCQ (weight error)", None), ("BCQ (output error, calib)", list(calib.split(4)))):
            m = copy.deepcopy(model)
            t = time.perf_counter()
            sk.quantize_(m, method="bcq", bits=bits, group_size=args.group, calib=cal)
            secs = time.perf_counter() - t
            layers = [mod for mod in m.modules() if isinstance(mod, BCQLinear)]
            for mod in layers:
                mod.use_lut = False
            nbytes = sum(mod.nbytes for mod in layers)
            rows.append(
                {"method": label, "bits": bits, "bytes": nbytes, "ppl": _ppl(m, held), "seconds": secs}
            )
            C.log(f"{label} {bits}-bit: ppl {rows[-1]['ppl']:.2f} ({secs:.0f} s)")

    # lookup-table matmul vs dense fp32 on SmolLM2's Linear shapes (in → out)
    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
    mm: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    for fin, fout in shapes:
        w = torch.randn(fout, fin, generator=g) * 0.02
        alpha, codes = quantize_weight(w, 3, args.group, rounds=5)
        packed, a = pack_codes(codes), alpha.permute(2, 0, 1).contiguous()
        layer = BCQLinear(packed, a, args.group, fin, None)
        dense = layer.dequantize()
        for batch in (1, 16):
            x = torch.randn(batch, fin, generator=g)
            y_lut = lut_matmul(x, packed, a, args.group, fin)
            err = float((y_lut - x @ dense.T).abs().max() / (x @ dense.T).abs().max())
            inner = 200 if batch == 1 else 50
            t_dense, t_lut = [], []
            for _ in range(args.reps):  # alternate the two paths
                t_dense.append(_time(lambda x=x, w=dense: x @ w.T, 1, inner))
                t_lut.append(
                    _time(lambda x=x, p=packed, a=a, fin=fin: lut_matmul(x, p, a, args.group, fin), 1, inner)
                )
            td, tl = statistics.median(t_dense), statistics.median(t_lut)
            mm.append(
                {
                    "shape": f"{fin}→{fout}",
                    "batch": batch,
                    "dense_us": td * 1e6,
                    "lut_us": tl * 1e6,
                    "lut_over_dense": tl / td,
                    "max_rel_diff": err,
                }
            )

    payload = {
        "model": "SmolLM2-135M-Instruct",
        "settings": vars(args),
        "linear_weights": n_weights,
        "perplexity": rows,
        "matmul": mm,
        "seconds": time.perf_counter() - t_start,
        "environment": C.environment(),
    }
    path = C.write_json("bcq_smollm2", payload)
    print(
        C.format_table(
            [
                {
                    "method": r["method"],
                    "bits": r["bits"],
                    "MB": f"{r['bytes'] / 1e6:.2f}",
                    "held-out ppl": f"{r['ppl']:.2f}",
                    "time s": f"{r['seconds']:.0f}",
                }
                for r in rows
            ],
            ["method", "bits", "MB", "held-out ppl", "time s"],
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
                    "lookup / dense": f"{r['lut_over_dense']:.1f}×",
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
