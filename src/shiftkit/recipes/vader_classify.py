"""Train MiniLM sentiment classifiers on one VADER domain with any shift method, and test every domain.

The components of the VADER suites (``shiftkit bench peft-vader``, ``shiftkit demo``): each method's plan
(:data:`PLANS`: its MiniLM config and learning rate), :func:`load_vader` (MiniLM with a seeded head, one
domain's training sentences and every domain's test sentences, tokenised once), :func:`train_probe` and
:func:`train_encoder` (train, test on every domain, save the shift file, load it onto the base and fold it,
or re-attach it when the method cannot be folded, and compare outputs).

Example:
    >>> data = load_vader(VaderSettings(methods=("lora",)))
    >>> row = train_encoder(data, method_plan("lora", data.settings), Path("/tmp"))
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shiftkit as sk
from shiftkit import zoo
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
    "PLANS",
    "MethodPlan",
    "PlanSpec",
    "VaderData",
    "VaderSettings",
    "finish_row",
    "load_vader",
    "method_plan",
    "train_encoder",
    "train_probe",
]


@dataclass(frozen=True, kw_only=True)
class PlanSpec:
    """One method's entry of :data:`PLANS` (plain data: the worker builds the config from it).

    Attributes:
        lr: peak learning rate (before ``lr_scale``).
        notes: one line for the report.
        config: keyword arguments of the method's registered config (``None``: probe / full fine-tuning);
            ``modules_to_save`` gets ``head`` (and ``also_train``) added.
        also_train: modules trained in full beside the shift and the head (Houlsby's LayerNorms).
        min_epochs: at least this many epochs (the probe trains on cached features, so it can afford many).
        train: other :class:`~shiftkit.recipes.learn.TrainConfig` overrides.
    """

    lr: float
    notes: str
    config: dict[str, Any] | None = None
    also_train: tuple[str, ...] = ()
    min_epochs: int = 0
    train: dict[str, Any] = field(default_factory=dict)


# MiniLM (BertModel) module names: encoder.layer.N.attention.self.{query,key,value},
# attention.output.dense, intermediate.dense, output.dense. Learning rates of probe/full/lora/ssf/bitfit come
# from a sweep of three rates per method over 3 seeds (512 tweets, 2 epochs): each is the best in-domain or
# within 1 point of it. Methods that train vectors only (SSF, BitFit, IA3, SVFit) take larger steps.
# The other methods started from the demo's rates (2e-3 for matrices, 5e-3 for vectors); where that left a
# method at the probe's accuracy (tweets, seed 0, probe in-domain 0.863), one to three larger rates were
# tried and the comment beside it gives the in-domain accuracies seen (single runs, ±1.5 points).
PLANS: dict[str, PlanSpec] = {
    "probe": PlanSpec(
        lr=5e-3,
        notes="linear head on cached mean-pooled features",
        min_epochs=30,  # a linear head on frozen, cached features: cheap, so it trains to convergence
        train={"batch_size": 32, "warmup_ratio": 0.0},
    ),
    "full": PlanSpec(lr=1e-4, notes="every encoder weight and the head"),
    # On query/value only (0.33 % of the parameters) LoRA stayed 1.8 points below full fine-tuning
    # in-domain (3 seeds); on every Linear it matches it, with 1.5 % of the parameters.
    "lora": PlanSpec(
        lr=2e-3,
        notes="r=8, alpha=16 on every encoder Linear + head",
        config={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    ),
    "ssf": PlanSpec(
        lr=5e-3, notes="scale+shift after every Linear and LayerNorm + head", config={"target_modules": "all"}
    ),
    "bitfit": PlanSpec(lr=5e-3, notes="every bias + head", config={"target_modules": "all"}),
    # 5e-3: 0.863 (no change from the probe), 2e-2: 0.858, 2e-1: 0.920. δ moves the kept singular values
    # (0.45-6.1 in MiniLM's query/value, ~255 of 384 kept at 99 % energy) by absolute amounts, one
    # rank-1 direction each: it needs far larger steps than SSF's per-channel scales.
    "svfit": PlanSpec(
        lr=2e-1,
        notes="top singular values (99 % energy) of query/value + head",
        config={"target_modules": ["query", "value"], "energy": 0.99},
    ),
    # 5e-3: 0.887, 2e-2: 0.897
    "ia3": PlanSpec(
        lr=2e-2, notes="(IA)3 scales on key, value, FFN output (PEFT's BERT default) + head", config={}
    ),
    "adapter": PlanSpec(
        lr=2e-3,
        notes="bottleneck 64 after attention.output.dense and output.dense + LayerNorms + head",
        config={"bottleneck": 64, "target_modules": ["attention.output.dense", "output.dense"]},
        also_train=("LayerNorm",),
    ),
    "prompt_tuning": PlanSpec(lr=3e-2, notes="20 virtual tokens + head", config={"num_virtual_tokens": 20}),
    "linear_adapter": PlanSpec(
        lr=2e-3,
        notes="linear (foldable) adapters on query/key/value/intermediate.dense + head",
        config={"target_modules": ["query", "key", "value", "intermediate.dense"]},
    ),
    # With PEGOConfig's λ = 1e-3 (the reference's, for CLIP ViT-B) the L1 orthogonality term (a sum over
    # 384×384 entries per matrix) pinned B at 0: 0.865 at lr 2e-3, 0.855 at 8e-3, 0.853 at 2e-2. λ = 1e-5:
    # 0.900; λ = 0 (plain grouped LoRA): 0.908.
    "pego": PlanSpec(
        lr=2e-3,
        notes="4 LoRAs of rank 4 on query/value, orthogonality loss (λ 1e-5) + head",
        config={"r": 4, "num_modules": 4, "target_modules": ["query", "value"], "lam": 1e-5},
    ),
    # query/value only (D = 1.8M, a 2^21-entry Fastfood transform): over every transformer layer (D = 10.6M,
    # 2^24 entries) one step took 30 s instead of 1.2 s on 2 busy cores (the base step: 0.15 s).
    # 1e-2: 0.870, 4e-2: 0.870, 1e-1: 0.877 (the intrinsic-dim suite's rate too).
    "subspace": PlanSpec(
        lr=1e-1,
        notes="1000-dim random (Fastfood) subspace of query/value weights and biases + head",
        config={"dim": 1000, "target_modules": ["query", "value"]},
    ),
    # Not tuned on this suite yet: full fine-tuning's rate (with Adam the shared array moves each weight by
    # about lr·σ/a per step, σ/a ≈ 1 for MiniLM's Linears).
    "rps": PlanSpec(
        lr=1e-4,
        notes="one shared array of 1 % of the encoder Linears (STABLE-RPS, shift mode) + head",
        config={"compression": 0.01, "target_modules": "all-linear", "exclude_modules": ["head"]},
    ),
    # Not tuned on this suite yet: LoRA's rate; the mask reaches 50 % sparsity over the default run's 64
    # steps (cubic schedule driven by the training forwards).
    "pst": PlanSpec(
        lr=2e-3,
        notes="PST on the encoder Linears, cubic schedule to 50 % sparsity over 64 steps + head",
        config={
            "sparsity": 0.5,
            "total_steps": 64,
            "target_modules": "all-linear",
            "exclude_modules": ["head"],
        },
    ),
    # It trains the tied blocks' full weights: at LoRA's 2e-3 the model collapsed to chance (loss ln 2);
    # 1e-4 (full fine-tuning's rate): 0.913, 3e-4: 0.902.
    "recursive": PlanSpec(
        lr=1e-4,
        notes="layers tied into shared blocks looped twice, depth-wise LoRA + head",
        config={"num_loops": 2},
    ),
}


Batches = list[dict[str, torch.Tensor]]


@dataclass(frozen=True, kw_only=True)
class VaderSettings:
    """What a VADER suite trains on and how long.

    Attributes:
        train_domain: tweets, by default: its sentences are the shortest (fastest on 2 cores) and MiniLM
            features separate its sentiment best (0.87 in-domain for a logistic-regression probe on 800
            embeddings), while movie and Amazon review snippets are a real shift away from it.
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
    """Build ``name``'s :class:`MethodPlan` from ``PLANS`` for settings ``s``.

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
