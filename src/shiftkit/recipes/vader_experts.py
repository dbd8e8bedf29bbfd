"""Per-domain VADER experts of one MiniLM: the shared start θ0, full / LoRA experts, a cache of them.

The components of ``shiftkit bench merge-vader`` and of the demo's merge section.

θ0 is the pretrained MiniLM encoder plus ONE linear head trained as a probe on the union of the four
domains' training sentences (encoder frozen). Every expert and the multi-task model start from θ0 and train
the encoder only (full fine-tuning) or a LoRA on it (r=8, α=16 on every encoder Linear, as peft-vader's LoRA
plan); the head stays frozen. So every task vector ``τ_d = θ_d − θ0`` lives in the same label space (the
same head reads the pooled features of every merged encoder), and a merge combines encoder shifts only: a
head per domain would leave nothing meaningful to merge in the last layer, and a random shared head would
make the per-domain fine-tunes learn four unrelated readouts.

Trained experts are cached under ``<cache>/merge-vader/<key>/`` (``key`` = a hash of the settings that
affect training, ``kinds`` excluded), one file per kind and domain, so a rerun with the same settings only
merges and evaluates, and a ``--kinds lora`` run's LoRA experts are reused by a later run of both kinds.

Example:
    >>> s = ExpertSettings(n_train=64)
    >>> data = load_splits(s)
    >>> experts = build_experts(data, cache_root=None)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import shiftkit as sk
from shiftkit import zoo
from shiftkit.core.shift import DELTA
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
    "DOMAINS",
    "ExpertSettings",
    "Experts",
    "VaderSplits",
    "build_experts",
    "cache_key",
    "evaluate",
    "load_splits",
    "lora_delta",
    "pooled",
    "with_delta",
]

DOMAINS: tuple[str, ...] = ("tweets", "movies", "amazon", "nyt")
Batches = list[dict[str, Tensor]]


@dataclass(frozen=True, kw_only=True)
class ExpertSettings:
    """Data and training settings of per-domain experts (counts per domain).

    Attributes:
        n_train: balanced training sentences per domain (each expert trains on one domain's). 512 as
            peft-vader: with 256 (and LoRA on query/value only) the LoRA experts barely left θ0 (in-domain
            +1 point on average), so routing between them had nothing to gain.
        n_val: validation sentences per domain, disjoint from train and test: coefficient grids, aTLAS
            and the learned router use it, never the test split.
        n_test: test sentences per domain (200: a standard error of about 2 points at 85 %).
        epochs: epochs of every expert (the multi-task model: the same epochs over the union, 4x the steps).
        full_lr: full fine-tuning's rate (peft-vader's sweep: 1e-4).
        lora_lr: LoRA's rate (peft-vader's LoRA plan: 2e-3).
        lora_r / lora_alpha: LoRA rank and α (r=8 as the LoRA plan of peft-vader; α/r = 2 as there).
        lora_targets: the LoRA's ``target_modules`` in the encoder (the head is always excluded).
            ``"all-linear"`` as peft-vader's LoRA plan (0.947 in-domain on tweets vs the probe's 0.863);
            ``query``/``value`` only gave experts too weak to specialise.
        probe_epochs / probe_lr: the θ0 head, trained on cached features (cheap, so to convergence).
        kinds: which experts to train and merge: ``"full"`` fine-tuning and/or ``"lora"``. ``--quick`` keeps
            LoRA only: merging four dense 22.7M-parameter task vectors takes minutes per method on 2 cores.
        multi_task: also train one model of each kind on the union of the domains (4x the steps).
        by_length: batch training sentences of similar length (``text_batches(by_length=True)``): the same
            sentences and epochs with less padding (about 1.5x faster on VADER's sentences); other batches,
            so other experts than without it.
        device: where to train.
    """

    model: str = "minilm"
    n_train: int = 512
    n_val: int = 64
    n_test: int = 200
    threshold: float = 0.5
    max_length: int = 64
    batch_size: int = 16
    epochs: int = 2
    seed: int = 0
    full_lr: float = 1e-4
    lora_lr: float = 2e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: str = "all-linear"
    probe_epochs: int = 30
    probe_lr: float = 5e-3
    kinds: tuple[str, ...] = ("full", "lora")
    multi_task: bool = True
    by_length: bool = False
    device: str = "cpu"


#: fields that change the trained experts (the cache key; ``by_length`` too, when on); the others only change
#: which experts exist or how they are used. ``kinds`` and ``multi_task`` are not: each kind's experts are
#: separate files of the same folder (θ0's head is shared).
TRAIN_FIELDS: tuple[str, ...] = (
    *("model", "n_train", "n_val", "threshold", "max_length", "batch_size", "epochs", "seed"),
    *("full_lr", "lora_lr", "lora_r", "lora_alpha", "lora_targets", "probe_epochs", "probe_lr"),
)


def cache_key(s: ExpertSettings) -> str:
    """A short hash of the settings that determine the experts.

    Example:
        >>> cache_key(ExpertSettings()) == cache_key(ExpertSettings(n_test=999))
        True
    """
    fields: dict[str, Any] = {k: getattr(s, k) for k in TRAIN_FIELDS}
    if s.by_length:  # only when on: keys of experts cached before the option existed stay valid
        fields["by_length"] = True
    text = json.dumps({"fields": fields, "shiftkit": sk.__version__}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass
class VaderSplits:
    """The model, its tokenised splits, and θ0's state once :func:`build_experts` has trained the head.

    ``train`` / ``val`` / ``test`` hold each domain's sentences; ``val_batches`` / ``test_batches`` are
    length-sorted evaluation batches; ``mixed`` is every domain's test sentences shuffled together (seeded)
    in batches of 64 that mix domains; ``mixed_domains`` says which domain each of its rows came from.
    """

    settings: ExpertSettings
    model: TextClassifier
    train: dict[str, EncodedTexts]
    val: dict[str, EncodedTexts]
    test: dict[str, EncodedTexts]
    val_batches: dict[str, Batches]
    test_batches: dict[str, Batches]
    mixed: Batches
    mixed_domains: list[str]
    base_state: dict[str, Tensor] = field(default_factory=dict)


def _concat(parts: list[EncodedTexts]) -> EncodedTexts:
    return EncodedTexts(
        [ids for p in parts for ids in p.input_ids], [y for p in parts for y in p.labels], parts[0].pad_id
    )


def load_splits(s: ExpertSettings) -> VaderSplits:
    """MiniLM (seeded head) and, per domain, disjoint balanced train / validation / test splits (tokenised).

    Validation sentences are the last ``n_val`` of ``zoo.vader_split``'s training part, so the test split is
    the one every VADER suite uses for the same ``n_test`` and seed.

    Example:
        >>> data = load_splits(ExpertSettings(n_train=16, n_val=8, n_test=16))
        >>> sorted(data.test), len(data.mixed_domains)
        (['amazon', 'movies', 'nyt', 'tweets'], 64)
    """
    model, tok = text_classifier(s.model, num_labels=2, seed=s.seed)
    model.to(s.device)
    tr, va, te = {}, {}, {}
    for dom in DOMAINS:
        x, y, tx, ty = zoo.vader_split(
            dom, n_train=s.n_train + s.n_val, n_test=s.n_test, threshold=s.threshold, seed=s.seed
        )
        tr[dom] = encode_texts(tok, x[: s.n_train], y[: s.n_train], s.max_length)
        va[dom] = encode_texts(tok, x[s.n_train :], y[s.n_train :], s.max_length)
        te[dom] = encode_texts(tok, tx, ty, s.max_length)
    # the mixed stream: all test sentences shuffled together, batches NOT sorted by length or domain
    items = [(ids, lab, dom) for dom in DOMAINS for ids, lab in zip(te[dom].input_ids, te[dom].labels)]
    random.Random(s.seed).shuffle(items)
    pad = te[DOMAINS[0]].pad_id
    mixed: Batches = []
    for i in range(0, len(items), 64):
        chunk = EncodedTexts([x for x, _, _ in items[i : i + 64]], [y for _, y, _ in items[i : i + 64]], pad)
        mixed += _unsorted_batches(chunk)
    return VaderSplits(
        settings=s,
        model=model,
        train=tr,
        val=va,
        test=te,
        val_batches={d: eval_batches(e) for d, e in va.items()},
        test_batches={d: eval_batches(e) for d, e in te.items()},
        mixed=mixed,
        mixed_domains=[d for _, _, d in items],
    )


def _unsorted_batches(data: EncodedTexts) -> Batches:
    # one batch in the given order: eval_batches sorts by length, which would regroup the stream
    loader = text_batches(data, batch_size=max(1, len(data)), shuffle=False)
    return list(loader)


@dataclass
class Experts:
    """θ0's head, the per-domain experts and the multi-task models, with how long each took to train.

    ``full[d]`` / ``lora_delta[d]``: dense task vectors (encoder keys only) of domain ``d``'s full and LoRA
    experts, plus ``"multi"`` for the model trained on every domain; ``lora[d]``: the LoRA shifts themselves
    (factors). ``info[name]``: ``{"seconds", "steps", "final_loss"}``; ``cached`` tells whether they were read
    from the cache.
    """

    full: dict[str, sk.Shift]
    lora: dict[str, sk.Shift]
    lora_delta: dict[str, sk.Shift]
    info: dict[str, dict[str, float]]
    cached: bool
    cache_dir: Path | None


def _lora_config(s: ExpertSettings) -> sk.ShiftConfig:
    # the head is the frozen shared readout: "all-linear" would otherwise pick it (it is no output embedding)
    return sk.LoRAConfig(
        r=s.lora_r, lora_alpha=s.lora_alpha, target_modules=s.lora_targets, exclude_modules=["head"]
    )


def lora_delta(model: TextClassifier, shift: sk.Shift) -> sk.Shift:
    """The exact dense ``ΔW = (α/r) B A`` of a LoRA shift (``shiftkit.merging.lowrank.lora_to_delta``).

    Example:
        >>> tv = lora_delta(model, sk.load("lora-tweets.safetensors"))
    """
    from shiftkit.merging.lowrank import lora_to_delta

    return lora_to_delta(shift, base=model)


def _probe_head(data: VaderSplits, say: Callable[[str], None]) -> dict[str, float]:
    s, model = data.settings, data.model
    model.eval()
    with torch.no_grad():
        feats, labels = [], []
        for b in eval_batches(_concat([data.train[d] for d in DOMAINS])):
            feats.append(model.embed(b["input_ids"].to(s.device), b["attention_mask"].to(s.device)))
            labels.append(b["labels"].to(s.device))
    tc = TrainConfig(epochs=s.probe_epochs, lr=s.probe_lr, batch_size=32, warmup_ratio=0.0, seed=s.seed)
    res = train(
        model.head,
        list(model.head.parameters()),
        tensor_batches(torch.cat(feats), torch.cat(labels), 32),
        None,
        tc,
        progress=False,
        desc="probe",
    )
    say(f"θ0 head: probe on {len(torch.cat(labels))} sentences of all domains, {res.steps} steps")
    return {"seconds": res.seconds, "steps": float(res.steps), "final_loss": res.losses[-1]}


def _train_one(
    data: VaderSplits, kind: str, texts: EncodedTexts, progress: bool | None, desc: str
) -> tuple[sk.Shift, sk.Shift | None, dict[str, float]]:
    """One expert from θ0, head frozen: (task vector | LoRA shift, None | its dense delta, info)."""
    s, model = data.settings, data.model
    model.load_state_dict(data.base_state)
    lr = s.full_lr if kind == "full" else s.lora_lr
    tc = TrainConfig(epochs=s.epochs, lr=lr, batch_size=s.batch_size, seed=s.seed, max_length=s.max_length)
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "full":
        params = list(model.encoder.parameters())
        for p in params:
            p.requires_grad_(True)
    else:
        torch.manual_seed(s.seed)  # LoRA's A is drawn at attach time
        sk.attach_(model, _lora_config(s))
        params = sk.shift_parameters(model)
    batches = text_batches(texts, s.batch_size, by_length=s.by_length)
    res = train(model, params, batches, None, tc, progress=progress, desc=desc)
    info = {"seconds": res.seconds, "steps": float(res.steps), "final_loss": res.losses[-1]}
    if kind == "full":
        tv = sk.task_vector(data.base_state, model)
        out = sk.Shift(DELTA, None, {k: v for k, v in tv.tensors.items() if k.startswith("encoder.")})
        model.load_state_dict(data.base_state)
        return out, None, info
    shift, attached = sk.extract(model), sk.to_delta(model)
    sk.detach_(model)
    model.load_state_dict(data.base_state)
    delta = lora_delta(model, shift)  # the merge input; checked against the attached shift's own delta
    info["lora_delta_max_diff"] = max(float((delta[k] - attached[k]).abs().max()) for k in attached.keys())
    return shift, delta, info


def build_experts(
    data: VaderSplits,
    cache_root: Path | None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> Experts:
    """Train (or read from the cache) θ0's head and the 4 (+ 1 multi-task) experts; sets ``data.base_state``.

    Args:
        data: from :func:`load_splits`; ``data.model`` gets θ0's head.
        cache_root: the cache folder (``<root>/merge-vader/<key>/``); ``None``: train, keep nothing.
        progress: tqdm bars (``None``: on a terminal only).
        log: receives one line per stage.

    Example:
        >>> experts = build_experts(data, Path(".cache/shiftkit"))
        >>> sorted(experts.full)
        ['amazon', 'movies', 'multi', 'nyt', 'tweets']
    """
    from safetensors.torch import load_file, save_file

    say = log or (lambda _m: None)
    s, model = data.settings, data.model
    folder = None if cache_root is None else cache_root / "merge-vader" / cache_key(s)
    names = [*DOMAINS, "multi"] if s.multi_task else list(DOMAINS)

    def stored(kind: str) -> bool:
        return folder is not None and all((folder / f"{kind}-{n}.safetensors").exists() for n in names)

    info: dict[str, dict[str, float]] = {}
    if folder is not None and (folder / "info.json").exists() and (folder / "head.safetensors").exists():
        info = json.loads((folder / "info.json").read_text())
        model.head.load_state_dict(load_file(folder / "head.safetensors"))
        say(f"θ0 head read from the cache {folder}")
    else:
        info = {"theta0_head": _probe_head(data, say)}
    data.base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shifts: dict[str, dict[str, sk.Shift]] = {"full": {}, "lora": {}}
    ldelta: dict[str, sk.Shift] = {}
    union = _concat([data.train[d] for d in DOMAINS])
    trained = False
    for kind in s.kinds:
        if folder is not None and stored(kind) and all(f"{kind}-{n}" in info for n in names):
            shifts[kind] = {n: sk.load(folder / f"{kind}-{n}.safetensors") for n in names}
            say(f"{kind} experts read from the cache {folder}")
            continue
        trained = True
        for n in names:
            t0 = time.perf_counter()
            texts = union if n == "multi" else data.train[n]
            shift, delta, info[f"{kind}-{n}"] = _train_one(data, kind, texts, progress, f"{kind}-{n}")
            shifts[kind][n] = shift
            if delta is not None:
                ldelta[n] = delta
            say(
                f"trained {kind} expert on {n}: {info[f'{kind}-{n}']['steps']:.0f} steps, "
                f"{time.perf_counter() - t0:.0f} s"
            )
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            head = {k: v.contiguous() for k, v in model.head.state_dict().items()}
            save_file(head, folder / "head.safetensors")
            for n in names:
                sk.save(shifts[kind][n], folder / f"{kind}-{n}.safetensors")
            settings = dataclasses.asdict(s)
            (folder / "settings.json").write_text(
                json.dumps({k: settings[k] for k in TRAIN_FIELDS}, indent=1)
            )
            (folder / "info.json").write_text(json.dumps(info, indent=1))  # last: marks this kind complete
    model.load_state_dict(data.base_state)
    if "lora" in s.kinds and not ldelta:
        ldelta = {n: lora_delta(model, shifts["lora"][n]) for n in names}
    full, lora = shifts["full"], shifts["lora"]
    return Experts(full, lora, ldelta, info, not trained, folder)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: dict[str, Batches]) -> dict[str, float]:
    """Accuracy of ``model`` on each domain's batches.

    Example:
        >>> evaluate(data.model, data.test_batches)["tweets"]
        0.87
    """
    return {dom: logits_accuracy(*predict(model, b)) for dom, b in batches.items()}


def pooled(acc: dict[str, float], data: VaderSplits) -> float:
    """Accuracy over every test sentence of every domain: a mixed-domain stream of the same sentences.

    Example:
        >>> pooled({"tweets": 0.9, "movies": 0.7}, data)  # equal test sizes: the mean
        0.8
    """
    n = {d: len(data.test[d]) for d in acc}
    return sum(acc[d] * n[d] for d in acc) / max(1, sum(n.values()))


@contextmanager
def with_delta(data: VaderSplits, delta: sk.Shift | None) -> Iterator[torch.nn.Module]:
    """``data.model`` set to ``θ0 + delta`` for the block, θ0 again afterwards.

    Example:
        >>> with with_delta(data, merged) as model:
        ...     acc = evaluate(model, data.val_batches)
    """
    model = data.model
    model.load_state_dict(data.base_state)
    try:
        if delta is not None:
            sk.apply_(model, delta)
        yield model
    finally:
        model.load_state_dict(data.base_state)
