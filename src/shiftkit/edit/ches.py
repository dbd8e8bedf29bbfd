"""CHES: centered hidden embedding similarity (Razin et al., "Unintentional Unalignment", ICLR 2025; spec
combine-compress.md §8). Before any preference training, it scores each (prompt, preferred, dispreferred)
triple by how alike the two responses look to the model; the most alike pairs are the ones whose DPO-style
training lowers the likelihood of the *preferred* response (likelihood displacement).

With ``h_k`` the last hidden state (after the final norm) at the position that predicts response token ``k``:
``H⁺ = Σ_k h(x, y⁺_{<k})``, ``H⁻`` likewise, ``CHES = ⟨H⁺, H⁻⟩ − ‖H⁺‖²`` and
``LN-CHES = ⟨H⁺, H⁻⟩ / (|y⁺||y⁻|) − ‖H⁺‖² / |y⁺|²``. Higher means more alike.

Prompt and response are tokenised separately and concatenated, so no token straddles the boundary; the
batches are padded here with explicit masks, so the tokenizer's padding side does not matter. Sums are taken
in float32 and the products in float64.

Example:
    >>> scores = edit.ches(model, tok, prompts, chosen, rejected)          # LN-CHES per pair
    >>> keep = edit.select_pairs(scores, m=64, quantile=0.0)              # the 64 least alike pairs
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.edit.probe import last_hidden, require_pad_token
from shiftkit.edit.registry import register_method
from shiftkit.errors import ShiftkitError

__all__ = [
    "ches",
    "ches_from_hidden",
    "edit_distance_similarity",
    "encode_pairs",
    "last_state_similarity",
    "response_sums",
    "select_pairs",
]


def _ches(h_pos: Tensor, h_neg: Tensor, n_pos: Tensor, n_neg: Tensor, length_normalized: bool) -> Tensor:
    """CHES (or LN-CHES) from summed hidden states ``(…, d)`` and response lengths ``(…)``."""
    hp, hn = h_pos.double(), h_neg.double()
    inner, sq = (hp * hn).sum(-1), (hp * hp).sum(-1)
    if length_normalized:
        n_pos, n_neg = n_pos.double(), n_neg.double()
        return inner / (n_pos * n_neg) - sq / (n_pos * n_pos)
    return inner - sq


def ches_from_hidden(h_chosen: Tensor, h_rejected: Tensor, *, length_normalized: bool = True) -> Tensor:
    """CHES of one pair from its hidden rows: ``h_chosen`` ``(|y⁺|, d)`` and ``h_rejected`` ``(|y⁻|, d)``, the
    states that predict each response token.

    Raises:
        ShiftkitError: not 2-D, different widths, or no rows.

    Example:
        >>> pos, neg = torch.tensor([[1.0, 0], [0, 1], [1, 1]]), torch.tensor([[1.0, 0], [0, 1], [0, -1]])
        >>> ches_from_hidden(pos, neg, length_normalized=False)
        tensor(-6., dtype=torch.float64)
    """
    if h_chosen.dim() != 2 or h_rejected.dim() != 2 or h_chosen.shape[1] != h_rejected.shape[1]:
        raise ShiftkitError(
            f"ches_from_hidden takes (tokens, hidden) rows of one width; got {tuple(h_chosen.shape)} and "
            f"{tuple(h_rejected.shape)}"
        )
    if h_chosen.shape[0] == 0 or h_rejected.shape[0] == 0:
        raise ShiftkitError("ches_from_hidden: a response has no tokens")
    n_pos, n_neg = torch.tensor(h_chosen.shape[0]), torch.tensor(h_rejected.shape[0])
    return _ches(h_chosen.float().sum(0), h_rejected.float().sum(0), n_pos, n_neg, length_normalized)


def _encode(tokenizer: Any, texts: Sequence[str], special: bool) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, max_length: int | None = None
) -> tuple[Tensor, Tensor, list[int], list[int]]:
    """Prompt and response tokenised apart (the prompt with the tokenizer's special tokens) and concatenated,
    so no token straddles the boundary; right-padded with the pad token.

    Returns:
        ``(input_ids, attention_mask, prompt_lengths, response_lengths)``; responses are cut so that prompt
        plus response fit in ``max_length`` tokens.

    Raises:
        ShiftkitError: prompts and responses differ in number, or the tokenizer has no pad token.
    """
    if len(prompts) != len(responses):
        raise ShiftkitError(f"{len(prompts)} prompts but {len(responses)} responses")
    pad = require_pad_token(tokenizer)
    pairs = []
    for p, r in zip(_encode(tokenizer, prompts, True), _encode(tokenizer, responses, False), strict=True):
        pairs.append((p, r if max_length is None else r[: max(0, max_length - len(p))]))
    width = max([1] + [len(p) + len(r) for p, r in pairs])
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for j, (p, r) in enumerate(pairs):
        ids[j, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[j, : len(p) + len(r)] = 1
    return ids, mask, [len(p) for p, _ in pairs], [len(r) for _, r in pairs]


def _response_states(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int,
    max_length: int,
    progress: Callable[[int, int], None] | None,
) -> Iterator[tuple[Tensor, int, int]]:
    """For each (prompt, response), in order: the last hidden states of the concatenated sequence
    ``(length, d)``, the prompt's length and the response's (after truncation to ``max_length`` tokens)."""
    if len(prompts) != len(responses):
        raise ShiftkitError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            ids, mask, n_p, n_r = encode_pairs(
                tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size], max_length=max_length
            )
            with torch.no_grad():
                hidden = last_hidden(model, ids.to(device), mask.to(device)).float().cpu()
            for j in range(len(n_p)):
                yield hidden[j, : n_p[j] + n_r[j]], n_p[j], n_r[j]
            if progress is not None:
                progress(min(i + batch_size, len(prompts)), len(prompts))
    finally:
        model.train(was_training)


def response_sums(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
    include_final_token: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """For each (prompt, response): the float32 sum of the last hidden states that predict the response's
    tokens, and how many there are (0 where the response is empty after tokenisation and truncation to
    ``max_length`` tokens, or the prompt is empty: those rows are zero).

    ``include_final_token=True`` reproduces the reference's per-example script, which also adds the state at
    the response's last token (one position more than the definition) and counts it in the length.

    Raises:
        ShiftkitError: prompts and responses differ in number, or the tokenizer has no pad token.
    """
    sums, counts = [], []
    for h, n_p, n_r in _response_states(
        model, tokenizer, prompts, responses, batch_size, max_length, progress
    ):
        # positions n_p-1 .. n_p+n_r-2 predict the response's tokens (one more with the reference's switch)
        n = n_r + (1 if include_final_token else 0) if n_p and n_r else 0
        sums.append(h[n_p - 1 : n_p - 1 + n].sum(0) if n else h.new_zeros(h.shape[-1]))
        counts.append(n)
    return torch.stack(sums), torch.tensor(counts)


def last_state_similarity(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
) -> Tensor:
    """Baseline of spec §8.2: ``⟨h⁺, h⁻⟩`` of the last hidden states at the final tokens of the two full
    sequences (higher = more alike); ``nan`` where a response is empty.

    Raises:
        ShiftkitError: the lists differ in length, or the tokenizer has no pad token.
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ShiftkitError(f"{len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    last = []
    for responses in (chosen, rejected):
        states = _response_states(model, tokenizer, prompts, responses, batch_size, max_length, None)
        last.append([h[-1] if n_r else None for h, _, n_r in states])
    return torch.tensor(
        [
            float("nan") if a is None or b is None else float(a.double() @ b.double())
            for a, b in zip(*last, strict=True)
        ],
        dtype=torch.float64,
    )


def edit_distance_similarity(tokenizer: Any, chosen: Sequence[str], rejected: Sequence[str]) -> Tensor:
    """Baseline of spec §8.2: minus the token-level edit distance of the two responses over the longer one's
    length (0 for identical responses, down to −1; higher = more alike); ``nan`` where both are empty.

    Raises:
        ShiftkitError: the lists differ in length.
    """
    if len(chosen) != len(rejected):
        raise ShiftkitError(f"{len(chosen)} chosen but {len(rejected)} rejected responses")
    out = []
    for a, b in zip(_encode(tokenizer, chosen, False), _encode(tokenizer, rejected, False), strict=True):
        if not a and not b:
            out.append(float("nan"))
            continue
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
        out.append(-row[-1] / max(len(a), len(b)))
    return torch.tensor(out, dtype=torch.float64)


@register_method("ches", kind="diagnose")
def ches(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    length_normalized: bool = True,
    batch_size: int = 16,
    max_length: int = 512,
    include_final_token: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """CHES (``length_normalized=False``) or LN-CHES of each preference pair, with the model as it is now.

    Args:
        model: a causal language model returning ``hidden_states`` (Hugging Face).
        tokenizer: its tokenizer (a pad token is needed for batching).
        prompts: the prompts ``x``.
        chosen: the preferred responses ``y⁺``.
        rejected: the dispreferred responses ``y⁻``.
        length_normalized: LN-CHES (the paper's choice for filtering) rather than CHES.
        batch_size: sequences per forward pass (each pair is two sequences).
        max_length: prompt + response tokens kept (responses are cut to fit).
        include_final_token: the reference script's off-by-one (see :func:`response_sums`).
        progress: called as ``progress(done, total)`` over the 2·N sequences.

    Returns:
        A float64 tensor with one score per pair; ``nan`` for a pair skipped because a response (or the
        prompt) is empty after tokenisation, as the reference skips them. A warning counts the skips.

    Raises:
        ShiftkitError: the three lists differ in length, or the tokenizer has no pad token.

    Example:
        >>> scores = edit.ches(model, tok, ["Q: hi"], [" Hello!"], [" Go away."])
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ShiftkitError(f"ches: {len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    n = len(prompts)
    step = None if progress is None else (lambda done, total: progress(done, 2 * n))
    step_neg = None if progress is None else (lambda done, total: progress(n + done, 2 * n))
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "max_length": max_length,
        "include_final_token": include_final_token,
    }
    h_pos, n_pos = response_sums(model, tokenizer, prompts, chosen, progress=step, **kw)
    h_neg, n_neg = response_sums(model, tokenizer, prompts, rejected, progress=step_neg, **kw)
    scores = _ches(h_pos, h_neg, n_pos, n_neg, length_normalized)
    skipped = (n_pos == 0) | (n_neg == 0)
    if bool(skipped.any()):
        warnings.warn(
            f"ches: skipped {int(skipped.sum())} of {n} pairs with an empty prompt or response after "
            "tokenisation (scored nan)",
            stacklevel=2,
        )
        scores = scores.masked_fill(skipped, math.nan)
    return scores


def select_pairs(scores: Tensor | Sequence[float], m: int, quantile: float = 0.0) -> Tensor:
    """The ``m`` pairs in a window of the ascending score order centred on ``quantile`` (spec §8.2).

    ``idx = round(q·(N−1))``, the window starts at ``max(0, idx − ⌊m/2⌋)`` and is moved left if it runs past
    the end: ``quantile=0`` gives the ``m`` least alike pairs (the paper trains on the lowest 5 % of LN-CHES),
    ``1`` the most alike. ``nan`` scores (skipped pairs) are left out.

    Returns:
        int64 indices into ``scores``, in ascending score order.

    Raises:
        ShiftkitError: ``m`` is not in ``1..N`` (N: the scored pairs), or ``quantile`` is outside [0, 1].
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    valid = (~torch.isnan(s)).nonzero().flatten()
    n = valid.numel()
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ShiftkitError(f"select_pairs: m must be an int in 1..{n} (the scored pairs), got {m!r}")
    if not 0.0 <= quantile <= 1.0:
        raise ShiftkitError(f"select_pairs: quantile must be in [0, 1], got {quantile!r}")
    order = valid[torch.sort(s[valid], stable=True).indices]
    idx = round(quantile * (n - 1))
    start = min(max(0, idx - m // 2), n - m)
    return order[start : start + m]
