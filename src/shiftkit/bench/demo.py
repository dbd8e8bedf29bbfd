"""``shiftkit demo``: five ways to adapt MiniLM to one VADER sentiment domain, evaluated on all four.

A linear probe, full fine-tuning, LoRA, SSF and BitFit are trained on the same sentences of one domain
(binary sentiment, ``|score| > 0.5``) and tested on held-out sentences of every domain, so the table shows
both the in-domain fit and what survives the shift to the other three domains. Every shift is extracted,
saved as one file, loaded back onto the base, folded into its weights, and compared with the model it was
trained as: the reported ``max |folded - attached|`` is the whole round trip file → fold.

Work is shared where it can be: each domain is tokenised once, test batches are sorted by length (little
padding), and the probe trains on sentence features computed once. Outputs are staged in a temporary folder
and moved into place only when everything has finished, so an interrupted run leaves no partial outputs.

Example:
    >>> payload = run_demo(DemoSettings(), "runs/demo")
    >>> payload["methods"][0]["method"]
    'probe'
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shiftkit as sk
from shiftkit import zoo
from shiftkit.bench.report import write_report
from shiftkit.recipes.learn import (
    EncodedTexts,
    TrainConfig,
    encode_texts,
    eval_batches,
    logits_accuracy,
    predict,
    tensor_batches,
    text_batches,
    train,
)
from shiftkit.recipes.models import TextClassifier, text_classifier

__all__ = ["DemoSettings", "MethodPlan", "default_plans", "quick_settings", "run_demo"]


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """What the demo trains on and how long.

    Attributes:
        train_domain: tweets, by default: its sentences are the shortest (fastest on 2 cores) and MiniLM
            features separate its sentiment best (ASSETS.md: 0.87 in-domain for a probe), while movie and
            Amazon review snippets are a real shift away from it.
        n_train: balanced training sentences.
        n_test: balanced test sentences per domain (400: a standard error of about 1.3 points at 90 %).
        max_length: tokens kept per sentence (tweets average 23 tokens; 64 truncates almost nothing).
        batch_size: training batch size.
        epochs: training epochs of the encoder methods (the probe trains many more, on cached features).
        seed: data split, head initialisation, shuffling and dropout.
        fold_check: test sentences (of the training domain) used to compare folded and attached outputs.
        lr_scale: multiplies every method's learning rate (for tuning experiments).
        lp_ft: start every encoder method from the probe's trained head ("LP-FT", Kumar et al. 2022,
            arXiv:2202.10054) instead of a random one. A random head learns slowly at the small learning
            rates that suit the encoder, in a few dozen steps (LoRA at lr 1e-3, seed 0: 0.865 in-domain from a
            random head, 0.910 from the probe's); the probe is trained anyway, so this costs nothing.
        device: where to train (``"cpu"``, ``"cuda"``).
        methods: which rows to run, in order; the probe must come first for ``lp_ft``.
    """

    model: str = "minilm"
    train_domain: str = "tweets"
    n_train: int = 512
    n_test: int = 400
    threshold: float = 0.5
    max_length: int = 64
    batch_size: int = 16
    epochs: int = 2
    seed: int = 0
    fold_check: int = 64
    lr_scale: float = 1.0
    lp_ft: bool = True
    device: str = "cpu"
    methods: tuple[str, ...] = ("probe", "full", "lora", "ssf", "bitfit")


def quick_settings() -> DemoSettings:
    """A seconds-long variant for tests: a few sentences, one short epoch."""
    return DemoSettings(n_train=32, n_test=16, max_length=32, epochs=1, fold_check=8)


@dataclass(frozen=True, kw_only=True)
class MethodPlan:
    """One row of the demo: a method, its config (``None`` for probe/full) and its training settings."""

    name: str
    config: sk.ShiftConfig | None
    train: TrainConfig
    notes: str = ""


def default_plans(s: DemoSettings) -> list[MethodPlan]:
    """The five methods with their learning rates (why each was chosen is in the notes)."""

    # Learning rates from a sweep of three rates per method over 3 seeds (512 tweets, 2 epochs): each is
    # the best in-domain or within 1 point of it. SSF and BitFit train vectors only: larger steps.
    def tc(lr: float, **kw: Any) -> TrainConfig:
        base = {"epochs": s.epochs, "batch_size": s.batch_size, "seed": s.seed, "max_length": s.max_length}
        return TrainConfig(**{**base, "lr": lr * s.lr_scale, **kw})

    head = ("head",)
    plans = {
        "probe": MethodPlan(
            name="probe",
            config=None,
            # a linear head on frozen, cached features: cheap, so it trains to convergence
            train=tc(5e-3, epochs=max(30, s.epochs), batch_size=32, warmup_ratio=0.0),
            notes="linear head on cached mean-pooled features",
        ),
        "full": MethodPlan(
            name="full",
            config=None,
            train=tc(1e-4),
            notes="every encoder weight and the head",
        ),
        "lora": MethodPlan(
            name="lora",
            # On query/value only (0.33 % of the parameters) LoRA stayed 1.8 points below full fine-tuning
            # in-domain (3 seeds); on every Linear it matches it, with 1.5 % of the parameters.
            config=sk.LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=head),
            train=tc(2e-3),
            notes="r=8, alpha=16 on every encoder Linear + head",
        ),
        "ssf": MethodPlan(
            name="ssf",
            config=sk.SSFConfig(target_modules="all", modules_to_save=head),
            train=tc(5e-3),
            notes="scale+shift after every Linear and LayerNorm + head",
        ),
        "bitfit": MethodPlan(
            name="bitfit",
            config=sk.BitFitConfig(target_modules="all", modules_to_save=head),
            train=tc(5e-3),
            notes="every bias + head",
        ),
    }
    unknown = [m for m in s.methods if m not in plans]
    if unknown:
        raise sk.ShiftkitError(f"unknown demo method(s) {unknown}; known: {', '.join(plans)}")
    return [plans[m] for m in s.methods]


@torch.no_grad()
def _features(
    model: TextClassifier, batches: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    dev = next(model.parameters()).device
    feats = [model.embed(b["input_ids"].to(dev), b["attention_mask"].to(dev)) for b in batches]
    return torch.cat(feats), torch.cat([b["labels"] for b in batches]).to(dev)


class _Holder(nn.Module):
    """Gives a lone head the name ``head`` so the head-only task vector applies to it."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head


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
    if s.train_domain not in domains:
        raise sk.ShiftkitError(f"unknown VADER domain {s.train_domain!r}; known: {', '.join(domains)}")
    say(f"loading {s.model} and VADER ({', '.join(domains)}); training on {s.train_domain}")
    model, tok = text_classifier(s.model, num_labels=2, seed=s.seed)
    model.to(s.device)
    tr_x, tr_y, _, _ = zoo.vader_split(
        s.train_domain, n_train=s.n_train, n_test=s.n_test, threshold=s.threshold, seed=s.seed
    )
    train_data = encode_texts(tok, tr_x, tr_y, s.max_length)
    tests: dict[str, list[dict[str, torch.Tensor]]] = {}
    fold_data: EncodedTexts | None = None
    for dom in domains:
        _, _, te_x, te_y = zoo.vader_split(
            dom, n_train=0, n_test=s.n_test, threshold=s.threshold, seed=s.seed
        )
        tests[dom] = eval_batches(encode_texts(tok, te_x, te_y, s.max_length))
        if dom == s.train_domain:
            fold_data = encode_texts(tok, te_x[: s.fold_check], te_y[: s.fold_check], s.max_length)
    assert fold_data is not None
    fold_batches = eval_batches(fold_data)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full_params = sum(p.numel() for p in model.parameters())
    timings: dict[str, float] = {"setup_seconds": time.perf_counter() - t0}

    rows: list[dict[str, Any]] = []
    head_init: dict[str, torch.Tensor] | None = None
    for plan in default_plans(s):
        say(f"{plan.name}: {plan.notes}")
        t = time.perf_counter()
        if plan.name == "probe":
            row, probe_head = _probe(model, plan, train_data, tests, stage, progress)
            head_init = probe_head.state_dict() if s.lp_ft else None
        else:
            if head_init is not None:
                model.head.load_state_dict(head_init)
            row = _encoder_method(model, plan, train_data, tests, fold_batches, base_state, stage, progress)
            row["head_init"] = "probe" if head_init is not None else "random"
        row["total_seconds"] = time.perf_counter() - t
        row["trainable_pct_of_full"] = 100.0 * row["trainable_params"] / full_params
        row["in_domain"] = row["accuracy"][s.train_domain]
        others = [row["accuracy"][d] for d in domains if d != s.train_domain]
        row["cross_domain_mean"] = sum(others) / len(others)
        row.update(
            lr=plan.train.lr, epochs=plan.train.epochs, batch_size=plan.train.batch_size, notes=plan.notes
        )
        rows.append(row)
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
        "full_params": full_params,
        "methods": rows,
        "timings": timings,
        "environment": {
            "torch": torch.__version__,
            "shiftkit": sk.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }


def _probe(
    model: TextClassifier,
    plan: MethodPlan,
    train_data: EncodedTexts,
    tests: dict[str, list[dict[str, torch.Tensor]]],
    stage: Path,
    progress: bool | None,
) -> tuple[dict[str, Any], nn.Module]:
    # The encoder is frozen, so its features are computed once: for training (timed as training) and for
    # every test domain (timed as evaluation).
    t = time.perf_counter()
    x, y = _features(model, eval_batches(train_data))
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    test_feats = {dom: _features(model, batches) for dom, batches in tests.items()}
    eval_s = time.perf_counter() - t
    base_head: nn.Module = model.head
    head = copy.deepcopy(base_head)
    res = train(
        head,
        list(head.parameters()),
        tensor_batches(x, y, plan.train.batch_size),
        None,
        plan.train,
        progress=progress,
        desc="probe",
    )
    with torch.no_grad():
        acc = {dom: logits_accuracy(head(f), lab) for dom, (f, lab) in test_feats.items()}
    # The probe's "shift" is the task vector of the head; applying it to a fresh copy is its fold.
    delta = sk.task_vector(_Holder(copy.deepcopy(base_head)), _Holder(head))
    path = stage / "probe.safetensors"
    sk.save(delta, path)
    fresh = _Holder(copy.deepcopy(base_head))
    sk.apply_(fresh, sk.load(path))
    with torch.no_grad():
        feats = torch.cat([f for f, _ in test_feats.values()])
        diff = float((fresh.head(feats) - head(feats)).abs().max())
    row = {
        "method": "probe",
        "trainable_params": sum(p.numel() for p in head.parameters()),
        "accuracy": acc,
        "train_seconds": encode_s + res.seconds,
        "eval_seconds": eval_s,
        "steps": res.steps,
        "final_loss": res.losses[-1],
        "max_fold_diff": diff,
        "shift_file": path.name,
        "file_bytes": path.stat().st_size,
    }
    return row, head


def _encoder_method(
    model: nn.Module,
    plan: MethodPlan,
    train_data: EncodedTexts,
    tests: dict[str, list[dict[str, torch.Tensor]]],
    fold_batches: list[dict[str, torch.Tensor]],
    base_state: dict[str, torch.Tensor],
    stage: Path,
    progress: bool | None,
) -> dict[str, Any]:
    if plan.config is not None:
        torch.manual_seed(plan.train.seed)  # LoRA's A and SSF's γ/β are drawn at attach time
        sk.attach_(model, plan.config)
        params = sk.shift_parameters(model)
    else:  # full fine-tuning
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
    res = train(
        model,
        params,
        text_batches(train_data, plan.train.batch_size),
        None,
        plan.train,
        progress=progress,
        desc=plan.name,
    )
    t = time.perf_counter()
    acc = {dom: logits_accuracy(*predict(model, batches)) for dom, batches in tests.items()}
    eval_s = time.perf_counter() - t
    trained_logits, _ = predict(model, fold_batches)
    path = stage / f"{plan.name}.safetensors"
    if plan.config is not None:
        sk.save(sk.extract(model), path)
        sk.detach_(model)  # the base, bit for bit
        sk.attach_(model, sk.load(path))
        sk.fold_(model)
    else:  # relative to the pristine base (seeded head), whatever head the run started from
        sk.save(sk.task_vector(base_state, model), path)
        model.load_state_dict(base_state)
        sk.apply_(model, sk.load(path))  # adding the task vector is the dense "fold"
    folded_logits, _ = predict(model, fold_batches)
    model.load_state_dict(base_state)  # back to the pristine base for the next method
    return {
        "method": plan.name,
        "trainable_params": sum(p.numel() for p in params),
        "accuracy": acc,
        "train_seconds": res.seconds,
        "eval_seconds": eval_s,
        "steps": res.steps,
        "final_loss": res.losses[-1],
        "max_fold_diff": float((folded_logits - trained_logits).abs().max()),
        "shift_file": path.name,
        "file_bytes": path.stat().st_size,
    }
