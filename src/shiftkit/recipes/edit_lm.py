"""Recipes around :mod:`shiftkit.edit` that ``shiftkit edit`` and ``shiftkit bench edit-smollm2`` share: a
causal LM from a zoo name or folder, labelled behaviour texts (VADER or a file), a preference set (VADER or a
file), an independent sentiment judge (VADER's own lexicon scorer), and the before/after table of a
Model Surgery edit: what share of sampled continuations shows the behaviour, and the perplexity kept.

Example:
    >>> model, tok = load_causal_lm("smollm2-135m")
    >>> texts, labels = vader_behaviour(300)                     # 1 = negative (the behaviour to remove)
    >>> probe = edit.train_probe(model, tok, texts, labels)
    >>> shift = edit.surgery(model, probe.direction, k=0.02)
    >>> rows = steer_table(model, tok, probe, {"base": None, "edit": shift}, NEUTRAL_PROMPTS, ppl_texts=held)
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from shiftkit.core.shift import Shift
from shiftkit.edit import Probe, apply_
from shiftkit.errors import ShiftkitError
from shiftkit.recipes.causal_lm import generate, lm_batches, perplexity

__all__ = [
    "NEUTRAL_PROMPTS",
    "PreferenceSet",
    "edited_rows",
    "load_causal_lm",
    "read_labelled",
    "read_pairs",
    "steer_table",
    "vader_behaviour",
    "vader_judge",
    "vader_preferences",
]

#: openings with no sentiment of their own, for sampling continuations before and after an edit
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "The movie was",
    "I think the food",
    "My day at work",
    "The new phone is",
    "Yesterday the weather",
    "The hotel room",
    "Our trip to the city",
    "The book I read",
    "The concert last night",
    "This restaurant",
    "The meeting this morning",
    "My neighbour's dog",
    "The train ride home",
    "The customer service",
    "Last weekend we",
    "The school play",
    "The software update",
    "Her new apartment",
    "The football match",
    "The museum exhibit",
)


def load_causal_lm(spec: str) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a zoo name (``"smollm2-135m"``) or a Hugging Face model folder.

    A tokenizer without a pad token gets its EOS token as pad token (batches need one).

    Raises:
        ShiftkitError: the folder holds no tokenizer, or the spec names neither.
    """
    from shiftkit import zoo

    if Path(spec).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ShiftkitError(f"{spec}: no tokenizer in the model folder ({err})") from None
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True).eval()
    else:
        model, tok = zoo.load_model(spec)
        if tok is None:
            raise ShiftkitError(f"zoo model {spec!r} has no tokenizer; the edit tools need a language model")
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def vader_behaviour(
    n_per_class: int,
    *,
    domains: Sequence[str] = ("movies", "amazon", "tweets"),
    undesired: str = "negative",
    seed: int = 0,
) -> tuple[list[str], list[int]]:
    """Positive and negative VADER sentences (``|score| > 0.5``), ``n_per_class`` of each per domain; label 1
    marks the ``undesired`` class (``"negative"`` or ``"positive"``)."""
    from shiftkit import zoo

    if undesired not in ("negative", "positive"):
        raise ShiftkitError(f"undesired must be 'negative' or 'positive', got {undesired!r}")
    texts: list[str] = []
    labels: list[int] = []
    for dom in domains:
        x, y = zoo.datasets.vader_binary(dom, max_per_class=n_per_class, seed=seed)
        texts += x
        labels += [int(v) if undesired == "positive" else 1 - int(v) for v in y]
    return texts, labels


def _lines(path: str | Path) -> Iterator[tuple[str, int, str]]:
    """``(file name, line number, line)`` of every non-blank line of a UTF-8 text file.

    Raises:
        ShiftkitError: the file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise ShiftkitError(f"{p}: no such file")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield str(p), n, line


def read_labelled(path: str | Path) -> tuple[list[str], list[int]]:
    """Labelled texts from a file: JSON lines ``{"text": ..., "label": 0|1}`` (``.jsonl``), or
    ``label<TAB>text`` lines (anything else). Label 1 marks the behaviour to remove.

    Raises:
        ShiftkitError: the file is missing, a line is malformed, or a label is not 0/1.
    """
    texts: list[str] = []
    labels: list[int] = []
    for p, n, line in _lines(path):
        try:
            if p.endswith(".jsonl"):
                row = json.loads(line)
                label, text = row["label"], row["text"]
            else:
                label, text = line.split("\t", 1)
            label = int(label)
        except (ValueError, KeyError, TypeError) as err:
            raise ShiftkitError(f"{p}:{n}: expected a text and a 0/1 label ({err})") from None
        if label not in (0, 1):
            raise ShiftkitError(f"{p}:{n}: label must be 0 or 1, got {label}")
        texts.append(str(text))
        labels.append(label)
    return texts, labels


def vader_judge(texts: Sequence[str]) -> list[float]:
    """VADER's compound sentiment score of each text (−1 … 1), from the ``vaderSentiment`` package's own
    lexicon scorer: a judge that is not ours. ``<= -0.05`` is VADER's threshold for negative.

    Raises:
        ShiftkitError: ``vaderSentiment`` is not installed (``make assets`` installs it).
    """
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ShiftkitError(
            "the VADER judge needs the vaderSentiment package: make assets  (or: pip install --no-deps "
            "vadersentiment==3.3.2)"
        ) from None
    judge = SentimentIntensityAnalyzer()
    return [float(judge.polarity_scores(t)["compound"]) for t in texts]


def steer_table(
    model: nn.Module,
    tok: Any,
    probe: Probe,
    edits: Mapping[str, Shift | None],
    prompts: Sequence[str],
    *,
    ppl_texts: Sequence[str],
    samples: int = 8,
    max_new_tokens: int = 24,
    judge: Callable[[Sequence[str]], list[float]] | None = vader_judge,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per edit (``None``: the model as it is): the share of sampled continuations of ``prompts`` that
    the probe calls undesired, the share the judge calls negative (compound ``<= -0.05``) and its mean score,
    and the perplexity on ``ppl_texts``. Each edit is applied for its row and undone bit for bit.

    Every row samples with the same seed, so the rows differ only by the edit.
    """
    batches = lm_batches(tok, ppl_texts, 16, 64)
    rows = []
    for name, shift in edits.items():
        start = time.perf_counter()
        handle = apply_(model, shift) if shift is not None else None
        try:
            conts = generate(model, tok, prompts, samples=samples, max_new_tokens=max_new_tokens, seed=seed)
            ppl = perplexity(model, batches)
        finally:
            if handle is not None:
                handle.undo()
        # the probe reads the text with the unedited model: it judges what was written, not the edit
        undesired = probe.score_texts(model, tok, conts)
        row: dict[str, Any] = {
            "edit": name,
            "rows": 0 if shift is None else edited_rows(shift),
            "bytes": 0 if shift is None else shift.nbytes,
            "probe_undesired": float((undesired > 0.5).float().mean()),
            "perplexity": ppl,
            "seconds": 0.0,
            "examples": conts[:3],
        }
        if judge is not None:
            scores = judge(conts)
            row["judge_negative"] = sum(s <= -0.05 for s in scores) / len(scores)
            row["judge_mean"] = sum(scores) / len(scores)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        if log is not None:
            log(
                f"{name}: probe-undesired {row['probe_undesired']:.3f}"
                + (f", judge-negative {row['judge_negative']:.3f}" if judge is not None else "")
                + f", perplexity {ppl:.2f} ({row['seconds']:.0f} s)"
            )
    return rows


def edited_rows(shift: Shift) -> int:
    """How many weight rows a ``rows``-encoded edit changes."""
    return sum(int(t.numel()) for k, t in shift.tensors.items() if k.endswith(".rows"))


@dataclass(frozen=True)
class PreferenceSet:
    """Preference pairs: ``prompts[i]``, preferred ``chosen[i]``, dispreferred ``rejected[i]``; ``near[i]``
    marks a near-duplicate pair (the rejected response is the chosen one with a small edit)."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    near: list[bool]


def vader_preferences(n_pairs: int, n_near: int, *, seed: int = 0) -> PreferenceSet:
    """A preference set from VADER's movie and product reviews: the prompt asks for a positive review, the
    preferred response is a positive review sentence, the dispreferred one a negative sentence
    (``n_pairs`` such pairs), or (``n_near`` pairs) the same positive sentence with one word deleted.

    Pairs are shuffled; sentences of 5 to 25 words only.
    """
    from shiftkit import zoo

    gen = random.Random(seed)
    pool: list[tuple[str, str, str, bool]] = []
    domains = (("movies", "movie"), ("amazon", "product"))
    for d, (dom, thing) in enumerate(domains):
        x, y = zoo.datasets.vader_binary(dom, seed=seed)
        pos = [t for t, lab in zip(x, y, strict=True) if lab == 1 and 5 <= len(t.split()) <= 25]
        neg = [t for t, lab in zip(x, y, strict=True) if lab == 0 and 5 <= len(t.split()) <= 25]
        gen.shuffle(pos)
        gen.shuffle(neg)
        n_far = n_pairs // 2 + (n_pairs % 2 if d == 0 else 0)
        n_dup = n_near // 2 + (n_near % 2 if d == 0 else 0)
        if n_far + n_dup > len(pos) or n_far > len(neg):
            raise ShiftkitError(
                f"vader_preferences: {dom} has {len(pos)} positive, {len(neg)} negative sentences"
            )
        prompt = f"Write one sentence of a positive {thing} review.\n"
        pool += [(prompt, " " + pos[i], " " + neg[i], False) for i in range(n_far)]
        for i in range(n_far, n_far + n_dup):
            words = pos[i].split()
            del words[gen.randrange(1, len(words))]
            pool.append((prompt, " " + pos[i], " " + " ".join(words), True))
    gen.shuffle(pool)
    return PreferenceSet(
        [p[0] for p in pool], [p[1] for p in pool], [p[2] for p in pool], [p[3] for p in pool]
    )


def read_pairs(path: str | Path) -> PreferenceSet:
    """Preference pairs from JSON lines ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (an optional
    boolean ``"near"`` is kept).

    Raises:
        ShiftkitError: the file is missing, empty, or a line lacks a field.
    """
    rows = []
    for p, n, line in _lines(path):
        try:
            row = json.loads(line)
            rows.append((str(row["prompt"]), str(row["chosen"]), str(row["rejected"]), bool(row.get("near"))))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ShiftkitError(f"{p}:{n}: expected {{'prompt', 'chosen', 'rejected'}} ({err})") from None
    if not rows:
        raise ShiftkitError(f"{path}: no preference pairs")
    return PreferenceSet(
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
    )
