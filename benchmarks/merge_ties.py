"""TIES merge of sharded checkpoints: ``shiftkit merge`` vs mergekit 0.1.5, on the same work (BENCH.md).

Work: a seeded random ``LlamaForCausalLM`` (vocab 32000, hidden 512, intermediate 1536, 11 layers, untied
head: 70.3M parameters) in float32, as a base plus three fine-tunes (base + N(0, 0.002²) on every weight),
each saved as a Hugging Face folder with sharded safetensors (three 100 MB shards + index) and cached under
``.cache/bench/merge_ties``. float32 because BENCH.md's anchor (53.9 s, 1.88 GB peak RSS) fits four 280 MB
float32 checkpoints, not bfloat16 ones. Recipe: ``ties``, density 0.5, weight 1.0 each,
``normalize: true``, output dtype float32.

Three ways to run the same recipe file, each repetition in fresh processes, alternating A/B/C:

(a) ``mergekit-yaml recipe.yml OUT --no-cuda --quiet`` (mergekit's command line);
(b) mergekit in-process: a fresh Python process calling ``mergekit.merge.run_merge`` (its import and merge
    times are reported separately);
(c) ``shiftkit merge recipe.yml OUT --no-progress``.

Each run goes through a small wrapper process that times the command (``perf_counter``) and reads its peak
RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the wrapper has no other child). A check round runs all
three first and compares every output tensor: mergekit trims with ``argsort`` and shiftkit with a stable
sort, so they may differ only at coordinates where a fine-tune's magnitude ties exactly at its tensor's
threshold (checked against the inputs; at most 1e-4 of the entries, each by at most a few noise σ). Only
then do the timed repetitions run.

Run: ``.venv/bin/python benchmarks/merge_ties.py`` (``--reps N``; ``--quick``: one timed repetition).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
BIN = Path(sys.executable).parent
CACHE = ROOT / ".cache" / "bench" / "merge_ties"
TARGETS = {"wall": 0.15, "rss": 0.35}
IMPLS = ("mergekit_yaml", "mergekit_inproc", "shiftkit")
_LLAMA = {"tie_word_embeddings": False}
SIZES: dict[str, dict[str, Any]] = {
    # 70.3M parameters: 2 × 32000 × 512 (embeddings, untied head) + 11 × (4 × 512² + 3 × 512 × 1536) + norms
    "70m": {**_LLAMA, "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1536},
    # plumbing smoke test only (--size tiny, 1.4M parameters): nothing to compare with the anchor
    "tiny": {**_LLAMA, "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 256},
}
SIZES["70m"].update(num_hidden_layers=11, num_attention_heads=8, num_key_value_heads=8)
SIZES["tiny"].update(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
DTYPE = "float32"
NOISE = 0.002  # σ of the fine-tuning noise; 1/10 of Llama's init std (0.02)
DENSITY = 0.5
SHARD = {"70m": "100MB", "tiny": "1MB"}
DIFF_TOL = 1e-6  # |Δ| above this counts as a differing entry (float32 reordering stays far below)
MAX_DIFF_FRACTION = 1e-4
MAX_ABS_DIFF = 10 * NOISE  # a tie at the threshold moves an entry by about one kept shift, ≲ a few σ


# --- building the inputs (a worker process) -----------------------------------------------------------
def _meta_wanted(size: str) -> dict[str, Any]:
    return {
        "config": SIZES[size],
        "dtype": DTYPE,
        "noise": NOISE,
        "shard": SHARD[size],
        "seed": 0,
        "version": 1,
    }


def build_inputs(size: str, folder: Path) -> None:
    """Write base + 3 fine-tunes as sharded HF folders into ``folder`` and a ``meta.json`` describing them."""
    C.setup_worker()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size])).to(getattr(torch, DTYPE))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(v.numel() for v in base.values())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model.save_pretrained(folder / "base", max_shard_size=SHARD[size])
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        tuned = {k: v + NOISE * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()}
        model.save_pretrained(folder / f"ft{i}", state_dict=tuned, max_shard_size=SHARD[size])
        del tuned
    shards = {
        name: len(list((folder / name).glob("*.safetensors"))) for name in ("base", "ft0", "ft1", "ft2")
    }
    indexed = all((folder / name / "model.safetensors.index.json").exists() for name in shards)
    meta = {**_meta_wanted(size), "params": n_params, "shards": shards, "indexed": indexed}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    C.emit(meta)


def ensure_inputs(size: str) -> dict[str, Any]:
    """The cached inputs of ``size`` (built in a fresh process when missing or stale)."""
    folder = CACHE / size
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in _meta_wanted(size).items()):
            return meta
    C.log(f"building base + 3 fine-tunes ({size}, {DTYPE}) under {folder} ...")
    t0 = time.perf_counter()
    meta = C.run_worker(SCRIPT, ["--build", size, "--folder", str(folder)], timeout=1800)
    took = time.perf_counter() - t0
    C.log(
        f"  built {meta['params'] / 1e6:.1f}M params per checkpoint, shards {meta['shards']} ({took:.0f} s)"
    )
    return meta


def write_recipe(size: str) -> Path:
    """The TIES recipe (mergekit's shape, read by both tools) with absolute paths to the cached inputs."""
    import yaml

    folder = CACHE / size
    recipe = {
        "merge_method": "ties",
        "base_model": str(folder / "base"),
        "models": [
            {"model": str(folder / f"ft{i}"), "parameters": {"weight": 1.0, "density": DENSITY}}
            for i in range(3)
        ],
        "parameters": {"normalize": True},
        "dtype": DTYPE,
    }
    path = folder / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --- the three ways to merge -----------------------------------------------------------------------------
def command(impl: str, recipe: Path, out: Path) -> list[str]:
    """The command line of one run (all three read the same recipe file)."""
    if impl == "mergekit_yaml":
        return [str(BIN / "mergekit-yaml"), str(recipe), str(out), "--no-cuda", "--quiet"]
    if impl == "mergekit_inproc":
        return [sys.executable, str(SCRIPT), "--inproc", str(recipe), "--out", str(out)]
    if impl == "shiftkit":
        return [str(BIN / "shiftkit"), "merge", str(recipe), str(out), "--no-progress"]
    raise C.BenchError(f"unknown implementation {impl!r}")


def run_inproc(recipe: Path, out: Path) -> None:
    """(b): mergekit's Python API in this fresh process; import and merge timed separately."""
    C.setup_worker()
    t0 = time.perf_counter()
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    t1 = time.perf_counter()
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    run_merge(config, str(out), MergeOptions(cuda=False, lazy_unpickle=False, quiet=True))
    C.emit({"import_s": t1 - t0, "merge_s": time.perf_counter() - t1, "rss_peak_mb": C.peak_rss_mb()})


def measure(impl: str, recipe: Path, out: Path) -> None:
    """Wrapper process: run one merge command, time it and read its peak RSS (this process's only child)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(impl, recipe, out)
    env = {**os.environ, **C.ENV}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise C.BenchError(f"{impl} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    inner = [ln for ln in proc.stdout.splitlines() if ln.startswith(C.MARKER)]
    C.emit(
        {
            "impl": impl,
            "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "rss_peak_mb": usage.ru_maxrss / 1024.0,
            "inner": json.loads(inner[-1][len(C.MARKER) :]) if inner else None,
            "out_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
            "loadavg": os.getloadavg(),
        }
    )


# --- checking the outputs --------------------------------------------------------------------------------
def _tensor_files(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def _tied_at_threshold(key: str, files: dict[str, dict[str, Path]]) -> Any:
    """Bool mask of the coordinates of ``key`` where some fine-tune's ``|τ|`` ties at its trim threshold.

    mergekit keeps ``k = ⌊density·n⌋`` entries by ``argsort``, shiftkit by a stable sort: the two may pick
    different entries among those equal to the k-th largest magnitude when more than k are ``>=`` it.
    """
    import torch
    from safetensors import safe_open

    def load(name: str) -> Any:
        with safe_open(str(files[name][key]), framework="pt") as fh:
            return fh.get_tensor(key).to(torch.float32)

    base = load("base")
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for i in range(3):
        mag = (load(f"ft{i}") - base).abs()
        k = int(DENSITY * mag.numel())
        if k == 0 or k >= mag.numel():
            continue
        kth = torch.topk(mag.reshape(-1), k).values[-1]
        if int((mag >= kth).sum()) > k:
            tied |= mag == kth
    return tied


def compare(a: Path, b: Path, inputs: Path | None = None) -> None:
    """Compare every tensor of two output folders, one tensor at a time (worker process).

    With ``inputs`` (the folder of base + fine-tunes), every differing coordinate must also be one where a
    fine-tune's magnitude ties at its TIES threshold (see :func:`_tied_at_threshold`).
    """
    C.setup_worker()
    import torch
    from safetensors import safe_open

    fa, fb = _tensor_files(a), _tensor_files(b)
    if set(fa) != set(fb):
        raise C.BenchError(f"outputs have different tensors: {sorted(set(fa) ^ set(fb))[:5]}")
    files = {n: _tensor_files(inputs / n) for n in ("base", "ft0", "ft1", "ft2")} if inputs else {}
    total = differ = unexplained = 0
    max_abs = 0.0
    worst = ""
    dtypes: set[str] = set()
    where: dict[str, int] = {}
    for k in sorted(fa):
        with safe_open(str(fa[k]), framework="pt") as ha, safe_open(str(fb[k]), framework="pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        if x.shape != y.shape or x.dtype != y.dtype:
            raise C.BenchError(f"{k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
        dtypes.add(str(x.dtype))
        d = (x.to(torch.float32) - y.to(torch.float32)).abs()
        total += d.numel()
        bad = d > DIFF_TOL
        n_bad = int(bad.sum())
        if n_bad:
            differ += n_bad
            where[k] = n_bad
            if files:
                unexplained += int((bad & ~_tied_at_threshold(k, files)).sum())
        m = float(d.max()) if d.numel() else 0.0
        if m > max_abs:
            max_abs, worst = m, k
    frac = differ / max(total, 1)
    C.emit(
        {
            "tensors": len(fa),
            "entries": total,
            "differing_entries": differ,
            "differing_fraction": frac,
            "differing_by_tensor": where,
            "not_at_a_threshold_tie": unexplained if files else None,
            "max_abs_diff": max_abs,
            "worst_tensor": worst,
            "dtypes": sorted(dtypes),
            "ok": frac <= MAX_DIFF_FRACTION and max_abs <= MAX_ABS_DIFF and unexplained == 0,
        }
    )


# --- the parent ------------------------------------------------------------------------------------------
def _shiftkit_merge_available() -> bool:
    try:
        proc = subprocess.run([str(BIN / "shiftkit"), "merge", "--help"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _torch_summary(config: str) -> str:
    keep = ("Math Kernel", "OpenMP", "CPU capability")
    parts = []
    for line in config.splitlines():
        line = line.strip(" -")
        if line.startswith("Build settings"):
            parts += [
                s.strip() for s in line.split(",") if s.strip().startswith(("TORCH_VERSION", "USE_CUDA="))
            ]
        elif any(k in line[:40] for k in keep):
            parts.append(line.split(" (Git Hash")[0])
    return "; ".join(parts)


def _paired(runs: dict[str, list[dict[str, Any]]], num: str, den: str, key: str) -> dict[str, Any]:
    return C.summarize([a[key] / b[key] for a, b in zip(runs[num], runs[den])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one timed repetition after the check round")
    p.add_argument("--reps", type=int, help="timed fresh-process repetitions per implementation (default 5)")
    p.add_argument("--size", choices=sorted(SIZES), default="70m", help="model size ('tiny': plumbing only)")
    p.add_argument(
        "--keep", action="store_true", help="keep the merged outputs under .cache/bench/merge_ties"
    )
    p.add_argument("--build", metavar="SIZE", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--inproc", metavar="RECIPE", help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--compare", nargs=2, metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.build:
        build_inputs(a.build, Path(a.folder))
        return 0
    if a.inproc:
        run_inproc(Path(a.inproc), Path(a.out))
        return 0
    if a.measure:
        measure(a.measure, Path(a.recipe), Path(a.out))
        return 0
    if a.compare:
        compare(Path(a.compare[0]), Path(a.compare[1]), Path(a.inputs) if a.inputs else None)
        return 0

    reps = a.reps or (1 if a.quick else 5)
    os.environ.update(C.ENV)
    t_start = time.perf_counter()
    env = C.environment()  # versions, torch config and the load average at the start
    meta = ensure_inputs(a.size)
    if min(meta["shards"].values()) < 3 or not meta["indexed"]:
        raise C.BenchError(f"inputs are not sharded as intended: {meta['shards']} (index: {meta['indexed']})")
    recipe = write_recipe(a.size)
    impls = list(IMPLS)
    missing = None
    if not _shiftkit_merge_available():
        missing = "`shiftkit merge` is not available: only mergekit (a) and (b) were run"
        C.log(missing)
        impls.remove("shiftkit")
    work = CACHE / a.size / "outputs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def job(impl: str, sub: str) -> list[str]:
        return ["--measure", impl, "--recipe", str(recipe), "--out", str(work / sub / impl)]

    # 1. check round (not timed): every output against mergekit-yaml's
    C.log(f"check round: {', '.join(impls)} on {meta['params'] / 1e6:.1f}M params × 4 checkpoints ({DTYPE})")
    check_runs = C.alternate(SCRIPT, {i: job(i, "check") for i in impls}, 1, describe=_describe)
    checks: dict[str, Any] = {}
    for impl in impls[1:]:
        pair = [str(work / "check" / impl), str(work / "check" / impls[0])]
        res = C.run_worker(SCRIPT, ["--compare", *pair, "--inputs", str(CACHE / a.size)])
        checks[f"{impl}_vs_{impls[0]}"] = res
        C.log(
            f"  {impl} vs {impls[0]}: {res['differing_entries']} of {res['entries']} entries differ "
            f"({res['differing_fraction']:.2e}), max |Δ| {res['max_abs_diff']:.3e} ({res['worst_tensor']}); "
            f"not at a threshold tie: {res['not_at_a_threshold_tie']}"
        )
        if not res["ok"]:
            raise C.BenchError(f"{impl} output differs from {impls[0]} beyond threshold ties: {res}")
    if not a.keep:
        shutil.rmtree(work / "check")

    # 2. timed repetitions, alternating in fresh processes
    runs = C.alternate(SCRIPT, {i: job(i, "timed") for i in impls}, reps, describe=_describe)
    stats = {
        i: {k: C.summarize([r[k] for r in rs]) for k in ("wall_s", "cpu_s", "rss_peak_mb")}
        for i, rs in runs.items()
    }
    inproc = [r["inner"] for r in runs["mergekit_inproc"] if r["inner"]]
    if inproc:
        stats["mergekit_inproc"]["import_s"] = C.summarize([r["import_s"] for r in inproc])
        stats["mergekit_inproc"]["merge_s"] = C.summarize([r["merge_s"] for r in inproc])
    ratios: dict[str, Any] = {}
    if "shiftkit" in runs:
        for anchor in ("mergekit_yaml", "mergekit_inproc"):
            for key, short in (("wall_s", "wall"), ("rss_peak_mb", "rss")):
                ratios[f"{short}_vs_{anchor}"] = {
                    "of_medians": C.ratio(stats["shiftkit"][key], stats[anchor][key]),
                    "paired": _paired(runs, "shiftkit", anchor, key),
                }
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)

    env["versions"]["mergekit"] = C._version("mergekit")
    env["torch_config_summary"] = _torch_summary(env["torch_config"])
    payload: dict[str, Any] = {
        "benchmark": "merge_ties",
        "environment": env,
        "settings": {
            "size": a.size,
            "model": SIZES[a.size],
            "params_per_checkpoint": meta["params"],
            "dtype": DTYPE,
            "noise_std": NOISE,
            "shards": meta["shards"],
            "recipe": recipe.read_text(),
            "reps": reps,
            "commands": {i: command(i, Path("recipe.yml"), Path("OUT"))[1:] for i in impls},
            "check": {"diff_tol": DIFF_TOL, "max_fraction": MAX_DIFF_FRACTION, "max_abs_diff": MAX_ABS_DIFF},
        },
        "shiftkit_missing": missing,
        "check": checks,
        "check_runs": check_runs,
        "stats": stats,
        "ratios": ratios,
        "targets": TARGETS,
        "runs": runs,
        "elapsed_s": time.perf_counter() - t_start,
    }
    path = C.write_json("merge_ties" if a.size == "70m" else f"merge_ties_{a.size}", payload)
    _report(payload, path)
    return 0


def _describe(r: dict[str, Any]) -> str:
    inner = r.get("inner") or {}
    extra = f" (import {inner['import_s']:.1f} s + merge {inner['merge_s']:.1f} s)" if inner else ""
    return f"{r['wall_s']:7.1f} s  peak RSS {r['rss_peak_mb']:7.0f} MiB{extra}"


def _report(payload: dict[str, Any], path: Path) -> None:
    s, r, st = payload["settings"], payload["ratios"], payload["stats"]
    rows = []
    for impl, x in st.items():
        rows.append(
            {
                "impl": impl,
                "wall s median (min–max)": C.fmt_range(x["wall_s"]),
                "cpu s": f"{x['cpu_s']['median']:.1f}",
                "peak RSS MiB median (min–max)": C.fmt_range(x["rss_peak_mb"], digits=0),
                "in-process import + merge s": (
                    f"{x['import_s']['median']:.1f} + {x['merge_s']['median']:.1f}" if "merge_s" in x else ""
                ),
            }
        )
    head = (
        f"merge_ties ({s['params_per_checkpoint'] / 1e6:.1f}M-param Llama, {s['dtype']}, base + 3, "
        f"TIES d={DENSITY}, {s['reps']} reps): "
    )
    if r:
        sk, mk = st["shiftkit"], st["mergekit_yaml"]
        w, m = r["wall_vs_mergekit_yaml"]["of_medians"], r["rss_vs_mergekit_yaml"]["of_medians"]
        wi, mi = r["wall_vs_mergekit_inproc"]["of_medians"], r["rss_vs_mergekit_inproc"]["of_medians"]
        ok_w = "met" if w <= TARGETS["wall"] else "NOT met"
        ok_m = "met" if m <= TARGETS["rss"] else "NOT met"
        chk = payload["check"]["shiftkit_vs_mergekit_yaml"]
        print(
            head + f"shiftkit {sk['wall_s']['median']:.1f} s / {sk['rss_peak_mb']['median']:.0f} MiB "
            f"vs mergekit-yaml {mk['wall_s']['median']:.1f} s / {mk['rss_peak_mb']['median']:.0f} MiB: "
            f"wall {w:.3f}× "
            f"(target ≤{TARGETS['wall']}: {ok_w}), RSS {m:.3f}× (target ≤{TARGETS['rss']}: {ok_m}); "
            f"vs in-process mergekit wall {wi:.3f}×, RSS {mi:.3f}×; outputs differ in "
            f"{chk['differing_fraction']:.1e} of entries (max |Δ| {chk['max_abs_diff']:.1e})"
        )
    else:
        print(head + (payload["shiftkit_missing"] or "no shiftkit runs"))
    print(C.format_table(rows, list(rows[0])))
    for name, x in r.items():
        pr = x["paired"]
        what, anchor = name.split("_vs_")
        print(
            f"ratio shiftkit/{anchor} {what}: of medians {x['of_medians']:.3f}, "
            f"paired median {pr['median']:.3f} (min–max {pr['min']:.3f}–{pr['max']:.3f})"
        )
    for name, c in payload["check"].items():
        print(
            f"check {name}: {c['differing_entries']}/{c['entries']} entries differ "
            f"({c['differing_fraction']:.2e}), max |Δ| {c['max_abs_diff']:.2e}, "
            f"{c['not_at_a_threshold_tie']} of them not at a TIES threshold tie"
        )
    v = payload["environment"]["versions"]
    print(
        f"versions: torch {v['torch']}, mergekit {v['mergekit']}, transformers {v['transformers']}, "
        f"safetensors {v['safetensors']}, shiftkit {v['shiftkit']}"
    )
    print(f"torch: {payload['environment']['torch_config_summary']}")
    print(f"results: {path}  ({payload['elapsed_s']:.0f} s, {C.THREADS} threads)")


if __name__ == "__main__":
    sys.exit(main())
