"""``peft-vader``: every learnable method, full fine-tuning and a linear probe on MiniLM over VADER's domains.

MiniLM (mean pooling + a linear head) learns binary sentiment (``|score| > 0.5``) on one VADER domain
(tweets by default; ``--all-domains`` trains on each of the four in turn) and is tested on held-out
sentences of every domain. Per method it reports:

* accuracy in-domain and on each other domain, and the cross-domain mean ``(1/3) Σ_{d ≠ train} acc_d``;
* trainable parameters, and their share of full fine-tuning's;
* training time (the train loop; for the probe also encoding its features once);
* memory: every method runs in a fresh worker process, so ``peak RSS`` is that method's alone (torch, the
  model, the data and its training); ``train mem`` is how much the resident set grew during training
  (sampled every 5 ms): activations, gradients, optimiser state and what the shift itself allocates;
* the shift file's size (``sk.save(sk.extract(model))``; full fine-tuning: its dense task vector; the
  probe: the head's), and whether it folds: the saved file is loaded onto the base and folded (or, if the
  method cannot be folded, re-attached) and the largest logit difference from the trained model is kept.

Every shift trains its method's parameters plus the new head (``modules_to_save=("head",)``), starting
from the probe's head (LP-FT, Kumar et al. 2022, arXiv:2202.10054). The per-method configs and learning
rates are the table :data:`shiftkit.recipes.vader_classify.PLANS`; registered methods without an entry,
and entries whose method is not registered, are listed as skipped. A method whose worker fails is listed with
its error; the others go on.

Example:
    >>> parser = argparse.ArgumentParser(); add_arguments(parser)
    >>> run(parser.parse_args(["--quick", "--methods", "lora"]))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SIZES", "add_arguments", "run", "run_suite"]

DOMAINS: tuple[str, ...] = ("tweets", "movies", "amazon", "nyt")


#: ``--quick`` / default / ``--full`` run sizes (VaderSettings overrides). The default (probe, full and 11
#: methods, 64 steps each) took 621 s on 2 CPU cores shared with other work (load ~1.8): ~25-35 s of
#: training per method, ~15 s of worker start-up, data and evaluation.
SIZES: dict[str, dict[str, Any]] = {
    "quick": {"n_train": 16, "n_test": 16, "max_length": 32, "epochs": 1, "fold_check": 8},
    "default": {"n_train": 512, "n_test": 400, "epochs": 2},
    "full": {"n_train": 1536, "n_test": 1000, "epochs": 3},
}
QUICK_METHODS: tuple[str, ...] = ("probe", "lora")

EPILOG = """\
examples:
  shiftkit bench peft-vader                                  # tweets -> all four domains, ~10 min
  shiftkit bench peft-vader --methods lora ia3 adapter       # the probe runs too (its head starts LP-FT)
  shiftkit bench peft-vader --all-domains --out runs/pv-all  # train on each domain in turn (4x longer)
  shiftkit bench peft-vader --quick --no-progress            # seconds: 16 sentences, 1 step, probe + LoRA
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options to ``parser`` (no torch import).

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--quick"]).quick
        True
    """
    parser.description = (__doc__ or "").split("\n\nExample:")[0]
    parser.epilog = EPILOG
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny run for tests: 16 sentences, 1 step")
    size.add_argument("--full", action="store_true", help="bigger run: 1536 train / 1000 test, 3 epochs")
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="only these rows, space- or comma-separated (default: all)",
    )
    dom = parser.add_mutually_exclusive_group()
    dom.add_argument("--train-domain", default="tweets", choices=DOMAINS, help="domain trained on")
    dom.add_argument("--all-domains", action="store_true", help="train on each of the four domains in turn")
    parser.add_argument("--n-train", type=int, metavar="N", help="training sentences (overrides the size)")
    parser.add_argument("--n-test", type=int, metavar="N", help="test sentences per domain")
    parser.add_argument("--epochs", type=int, metavar="N", help="epochs of the encoder methods")
    parser.add_argument("--seed", type=int, default=0, help="data split, head init, shuffling (default 0)")
    parser.add_argument("--no-lp-ft", action="store_true", help="start every method from a random head")
    parser.add_argument("--out", default="runs/peft-vader", metavar="DIR", help="default: runs/peft-vader")
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")
    parser.add_argument("--keep-shifts", action="store_true", help="also keep every shift file in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the suite from parsed options: print the table, write results.json and report.html.

    Example:
        >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
        0
    """
    from shiftkit._fileio import atomic_write_text
    from shiftkit.bench.report import format_table, suite_table_rows
    from shiftkit.errors import ShiftkitError

    size = "quick" if args.quick else "full" if args.full else "default"
    settings = {**SIZES[size], "seed": args.seed, "lp_ft": not args.no_lp_ft}
    for key in ("n_train", "n_test", "epochs"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ShiftkitError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
        settings[key] = settings[key] if value is None else value
    picked = [m for item in args.methods or () for m in item.split(",") if m]
    methods = picked or (list(QUICK_METHODS) if args.quick else None)
    start = time.perf_counter()
    payload = run_suite(
        settings,
        list(DOMAINS) if args.all_domains else [args.train_domain],
        args.out,
        methods=methods,
        keep_shifts=args.keep_shifts,
        progress=False if args.no_progress else None,
        log=lambda msg: print(f"[peft-vader] {msg}", file=sys.stderr, flush=True),
    )
    for r in payload["runs"]:
        rows, columns = suite_table_rows(r)
        st = payload["settings"]
        print(
            f"\ntrained on {r['train_domain']} ({st['n_train']} sentences, {st['epochs']} epochs, batch "
            f"{st['batch_size']}; tested on {st['n_test']} per domain; size {size}):"
        )
        print(format_table(rows, columns))
        for s in r["skipped"]:
            print(f"  skipped {s['method']}: {s['reason']}")
        for f in r["failed"]:
            print(f"  FAILED {f['method']}: {f['error']}")
    print(f"\nfinished in {time.perf_counter() - start:.0f} s; report: {args.out}/report.html")
    if args.json:
        atomic_write_text(args.json, json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


def _select(
    methods: list[str] | None, registered: list[str], lp_ft: bool
) -> tuple[list[str], list[dict[str, str]]]:
    """The rows to run, in table order, and the skipped ones with the reason."""
    from shiftkit.errors import ShiftkitError
    from shiftkit.recipes.vader_classify import PLANS

    known = ["probe", "full", *registered]
    if methods is not None:
        unknown = [m for m in methods if m not in known and m not in PLANS]
        if unknown:
            raise ShiftkitError(
                f"unknown method(s) {unknown}; known: {', '.join(dict.fromkeys([*PLANS, *known]))}"
            )
    wanted = set(methods) if methods is not None else set(PLANS) | set(registered)
    if lp_ft:
        wanted.add("probe")  # its trained head is where every other row starts
    order = [m for m in [*PLANS, *registered] if m in wanted]
    run, skipped = [], []
    for m in dict.fromkeys(order):
        if m not in PLANS:
            skipped.append({"method": m, "reason": "registered, but no MiniLM plan in vader_classify.PLANS"})
        elif PLANS[m].config is not None and m not in registered:
            skipped.append({"method": m, "reason": "not registered in this install (sk.list_methods())"})
        else:
            run.append(m)
    return run, skipped


def run_suite(
    settings: dict[str, Any],
    train_domains: list[str],
    out_dir: str | os.PathLike[str],
    *,
    methods: list[str] | None = None,
    keep_shifts: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every selected method on every training domain; write ``<out_dir>/{results.json, report.html}``.

    Args:
        settings: :class:`~shiftkit.recipes.vader_classify.VaderSettings` fields (``train_domain`` and
            ``methods`` are set here).
        train_domains: one run per domain.
        out_dir: output folder; files are moved there only once everything has finished.
        methods: rows to run (``None``: all in :data:`PLANS` and the registry).
        keep_shifts: also move the shift files into ``out_dir/<train domain>/``.
        progress: tqdm bars in the workers (``None``: only on a terminal).
        log: receives one line per stage.

    Returns:
        The payload written to ``results.json``.

    Example:
        >>> payload = run_suite(SIZES["quick"], ["tweets"], "runs/pv", methods=["lora"])
    """
    import shiftkit as sk
    from shiftkit.bench.report import write_suite_report
    from shiftkit.recipes.vader_classify import VaderSettings

    say = log or (lambda _msg: None)
    s = VaderSettings(**settings)
    chosen, skipped = _select(methods, sk.list_methods(), s.lp_ft)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    t0 = time.perf_counter()
    try:
        runs = []
        for dom in train_domains:
            sd = dataclasses.replace(s, train_domain=dom, methods=tuple(chosen))
            runs.append(_run_domain(sd, stage / dom, progress, say))
            runs[-1]["skipped"] = skipped
        done = [r for run in runs for r in run["methods"]]
        # the same in every worker: kept once, at the top
        env = [r.pop("environment") for r in done][:1] or [{}]
        full_params = [r.pop("full_params") for r in done][:1] or [None]
        payload = {
            "suite": "peft-vader",
            "title": "peft-vader: every shift method on MiniLM, VADER sentiment in and across domains",
            "settings": {**dataclasses.asdict(s), "methods": chosen, "train_domains": train_domains},
            "full_params": full_params[0],
            "runs": runs,
            "environment": env[0],
            "timings": {"total_seconds": time.perf_counter() - t0},
            "memory": "each method in a fresh process: peak RSS = ru_maxrss of that process; train mem = "
            "growth of its RSS during training (sampled every 5 ms)",
        }
        write_suite_report(stage, payload)
        out.mkdir(parents=True, exist_ok=True)
        if keep_shifts:
            for run in runs:
                (out / run["train_domain"]).mkdir(exist_ok=True)
                for r in run["methods"]:
                    os.replace(
                        stage / run["train_domain"] / r["shift_file"],
                        out / run["train_domain"] / r["shift_file"],
                    )
        for name in ("results.json", "report.html"):
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return payload


def _run_domain(s: Any, stage: Path, progress: bool | None, say: Callable[[str], None]) -> dict[str, Any]:
    from shiftkit.recipes.vader_classify import PLANS

    stage.mkdir(parents=True)
    head = stage / "probe_head.safetensors"
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    t0 = time.perf_counter()
    for name in s.methods:
        say(f"{s.train_domain}: {name}: {PLANS[name].notes}")
        spec = {
            "settings": dataclasses.asdict(s),
            "method": name,
            "stage": str(stage),
            "head_out": str(head) if name == "probe" else None,
            "head_init": str(head) if s.lp_ft and name != "probe" and head.exists() else None,
            "progress": progress,
            "result": str(stage / f"{name}.result.json"),
        }
        result = _spawn(spec, stage / f"{name}.spec.json")
        if not result["ok"]:
            failed.append(
                {"method": name, "error": result["error"], "traceback": result.get("traceback", "")}
            )
            say(f"{s.train_domain}: {name} FAILED: {result['error']}")
            continue
        row = result["row"]
        rows.append(row)
        say(
            f"{s.train_domain}: {name}: in-domain {row['in_domain']:.3f}, cross-domain "
            f"{row['cross_domain_mean']:.3f}, train {row['train_seconds']:.1f} s, "
            f"worker {row['worker_seconds']:.0f} s"
        )
    return {
        "train_domain": s.train_domain,
        "domains": list(DOMAINS),
        "methods": rows,
        "failed": failed,
        "seconds": time.perf_counter() - t0,
    }


def _spawn(spec: dict[str, Any], spec_path: Path) -> dict[str, Any]:
    """Run one method in a fresh ``python -m shiftkit.bench._suite`` process and read its result."""
    spec_path.write_text(json.dumps(spec))
    # Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread waits a whole
    # scheduler slice at every barrier while another process holds the core (benchmarks/README.md).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "shiftkit.bench._suite", str(spec_path)]
    proc = subprocess.run(cmd, check=False, env=env)
    result_path = Path(spec["result"])
    if not result_path.exists():
        return {"ok": False, "error": f"worker exited with status {proc.returncode} and wrote no result"}
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result
