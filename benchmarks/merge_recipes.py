"""Every recipe of mergekit's ``examples/``, run by ``mergekit-yaml`` and by ``shiftkit merge`` (BENCH.md).

Inputs: the 70.3M-parameter Llama base and three fine-tunes of ``benchmarks/merge_ties.py`` (float32, sharded,
cached under ``.cache/bench/merge_ties/70m``; built on first use). The recipes are mergekit 0.1.5's
``examples/*.yml`` as published — ``dtype: float16``/``bfloat16``, gradients, filters, slices — with the hub
names replaced by these folders (model A = ft0, B = ft1, C = ft2, the base model = base) and the 40-layer
ranges of the 13B models scaled to the 11 layers here (``[0, 40]`` → ``[0, 11]``; the 44-layer
frankenmerge's ``[0, 24]`` + ``[20, 40]`` → ``[0, 7]`` + ``[5, 11]``, 13 layers).

Both runners read the same recipe file under the same settings (``OMP_WAIT_POLICY=PASSIVE``, the same
thread count: ``_common.ENV``), each run in a fresh process timed by a wrapper that also reads its peak RSS
(``merge_ties.py --measure``), alternating mergekit and shiftkit. A check round compares the outputs first:
the largest difference relative to the tensor's scale is reported per recipe (float16 outputs: mergekit
rounds its inputs and, for TIES, its arithmetic to 16 bits, shiftkit only the result, so they differ by a
few fp16 units; TIES also at threshold ties).

Run: ``.venv/bin/python benchmarks/merge_recipes.py`` (``--reps N``, default 3; ``--quick``: 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import _common as C
import merge_ties as MT

SCRIPT = Path(__file__).resolve()
IMPLS = ("mergekit_yaml", "shiftkit")
TARGET_WALL = 0.5  # every recipe: shiftkit's wall time ≤ 0.5× mergekit-yaml's

EXAMPLES: dict[str, str] = {
    "arcee_fusion.yml": """
models:
  - model: MODEL_A
  - model: MODEL_B
merge_method: arcee_fusion
base_model: MODEL_A
dtype: bfloat16
""",
    "bio-merge.yml": """
models:
  - model: MODEL_A
    parameters: {density: 0.5, weight: 0.5}
  - model: MODEL_B
    parameters: {density: 0.5, weight: 0.5}
merge_method: ties
base_model: MODEL_BASE
parameters: {normalize: false, int8_mask: true}
dtype: float16
""",
    "gradient-slerp.yml": """
slices:
  - sources:
      - model: MODEL_A
        layer_range: [0, 11]
      - model: MODEL_B
        layer_range: [0, 11]
merge_method: slerp
base_model: MODEL_A
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
""",
    "linear.yml": """
models:
  - model: MODEL_A
    parameters: {weight: 1.0}
  - model: MODEL_C
    parameters: {weight: 0.3}
  - model: MODEL_B
    parameters: {weight: 0.5}
merge_method: linear
dtype: float16
""",
    "orcamini-platy-44layer.yml": """
slices:
  - sources:
    - model: MODEL_A
      layer_range: [0, 7]
  - sources:
    - model: MODEL_B
      layer_range: [5, 11]
merge_method: passthrough
dtype: float16
""",
    "ties.yml": """
models:
  - model: MODEL_A
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: MODEL_B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: MODEL_C
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: MODEL_BASE
parameters: {normalize: true, int8_mask: true}
dtype: float16
""",
}


def write_recipes(folder: Path) -> dict[str, Path]:
    """The example recipes pointed at the cached checkpoints, written under ``folder / "recipes"``."""
    out = folder / "recipes"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in EXAMPLES.items():
        for placeholder, sub in (
            ("MODEL_BASE", "base"),
            ("MODEL_A", "ft0"),
            ("MODEL_B", "ft1"),
            ("MODEL_C", "ft2"),
        ):
            text = text.replace(placeholder, str(folder / sub))
        paths[name] = out / name
        paths[name].write_text(text)
    return paths


def compare(a: Path, b: Path) -> None:
    """Largest ``|a − b| / max|b|`` over the tensors of two output folders (worker process)."""
    C.setup_worker()
    from safetensors import safe_open

    fa, fb = MT._tensor_files(a), MT._tensor_files(b)
    if set(fa) != set(fb):
        raise C.BenchError(f"outputs have different tensors: {sorted(set(fa) ^ set(fb))[:5]}")
    worst, where, dtypes = 0.0, "", set()
    for k in sorted(fa):
        with safe_open(str(fa[k]), framework="pt") as ha, safe_open(str(fb[k]), framework="pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        if x.shape != y.shape:
            raise C.BenchError(f"{k}: {tuple(x.shape)} vs {tuple(y.shape)}")
        dtypes.add(f"{x.dtype} vs {y.dtype}")  # mergekit writes arcee_fusion in float32 whatever the dtype
        scale = float(y.float().abs().max()) or 1.0
        d = float((x.float() - y.float()).abs().max()) / scale
        if d > worst:
            worst, where = d, k
    C.emit({"tensors": len(fa), "max_rel_diff": worst, "worst_tensor": where, "dtypes": sorted(dtypes)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one timed repetition per recipe")
    p.add_argument("--reps", type=int, help="timed fresh-process repetitions (default 3)")
    p.add_argument("--only", nargs="*", help="run only these recipe names")
    p.add_argument("--compare", nargs=2, metavar="DIR", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.compare:
        compare(Path(a.compare[0]), Path(a.compare[1]))
        return 0
    reps = a.reps or (1 if a.quick else 3)
    os.environ.update(C.ENV)
    t_start = time.perf_counter()
    env = C.environment()
    meta = MT.ensure_inputs("70m")
    folder = MT.CACHE / "70m"
    recipes = write_recipes(folder)
    names = [n for n in recipes if not a.only or n in a.only]
    work = folder / "recipe_outputs"
    results: dict[str, Any] = {}
    for name in names:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        C.log(f"{name}:")

        def job(impl: str, sub: str, name: str = name) -> list[str]:
            return ["--measure", impl, "--recipe", str(recipes[name]), "--out", str(work / sub / impl)]

        try:
            C.alternate(MT.SCRIPT, {i: job(i, "check") for i in IMPLS}, 1, describe=MT._describe)
        except C.BenchError as e:
            results[name] = {"error": str(e).splitlines()[-1]}
            C.log(f"  failed: {results[name]['error']}")
            continue
        check = C.run_worker(
            SCRIPT, ["--compare", str(work / "check" / "shiftkit"), str(work / "check" / IMPLS[0])]
        )
        C.log(f"  outputs: max relative difference {check['max_rel_diff']:.2e} ({check['worst_tensor']})")
        runs = C.alternate(MT.SCRIPT, {i: job(i, "timed") for i in IMPLS}, reps, describe=MT._describe)
        stats = {
            i: {k: C.summarize([r[k] for r in rs]) for k in ("wall_s", "rss_peak_mb")}
            for i, rs in runs.items()
        }
        results[name] = {
            "check": check,
            "stats": stats,
            "wall_ratio": C.ratio(stats["shiftkit"]["wall_s"], stats["mergekit_yaml"]["wall_s"]),
            "rss_ratio": C.ratio(stats["shiftkit"]["rss_peak_mb"], stats["mergekit_yaml"]["rss_peak_mb"]),
        }
    shutil.rmtree(work, ignore_errors=True)
    env["versions"]["mergekit"] = C._version("mergekit")
    payload = {
        "benchmark": "merge_recipes",
        "environment": env,
        "settings": {
            "params_per_checkpoint": meta["params"],
            "reps": reps,
            "recipes": {n: EXAMPLES[n] for n in names},
        },
        "results": results,
        "target_wall": TARGET_WALL,
        "elapsed_s": time.perf_counter() - t_start,
    }
    path = C.write_json("merge_recipes", payload)
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append(
                {
                    "recipe": name,
                    "mergekit s": "",
                    "shiftkit s": "",
                    "wall ×": "",
                    "RSS ×": "",
                    "max rel Δ": r["error"][:60],
                }
            )
            continue
        st = r["stats"]
        rows.append(
            {
                "recipe": name,
                "mergekit s": C.fmt_range(st["mergekit_yaml"]["wall_s"]),
                "shiftkit s": C.fmt_range(st["shiftkit"]["wall_s"]),
                "wall ×": f"{r['wall_ratio']:.3f}"
                + ("" if r["wall_ratio"] <= TARGET_WALL else " (target NOT met)"),
                "RSS ×": f"{r['rss_ratio']:.3f}",
                "max rel Δ": f"{r['check']['max_rel_diff']:.1e}",
            }
        )
    print(
        f"merge_recipes ({meta['params'] / 1e6:.1f}M-param Llama checkpoints, {reps} reps, "
        f"target wall ≤ {TARGET_WALL}×)"
    )
    print(C.format_table(rows, list(rows[0])))
    print(f"results: {path}  ({payload['elapsed_s']:.0f} s, {C.THREADS} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
