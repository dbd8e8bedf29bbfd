"""Binary-coding quantisation of SmolLM2-135M (issue: compress; BENCH.md ``compress_throughput`` row's BCQ
part): held-out perplexity of ``sk.quantize_(model, method="bcq")`` at 2 and 3 bits, against
round-to-nearest (RTN, asymmetric min–max per row and group) at the same bits and group size, the bytes of
each (the lookup-table matmul's CPU time against the dense one: ``benchmarks/compress_throughput.py``).

Data: Rotten Tomatoes snippets (``zoo.load_dataset("rotten-tomatoes")``), shuffled with seed 0; the first
``--eval`` sequences of ``--seq-len`` tokens are held out for perplexity, the next ``--calib`` calibrate
(disjoint). Every Linear except the tied output head is quantised (group size ``--group``); the embedding
stays fp32, as in ShiftAddLLM. Perplexities use the dequantised dense path of the quantised layers (the
lookup path gives the same numbers to float tolerance: ``tests/compression/test_bcq.py`` asserts it).

Run: ``.venv/bin/python benchmarks/bcq_smollm2.py`` (~10 min on 2 cores; ``--quick``: fewer sequences).
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from typing import Any

import _common as C


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval", type=int, default=32, help="held-out sequences")
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.eval, args.calib = 8, 4
    C.setup_worker()

    import shiftkit as sk
    from shiftkit import zoo
    from shiftkit.bench.recursive import _perplexity, _sequences
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
    base_ppl = _perplexity(model, held, 8)
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
                "ppl": _perplexity(m, held, 8),
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
                {
                    "method": label,
                    "bits": bits,
                    "bytes": nbytes,
                    "ppl": _perplexity(m, held, 8),
                    "seconds": secs,
                }
            )
            C.log(f"{label} {bits}-bit: ppl {rows[-1]['ppl']:.2f} ({secs:.0f} s)")

    payload = {
        "model": "SmolLM2-135M-Instruct",
        "settings": vars(args),
        "linear_weights": n_weights,
        "perplexity": rows,
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
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
