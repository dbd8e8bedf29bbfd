"""(IA)³ training step: shiftkit vs Hugging Face PEFT 0.21.2, on the same work (BENCH.md).

Same models, batches, losses and protocol as ``peft_lora_step.py`` (whose helpers this script reuses):
(a) the seeded random Llama, (b) the real all-MiniLM-L6-v2. (IA)³ on PEFT's default targets for each
architecture, on both sides from ``target_modules=None``: Llama ``k_proj``, ``v_proj`` (output scaled) and
``down_proj`` (input scaled, the feed-forward module); BERT ``key``, ``value`` and ``output.dense`` (input
scaled: PEFT's feed-forward entry ``output.dense`` matches both the attention-output and the FFN-output
``dense``). AdamW lr 1e-3 over the vectors.

1. A check process builds PEFT's model and shiftkit's on identical bases, asserts they scale the same
   modules on the same side, sets every vector to the same ``1 + 0.1·N(0, 1)`` (so the forward already
   depends on where each vector sits; ones would hide a misplaced one) and trains both a few steps: the
   losses must agree (rtol 1e-5) before any timing counts. The vectors go to a file every worker loads.
2. Fresh processes alternate PEFT / shiftkit ≥ 5 times; each injects (timed), runs warm-up + timed steps,
   then times save, load (checked exact) and fold (``merge_and_unload`` vs ``sk.fold_``, checked against
   the unfolded output).

Run: ``.venv/bin/python benchmarks/peft_ia3_step.py`` (``--quick`` for a smoke run; ``--profile`` prints
a torch.profiler table of both sides' steps instead of timing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import peft_lora_step as L

SCRIPT = Path(__file__).resolve()
PEFT_TASK = {"llama": "CAUSAL_LM", "minilm": "FEATURE_EXTRACTION"}


# --- (IA)³ on both sides ----------------------------------------------------------------------------------
def attach_peft_ia3(model: Any, case: str) -> Any:
    """``get_peft_model`` with PEFT's default (IA)³ targets for the architecture (``target_modules=None``)."""
    from peft import IA3Config, get_peft_model

    cfg = IA3Config(task_type=PEFT_TASK[case])
    return get_peft_model(model, cfg)


def attach_shiftkit_ia3(model: Any, case: str) -> Any:
    """``sk.attach_`` with shiftkit's default (IA)³ targets (the same families as PEFT's mapping)."""
    import shiftkit as sk

    return sk.attach_(model, sk.IA3Config())


def ia3_vectors(model: Any) -> dict[str, Any]:
    """``{base-relative module name: ia3_l}`` of a PEFT or shiftkit (IA)³ model (same shapes on both)."""
    from torch import nn

    out = {}
    for name, mod in model.named_modules():
        vec: Any = getattr(mod, "ia3_l", None)
        if vec is None:
            continue
        if isinstance(vec, nn.ParameterDict):
            vec = vec["default"]
        out[name.removeprefix("base_model.model.")] = vec
    return out


def set_ia3_(model: Any, vectors: dict[str, Any]) -> None:
    """Copy ``vectors`` into the model's (IA)³ vectors; names and shapes must match."""
    import torch

    mine = ia3_vectors(model)
    if set(mine) != set(vectors):
        raise C.BenchError(f"(IA)3 modules differ: {sorted(set(mine) ^ set(vectors))[:4]}")
    with torch.no_grad():
        for name, v in vectors.items():
            mine[name].copy_(v)


def _attach(impl: str, base: Any, case: str) -> Any:
    return attach_peft_ia3(base, case) if impl == "peft" else attach_shiftkit_ia3(base, case)


# --- inside a worker --------------------------------------------------------------------------------------
def run_check(case: str, init_path: str) -> None:
    """Same modules, same sides, same init; then the per-step losses of PEFT and shiftkit must agree."""
    C.setup_worker()
    import torch
    from safetensors.torch import save_file

    peft_model = attach_peft_ia3(C.build_base(case), case)
    sk_model = attach_shiftkit_ia3(C.build_base(case), case)
    pv, sv = ia3_vectors(peft_model), ia3_vectors(sk_model)
    shapes = {n: tuple(v.shape) for n, v in pv.items()}
    if shapes != {n: tuple(v.shape) for n, v in sv.items()}:  # (out, 1) output side, (1, in) input side
        raise C.BenchError(f"(IA)3 modules or sides differ: peft {shapes} vs shiftkit {sv}")
    g = torch.Generator().manual_seed(5)
    init = {n: 1.0 + 0.1 * torch.randn(v.shape, generator=g) for n, v in pv.items()}
    save_file(init, init_path)
    set_ia3_(peft_model, init)
    set_ia3_(sk_model, init)
    models = {"peft": peft_model, "shiftkit": sk_model}
    loss_fn, data = L._loss_fn(case), L._batches(case)
    opts = {k: torch.optim.AdamW(L._trainable(m), lr=1e-3) for k, m in models.items()}
    losses: dict[str, list[float]] = {k: [] for k in models}
    for i in range(L.CHECK_STEPS[case]):
        for k, m in models.items():
            m.train()
            losses[k].append(L._step(m, opts[k], loss_fn, data[i % len(data)], 100 + i))
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses["shiftkit"], losses["peft"]))
    C.emit(
        {
            "base_params": sum(p.numel() for n, p in sk_model.named_parameters() if "ia3_l" not in n),
            "trainable": {k: sum(p.numel() for p in L._trainable(m)) for k, m in models.items()},
            "ia3_modules": len(pv),
            "input_side": sorted(n for n, s in shapes.items() if s[0] == 1),
            "losses": losses,
            "max_rel_diff": rel,
            "ok": rel <= 1e-5,
        }
    )


def run_worker(case: str, impl: str, init_path: str, warmup: int, steps: int) -> None:
    """One repetition: inject, warm up, time ``steps`` training steps, then save / load / fold."""
    C.setup_worker()
    import torch
    from safetensors.torch import load_file

    import shiftkit as sk

    if impl == "peft":
        from peft import PeftModel
    _ = (sk.attach_, sk.IA3Config)  # resolve the lazy API outside the timed injection
    base = C.build_base(case)
    rss_base = C.current_rss_mb()
    t0 = time.perf_counter()
    model = _attach(impl, base, case)
    inject_s = time.perf_counter() - t0
    set_ia3_(model, load_file(init_path))
    model.train()
    opt = torch.optim.AdamW(L._trainable(model), lr=1e-3)
    loss_fn, data = L._loss_fn(case), L._batches(case)
    wall, cpu, losses = [], [], []
    for i in range(warmup + steps):
        w0, c0 = time.perf_counter(), time.process_time()
        losses.append(L._step(model, opt, loss_fn, data[i % len(data)], 100 + i))
        if i >= warmup:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    rss_peak = C.peak_rss_mb()

    model.eval()
    probe = {k: v[:2, :16] for k, v in data[0].items() if k != "labels" and hasattr(v, "shape")}
    probe.update({k: v for k, v in data[0].items() if not hasattr(v, "shape")})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if impl == "peft":
            model.save_pretrained(tmp)
            file = os.path.join(tmp, "adapter_model.safetensors")
        else:
            file = os.path.join(tmp, "ia3.safetensors")
            sk.save(sk.extract(model), file)
        save_s = time.perf_counter() - t0
        file_bytes, dir_bytes = os.path.getsize(file), L._dir_bytes(tmp)
        fresh = C.build_base(case)
        t0 = time.perf_counter()
        loaded = PeftModel.from_pretrained(fresh, tmp) if impl == "peft" else sk.attach_(fresh, sk.load(file))
        load_s = time.perf_counter() - t0
    mine, back = ia3_vectors(model), ia3_vectors(loaded)
    same = set(mine) == set(back) and all(torch.equal(mine[n], back[n]) for n in mine)
    with torch.no_grad():
        before = L._output(model(**probe))
        t0 = time.perf_counter()
        folded = model.merge_and_unload() if impl == "peft" else sk.fold_(model)
        fold_s = time.perf_counter() - t0
        after = L._output(folded(**probe))
    C.emit(
        {
            "impl": impl,
            "wall_s": wall,
            "cpu_s": cpu,
            "losses": losses,
            "inject_s": inject_s,
            "save_s": save_s,
            "load_s": load_s,
            "fold_s": fold_s,
            "file_bytes": file_bytes,
            "dir_bytes": dir_bytes,
            "load_equal": same,
            "fold_max_abs_diff": float((before - after).abs().max()),
            "rss_base_mb": rss_base,
            "rss_peak_mb": rss_peak,
            "loadavg": os.getloadavg(),
        }
    )


def run_profile(case: str, steps: int) -> None:
    """torch.profiler tables of both sides' training steps, interleaved in one process (for diagnosis)."""
    C.setup_worker()
    import torch
    from torch.profiler import ProfilerActivity, profile

    models = {impl: _attach(impl, C.build_base(case), case) for impl in ("peft", "shiftkit")}
    loss_fn, data = L._loss_fn(case), L._batches(case)
    opts = {k: torch.optim.AdamW(L._trainable(m), lr=1e-3) for k, m in models.items()}
    for k, m in models.items():
        m.train()
        L._step(m, opts[k], loss_fn, data[0], 99)  # warm-up
    for k, m in models.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                L._step(m, opts[k], loss_fn, data[i % len(data)], 100 + i)
        print(f"===== {case} {k}: {steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


# --- the parent: check, alternate, aggregate, report -----------------------------------------------------
def bench_case(case: str, reps: int, warmup: int, steps: int) -> dict[str, Any]:
    """Check, then time PEFT and shiftkit on ``case``; returns the JSON section for it."""
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init.safetensors")
        C.log(f"[{case}] checking losses (identical init, {L.CHECK_STEPS[case]} steps) ...")
        check = C.run_worker(SCRIPT, ["--check", case, "--init", init])
        C.log(f"[{case}] losses peft {check['losses']['peft']}")
        C.log(f"[{case}] losses sk   {check['losses']['shiftkit']}  max rel diff {check['max_rel_diff']:.2e}")
        if not check["ok"]:
            raise C.BenchError(f"[{case}] losses differ (max rel {check['max_rel_diff']:.3e} > 1e-5)")
        args = ["--model", case, "--init", init, "--warmup", str(warmup), "--steps", str(steps)]
        runs = C.alternate(
            SCRIPT,
            {impl: ["--worker", impl, *args] for impl in ("peft", "shiftkit")},
            reps,
            describe=lambda r: f"{1e3 * statistics.median(r['wall_s']):8.1f} ms/step",
        )
    stats = {impl: {key: L._median_of(rs, key) for key in L.STAT_KEYS} for impl, rs in runs.items()}
    worker_rel = max(
        abs(a - b) / abs(b)
        for rp, rs in zip(runs["peft"], runs["shiftkit"])
        for a, b in zip(rs["losses"], rp["losses"])
    )
    return {
        "check": check,
        "reps": reps,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "batch": L.SHAPES[case],
        "stats": stats,
        "ratio_wall": C.ratio(stats["shiftkit"]["wall_s"], stats["peft"]["wall_s"]),
        "ratio_cpu": C.ratio(stats["shiftkit"]["cpu_s"], stats["peft"]["cpu_s"]),
        "ratio_min": stats["shiftkit"]["wall_s"]["min"] / stats["peft"]["wall_s"]["min"],
        "worker_losses_max_rel_diff": worker_rel,
        "load_equal": all(r["load_equal"] for rs in runs.values() for r in rs),
        "fold_max_abs_diff": max(r["fold_max_abs_diff"] for rs in runs.values() for r in rs),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, few steps")
    p.add_argument("--models", nargs="+", choices=sorted(L.SHAPES), default=sorted(L.SHAPES))
    p.add_argument("--reps", type=int, help="fresh-process repetitions per side (default 5; --quick 2)")
    p.add_argument("--steps", type=int, help="timed steps per repetition (default: per model)")
    p.add_argument("--warmup", type=int, help="warm-up steps per repetition (default: per model)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables instead of timing")
    p.add_argument("--check", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=("peft", "shiftkit"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.check:
        run_check(a.check, a.init)
        return 0
    if a.worker:
        run_worker(a.model, a.worker, a.init, a.warmup, a.steps)
        return 0
    if a.profile:
        for case in a.models:
            run_profile(case, a.steps or 3)
        return 0

    reps = a.reps or (2 if a.quick else 5)
    payload: dict[str, Any] = {"benchmark": "peft_ia3_step", "environment": C.environment(), "models": {}}
    payload["settings"] = {"targets": "PEFT defaults (target_modules=None)", "lr": 1e-3, "reps": reps}
    t_start = time.perf_counter()
    for case in ["llama", "minilm"]:
        if case not in a.models:
            continue
        if case == "minilm" and not C.minilm_installed():
            msg = "MiniLM asset not installed (make assets): MiniLM part skipped"
            C.log(msg)
            payload["models"][case] = {"skipped": msg}
            continue
        warmup, steps = L.DEFAULTS[case]
        if a.quick:
            warmup, steps = 1, (3 if case == "llama" else 1)
        warmup = a.warmup if a.warmup is not None else warmup
        steps = a.steps or steps
        payload["models"][case] = bench_case(case, reps, warmup, steps)
    payload["elapsed_s"] = time.perf_counter() - t_start
    path = C.write_json("peft_ia3_step", payload)

    done = {k: v for k, v in payload["models"].items() if "stats" in v}
    rows = [row for case, res in done.items() for row in L._rows(case, res)]
    parts = []
    for case, res in done.items():
        med = {i: res["stats"][i]["wall_s"]["median"] * 1e3 for i in ("peft", "shiftkit")}
        verdict = "met" if res["ratio_wall"] <= L.TARGET_RATIO else "NOT met"
        parts.append(
            f"{case} ({res['check']['ia3_modules']} (IA)3 modules): shiftkit {med['shiftkit']:.1f} vs "
            f"PEFT {med['peft']:.1f} ms/step, ratio {res['ratio_wall']:.3f} "
            f"(of minima {res['ratio_min']:.3f}; target ≤{L.TARGET_RATIO}: {verdict})"
        )
    parts += [f"{case}: skipped" for case, res in payload["models"].items() if "skipped" in res]
    print("peft_ia3_step: " + "; ".join(parts))
    if rows:
        print(C.format_table(rows, list(rows[0])))
    for case, res in done.items():
        print(
            f"{case}: losses equal (check max rel diff {res['check']['max_rel_diff']:.1e}, timed runs "
            f"{res['worker_losses_max_rel_diff']:.1e}); load round trip exact: {res['load_equal']}; "
            f"fold max |Δ| {res['fold_max_abs_diff']:.1e}"
        )
    policy = C.ENV["OMP_WAIT_POLICY"]
    print(f"results: {path}  ({payload['elapsed_s']:.0f} s, {C.THREADS} threads, OMP_WAIT_POLICY={policy})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
