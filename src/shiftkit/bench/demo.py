"""``shiftkit demo``: every verb of shiftkit in one run — learn, fold, merge, compress, adapt — with one table
each.

* **learn**: a linear probe, full fine-tuning, LoRA, SSF and BitFit are trained on the same sentences of one
  VADER domain (binary sentiment, ``|score| > 0.5``) and tested on held-out sentences of every domain, so the
  table shows the in-domain fit and what survives the shift to the other three domains. Every shift is
  extracted, saved as one file, loaded back onto the base, folded into its weights, and compared with the
  model it was trained as (``max |folded - attached|``).
* **fold**: the LoRA shift file on the pristine base, attached and then folded: parameters at inference,
  sentences per second against the base, and the largest logit difference. Folding costs nothing at
  inference.
* **merge**: one LoRA expert per domain, all from one start θ0 (the encoder plus one probe head trained on
  every domain, then frozen), merged into a single model by task arithmetic and by breadcrumbs (the best
  LoRA merge of ``shiftkit bench merge-vader``, with the coefficients that suite chose on validation).
* **compress**: the four LoRA experts of the merge section compressed with ComPEFT (``sk.compress``,
  density 0.5, α as ``shiftkit bench compress-vader`` chose it on validation) and with binary-coding
  quantisation (3 bits): file sizes before and after, and each expert's accuracy on its own domain kept.
* **adapt**: an EfficientNet-Lite0 Fashion-MNIST classifier on a stream of corrupted images (Fashion-MNIST-C
  built from the CIFAR-10-C definitions), without adaptation (``source``), with test-batch statistics
  (``norm``) and with TENT, reset at each corruption.

Work is shared where it can be: each domain is tokenised once, test batches are sorted by length, the probe
trains on sentence features computed once. Outputs are staged in a temporary folder and moved into place only
when everything has finished, so an interrupted run leaves no partial outputs.

The learn settings, method plans and training rows are shared with ``shiftkit bench peft-vader``
(:mod:`shiftkit.recipes.vader_classify`); the merge experts with ``merge-vader``
(:mod:`shiftkit.recipes.vader_experts`); the source model with ``tta-fmnist-c``
(:mod:`shiftkit.recipes.image_source`).

Example:
    >>> payload = run_demo(DemoSettings(), "runs/demo")
    >>> payload["sections"]
    ['learn', 'fold', 'merge', 'compress', 'adapt']
"""

from __future__ import annotations

import copy
import dataclasses
import html
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import shiftkit as sk
from shiftkit import zoo
from shiftkit._fileio import atomic_write_text
from shiftkit.bench.report import (
    CSS,
    environment,
    footer,
    html_table,
    human_bytes,
    human_count,
    learn_section_html,
    table_rows,
)
from shiftkit.errors import ShiftkitError
from shiftkit.recipes.image_source import SourceSettings
from shiftkit.recipes.learn import predict
from shiftkit.recipes.vader_classify import (
    MethodPlan,
    VaderData,
    VaderSettings,
    finish_row,
    load_vader,
    method_plan,
    train_encoder,
    train_probe,
)
from shiftkit.recipes.vader_experts import ExpertSettings

__all__ = [
    "SECTIONS",
    "DemoSettings",
    "MethodPlan",
    "default_plans",
    "quick_settings",
    "render_demo_html",
    "run_demo",
    "section_tables",
]

#: the demo's sections, in order: one table each in the terminal and in ``report.html``
SECTIONS: tuple[str, ...] = ("learn", "fold", "merge", "compress", "adapt")

LEARN_METHODS: tuple[str, ...] = ("probe", "full", "lora", "ssf", "bitfit")

#: ComPEFT's density and α for the demo's LoRA experts: ``compress-vader`` measured LoRA factors keeping
#: their accuracy within a point down to density 0.5 (α chosen per expert on validation: 1 for two of the
#: four); the demo has no validation split, so it takes that setting
COMPEFT_DENSITY, COMPEFT_ALPHA = 0.5, 1.0


def _merge_experts() -> ExpertSettings:
    # merge-vader's expert recipe (2 epochs, LoRA r=8 on every encoder Linear, lr 2e-3) on 384 sentences
    # per domain (merge-vader: 512), LoRA only, no multi-task model, length-bucketed batches (1.5x faster):
    # about 10 s per expert on 2 cores. 200 test sentences per domain.
    return ExpertSettings(
        n_train=384, n_val=0, n_test=200, kinds=("lora",), multi_task=False, by_length=True, probe_epochs=10
    )


def _adapt_source() -> SourceSettings:
    # 79 steps of batch 64 on 5,000 images (about 25 s on 2 cores), BatchNorm statistics re-estimated on
    # 2,048 of them. tta-fmnist-c's source (30,000 images, 2 epochs: 11.6 % error) takes 5 minutes.
    return SourceSettings("fashion-mnist", 5000, 1, 0, batch_size=64, lr=6e-3, precise_bn=2048)


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """What each section of the demo runs on.

    Attributes:
        learn: the learn section (MiniLM on one VADER domain, methods in ``learn.methods``).
        fold_method: the learn section's shift shown attached and folded (it must be one of
        ``learn.methods``). merge: the per-domain experts of the merge section. merges: ``(method, λ)`` pairs;
        λ as ``merge-vader`` chose it on validation for LoRA experts. compressions: ``(compressor, params)``
        applied to each LoRA expert of the merge section. source: the adapt section's
        Fashion-MNIST source model. corruptions: the adapt stream's corruptions, one after the other (severity
        ``severity``). severity: corruption severity (1-5). adapt_images: Fashion-MNIST test images per
        corruption. adapt_batch: stream batch size. adapt_methods: registered TTA methods to run (``source``
        is the unadapted model).
    """

    learn: VaderSettings = field(default_factory=VaderSettings)
    fold_method: str = "lora"
    merge: ExpertSettings = field(default_factory=_merge_experts)
    merges: tuple[tuple[str, float], ...] = (("task_arithmetic", 0.5), ("breadcrumbs", 1.0))
    compressions: tuple[tuple[str, dict[str, Any]], ...] = (
        ("compeft", {"density": COMPEFT_DENSITY, "alpha": COMPEFT_ALPHA}),
        ("bcq", {"bits": 3, "group_size": 64}),
    )
    source: SourceSettings = field(default_factory=_adapt_source)
    corruptions: tuple[str, ...] = ("gaussian_noise", "defocus_blur", "fog", "contrast")
    severity: int = 5
    adapt_images: int = 500
    adapt_batch: int = 50
    adapt_methods: tuple[str, ...] = ("source", "norm", "tent")


def quick_settings() -> DemoSettings:
    """A variant of every section that runs in well under 90 s: a few sentences and images, short training.

    Example:
        >>> quick_settings().learn.n_train
        32
    """
    return DemoSettings(
        learn=VaderSettings(n_train=32, n_test=16, max_length=32, epochs=1, fold_check=8),
        merge=ExpertSettings(
            n_train=16,
            n_val=0,
            n_test=16,
            max_length=32,
            epochs=1,
            probe_epochs=2,
            kinds=("lora",),
            multi_task=False,
            by_length=True,
            lora_targets=r".*\.(query|value)",
        ),
        source=SourceSettings("fashion-mnist", 256, 1, 0, batch_size=64, lr=6e-3, precise_bn=128),
        corruptions=("gaussian_noise", "fog"),
        adapt_images=100,
    )


def default_plans(s: VaderSettings) -> list[MethodPlan]:
    """The learn section's rows of ``s.methods`` with their learning rates (``vader_classify.PLANS``).

    Raises:
        ShiftkitError: a method the demo does not run.

    Example:
        >>> [p.name for p in default_plans(VaderSettings())]
        ['probe', 'full', 'lora', 'ssf', 'bitfit']
    """
    unknown = [m for m in s.methods if m not in LEARN_METHODS]
    if unknown:
        raise ShiftkitError(f"unknown demo method(s) {unknown}; known: {', '.join(LEARN_METHODS)}")
    return [method_plan(m, s) for m in s.methods]


def _check(s: DemoSettings) -> None:
    from shiftkit import adapt
    from shiftkit.data import CORRUPTIONS
    from shiftkit.merging.registry import get_merge_method

    default_plans(s.learn)
    if s.fold_method not in s.learn.methods or s.fold_method in ("probe", "full"):
        shifts = [m for m in s.learn.methods if m not in ("probe", "full")]
        raise ShiftkitError(
            f"fold_method {s.fold_method!r} must be a shift the learn section trains: {shifts}"
        )
    for name, _ in s.merges:
        get_merge_method(name)  # raises UnknownMethodError naming the registered ones
    unknown = [c for c in s.corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ShiftkitError(f"unknown corruption(s) {unknown}; known: {', '.join(CORRUPTIONS)}")
    known = adapt.list_methods()
    missing = [m for m in s.adapt_methods if m not in known]
    if missing:
        raise ShiftkitError(f"unknown adapt method(s) {missing}; registered: {', '.join(known)}")


def run_demo(
    settings: DemoSettings,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every section and write ``<out_dir>/{results.json, report.html, <method>.safetensors}``.

    Args:
        settings: what each section trains on and how long.
        out_dir: output folder; files are replaced only once the whole run has finished.
        progress: tqdm bars on stderr (``None``: only on a terminal).
        log: receives one line per stage (the CLI prints them).

    Returns:
        The results payload written to ``results.json``.

    Raises:
        ShiftkitError: settings that name an unknown method or corruption (before anything trains).

    Example:
        >>> payload = run_demo(quick_settings(), "runs/demo-quick", progress=False)
    """
    _check(settings)
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        payload = _run(settings, stage, progress, say)
        atomic_write_text(stage / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
        atomic_write_text(stage / "report.html", render_demo_html(payload))
        # everything exists and is complete: move it into place (renames, so readers never see half a file)
        out.mkdir(parents=True, exist_ok=True)
        for name in [r["shift_file"] for r in payload["methods"]] + ["results.json", "report.html"]:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return payload


def _run(s: DemoSettings, stage: Path, progress: bool | None, say: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    learn = _learn(s.learn, stage, progress, say)
    timings = {"learn_seconds": time.perf_counter() - t0}
    t = time.perf_counter()
    fold = _fold(learn.pop("_data"), s.fold_method, stage, say)
    timings["fold_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    merge = _merge(s, progress, say)
    timings["merge_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    compress = _compress(s, merge.pop("_experts"), merge.pop("_data"), say)
    timings["compress_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    adapt_ = _adapt(s, progress, say)
    timings["adapt_seconds"] = time.perf_counter() - t
    timings["total_seconds"] = time.perf_counter() - t0
    return {
        "title": "shiftkit demo: learn, fold, merge, compress and adapt parameter shifts",
        "sections": list(SECTIONS),
        **learn,
        "fold": fold,
        "merge": merge,
        "compress": compress,
        "adapt": adapt_,
        "demo_settings": dataclasses.asdict(s),
        "timings": timings,
        "environment": environment(),
    }


# --- learn -------------------------------------------------------------------------------------------
def _learn(
    s: VaderSettings, stage: Path, progress: bool | None, say: Callable[[str], None]
) -> dict[str, Any]:
    t0 = time.perf_counter()
    domains = list(zoo.VADER_DOMAINS)
    plans = default_plans(s)
    say(f"learn: loading {s.model} and VADER ({', '.join(domains)}); training on {s.train_domain}")
    data = load_vader(s)
    setup = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    head_init: dict[str, Any] | None = None
    for plan in plans:
        say(f"learn {plan.name}: {plan.notes}")
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
            f"learn {plan.name}: in-domain {row['in_domain']:.3f}, "
            f"cross-domain {row['cross_domain_mean']:.3f}, train {row['train_seconds']:.1f} s"
        )
    return {
        "settings": dataclasses.asdict(s),
        "train_domain": s.train_domain,
        "domains": domains,
        "full_params": data.full_params,
        "methods": rows,
        "learn_setup_seconds": setup,
        "_data": data,
    }


# --- fold --------------------------------------------------------------------------------------------
def _forward_rates(
    models: Sequence[torch.nn.Module], batches: list[dict[str, torch.Tensor]], rounds: int
) -> tuple[list[float], list[torch.Tensor]]:
    """Sentences per second of each model (the best of ``rounds`` interleaved passes) and its logits."""
    n = sum(len(b["labels"]) for b in batches)
    best = [0.0] * len(models)
    logits: list[torch.Tensor] = [torch.empty(0)] * len(models)
    for model in models:
        predict(model, batches[:1])  # warm-up: first-call allocations are not inference cost
    for _ in range(rounds):  # interleaved, so a busy spell of the machine hits every model alike
        for i, model in enumerate(models):
            t = time.perf_counter()
            logits[i], _ = predict(model, batches)
            best[i] = max(best[i], n / (time.perf_counter() - t))
    return best, logits


def _fold(data: VaderData, method: str, stage: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The learn section's shift file on the pristine base: base, attached and folded forward passes."""
    base = data.model
    base.load_state_dict(data.base_state)
    batches = data.tests[data.settings.train_domain][::2]  # every other length-sorted batch: all lengths
    attached, folded = copy.deepcopy(base), copy.deepcopy(base)
    shift = sk.load(stage / f"{method}.safetensors")
    sk.attach_(attached, shift)
    sk.attach_(folded, shift)
    t = time.perf_counter()
    sk.fold_(folded)
    fold_seconds = time.perf_counter() - t
    models = [base, attached, folded]
    params = [sum(p.numel() for p in m.parameters()) for m in models]
    rates, logits = _forward_rates(models, batches, rounds=3)
    diff = float((logits[2] - logits[1]).abs().max())
    agree = float((logits[2].argmax(-1) == logits[1].argmax(-1)).float().mean())
    say(
        f"fold {method}: {rates[1]:.0f} sentences/s attached, {rates[2]:.0f} folded, "
        f"{rates[0]:.0f} base; max |folded - attached| {diff:.1e}"
    )
    labels = ["base", f"{method} attached", f"{method} folded"]
    rows: list[dict[str, Any]] = [
        {"model": label, "params": n, "rate": r} for label, n, r in zip(labels, params, rates)
    ]
    rows[2]["max_diff"] = diff
    return {
        "method": method,
        "sentences": sum(len(b["labels"]) for b in batches),
        "rows": rows,
        "fold_seconds": fold_seconds,
        "prediction_agreement": agree,
        "shift_params": params[1] - params[0],
    }


# --- merge -------------------------------------------------------------------------------------------
def _merge(s: DemoSettings, progress: bool | None, say: Callable[[str], None]) -> dict[str, Any]:
    from shiftkit.recipes.vader_experts import DOMAINS, build_experts, evaluate, load_splits, with_delta

    es = s.merge
    say(f"merge: one LoRA expert per VADER domain ({es.n_train} sentences each), all from one θ0")
    data = load_splits(es)
    experts = build_experts(data, None, progress, say)

    def row(label: str, group: str, delta: sk.Shift | None, **extra: Any) -> dict[str, Any]:
        with with_delta(data, delta) as model:
            acc = evaluate(model, data.test_batches)
        return {"row": label, "group": group, "accuracy": acc, "mean": sum(acc.values()) / len(acc), **extra}

    rows = [row("θ0 (encoder + probe head)", "base", None)]
    for d in DOMAINS:
        info = experts.info[f"lora-{d}"]
        rows.append(row(f"LoRA expert: {d}", "expert", experts.lora_delta[d], seconds=info["seconds"]))
    own = {d: r["accuracy"][d] for d, r in zip(DOMAINS, rows[1:])}
    rows.append(
        {
            "row": "oracle: each domain's own expert",
            "group": "oracle",
            "accuracy": own,
            "mean": sum(own.values()) / len(own),
            "notes": "four models, and the domain label of every test sentence",
        }
    )
    inputs = [experts.lora_delta[d] for d in DOMAINS]
    for name, lam in s.merges:
        t = time.perf_counter()
        merged = sk.merge(inputs, method=name, lambda_=lam)
        seconds = time.perf_counter() - t
        rows.append(row(f"merged: {name} (λ {lam:g})", "merge", merged, seconds=seconds, method=name))
        say(f"merge {name}: mean {rows[-1]['mean']:.3f} ({seconds:.1f} s to merge)")
    lora_params = sum(t.numel() for t in experts.lora[DOMAINS[0]].tensors.values())
    return {
        "_experts": experts,
        "_data": data,
        "domains": list(DOMAINS),
        "settings": dataclasses.asdict(es),
        "rows": rows,
        "lora_params": lora_params,
        "train_seconds": sum(experts.info[f"lora-{d}"]["seconds"] for d in DOMAINS),
        "theta0_head_seconds": experts.info["theta0_head"]["seconds"],
    }


# --- compress ----------------------------------------------------------------------------------------
def _compress(s: DemoSettings, experts: Any, data: Any, say: Callable[[str], None]) -> dict[str, Any]:
    """Each LoRA expert compressed every way of ``s.compressions``: file bytes and own-domain accuracy."""
    from shiftkit.core.io import file_size
    from shiftkit.recipes.vader_experts import DOMAINS, evaluate, with_delta

    def own(d: str, delta: sk.Shift) -> float:
        with with_delta(data, delta) as model:
            return evaluate(model, {d: data.test_batches[d]})[d]

    dense = {d: experts.lora[d] for d in DOMAINS}
    rows: list[dict[str, Any]] = [
        {
            "row": "LoRA experts as trained (fp32)",
            "compressor": "none",
            "bytes": {d: file_size(dense[d]) for d in DOMAINS},
            "accuracy": {d: own(d, experts.lora_delta[d]) for d in DOMAINS},  # as the merge section
            "seconds": 0.0,
        }
    ]
    for name, params in s.compressions:
        t = time.perf_counter()
        small = {d: sk.compress(dense[d], method=name, **params) for d in DOMAINS}
        seconds = time.perf_counter() - t
        label = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
        rows.append(
            {
                "row": f"{name} ({label})",
                "compressor": name,
                "bytes": {d: file_size(small[d]) for d in DOMAINS},
                "accuracy": {d: own(d, sk.to_delta(small[d])) for d in DOMAINS},  # decodes, then s·B A
                "seconds": seconds,
            }
        )
        ratio = sum(rows[0]["bytes"].values()) / sum(rows[-1]["bytes"].values())
        mean = sum(rows[-1]["accuracy"].values()) / len(DOMAINS)
        say(f"compress {name}: {ratio:.1f}x smaller, own-domain mean accuracy {mean:.3f}")
    for r in rows:
        r["total_bytes"] = sum(r["bytes"].values())
        r["ratio"] = rows[0]["total_bytes"] / r["total_bytes"]
        r["mean"] = sum(r["accuracy"].values()) / len(r["accuracy"])
    return {"domains": list(DOMAINS), "rows": rows}


# --- adapt -------------------------------------------------------------------------------------------
def _adapt(s: DemoSettings, progress: bool | None, say: Callable[[str], None]) -> dict[str, Any]:
    import numpy as np

    from shiftkit import adapt
    from shiftkit.data import corrupted_domains, grey28_to_rgb32
    from shiftkit.data import streams as st
    from shiftkit.recipes.image_source import clean_error, source_model
    from shiftkit.zoo import load_dataset

    say(f"adapt: training the Fashion-MNIST source model ({s.source.n_train} images)")
    source, info = source_model(s.source, None, progress, say)
    _, _, xte, yte = load_dataset("fashion-mnist")
    idx = np.sort(np.random.default_rng(s.source.seed).permutation(len(yte))[: s.adapt_images])
    x, y = grey28_to_rgb32(xte[idx]), torch.as_tensor(yte[idx])
    clean = clean_error(source, x, y)
    domains = corrupted_domains(x, y, s.corruptions, s.severity, s.source.seed)
    runs = {}
    for m in s.adapt_methods:
        run = adapt.evaluate(
            adapt.make(m, copy.deepcopy(source)),
            st.episodic(domains, s.adapt_batch),
            progress=progress,
            desc=m,
        )
        runs[m] = {k: v for k, v in run.to_dict().items() if k != "stream"}
        say(f"adapt {m}: mean error {run.mean_error:.1f} % ({run.images_per_second:.0f} images/s)")
    return {
        "corruptions": list(s.corruptions),
        "severity": s.severity,
        "images": len(y),
        "batch_size": s.adapt_batch,
        "clean_error": clean,
        "source_info": info,
        "runs": runs,
    }


# --- tables and report -------------------------------------------------------------------------------
def _fold_table(p: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    base_rate = p["rows"][0]["rate"]
    cols = ["model", "parameters", "sentences/s", "vs base", "max |Δ logits|"]
    rows = [
        {
            "model": r["model"],
            "parameters": human_count(r["params"]),
            "sentences/s": f"{r['rate']:.0f}",
            "vs base": f"{r['rate'] / base_rate:.2f}x",
            "max |Δ logits|": f"{r['max_diff']:.1e}" if "max_diff" in r else "",
        }
        for r in p["rows"]
    ]
    return rows, cols


def _merge_table(p: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    cols = ["model", *p["domains"], "mean"]
    rows = [
        {
            "model": r["row"],
            **{d: f"{r['accuracy'][d]:.3f}" for d in p["domains"]},
            "mean": f"{r['mean']:.3f}",
        }
        for r in p["rows"]
    ]
    return rows, cols


def _compress_table(p: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    cols = ["shifts", "bytes (4 files)", "smaller", *p["domains"], "mean"]
    rows = [
        {
            "shifts": r["row"],
            "bytes (4 files)": human_bytes(r["total_bytes"]),
            "smaller": f"{r['ratio']:.1f}x",
            **{d: f"{r['accuracy'][d]:.3f}" for d in p["domains"]},
            "mean": f"{r['mean']:.3f}",
        }
        for r in p["rows"]
    ]
    return rows, cols


def _adapt_table(p: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    cols = ["method", *p["corruptions"], "mean", "images/s"]
    rows = []
    for m, r in p["runs"].items():
        row = {"method": m, **{c: f"{r['errors'][c]:.1f}" for c in p["corruptions"]}}
        row.update({"mean": f"{r['mean_error']:.1f}", "images/s": f"{r['images_per_second']:.0f}"})
        rows.append(row)
    return rows, cols


def section_tables(payload: dict[str, Any]) -> list[tuple[str, str, list[dict[str, str]], list[str]]]:
    """Each section present in ``payload`` as ``(key, heading, rows, columns)``, in :data:`SECTIONS` order.

    Example:
        >>> for key, heading, rows, columns in section_tables(payload):
        ...     print(heading); print(format_table(rows, columns))
    """
    out = []
    s = payload.get("settings", {})
    if payload.get("methods"):
        heading = (
            f"learn: {s.get('model', 'minilm')} trained on {payload['train_domain']}, "
            "accuracy on each VADER domain"
        )
        out.append(("learn", heading, *table_rows(payload)))
    if "fold" in payload:
        f = payload["fold"]
        heading = (
            f"fold: the {f['method']} shift attached, then folded into the weights "
            f"({f['sentences']} sentences)"
        )
        out.append(("fold", heading, *_fold_table(f)))
    if "merge" in payload:
        m = payload["merge"]
        n = m["settings"]["n_train"]
        heading = f"merge: four LoRA experts ({n} sentences of one domain each) into one model, accuracy"
        out.append(("merge", heading, *_merge_table(m)))
    if "compress" in payload:
        heading = "compress: the four LoRA experts compressed, file bytes and own-domain accuracy kept"
        out.append(("compress", heading, *_compress_table(payload["compress"])))
    if "adapt" in payload:
        a = payload["adapt"]
        heading = (
            f"adapt: Fashion-MNIST-C stream (severity {a['severity']}, {a['images']} images per corruption), "
            "error %"
        )
        out.append(("adapt", heading, *_adapt_table(a)))
    return out


def _section_notes(key: str, payload: dict[str, Any]) -> str:
    esc = html.escape
    if key == "fold":
        f = payload["fold"]
        return (
            f"<p>The saved {esc(f['method'])} file ({esc(human_count(f['shift_params']))} parameters) was "
            "attached to the pristine base and then folded into its weights with <code>sk.fold_</code> "
            f"({f['fold_seconds'] * 1000:.0f} ms). The folded model has exactly the base's parameters and "
            "speed, and its predictions agree with the attached model's on "
            f"{100 * f['prediction_agreement']:.1f} % of the sentences. From the command line: "
            "<code>shiftkit fold runs/demo/lora.safetensors --model "
            "shiftkit.recipes.models:minilm_classifier --output runs/folded</code>.</p>"
        )
    if key == "merge":
        m = payload["merge"]
        s = m["settings"]
        return (
            "<p>θ0 is the pretrained encoder plus one linear head trained as a probe on all four domains, "
            f"then frozen; each expert is a LoRA (r={s['lora_r']}, α={s['lora_alpha']}, encoder Linears, "
            f"{esc(human_count(m['lora_params']))} parameters) trained from θ0 on one domain "
            f"({s['n_train']} sentences, {s['epochs']} epochs; {m['train_seconds']:.0f} s for the four). "
            "The merges combine the exact dense ΔW = (α/r)BA of the four experts into one model; "
            "the oracle needs all four models and the domain of every sentence. "
            f"Tested on {s['n_test']} sentences per domain.</p>"
        )
    if key == "compress":
        return (
            "<p>Each merge-section LoRA expert is compressed as its own factors: ComPEFT keeps the largest "
            "half of the entries as signs times one scale (positions bitmap-coded), binary-coding "
            "quantisation stores each factor as 3 bit-planes with float16 scales per group of 64 inputs. "
            "The compressed files load with <code>sk.load</code> and work wherever a shift does "
            "(<code>sk.apply_</code>, <code>sk.merge</code>, <code>shiftkit merge</code>); accuracy is each "
            "expert on its own domain after decompression. The full curve: "
            "<code>shiftkit bench compress-vader</code>; from the command line: "
            "<code>shiftkit compress lora.safetensors small.safetensors --density 0.1</code>.</p>"
        )
    if key == "adapt":
        a = payload["adapt"]
        return (
            "<p>Source: EfficientNet-Lite0 (ImageNet) fine-tuned on "
            f"{a['source_info']['settings']['n_train']} Fashion-MNIST images "
            f"({a['source_info']['train_seconds']:.0f} s); {a['clean_error']:.1f} % error on the clean "
            f"images of the stream. Each method predicts a batch of {a['batch_size']}, then adapts "
            "(online), and is reset at every new corruption. <code>norm</code> normalises with the test "
            "batch's statistics; "
            "TENT also updates the BatchNorm affine parameters to lower the prediction entropy. "
            "Every adapt method: <code>shiftkit bench tta-fmnist-c</code>.</p>"
        )
    return ""


def render_demo_html(payload: dict[str, Any]) -> str:
    """The demo's ``report.html``: one section per verb (no external resources, all text escaped).

    Example:
        >>> html = render_demo_html(json.loads(Path("runs/demo/results.json").read_text()))
    """
    esc = html.escape
    parts = []
    for key, heading, rows, columns in section_tables(payload):
        body = learn_section_html(payload) if key == "learn" else html_table(rows, columns)
        parts.append(f"<h2>{esc(heading)}</h2>\n{body}\n{_section_notes(key, payload)}")
    timings = payload.get("timings", {})
    spent = ", ".join(
        f"{k.removesuffix('_seconds')} {v:.0f} s" for k, v in timings.items() if k != "total_seconds"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(payload["title"])}</title>
<style>{CSS}</style></head><body>
<h1>{esc(payload["title"])}</h1>
{"".join(parts)}
<p class="note">{esc(spent)}</p>
{footer(payload)}
</body></html>
"""
