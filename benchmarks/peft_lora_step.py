"""LoRA r=8 training step: shiftkit vs Hugging Face PEFT 0.21.2, on the same work (BENCH.md).

Models: (a) a seeded random Llama (vocab 4096, hidden 256, 4 layers, ~5.3M parameters), LoRA on
q_proj/v_proj, batch 8×128 random tokens, causal-LM loss; (b) the real all-MiniLM-L6-v2 from the zoo,
LoRA on query/value, batch 16×64, MSE of the pooled output to a fixed random target. AdamW lr 1e-3.

1. A check process builds PEFT's model, attaches shiftkit's LoRA to an identical base, copies PEFT's
   ``lora_A``/``lora_B`` into it and trains both a few steps: the losses must agree (rtol 1e-5) before any
   timing counts. The initial factors go to a file that every worker loads, so all runs start identically.
2. Fresh processes alternate PEFT / shiftkit / PEFT / shiftkit ...; each builds the base, injects LoRA
   (timed), runs warm-up + timed steps (forward + backward + optimizer step), then times save, load and
   fold. Peak RSS is the worker's ``ru_maxrss`` taken right after the timed steps.

Run: ``.venv/bin/python benchmarks/peft_lora_step.py`` (``--quick`` for a smoke run).
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

SCRIPT = Path(__file__).resolve()
TARGET_RATIO = 0.95
SHAPES = {"llama": (8, 128), "minilm": (16, 64)}
CHECK_STEPS = {"llama": 4, "minilm": 3}
STAT_KEYS: tuple[str, ...] = ("wall_s", "cpu_s", "inject_s", "save_s", "load_s", "fold_s")
STAT_KEYS += ("rss_peak_mb", "rss_base_mb", "file_bytes", "dir_bytes")
DEFAULTS = {  # (warm-up steps, timed steps) per repetition; sized for ~5 min on 2 busy cores
    "llama": (2, 8),
    "minilm": (1, 3),
}


# --- inside a worker (torch imported lazily) ------------------------------------------------------------
def _batches(case: str, n: int = 4) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(1)
    b, t = SHAPES[case]
    out = []
    for _ in range(n):
        if case == "llama":
            ids = torch.randint(0, C.LLAMA["vocab_size"], (b, t), generator=g)
            out.append({"input_ids": ids, "labels": ids, "use_cache": False})
        else:  # MiniLM: skip the special tokens at the bottom of the vocabulary
            ids = torch.randint(1000, 30522, (b, t), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _loss_fn(case: str) -> Any:
    import torch
    import torch.nn.functional as F

    if case == "llama":
        return lambda model, batch: model(**batch).loss
    target = torch.randn(SHAPES["minilm"][0], 384, generator=torch.Generator().manual_seed(2)) * 0.5
    return lambda model, batch: F.mse_loss(model(**batch).pooler_output, target)


def _attach(impl: str, base: Any, case: str) -> Any:
    return C.attach_peft(base, case) if impl == "peft" else C.attach_shiftkit(base, case)


def _trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def _step(model: Any, opt: Any, loss_fn: Any, batch: dict[str, Any], seed: int) -> float:
    import torch

    torch.manual_seed(seed)  # same dropout masks (MiniLM) on both sides
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    return float(loss.detach())


def run_check(case: str, init_path: str) -> None:
    """Identical init, then the per-step losses of PEFT and shiftkit must agree."""
    C.setup_worker()
    import torch
    from safetensors.torch import save_file

    peft_model = C.attach_peft(C.build_base(case), case)
    pairs = C.lora_pairs(peft_model)
    flat = {}
    for name, (a, b) in pairs.items():
        flat[f"{name}.lora_A"], flat[f"{name}.lora_B"] = a.detach().clone(), b.detach().clone()
    save_file(flat, init_path)
    sk_model = C.attach_shiftkit(C.build_base(case), case)
    C.set_lora_(sk_model, pairs)
    base_p = sum(p.numel() for n, p in sk_model.named_parameters() if "lora_" not in n)
    models = {"peft": peft_model, "shiftkit": sk_model}
    loss_fn, data = _loss_fn(case), _batches(case)
    opts = {k: torch.optim.AdamW(_trainable(m), lr=1e-3) for k, m in models.items()}
    losses: dict[str, list[float]] = {k: [] for k in models}
    for i in range(CHECK_STEPS[case]):
        for k, m in models.items():
            m.train()
            losses[k].append(_step(m, opts[k], loss_fn, data[i % len(data)], 100 + i))
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses["shiftkit"], losses["peft"]))
    C.emit(
        {
            "base_params": base_p,
            "trainable": {k: sum(p.numel() for p in _trainable(m)) for k, m in models.items()},
            "lora_modules": len(pairs),
            "losses": losses,
            "max_rel_diff": rel,
            "ok": rel <= 1e-5,
        }
    )


def _dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_worker(case: str, impl: str, init_path: str, warmup: int, steps: int) -> None:
    """One repetition: inject, warm up, time ``steps`` training steps, then save / load / fold."""
    C.setup_worker()
    import torch
    from safetensors.torch import load_file

    import shiftkit as sk

    if impl == "peft":
        from peft import PeftModel
    _ = (sk.attach_, sk.LoRAConfig)  # resolve the lazy API outside the timed injection
    base = C.build_base(case)
    rss_base = C.current_rss_mb()
    t0 = time.perf_counter()
    model = _attach(impl, base, case)
    inject_s = time.perf_counter() - t0
    flat = load_file(init_path)
    names = {k.rsplit(".", 1)[0] for k in flat}
    C.set_lora_(model, {n: (flat[f"{n}.lora_A"], flat[f"{n}.lora_B"]) for n in names})
    model.train()
    opt = torch.optim.AdamW(_trainable(model), lr=1e-3)
    loss_fn, data = _loss_fn(case), _batches(case)
    wall, cpu, losses = [], [], []
    for i in range(warmup + steps):
        w0, c0 = time.perf_counter(), time.process_time()
        losses.append(_step(model, opt, loss_fn, data[i % len(data)], 100 + i))
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
            file = os.path.join(tmp, "lora.safetensors")
            sk.save(sk.extract(model), file)
        save_s = time.perf_counter() - t0
        file_bytes, dir_bytes = os.path.getsize(file), _dir_bytes(tmp)
        fresh = C.build_base(case)
        t0 = time.perf_counter()
        loaded = PeftModel.from_pretrained(fresh, tmp) if impl == "peft" else sk.attach_(fresh, sk.load(file))
        load_s = time.perf_counter() - t0
    same = all(
        torch.equal(a, la) and torch.equal(b, lb)
        for (a, b), (la, lb) in zip(C.lora_pairs(model).values(), C.lora_pairs(loaded).values())
    )
    with torch.no_grad():
        before = _output(model(**probe))
        t0 = time.perf_counter()
        folded = model.merge_and_unload() if impl == "peft" else sk.fold_(model)
        fold_s = time.perf_counter() - t0
        after = _output(folded(**probe))
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


def _output(out: Any) -> Any:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --- the parent: check, alternate, aggregate, report ----------------------------------------------------
def _median_of(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    vals = [r[key] for r in runs]
    return C.summarize([statistics.median(v) if isinstance(v, list) else v for v in vals])


def bench_case(case: str, reps: int, warmup: int, steps: int) -> dict[str, Any]:
    """Check, then time PEFT and shiftkit on ``case``; returns the JSON section for it."""
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init.safetensors")
        C.log(f"[{case}] checking losses (identical init, {CHECK_STEPS[case]} steps) ...")
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
    stats = {impl: {key: _median_of(rs, key) for key in STAT_KEYS} for impl, rs in runs.items()}
    # the timed workers start from the same init on the same data: their losses agree too
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
        "batch": SHAPES[case],
        "stats": stats,
        "ratio_wall": C.ratio(stats["shiftkit"]["wall_s"], stats["peft"]["wall_s"]),
        "ratio_cpu": C.ratio(stats["shiftkit"]["cpu_s"], stats["peft"]["cpu_s"]),
        # the fastest repetition of each side: the least disturbed by other work on a shared machine
        "ratio_min": stats["shiftkit"]["wall_s"]["min"] / stats["peft"]["wall_s"]["min"],
        "worker_losses_max_rel_diff": worker_rel,
        "load_equal": all(r["load_equal"] for rs in runs.values() for r in rs),
        "fold_max_abs_diff": max(r["fold_max_abs_diff"] for rs in runs.values() for r in rs),
        "runs": runs,
    }


def _rows(case: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for impl in ("peft", "shiftkit"):
        s = res["stats"][impl]
        rows.append(
            {
                "model": case,
                "impl": impl,
                "ms/step median (min–max)": C.fmt_range(s["wall_s"], 1e3),
                "cpu ms/step": f"{s['cpu_s']['median'] * 1e3:.1f}",
                "peak RSS MiB": f"{s['rss_peak_mb']['median']:.0f}",
                "RSS before inject": f"{s['rss_base_mb']['median']:.0f}",
                "inject ms": f"{s['inject_s']['median'] * 1e3:.1f}",
                "fold ms": f"{s['fold_s']['median'] * 1e3:.2f}",
                "save ms": f"{s['save_s']['median'] * 1e3:.1f}",
                "load ms": f"{s['load_s']['median'] * 1e3:.1f}",
                "file KiB": f"{s['file_bytes']['median'] / 1024:.1f}",
                "folder KiB": f"{s['dir_bytes']['median'] / 1024:.1f}",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, few steps")
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES, reverse=False))
    p.add_argument("--reps", type=int, help="fresh-process repetitions per side (default 5; --quick 2)")
    p.add_argument("--steps", type=int, help="timed steps per repetition (default: per model)")
    p.add_argument("--warmup", type=int, help="warm-up steps per repetition (default: per model)")
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

    reps = a.reps or (2 if a.quick else 5)
    payload: dict[str, Any] = {"benchmark": "peft_lora_step", "environment": C.environment(), "models": {}}
    payload["settings"] = {"r": C.R, "lora_alpha": C.ALPHA, "targets": C.TARGETS, "lr": 1e-3, "reps": reps}
    t_start = time.perf_counter()
    for case in ["llama", "minilm"]:
        if case not in a.models:
            continue
        if case == "minilm" and not C.minilm_installed():
            msg = "MiniLM asset not installed (make assets): MiniLM part skipped"
            C.log(msg)
            payload["models"][case] = {"skipped": msg}
            continue
        warmup, steps = DEFAULTS[case]
        if a.quick:
            warmup, steps = 1, (3 if case == "llama" else 1)
        warmup = a.warmup if a.warmup is not None else warmup
        steps = a.steps or steps
        payload["models"][case] = bench_case(case, reps, warmup, steps)
    payload["elapsed_s"] = time.perf_counter() - t_start
    path = C.write_json("peft_lora_step", payload)

    done = {k: v for k, v in payload["models"].items() if "stats" in v}
    rows = [row for case, res in done.items() for row in _rows(case, res)]
    parts = []
    for case, res in done.items():
        med = {i: res["stats"][i]["wall_s"]["median"] * 1e3 for i in ("peft", "shiftkit")}
        verdict = "met" if res["ratio_wall"] <= TARGET_RATIO else "NOT met"
        parts.append(
            f"{case} ({res['check']['base_params'] / 1e6:.2f}M params): shiftkit {med['shiftkit']:.1f} vs "
            f"PEFT {med['peft']:.1f} ms/step, ratio {res['ratio_wall']:.3f} "
            f"(of minima {res['ratio_min']:.3f}; "
            f"target ≤{TARGET_RATIO}: {verdict})"
        )
    for case, res in payload["models"].items():
        if "skipped" in res:
            parts.append(f"{case}: skipped")
    print("peft_lora_step: " + "; ".join(parts))
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
