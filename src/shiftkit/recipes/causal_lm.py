"""Causal language-model chores the recipes and suites share: batches for the next-token loss, perplexity,
sampled continuations, response log-probabilities and a short DPO run.

Example:
    >>> batches = lm_batches(tok, held_out_texts, batch_size=16, max_length=64)
    >>> perplexity(model, batches)
    31.4
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.edit.ches import encode_pairs
from shiftkit.errors import ShiftkitError

__all__ = [
    "DPOSettings",
    "dpo_train",
    "generate",
    "lm_batches",
    "perplexity",
    "response_logprobs",
]


def lm_batches(tok: Any, texts: Sequence[str], batch_size: int, max_length: int) -> list[dict[str, Tensor]]:
    """Causal-LM batches: ``input_ids``, ``attention_mask`` and ``labels`` (padding ignored: -100)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def perplexity(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every real token of ``batches``."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            target = b["labels"][:, 1:]
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                target.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(nll)
            count += int((target != -100).sum())
    return math.exp(total / max(count, 1))


@torch.no_grad()
def generate(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    max_new_tokens: int = 24,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 64,
) -> list[str]:
    """Sampled continuations (text after the prompt), ``samples`` per prompt, prompt-major order.

    The same seed gives the same random stream, so an edited and an unedited model are compared on equal
    draws. The tokenizer is used with left padding (restored afterwards).
    """
    side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            queue = [p for p in prompts for _ in range(samples)]
            for i in range(0, len(queue), batch_size):
                enc = tok(queue[i : i + batch_size], return_tensors="pt", padding=True)
                ids = model.generate(  # type: ignore[operator]
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    top_p=top_p,
                    temperature=1.0,
                    pad_token_id=tok.pad_token_id,
                )
                out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def _pair_batch(tok: Any, prompts: Sequence[str], responses: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded prompt+response ids, attention mask and a mask of the response's target positions."""
    ids, mask, n_p, n_r = encode_pairs(tok, prompts, responses)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for j, (p, r) in enumerate(zip(n_p, n_r, strict=True)):
        target[j, p : p + r] = True
    return ids, mask, target


def _logprobs(model: nn.Module, ids: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * target[:, 1:]).sum(-1)


def response_logprobs(
    model: nn.Module, tok: Any, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 16
) -> Tensor:
    """``log π(response | prompt)`` summed over the response's tokens, one float per pair (no gradient)."""
    model.eval()
    rows = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            rows.append(
                _logprobs(
                    model, *_pair_batch(tok, prompts[i : i + batch_size], responses[i : i + batch_size])
                )
            )
    return torch.cat(rows)


@dataclass(frozen=True)
class DPOSettings:
    """A short DPO run (Rafailov et al., 2023): ``−log σ(β[(log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) −
    log π_ref(y⁻))])``, full fine-tuning with Adam.

    Attributes:
        epochs: passes over the pairs.
        batch_size: pairs per step.
        lr: Adam learning rate.
        beta: DPO's β.
        seed: batch order.
    """

    epochs: int = 2
    batch_size: int = 8
    lr: float = 1e-6
    beta: float = 0.1
    seed: int = 0


def dpo_train(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    settings: DPOSettings = DPOSettings(),
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Train ``model`` in place with DPO on the pairs (the reference model is ``model`` as given); returns the
    loss of every step.

    Raises:
        ShiftkitError: no pairs, or lists of different lengths.
    """
    n = len(prompts)
    if n == 0 or not n == len(chosen) == len(rejected):
        raise ShiftkitError(f"dpo_train: {n} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    ref_pos = response_logprobs(model, tok, prompts, chosen)
    ref_neg = response_logprobs(model, tok, prompts, rejected)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    gen = random.Random(settings.seed)
    steps = settings.epochs * math.ceil(n / settings.batch_size)
    losses: list[float] = []
    model.train()
    for _ in range(settings.epochs):
        order = list(range(n))
        gen.shuffle(order)
        for i in range(0, n, settings.batch_size):
            b = order[i : i + settings.batch_size]
            xs, pos_ys, neg_ys = ([seq[j] for j in b] for seq in (prompts, chosen, rejected))
            pos = _logprobs(model, *_pair_batch(tok, xs, pos_ys))
            neg = _logprobs(model, *_pair_batch(tok, xs, neg_ys))
            margin = (pos - ref_pos[b]) - (neg - ref_neg[b])
            loss = -F.logsigmoid(settings.beta * margin).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(len(losses), steps)
    model.eval()
    return losses
