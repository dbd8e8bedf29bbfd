"""Inference latency: base model vs folded shifts vs unmerged LoRA (shiftkit and HF PEFT), BENCH.md.

Variants, on the random Llama (batch 8×128) and the real MiniLM (16×64), eval mode, no grad:
``base``; ``lora_folded``, ``ssf_folded`` and ``ia3_folded`` (``sk.fold_``: the original architecture with
new weights; SSF also gives bias-free Linears a bias); ``sk_unmerged`` (LoRA attached); ``peft_unmerged``
(``get_peft_model``, same LoRA factors); ``ia3_sk_unmerged`` / ``ia3_peft_unmerged``: (IA)³ on PEFT's
default targets (see ``peft_ia3_step.py``), attached, with the same vectors ``1 + 0.1·N(0, 1)``.

Every repetition is a fresh process that builds all variants from one base, checks their outputs agree
(folded = attached; shiftkit unmerged = PEFT unmerged), then times forwards in interleaved rounds with a
rotating order (A B C D E, B C D E A, ...), so every variant sees the same machine phases; the ratios
are taken per process (paired) and over the medians of all processes.

Run: ``.venv/bin/python benchmarks/fold_latency.py`` (``--quick`` for a smoke run).
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
import peft_ia3_step as IA3

SCRIPT = Path(__file__).resolve()
SHAPES = {"llama": (8, 128), "minilm": (16, 64)}
VARIANTS = ("base", "lora_folded", "ssf_folded", "ia3_folded", "sk_unmerged", "peft_unmerged")
VARIANTS += ("ia3_sk_unmerged", "ia3_peft_unmerged")
DEFAULTS = {"llama": (6, 2), "minilm": (6, 1)}  # (rounds, forwards per variant per round)


# --- inside a worker ------------------------------------------------------------------------------------
def _inputs(case: str, batch: tuple[int, int]) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    b, t = batch
    if case == "llama":
        return {"input_ids": torch.randint(0, C.LLAMA["vocab_size"], (b, t), generator=g), "use_cache": False}
    ids = torch.randint(1000, 30522, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _out(model: Any, inputs: dict[str, Any]) -> Any:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _build(case: str) -> tuple[dict[str, Any], dict[str, float]]:
    """All variants from one base, and the output checks (max |Δ|) between those that must agree."""
    import torch

    import shiftkit as sk

    base = C.build_base(case).eval()
    probe = {k: (v[:2, :16] if hasattr(v, "shape") else v) for k, v in _inputs(case, (2, 16)).items()}
    models: dict[str, Any] = {"base": base}

    sk_lora = C.attach_shiftkit(copy.deepcopy(base), case)
    torch.manual_seed(3)
    with torch.no_grad():  # non-zero B, so the shift changes the outputs and the checks mean something
        for _, b in C.lora_pairs(sk_lora).values():
            b.normal_(0.0, 0.02)
    pairs = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in C.lora_pairs(sk_lora).items()}
    models["sk_unmerged"] = sk_lora.eval()
    peft = C.attach_peft(copy.deepcopy(base), case)
    C.set_lora_(peft, pairs)
    models["peft_unmerged"] = peft.eval()
    folded = C.attach_shiftkit(copy.deepcopy(base), case)
    C.set_lora_(folded, pairs)
    models["lora_folded"] = sk.fold_(folded).eval()

    torch.manual_seed(4)
    ssf = sk.attach_(copy.deepcopy(base), sk.SSFConfig(target_modules="all")).eval()
    with torch.no_grad():
        ssf_attached = _out(ssf, probe)
    models["ssf_folded"] = sk.fold_(ssf).eval()

    ia3 = IA3.attach_shiftkit_ia3(copy.deepcopy(base), case)
    g = torch.Generator().manual_seed(5)  # non-trivial vectors, as in peft_ia3_step.py's check
    vectors = {n: 1.0 + 0.1 * torch.randn(v.shape, generator=g) for n, v in IA3.ia3_vectors(ia3).items()}
    IA3.set_ia3_(ia3, vectors)
    models["ia3_sk_unmerged"] = ia3.eval()
    peft_ia3 = IA3.attach_peft_ia3(copy.deepcopy(base), case)
    IA3.set_ia3_(peft_ia3, vectors)
    models["ia3_peft_unmerged"] = peft_ia3.eval()
    ia3_fold = IA3.attach_shiftkit_ia3(copy.deepcopy(base), case)
    IA3.set_ia3_(ia3_fold, vectors)
    models["ia3_folded"] = sk.fold_(ia3_fold).eval()

    with torch.no_grad():
        o = {k: _out(m, probe) for k, m in models.items()}
    checks = {
        "lora_folded_vs_sk_unmerged": float((o["lora_folded"] - o["sk_unmerged"]).abs().max()),
        "sk_unmerged_vs_peft_unmerged": float((o["sk_unmerged"] - o["peft_unmerged"]).abs().max()),
        "ssf_folded_vs_ssf_attached": float((o["ssf_folded"] - ssf_attached).abs().max()),
        "ia3_folded_vs_ia3_sk_unmerged": float((o["ia3_folded"] - o["ia3_sk_unmerged"]).abs().max()),
        "ia3_sk_unmerged_vs_ia3_peft_unmerged": float(
            (o["ia3_sk_unmerged"] - o["ia3_peft_unmerged"]).abs().max()
        ),
        "lora_vs_base (must be > 0)": float((o["sk_unmerged"] - o["base"]).abs().max()),
        "ia3_vs_base (must be > 0)": float((o["ia3_sk_unmerged"] - o["base"]).abs().max()),
    }
    return models, checks


def run_worker(case: str, rounds: int, per_round: int) -> None:
    """One repetition: build, check, then time every variant in interleaved rounds."""
    C.setup_worker()
    import torch

    models, checks = _build(case)
    ok = (
        checks["lora_folded_vs_sk_unmerged"] <= 1e-4
        and checks["sk_unmerged_vs_peft_unmerged"] <= 1e-5
        and checks["ssf_folded_vs_ssf_attached"] <= 1e-4
        and checks["ia3_folded_vs_ia3_sk_unmerged"] <= 1e-4
        and checks["ia3_sk_unmerged_vs_ia3_peft_unmerged"] <= 1e-5
        and checks["lora_vs_base (must be > 0)"] > 0
        and checks["ia3_vs_base (must be > 0)"] > 0
    )
    inputs = _inputs(case, SHAPES[case])
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    with torch.no_grad():
        for k in VARIANTS:  # warm-up: first-call allocations and lazy initialisation
            _out(models[k], inputs)
        for rnd in range(rounds):
            order = VARIANTS[rnd % len(VARIANTS) :] + VARIANTS[: rnd % len(VARIANTS)]
            for k in order:
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    _out(models[k], inputs)
                    times[k].append(time.perf_counter() - t0)
    load = os.getloadavg()
    C.emit({"checks": checks, "ok": ok, "times_s": times, "rss_peak_mb": C.peak_rss_mb(), "loadavg": load})


# --- the parent ----------------------------------------------------------------------------------------
def bench_case(case: str, reps: int, rounds: int, per_round: int) -> dict[str, Any]:
    """Fresh-process repetitions for ``case``; returns the JSON section for it."""
    args = ["--worker", case, "--rounds", str(rounds), "--per-round", str(per_round)]

    def describe(r: dict[str, Any]) -> str:
        return " ".join(f"{k}={1e3 * statistics.median(v):.1f}" for k, v in r["times_s"].items()) + " ms"

    runs = C.alternate(SCRIPT, {case: args}, reps, describe)[case]
    bad = [r["checks"] for r in runs if not r["ok"]]
    if bad:
        raise C.BenchError(f"[{case}] outputs that must agree do not: {bad[0]}")
    per_proc = {k: [statistics.median(r["times_s"][k]) for r in runs] for k in VARIANTS}
    stats = {k: C.summarize(v) for k, v in per_proc.items()}

    def paired(num: str, den: str) -> dict[str, Any]:
        return C.summarize([a / b for a, b in zip(per_proc[num], per_proc[den])])

    ratios = {
        "lora_folded/base": paired("lora_folded", "base"),
        "ssf_folded/base": paired("ssf_folded", "base"),
        "ia3_folded/base": paired("ia3_folded", "base"),
        "sk_unmerged/peft_unmerged": paired("sk_unmerged", "peft_unmerged"),
        "ia3_sk_unmerged/ia3_peft_unmerged": paired("ia3_sk_unmerged", "ia3_peft_unmerged"),
        "sk_unmerged/base": paired("sk_unmerged", "base"),
        "peft_unmerged/base": paired("peft_unmerged", "base"),
        "ia3_sk_unmerged/base": paired("ia3_sk_unmerged", "base"),
        "ia3_peft_unmerged/base": paired("ia3_peft_unmerged", "base"),
    }
    checks = {k: max(r["checks"][k] for r in runs) for k in runs[0]["checks"]}
    return {
        "batch": SHAPES[case],
        "reps": reps,
        "rounds": rounds,
        "forwards_per_round": per_round,
        "checks_max_abs_diff": checks,
        "stats_s": stats,
        "ratios_paired": ratios,
        "ratios_of_medians": {
            "lora_folded/base": C.ratio(stats["lora_folded"], stats["base"]),
            "ssf_folded/base": C.ratio(stats["ssf_folded"], stats["base"]),
            "ia3_folded/base": C.ratio(stats["ia3_folded"], stats["base"]),
            "sk_unmerged/peft_unmerged": C.ratio(stats["sk_unmerged"], stats["peft_unmerged"]),
            "ia3_sk_unmerged/ia3_peft_unmerged": C.ratio(
                stats["ia3_sk_unmerged"], stats["ia3_peft_unmerged"]
            ),
        },
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, 2 rounds")
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    p.add_argument("--reps", type=int, help="fresh-process repetitions (default 5; --quick 2)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per repetition (default 6)")
    p.add_argument("--per-round", type=int, help="forwards per variant per round (default: per model)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        run_worker(a.worker, a.rounds, a.per_round)
        return 0

    reps = a.reps or (2 if a.quick else 5)
    payload: dict[str, Any] = {"benchmark": "fold_latency", "environment": C.environment(), "models": {}}
    payload["settings"] = {"r": C.R, "lora_alpha": C.ALPHA, "targets": C.TARGETS, "ssf_targets": "all"}
    payload["settings"]["ia3_targets"] = "PEFT defaults (target_modules=None)"
    t_start = time.perf_counter()
    for case in ("llama", "minilm"):
        if case not in a.models:
            continue
        if case == "minilm" and not C.minilm_installed():
            msg = "MiniLM asset not installed (make assets): MiniLM part skipped"
            C.log(msg)
            payload["models"][case] = {"skipped": msg}
            continue
        rounds, per_round = DEFAULTS[case]
        rounds = a.rounds or (2 if a.quick else rounds)
        per_round = a.per_round or per_round
        C.log(f"[{case}] {reps} fresh processes × {rounds} rounds × {per_round} forwards per variant")
        payload["models"][case] = bench_case(case, reps, rounds, per_round)
    payload["elapsed_s"] = time.perf_counter() - t_start
    path = C.write_json("fold_latency", payload)

    rows, parts = [], []
    for case, res in payload["models"].items():
        if "skipped" in res:
            parts.append(f"{case}: skipped")
            continue
        paired = res["ratios_paired"]
        for k in VARIANTS:
            vs_base = paired[f"{k}/base"]["median"] if k != "base" else 1.0
            rows.append(
                {
                    "model": case,
                    "variant": k,
                    "ms/forward median (min–max)": C.fmt_range(res["stats_s"][k], 1e3),
                    "vs base (paired)": f"{vs_base:.3f}",
                }
            )
        r = res["ratios_paired"]
        parts.append(
            f"{case}: lora_folded/base {r['lora_folded/base']['median']:.3f}, "
            f"ssf_folded/base {r['ssf_folded/base']['median']:.3f}, "
            f"ia3_folded/base {r['ia3_folded/base']['median']:.3f} (target 0.98–1.02), "
            f"sk_unmerged/peft_unmerged {r['sk_unmerged/peft_unmerged']['median']:.3f}, "
            f"ia3 {r['ia3_sk_unmerged/ia3_peft_unmerged']['median']:.3f} (target ≤1)"
        )
    print("fold_latency: " + "; ".join(parts))
    if rows:
        print(C.format_table(rows, ["model", "variant", "ms/forward median (min–max)", "vs base (paired)"]))
    for case, res in payload["models"].items():
        if "checks_max_abs_diff" in res:
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in res["checks_max_abs_diff"].items())
            print(f"{case} output checks (max |Δ|): {diffs}")
    policy = C.ENV["OMP_WAIT_POLICY"]
    print(f"results: {path}  ({payload['elapsed_s']:.0f} s, {C.THREADS} threads, OMP_WAIT_POLICY={policy})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
