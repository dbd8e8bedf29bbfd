"""Shared helpers of the benchmarks: fresh-process A/B runs, statistics, environment, JSON results.

The parent process of a benchmark never imports torch for timing: every measured repetition runs in a fresh
Python process (``<script> --worker ...``) that prints one JSON line after :data:`MARKER`, so import caches,
allocator state and thread pools of one run never leak into the next, and peak RSS is per repetition.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

THREADS = 2
MARKER = "@@BENCH "
RESULTS = Path(__file__).resolve().parent / "results"

# Set before torch is imported (OpenMP reads its variable once, at start-up) and passed to every worker.
ENV = {
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    # Idle OpenMP threads sleep instead of spinning. On a shared 2-core machine a spinning thread waits a
    # whole scheduler slice at every barrier whenever another process holds the other core: steps took
    # 20× longer (4.4 s instead of 0.21 s) and swamped any difference between the two sides. Export
    # OMP_WAIT_POLICY=ACTIVE to measure libgomp's default on a quiet machine.
    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
}


class BenchError(RuntimeError):
    """A worker failed, or outputs that must agree did not."""


def setup_worker() -> None:
    """Apply :data:`ENV` and pin torch to :data:`THREADS` threads (call first in a worker)."""
    os.environ.update(ENV)
    import torch

    torch.set_num_threads(THREADS)


def emit(payload: dict[str, Any]) -> None:
    """Print a worker's result as one marked JSON line for the parent."""
    print(MARKER + json.dumps(payload), flush=True)


def run_worker(script: Path, args: Sequence[str], timeout: float = 900.0) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process and return the JSON it emitted."""
    env = {**os.environ, **ENV}
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise BenchError(f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1][len(MARKER) :])
    return result


def alternate(
    script: Path,
    jobs: dict[str, list[str]],
    reps: int,
    describe: Callable[[dict[str, Any]], str] = lambda r: "",
) -> dict[str, list[dict[str, Any]]]:
    """Run every job once per repetition, in order A, B, A, B, ..., each in a fresh process.

    Alternating (rather than all A then all B) spreads slow phases of a shared, noisy machine over both
    sides instead of charging them to one.
    """
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in jobs}
    for rep in range(reps):
        for name, args in jobs.items():
            t0 = time.perf_counter()
            res = run_worker(script, args)
            out[name].append(res)
            log(f"  rep {rep + 1}/{reps} {name:<8} {describe(res)}  ({time.perf_counter() - t0:.1f} s)")
    return out


def log(msg: str) -> None:
    """Progress to stderr, so stdout keeps the summary and the table."""
    print(msg, file=sys.stderr, flush=True)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "values"}`` of a sample."""
    vals = [float(v) for v in values]
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": vals,
    }


def ratio(num: dict[str, Any], den: dict[str, Any]) -> float:
    """Ratio of two medians."""
    return float(num["median"]) / float(den["median"])


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Resident set size of this process now, MiB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment() -> dict[str, Any]:
    """Package versions, torch build configuration, threads and machine facts for the JSON result."""
    import torch

    dists = ("torch", "transformers", "peft", "shiftkit", "safetensors", "numpy", "accelerate")
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": THREADS,
        "env": ENV,
        "versions": {d: _version(d) for d in dists},
        "torch_config": torch.__config__.show(),
        "loadavg_start": os.getloadavg(),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"{name}.json"
    payload = {**payload, "loadavg_end": os.getloadavg()}
    fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, default=str)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Aligned plain-text table of ``rows`` (dicts) over ``columns``."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def fmt_range(stats: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    """``"median (min–max)"`` of a :func:`summarize` result, multiplied by ``scale``."""
    m, lo, hi = (stats[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


# --- the two models and the LoRA set-up shared by both benchmarks -------------------------------------
# ~5.3M parameters: the random Llama of BENCH.md's anchor (vocab 4096, hidden 256, 4 layers, 8 heads).
LLAMA: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "intermediate_size": 688,
    "num_attention_heads": 8,
}
TARGETS = {"llama": ["q_proj", "v_proj"], "minilm": ["query", "value"]}
PEFT_TASK = {"llama": "CAUSAL_LM", "minilm": "FEATURE_EXTRACTION"}
R, ALPHA = 8, 16.0


def minilm_installed() -> bool:
    """True if the offline MiniLM asset is installed (cheap: no torch import)."""
    from shiftkit import zoo

    return bool(zoo.is_installed("minilm"))


def build_base(case: str, seed: int = 0) -> nn.Module:
    """A fresh base model: the seeded random Llama, or the real MiniLM from the zoo."""
    import torch

    if case == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**LLAMA))
    if case == "minilm":
        from shiftkit import zoo

        model, _ = zoo.load_model("minilm")
        return model
    raise BenchError(f"unknown model {case!r}")


def attach_peft(model: nn.Module, case: str) -> nn.Module:
    """``get_peft_model`` with LoRA r=8, α=16, no dropout on the case's targets."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=int(ALPHA), lora_dropout=0.0, target_modules=TARGETS[case])
    cfg.task_type = PEFT_TASK[case]
    return get_peft_model(model, cfg)


def attach_shiftkit(model: nn.Module, case: str) -> nn.Module:
    """``sk.attach_`` with the same LoRA settings as :func:`attach_peft`."""
    import shiftkit as sk

    return sk.attach_(model, sk.LoRAConfig(r=R, lora_alpha=ALPHA, target_modules=tuple(TARGETS[case])))


def lora_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{base-relative module name: (A (r, in), B (out, r))}`` of a PEFT or a shiftkit LoRA model.

    PEFT keeps ``lora_A.default.weight`` (r, in) and ``lora_B.default.weight`` (out, r), the same layout
    as shiftkit's ``lora_A`` / ``lora_B``; only the module names differ (PEFT prefixes
    ``base_model.model.``).
    """
    from torch import nn

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        a: Any = getattr(mod, "lora_A", None)
        b: Any = getattr(mod, "lora_B", None)
        if a is None or b is None:
            continue
        if isinstance(a, nn.ModuleDict):
            a, b = a["default"].weight, b["default"].weight
        out[name.removeprefix("base_model.model.")] = (a, b)
    return out


def set_lora_(model: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy ``pairs`` (see :func:`lora_pairs`) into the LoRA factors of ``model``; names must match."""
    import torch

    mine = lora_pairs(model)
    if set(mine) != set(pairs):
        raise BenchError(f"LoRA modules differ: {sorted(set(mine) ^ set(pairs))[:4]}")
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            mine[name][0].copy_(a)
            mine[name][1].copy_(b)
