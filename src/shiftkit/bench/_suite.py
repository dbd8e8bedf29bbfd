"""What the VADER suites share: settings, the per-method plans, data, training rows, and a worker process.

``shiftkit demo`` runs a few methods in one process; ``shiftkit bench peft-vader`` runs each method in a
fresh worker process (``python -m shiftkit.bench._suite SPEC.json``) so that every row's peak memory is
that method's own. Both build their rows with the same functions:

* :data:`shiftkit.bench.peft_vader.PLANS`: one entry per method, its MiniLM config and learning rate;
* :func:`load_vader`: MiniLM with a seeded head, one domain's training sentences and every domain's
  test sentences, tokenised once;
* :func:`train_probe` / :func:`train_encoder`: train, test on every domain, save the shift file, load it
  onto the base and fold it (or, for methods that cannot be folded, re-attach it) and compare outputs.

Example:
    >>> data = load_vader(VaderSettings(methods=("lora",)))
    >>> row = train_encoder(data, method_plan("lora", data.settings), Path("/tmp"))
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shiftkit as sk
from shiftkit import zoo
from shiftkit.bench.peft_vader import PLANS
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

__all__ = [
    "MethodPlan",
    "RssPeak",
    "VaderData",
    "VaderSettings",
    "environment",
    "finish_row",
    "load_vader",
    "method_plan",
    "run_worker",
    "train_encoder",
    "train_probe",
    "worker_main",
]

Batches = list[dict[str, torch.Tensor]]


@dataclass(frozen=True, kw_only=True)
class VaderSettings:
    """What a VADER suite trains on and how long.

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


@dataclass(frozen=True, kw_only=True)
class MethodPlan:
    """One row: a method, its config (``None`` for probe/full) and its training settings."""

    name: str
    config: sk.ShiftConfig | None
    train: TrainConfig
    notes: str = ""


def method_plan(name: str, s: VaderSettings) -> MethodPlan:
    """Build ``name``'s :class:`MethodPlan` from ``peft_vader.PLANS`` for settings ``s``.

    Raises:
        ShiftkitError: ``name`` has no entry in ``PLANS``, or its config does not fit the method's.
        UnknownMethodError: the method is not registered.

    Example:
        >>> method_plan("lora", VaderSettings()).train.lr
        0.002
    """
    spec = PLANS.get(name)
    if spec is None:
        raise sk.ShiftkitError(f"method {name!r} has no MiniLM plan; planned: {', '.join(PLANS)}")
    base = {"epochs": max(s.epochs, spec.min_epochs), "batch_size": s.batch_size, "seed": s.seed}
    tc = TrainConfig(**{**base, "max_length": s.max_length, **spec.train, "lr": spec.lr * s.lr_scale})
    config = None
    if spec.config is not None:
        cls = sk.get_method(name).config_cls
        try:
            config = cls(**spec.config, modules_to_save=("head", *spec.also_train))
        except TypeError as err:  # a field this version of the method does not have
            raise sk.ShiftkitError(f"{name}: the plan's config does not fit {cls.__name__}: {err}") from None
    return MethodPlan(name=name, config=config, train=tc, notes=spec.notes)


@dataclass
class VaderData:
    """The model and the tokenised sentences every row of a run trains and tests on."""

    settings: VaderSettings
    model: TextClassifier
    train: EncodedTexts
    tests: dict[str, Batches]
    fold_batches: Batches
    base_state: dict[str, torch.Tensor]
    full_params: int


def load_vader(s: VaderSettings) -> VaderData:
    """MiniLM with a seeded head, ``s.train_domain``'s training sentences, every domain's test sentences.

    Example:
        >>> data = load_vader(VaderSettings(train_domain="nyt"))
        >>> sorted(data.tests)
        ['amazon', 'movies', 'nyt', 'tweets']
    """
    domains = list(zoo.VADER_DOMAINS)
    if s.train_domain not in domains:
        raise sk.ShiftkitError(f"unknown VADER domain {s.train_domain!r}; known: {', '.join(domains)}")
    model, tok = text_classifier(s.model, num_labels=2, seed=s.seed)
    model.to(s.device)
    tr_x, tr_y, _, _ = zoo.vader_split(
        s.train_domain, n_train=s.n_train, n_test=s.n_test, threshold=s.threshold, seed=s.seed
    )
    tests: dict[str, Batches] = {}
    fold_batches: Batches = []
    for dom in domains:  # each domain is tokenised once; test batches sorted by length (little padding)
        _, _, te_x, te_y = zoo.vader_split(
            dom, n_train=0, n_test=s.n_test, threshold=s.threshold, seed=s.seed
        )
        tests[dom] = eval_batches(encode_texts(tok, te_x, te_y, s.max_length))
        if dom == s.train_domain:
            n = s.fold_check
            fold_batches = eval_batches(encode_texts(tok, te_x[:n], te_y[:n], s.max_length))
    return VaderData(
        settings=s,
        model=model,
        train=encode_texts(tok, tr_x, tr_y, s.max_length),
        tests=tests,
        fold_batches=fold_batches,
        base_state={k: v.detach().clone() for k, v in model.state_dict().items()},
        full_params=sum(p.numel() for p in model.parameters()),
    )


@torch.no_grad()
def _features(model: TextClassifier, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    dev = next(model.parameters()).device
    feats = [model.embed(b["input_ids"].to(dev), b["attention_mask"].to(dev)) for b in batches]
    return torch.cat(feats), torch.cat([b["labels"] for b in batches]).to(dev)


class _Holder(nn.Module):
    """Gives a lone head the name ``head`` so the head-only task vector applies to it."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head


def train_probe(
    data: VaderData,
    plan: MethodPlan,
    stage: Path,
    progress: bool | None = None,
    during_training: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """Train a linear head on frozen features; returns its row and the trained head.

    The encoder is frozen, so its features are computed once: for training (timed as training) and for
    every test domain (timed as evaluation). The probe's "shift" is the head's task vector; adding it to
    a fresh copy of the head is its fold. ``during_training`` wraps the encoding and training.

    Example:
        >>> row, head = train_probe(data, method_plan("probe", data.settings), Path("/tmp"))
        >>> row["trainable_params"]
        770
    """
    model = data.model
    with during_training or contextlib.nullcontext():
        t = time.perf_counter()
        x, y = _features(model, eval_batches(data.train))
        encode_s = time.perf_counter() - t
        head = copy.deepcopy(model.head)
        batches = tensor_batches(x, y, plan.train.batch_size)
        res = train(head, list(head.parameters()), batches, None, plan.train, progress=progress, desc="probe")
    t = time.perf_counter()
    test_feats = {dom: _features(model, batches) for dom, batches in data.tests.items()}
    eval_s = time.perf_counter() - t
    with torch.no_grad():
        acc = {dom: logits_accuracy(head(f), lab) for dom, (f, lab) in test_feats.items()}
    path = stage / "probe.safetensors"
    sk.save(sk.task_vector(_Holder(copy.deepcopy(model.head)), _Holder(head)), path)
    fresh = _Holder(copy.deepcopy(model.head))
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
        "foldable": True,
        "max_fold_diff": diff,
        "shift_file": path.name,
        "file_bytes": path.stat().st_size,
    }
    return row, head


def train_encoder(
    data: VaderData,
    plan: MethodPlan,
    stage: Path,
    progress: bool | None = None,
    during_training: contextlib.AbstractContextManager[Any] | None = None,
) -> dict[str, Any]:
    """Train one encoder method (a shift, or full fine-tuning), test it, and check its file round trip.

    The shift is extracted, saved, loaded onto the restored base and folded into its weights;
    ``max_fold_diff`` compares those logits with the trained model's. For a method that cannot be folded
    the loaded shift is re-attached instead (``foldable`` false). Full fine-tuning saves its task vector
    and adds it to the base. The model is the pristine base again afterwards. ``during_training`` wraps
    the training loop (e.g. an :class:`RssPeak`).

    Example:
        >>> row = train_encoder(data, method_plan("ia3", data.settings), Path("/tmp"))
        >>> row["foldable"], row["max_fold_diff"] < 1e-4
        (True, True)
    """
    model = data.model
    if plan.config is not None:
        torch.manual_seed(plan.train.seed)  # LoRA's A, SSF's γ/β, ... are drawn at attach time
        sk.attach_(model, plan.config)
        params = sk.shift_parameters(model)
    else:  # full fine-tuning
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
    with during_training or contextlib.nullcontext():
        batches = text_batches(data.train, plan.train.batch_size)
        res = train(model, params, batches, None, plan.train, progress=progress, desc=plan.name)
    t = time.perf_counter()
    acc = {dom: logits_accuracy(*predict(model, batches)) for dom, batches in data.tests.items()}
    eval_s = time.perf_counter() - t
    trained_logits, _ = predict(model, data.fold_batches)
    path = stage / f"{plan.name}.safetensors"
    foldable = True
    if plan.config is not None:
        sk.save(sk.extract(model), path)
        sk.detach_(model)  # the base, bit for bit
        sk.attach_(model, sk.load(path))
        try:
            sk.fold_(model)
        except sk.NotFoldableError:
            foldable = False  # compare the re-attached shift instead
        folded_logits, _ = predict(model, data.fold_batches)
        if not foldable:
            sk.detach_(model)
    else:  # relative to the pristine base (seeded head), whatever head the run started from
        sk.save(sk.task_vector(data.base_state, model), path)
        model.load_state_dict(data.base_state)
        sk.apply_(model, sk.load(path))  # adding the task vector is the dense "fold"
        folded_logits, _ = predict(model, data.fold_batches)
    model.load_state_dict(data.base_state)  # back to the pristine base for the next method
    return {
        "method": plan.name,
        "trainable_params": sum(p.numel() for p in params),
        "accuracy": acc,
        "train_seconds": res.seconds,
        "eval_seconds": eval_s,
        "steps": res.steps,
        "final_loss": res.losses[-1],
        "foldable": foldable,
        "max_fold_diff": float((folded_logits - trained_logits).abs().max()),
        "shift_file": path.name,
        "file_bytes": path.stat().st_size,
    }


def finish_row(row: dict[str, Any], plan: MethodPlan, data: VaderData) -> dict[str, Any]:
    """Add the derived columns: share of the full parameter count, in-domain and cross-domain accuracy.

    Example:
        >>> row = finish_row(train_encoder(data, plan, stage), plan, data)
        >>> row["cross_domain_mean"]  # mean accuracy over the three domains not trained on
    """
    s = data.settings
    row["trainable_pct_of_full"] = 100.0 * row["trainable_params"] / data.full_params
    row["in_domain"] = row["accuracy"][s.train_domain]
    others = [a for dom, a in row["accuracy"].items() if dom != s.train_domain]
    row["cross_domain_mean"] = sum(others) / len(others)
    row.update(lr=plan.train.lr, epochs=plan.train.epochs, batch_size=plan.train.batch_size, notes=plan.notes)
    return row


def environment() -> dict[str, Any]:
    """Versions and threads, for the results payload.

    Example:
        >>> environment()["threads"]
        2
    """
    return {
        "torch": torch.__version__,
        "shiftkit": sk.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


# --- the worker process of `shiftkit bench peft-vader` ------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssPeak:
    """Samples this process's resident set size every ``interval`` s while active; ``peak_mb`` / ``start_mb``.

    RSS counts what the process holds: model, activations, gradients, optimiser state, allocator caches.
    Linux only (reads ``/proc/self/statm``).

    Example:
        >>> with RssPeak() as meter:
        ...     train(...)
        >>> meter.peak_mb - meter.start_mb   # growth while training, MiB
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.start_mb, self.peak_mb = interval, 0.0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __enter__(self) -> RssPeak:
        self.start_mb = self.peak_mb = _rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and test one method in this (fresh) process; the spec names the method, settings and files.

    Spec keys: ``settings`` (a :class:`VaderSettings` as a dict), ``method``, ``stage`` (folder for the
    shift file), ``head_init`` (optional trained head to start from), ``head_out`` (the probe writes its
    head there), ``progress``.

    Example:
        >>> row = run_worker({"settings": {...}, "method": "lora", "stage": "/tmp/s", "result": "/tmp/r"})
        >>> row["peak_rss_mb"], row["train_mem_mb"]
    """
    import resource

    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    fields = {**spec["settings"], "methods": tuple(spec["settings"]["methods"])}
    s = VaderSettings(**fields)
    plan = method_plan(spec["method"], s)  # before loading anything: a bad plan fails in a second
    data = load_vader(s)
    stage, progress = Path(spec["stage"]), spec.get("progress")
    meter = RssPeak() if os.path.exists("/proc/self/statm") else None
    if plan.name == "probe":
        row, head = train_probe(data, plan, stage, progress, meter)
        if spec.get("head_out"):
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, spec["head_out"])
    else:
        if spec.get("head_init"):
            data.model.head.load_state_dict(load_file(spec["head_init"]))
        row = train_encoder(data, plan, stage, progress, meter)
        row["head_init"] = "probe" if spec.get("head_init") else "random"
    row = finish_row(row, plan, data)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    row["train_mem_mb"] = None if meter is None else max(0.0, meter.peak_mb - meter.start_mb)
    row["worker_seconds"] = time.perf_counter() - t0
    row["full_params"] = data.full_params
    row["environment"] = environment()
    return row


def worker_main(argv: list[str]) -> int:
    """``python -m shiftkit.bench._suite SPEC.json``: run :func:`run_worker`, write ``spec["result"]``.

    The result is ``{"ok": True, "row": {...}}`` or ``{"ok": False, "error": ..., "traceback": ...}``.

    Example:
        >>> worker_main(["/tmp/lora.spec.json"])
        0
    """
    spec = json.loads(Path(argv[0]).read_text())
    try:
        out: dict[str, Any] = {"ok": True, "row": run_worker(spec)}
    except Exception as err:  # reported as this method's failure; the suite goes on with the next
        out = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    Path(spec["result"]).write_text(json.dumps(out, default=str))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
