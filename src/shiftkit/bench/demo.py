"""``shiftkit demo``: five ways to adapt MiniLM to one VADER sentiment domain, evaluated on all four.

A linear probe, full fine-tuning, LoRA, SSF and BitFit are trained on the same sentences of one domain
(binary sentiment, ``|score| > 0.5``) and tested on held-out sentences of every domain, so the table shows
both the in-domain fit and what survives the shift to the other three domains. Every shift is extracted,
saved as one file, loaded back onto the base, folded into its weights, and compared with the model it was
trained as: the reported ``max |folded - attached|`` is the whole round trip file → fold.

Work is shared where it can be: each domain is tokenised once, test batches are sorted by length (little
padding), and the probe trains on sentence features computed once. Outputs are staged in a temporary folder
and moved into place only when everything has finished, so an interrupted run leaves no partial outputs.

The settings, the method plans and the training rows are shared with ``shiftkit bench peft-vader``
(:mod:`shiftkit.recipes.vader_classify`).

Example:
    >>> payload = run_demo(DemoSettings(), "runs/demo")
    >>> payload["methods"][0]["method"]
    'probe'
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shiftkit import zoo
from shiftkit.bench.report import environment, write_report
from shiftkit.errors import ShiftkitError
from shiftkit.recipes.vader_classify import (
    MethodPlan,
    VaderSettings,
    finish_row,
    load_vader,
    method_plan,
    train_encoder,
    train_probe,
)

__all__ = ["DemoSettings", "MethodPlan", "default_plans", "quick_settings", "run_demo"]

#: the demo's learn settings: a :class:`~shiftkit.recipes.vader_classify.VaderSettings`
DemoSettings = VaderSettings


def quick_settings() -> DemoSettings:
    """A seconds-long variant for tests: a few sentences, one short epoch."""
    return DemoSettings(n_train=32, n_test=16, max_length=32, epochs=1, fold_check=8)


def default_plans(s: DemoSettings) -> list[MethodPlan]:
    """The rows of ``s.methods`` with their learning rates (why each was chosen: ``_suite.PLANS``)."""
    unknown = [m for m in s.methods if m not in ("probe", "full", "lora", "ssf", "bitfit")]
    if unknown:
        raise ShiftkitError(f"unknown demo method(s) {unknown}; known: probe, full, lora, ssf, bitfit")
    return [method_plan(m, s) for m in s.methods]


def run_demo(
    settings: DemoSettings,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo and write ``<out_dir>/{results.json, report.html, <method>.safetensors}``.

    Args:
        settings: what to train on and how long.
        out_dir: output folder; files are replaced only once the whole run has finished.
        progress: tqdm bars on stderr (``None``: only on a terminal).
        log: receives one line per stage (the CLI prints them).

    Returns:
        The results payload written to ``results.json``.

    Example:
        >>> payload = run_demo(quick_settings(), "runs/demo-quick", progress=False)
    """
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        payload = _run(settings, stage, progress, say)
        write_report(stage, payload)
        # everything exists and is complete: move it into place (renames, so readers never see half a file)
        out.mkdir(parents=True, exist_ok=True)
        for name in [r["shift_file"] for r in payload["methods"]] + ["results.json", "report.html"]:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return payload


def _run(s: DemoSettings, stage: Path, progress: bool | None, say: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    domains = list(zoo.VADER_DOMAINS)
    plans = default_plans(s)
    say(f"loading {s.model} and VADER ({', '.join(domains)}); training on {s.train_domain}")
    data = load_vader(s)
    timings: dict[str, float] = {"setup_seconds": time.perf_counter() - t0}

    rows: list[dict[str, Any]] = []
    head_init: dict[str, Any] | None = None
    for plan in plans:
        say(f"{plan.name}: {plan.notes}")
        t = time.perf_counter()
        if plan.name == "probe":
            row, probe_head = train_probe(data, plan, stage, progress)
            head_init = probe_head.state_dict() if s.lp_ft else None
        else:
            if head_init is not None:
                data.model.head.load_state_dict(head_init)
            row = train_encoder(data, plan, stage, progress)
            row["head_init"] = "probe" if head_init is not None else "random"
        row["total_seconds"] = time.perf_counter() - t
        rows.append(finish_row(row, plan, data))
        say(
            f"{plan.name}: in-domain {row['in_domain']:.3f}, cross-domain {row['cross_domain_mean']:.3f}, "
            f"train {row['train_seconds']:.1f} s"
        )
    timings["total_seconds"] = time.perf_counter() - t0
    return {
        "title": "shiftkit demo: MiniLM on VADER sentiment, trained on one domain, tested on four",
        "settings": dataclasses.asdict(s),
        "train_domain": s.train_domain,
        "domains": domains,
        "full_params": data.full_params,
        "methods": rows,
        "timings": timings,
        "environment": environment(),
    }
