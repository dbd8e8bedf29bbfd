"""Model Surgery's behaviour probe (Wang et al., NAACL 2025; spec learn.md §11.1): a two-class linear probe on
a frozen language model's mean-pooled last hidden state, whose undesired-class weight row is the direction
the edit writes into the model.

The features are the last entry of ``hidden_states`` (after the final norm in Hugging Face decoders), averaged
over the real tokens given by the attention mask. The reference masks padding by token id 0 instead, which
drops real tokens of tokenizers whose id 0 is a word; we follow the attention mask.

Example:
    >>> probe = edit.train_probe(model, tok, texts, labels)      # label 1 = the behaviour to remove
    >>> probe.accuracy, probe.direction.shape
    (0.87, torch.Size([576]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.core.functional import mean_pool
from shiftkit.errors import ShiftkitError

__all__ = ["Probe", "hidden_features", "last_hidden", "require_pad_token", "train_probe"]


def require_pad_token(tokenizer: Any) -> int:
    """The tokenizer's pad token id.

    Raises:
        ShiftkitError: the tokenizer has none (batches of different lengths could not be padded).
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ShiftkitError(
            "the tokenizer has no pad token, so texts of different lengths cannot be batched; set one "
            "first, e.g. tokenizer.pad_token = tokenizer.eos_token"
        )
    return int(pad)


def last_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    states = getattr(out, "hidden_states", None)
    if not states:
        raise ShiftkitError(
            f"{type(model).__name__} returned no hidden_states; the probe needs a model that accepts "
            "output_hidden_states=True (a Hugging Face causal LM)"
        )
    return states[-1]


@torch.no_grad()
def hidden_features(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Mean-pooled last hidden state of each text (padding masked by the attention mask), float32.

    Batches are padded on the right whatever the tokenizer's ``padding_side``, so each text's features do
    not depend on the others in its batch.

    Args:
        model: a language model called as ``model(input_ids=, attention_mask=, output_hidden_states=True)``.
        tokenizer: its tokenizer (a pad token is needed).
        texts: the texts.
        batch_size: texts per forward pass.
        max_length: tokens kept per text.
        progress: called as ``progress(done, total)`` after each batch.

    Returns:
        ``(len(texts), hidden)`` features.

    Raises:
        ShiftkitError: no texts, no pad token, or a model without hidden states.
    """
    if len(texts) == 0:
        raise ShiftkitError("hidden_features: no texts given")
    require_pad_token(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    # right padding: the real tokens keep positions 0..n-1 (left padding would shift them in models that
    # number positions from the first column)
    side = getattr(tokenizer, "padding_side", None)
    if side is not None:
        tokenizer.padding_side = "right"
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            mask = enc["attention_mask"].to(device)
            hidden = last_hidden(model, enc["input_ids"].to(device), mask)
            rows.append(mean_pool(hidden.float(), mask).cpu())
            if progress is not None:
                progress(min(i + batch_size, len(texts)), len(texts))
    finally:
        model.train(was_training)
        if side is not None:
            tokenizer.padding_side = side
    return torch.cat(rows)


@dataclass(frozen=True)
class Probe:
    """A trained two-class probe: ``logits = features @ weight.T + bias``; class 1 is the undesired behaviour.

    Attributes:
        weight: ``(2, hidden)`` weight rows.
        bias: ``(2,)`` biases.
        accuracy: accuracy on the held-out split.
        train_accuracy: accuracy on the training split.
        n_train: texts it was trained on.
        n_held_out: texts it was tested on.
    """

    weight: Tensor
    bias: Tensor
    accuracy: float
    train_accuracy: float
    n_train: int
    n_held_out: int

    @property
    def direction(self) -> Tensor:
        """The raw (unnormalised) weight row of the undesired class, as the reference uses it."""
        return self.weight[1]

    def logits(self, features: Tensor) -> Tensor:
        """Logits of ``(n, hidden)`` features."""
        return features.float() @ self.weight.T + self.bias

    def undesired(self, features: Tensor) -> Tensor:
        """Probability of the undesired class for each row of ``features``."""
        return self.logits(features).softmax(-1)[:, 1]

    def score_texts(self, model: nn.Module, tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> Tensor:
        """Probability of the undesired class for each text (features from ``model``; see
        :func:`hidden_features` for ``kwargs``)."""
        return self.undesired(hidden_features(model, tokenizer, texts, **kwargs))


def _accuracy(probe_logits: Tensor, labels: Tensor) -> float:
    return float((probe_logits.argmax(-1) == labels).float().mean()) if labels.numel() else float("nan")


def train_probe(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] | Tensor,
    *,
    epochs: int = 10,
    lr: float = 1e-4,
    batch_size: int = 32,
    held_out: float = 0.2,
    seed: int = 0,
    max_length: int = 128,
    features: Tensor | None = None,
) -> Probe:
    """Train the behaviour probe of Model Surgery on a frozen language model.

    The model's features are computed once (it stays frozen); the linear probe is trained with Adam on
    log-softmax + NLL, the reference's loss (lr 1e-4, 10 epochs by default).

    Args:
        model: the language model (unchanged).
        tokenizer: its tokenizer (must have a pad token).
        texts: training texts.
        labels: 0 (acceptable) or 1 (undesired: the behaviour the edit should remove) per text.
        epochs: passes over the training split.
        lr: Adam learning rate.
        batch_size: probe batch size (and forward batch size for the features).
        held_out: fraction of the texts kept out of training to measure ``accuracy`` (0 < held_out < 1).
        seed: the split, the probe's initialisation and the batch order.
        max_length: tokens kept per text.
        features: precomputed :func:`hidden_features` of ``texts`` (skips the forward passes).

    Returns:
        The :class:`Probe`, with its held-out accuracy.

    Raises:
        ShiftkitError: texts and labels of different lengths, a label other than 0/1, a class without
            examples, a ``held_out`` outside (0, 1), or a tokenizer without a pad token.

    Example:
        >>> probe = train_probe(model, tok, ["awful", "lovely", ...], [1, 0, ...])
        >>> shift = edit.surgery(model, probe.direction, k=0.02)
    """
    y = torch.as_tensor(list(labels) if not isinstance(labels, Tensor) else labels).long().flatten()
    if len(texts) != y.numel():
        raise ShiftkitError(f"train_probe: {len(texts)} texts but {y.numel()} labels")
    if y.numel() and not bool(((y == 0) | (y == 1)).all()):
        raise ShiftkitError(
            f"train_probe: labels must be 0 (acceptable) or 1 (undesired); got {sorted(set(y.tolist()))}"
        )
    if int((y == 1).sum()) < 2 or int((y == 0).sum()) < 2:
        raise ShiftkitError(
            f"train_probe needs at least two texts of each class; got {int((y == 0).sum())} of class 0 "
            f"and {int((y == 1).sum())} of class 1"
        )
    if not 0 < held_out < 1:
        raise ShiftkitError(f"train_probe: held_out is a fraction in (0, 1), got {held_out!r}")
    if epochs < 1 or batch_size < 1:
        raise ShiftkitError(f"train_probe: epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    feats = (
        features.float()
        if features is not None
        else hidden_features(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    )
    if feats.shape[0] != y.numel():
        raise ShiftkitError(f"train_probe: {feats.shape[0]} feature rows for {y.numel()} labels")
    gen = torch.Generator().manual_seed(seed)
    # a stratified split, so both classes are in both parts
    test_idx, train_idx = [], []
    for c in (0, 1):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = max(1, round(held_out * idx.numel()))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(feats.shape[1], 2)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        order = tr[torch.randperm(tr.numel(), generator=gen)]
        for i in range(0, order.numel(), batch_size):
            b = order[i : i + batch_size]
            loss = nn.functional.nll_loss(torch.log_softmax(head(feats[b]), -1), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
        logits = feats @ weight.T + bias
    return Probe(
        weight, bias, _accuracy(logits[te], y[te]), _accuracy(logits[tr], y[tr]), tr.numel(), te.numel()
    )
