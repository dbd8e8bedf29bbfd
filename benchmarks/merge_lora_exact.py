"""Merging 3 LoRA adapters: PEFT ``add_weighted_adapter`` (factor-wise) vs shiftkit's exact ΔW merge.

BENCH.md row "merging 3 LoRA adapters: PEFT add_weighted_adapter (ties, factor-wise) vs shiftkit exact ΔW
merge".

Model: the seeded random Llama of BENCH.md (vocab 4096, hidden 256, 4 layers). Three LoRA adapters, r=8,
α=16 on ``q_proj``/``v_proj`` (8 weights of 256×256), with PEFT's Kaiming-uniform ``A`` and a non-zero
``B ~ N(0, 0.01²)`` (independent per adapter, as three separately trained adapters; B is zero only at init).

Methods, weights and the exact ΔW-space reference each result is compared with (``ΔW_i = s·B_i A_i``):

* ``ties`` (density 0.5, weights 1): PEFT ``combination_type="ties"`` merges the A-factors and the
  B-factors separately (spec combine-compress.md §1.6); shiftkit ``merge_lora(method="ties",
  semantics="peft", output="delta")`` merges the ΔW_i. Reference: ``peft.utils.merge_utils.ties`` applied to
  the ΔW_i in float64 (PEFT's own TIES, in ΔW space). Also shiftkit ``output="lora", rank=8``: the best
  rank-8 factors of that merge (Eckart–Young), the floor for any rank-8 adapter, beside PEFT's
  ``"ties_svd"`` (the same ΔW-space TIES, then SVD).
* ``linear`` (the average, weights 1/3): PEFT ``"linear"`` (factor-wise: ``(Σ√(w s) B_i)(Σ√(w s) A_j)``,
  cross terms ``B_i A_j``) and PEFT ``"cat"`` (exact); shiftkit ``merge_lora(method="linear",
  output="concat")``. Reference: ``(1/3) Σ s B_i A_i`` in float64.

Error = ``‖ΔW_result − ΔW_ref‖_F / ‖ΔW_ref‖_F`` over all 8 weights (and the largest per weight). Timing: the
merge call only (PEFT also needs the base model loaded with the three adapters; shiftkit needs no model),
median of the in-process repetitions of each fresh worker process; workers alternate between the jobs,
≥ 5 per job; the figure is the median over workers.

Run: ``.venv/bin/python benchmarks/merge_lora_exact.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

SCRIPT = Path(__file__).resolve()
N_ADAPTERS = 3
B_STD = 0.01  # non-zero B of a trained adapter; relative errors do not depend on the scale
DENSITY = 0.5
#: job name -> (implementation, what it computes)
JOBS = {
    "peft_ties": ("peft", "ties"),
    "sk_ties": ("shiftkit", "ties"),
    "sk_ties_svd8": ("shiftkit", "ties_svd8"),
    "peft_ties_svd": ("peft", "ties_svd"),
    "peft_linear": ("peft", "linear"),
    "peft_cat": ("peft", "cat"),
    "sk_concat": ("shiftkit", "concat"),
}
REFERENCE = {
    "ties": "ties",
    "ties_svd8": "ties",
    "ties_svd": "ties",
    "linear": "linear",
    "cat": "linear",
    "concat": "linear",
}


# --- inside a worker (torch imported lazily) ------------------------------------------------------------
def prepare(folder: str) -> None:
    """Write the 3 adapters (shiftkit files and PEFT folders) and the float64 ΔW-space references."""
    C.setup_worker()
    import torch
    from peft.utils.merge_utils import ties
    from safetensors.torch import save_file

    import shiftkit as sk
    from shiftkit.merging.lowrank import lora_delta, lora_param_names

    out = Path(folder)
    deltas: list[dict[str, Any]] = []
    for i in range(N_ADAPTERS):
        model = C.attach_shiftkit(C.build_base("llama"), "llama")
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for _, (a, b) in C.lora_pairs(model).items():
                torch.nn.init.kaiming_uniform_(a, a=5**0.5)  # PEFT's init of A
                b.normal_(0.0, B_STD)
        shift = sk.extract(model)
        sk.save(shift, out / f"a{i}.safetensors")
        sk.export_peft(shift, out / f"peft{i}", task_type="CAUSAL_LM")
        deltas.append({n: lora_delta(shift, n).double() for n in lora_param_names(shift)})
    refs = {}
    for name in deltas[0]:
        stack = [d[name] for d in deltas]
        refs[f"linear/{name}"] = sum(stack) / N_ADAPTERS
        refs[f"ties/{name}"] = ties(stack, torch.ones(N_ADAPTERS, dtype=torch.float64), DENSITY, "total")
    save_file({k: v.contiguous() for k, v in refs.items()}, str(out / "reference.safetensors"))
    C.emit({"weights": len(deltas[0]), "shape": list(next(iter(deltas[0].values())).shape)})


def _errors(result: dict[str, Any], refs: dict[str, Any], kind: str) -> dict[str, Any]:
    num = den = 0.0
    per = {}
    for name, got in result.items():
        ref = refs[f"{REFERENCE[kind]}/{name}"]
        diff = float((got.double() - ref).norm() ** 2)
        norm = float(ref.norm() ** 2)
        per[name] = (diff / norm) ** 0.5
        num, den = num + diff, den + norm
    if set(result) != {k.split("/", 1)[1] for k in refs if k.startswith(REFERENCE[kind] + "/")}:
        raise C.BenchError(f"{kind}: merged weights differ from the reference's")
    return {"rel_error": (num / den) ** 0.5, "max_rel_error": max(per.values()), "per_weight": per}


def _peft_merge(folder: Path, kind: str, reps: int) -> tuple[list[float], dict[str, Any], int]:
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(C.build_base("llama"), str(folder / "peft0"), adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        model.load_adapter(str(folder / f"peft{i}"), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    ties = kind.startswith("ties")
    weights = [1.0] * N_ADAPTERS if ties else [1.0 / N_ADAPTERS] * N_ADAPTERS
    extra: dict[str, Any] = {"density": DENSITY} if ties else {}
    if kind == "ties_svd":
        extra["svd_rank"] = C.R
    times = []
    for rep in range(reps):
        if rep:
            model.delete_adapter(f"m{rep - 1}")
        t0 = time.perf_counter()
        model.add_weighted_adapter(names, weights, f"m{rep}", combination_type=kind, **extra)
        times.append(time.perf_counter() - t0)
    merged, rank = f"m{reps - 1}", 0
    out = {}
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and merged in module.lora_A:
                out[f"{name}.weight"] = module.get_delta_weight(merged).float()
                rank = module.lora_A[merged].weight.shape[0]
    return times, out, rank


def _shiftkit_merge(folder: Path, kind: str, reps: int) -> tuple[list[float], dict[str, Any], int]:
    import shiftkit as sk
    from shiftkit.merging.lowrank import lora_delta, merge_lora

    shifts = [sk.load(folder / f"a{i}.safetensors") for i in range(N_ADAPTERS)]
    call: dict[str, Any] = {
        "ties": {"method": "ties", "density": DENSITY, "semantics": "peft", "output": "delta"},
        "ties_svd8": {"method": "ties", "density": DENSITY, "semantics": "peft", "output": "lora", "rank": 8},
        "concat": {"method": "linear", "output": "concat"},
    }[kind]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = merge_lora(shifts, warn_above=None, **call)
        times.append(time.perf_counter() - t0)
    if res.shift.method == "delta":
        return times, dict(res.shift.tensors), 0
    names = sorted(k[: -len(".lora_A")] + ".weight" for k in res.shift.tensors if k.endswith(".lora_A"))
    return times, {n: lora_delta(res.shift, n) for n in names}, int(res.rank or 0)


def run_worker(folder: str, job: str, reps: int) -> None:
    """One fresh process: ``reps`` timed merges of one job, then the error of the last result."""
    C.setup_worker()
    from safetensors.torch import load_file

    impl, kind = JOBS[job]
    merge = _peft_merge if impl == "peft" else _shiftkit_merge
    times, result, rank = merge(Path(folder), kind, reps)
    refs = load_file(str(Path(folder) / "reference.safetensors"))
    errs = _errors(result, refs, kind)
    C.emit({"times": times, "median_s": statistics.median(times[1:] or times), "rank": rank, **errs})


# --- parent ----------------------------------------------------------------------------------------------
ROW_LABEL = {
    "peft_ties": "PEFT add_weighted_adapter ties (factor-wise)",
    "sk_ties": "shiftkit merge_lora ties, output=delta (exact)",
    "sk_ties_svd8": "shiftkit merge_lora ties, output=lora rank 8 (SVD)",
    "peft_ties_svd": "PEFT add_weighted_adapter ties_svd rank 8 (ΔW + SVD)",
    "peft_linear": "PEFT add_weighted_adapter linear (factor-wise)",
    "peft_cat": "PEFT add_weighted_adapter cat (exact)",
    "sk_concat": "shiftkit merge_lora linear, output=concat (exact)",
}


def _describe(r: dict[str, Any]) -> str:
    return f"{r['median_s'] * 1e3:.2f} ms, error {r['rel_error']:.2e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 worker processes per job")
    p.add_argument("--reps", type=int, help="fresh worker processes per job (default 5; --quick 2)")
    p.add_argument("--inner", type=int, help="timed merges per worker (default 6, the first is warm-up)")
    p.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=sorted(JOBS), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    inner = a.inner or (3 if a.quick else 6)
    if a.prepare:
        prepare(a.prepare)
        return 0
    if a.worker:
        run_worker(a.folder, a.worker, inner)
        return 0

    reps = a.reps or (2 if a.quick else 5)
    t_start = time.perf_counter()
    payload: dict[str, Any] = {"benchmark": "merge_lora_exact", "environment": C.environment()}
    payload["settings"] = {
        "model": C.LLAMA,
        "adapters": N_ADAPTERS,
        "r": C.R,
        "lora_alpha": C.ALPHA,
        "targets": C.TARGETS["llama"],
        "b_std": B_STD,
        "density": DENSITY,
        "reps": reps,
        "inner": inner,
    }
    with tempfile.TemporaryDirectory(prefix="merge_lora_exact.") as folder:
        payload["prepare"] = C.run_worker(SCRIPT, ["--prepare", folder])
        jobs = {j: ["--worker", j, "--folder", folder, "--inner", str(inner)] for j in JOBS}
        runs = C.alternate(SCRIPT, jobs, reps, _describe)
    results: dict[str, Any] = {}
    for job, rs in runs.items():
        results[job] = {
            "label": ROW_LABEL[job],
            "time_s": C.summarize([r["median_s"] for r in rs]),
            "rel_error": rs[-1]["rel_error"],
            "max_rel_error": rs[-1]["max_rel_error"],
            "rel_error_spread": max(r["rel_error"] for r in rs) - min(r["rel_error"] for r in rs),
            "rank": rs[-1]["rank"],
            "per_weight": rs[-1]["per_weight"],
            "runs": rs,
        }
    payload["results"] = results
    payload["elapsed_s"] = time.perf_counter() - t_start
    path = C.write_json("merge_lora_exact", payload)

    rows = [
        {
            "job": r["label"],
            "rank": r["rank"] or "dense",
            "rel. error vs exact ΔW merge": f"{r['rel_error']:.2e}",
            "max per weight": f"{r['max_rel_error']:.2e}",
            "ms median (min–max)": C.fmt_range(r["time_s"], 1e3, 2),
        }
        for r in results.values()
    ]
    ms = {j: results[j]["time_s"]["median"] * 1e3 for j in results}
    err = {j: results[j]["rel_error"] for j in results}
    print(
        f"merge_lora_exact: ties: PEFT factor-wise error {err['peft_ties']:.3f} ({ms['peft_ties']:.1f} ms) "
        "vs "
        f"shiftkit exact {err['sk_ties']:.1e} ({ms['sk_ties']:.1f} ms); best rank-8 refit: shiftkit "
        f"{err['sk_ties_svd8']:.3f}, PEFT ties_svd {err['peft_ties_svd']:.3f}; linear: PEFT factor-wise "
        f"{err['peft_linear']:.3f} ({ms['peft_linear']:.1f} ms), PEFT cat {err['peft_cat']:.1e} "
        f"({ms['peft_cat']:.1f} ms), shiftkit concat {err['sk_concat']:.1e} ({ms['sk_concat']:.1f} ms)"
    )
    print(C.format_table(rows, list(rows[0])))
    print(f"results: {path}  ({payload['elapsed_s']:.0f} s, {C.THREADS} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
