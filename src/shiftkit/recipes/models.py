"""Classifiers built on zoo encoders: :class:`TextClassifier` (mean-pooled last hidden state, then one linear
head) and :class:`ImageClassifier` (an image network fed ``(x − 0.5) / 0.5``).

The head is the only new module, so shift methods train it beside their shift through
``modules_to_save=("head",)`` and a linear probe trains it alone.

Example:
    >>> model, tok = text_classifier("minilm", num_labels=2, seed=0)
    >>> batch = tok(["what a great film"], return_tensors="pt")
    >>> model(batch["input_ids"], batch["attention_mask"]).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from shiftkit.core.functional import mean_pool
from shiftkit.errors import ShiftkitError

__all__ = ["TEXT_ENCODERS", "ImageClassifier", "TextClassifier", "minilm_classifier", "text_classifier"]

#: zoo models that :func:`text_classifier` can build on
TEXT_ENCODERS: tuple[str, ...] = ("minilm",)


class TextClassifier(nn.Module):
    """``head(mean_pool(encoder(input_ids, attention_mask)))``: logits for ``num_labels`` classes.

    The encoder is any module called as ``encoder(input_ids=..., attention_mask=...)`` that returns the
    token states ``(batch, seq, hidden)``, either directly or as ``.last_hidden_state`` (Hugging Face).
    A BERT pooler is dropped from the encoder: mean pooling never uses it, and its weights would otherwise
    count as trainable parameters that get no gradient.

    Args:
        encoder: the text encoder (modified in place: its ``pooler`` is set to ``None`` if it has one).
        num_labels: number of classes.
        hidden_size: width of the token states; read from ``encoder.config.hidden_size`` when omitted.
        seed: seed of the head's initialisation (the global RNG is left untouched), so a shift trained on
            one instance fits a fresh one built with the same seed.

    Example:
        >>> enc, tok = zoo.load_model("minilm")
        >>> model = TextClassifier(enc, num_labels=2, seed=0)
    """

    def __init__(self, encoder: nn.Module, num_labels: int, *, hidden_size: int | None = None, seed: int = 0):
        super().__init__()
        if num_labels < 1:
            raise ShiftkitError(f"num_labels must be >= 1, got {num_labels}")
        if hidden_size is None:
            hidden_size = getattr(getattr(encoder, "config", None), "hidden_size", None)
            if not isinstance(hidden_size, int):
                raise ShiftkitError(
                    f"cannot tell the hidden size of {type(encoder).__name__}: pass hidden_size=..."
                )
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # type: ignore[assignment]
        self.encoder = encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = nn.Linear(hidden_size, num_labels)

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean-pooled sentence features.

        Args:
            input_ids: token ids, shape ``(batch, seq)``.
            attention_mask: 1 for real tokens, 0 for padding, shape ``(batch, seq)``.

        Returns:
            Features, shape ``(batch, hidden)``.
        """
        out: Any = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out if isinstance(out, Tensor) else out.last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Class logits.

        Args:
            input_ids: token ids, shape ``(batch, seq)``.
            attention_mask: 1 for real tokens, 0 for padding, shape ``(batch, seq)``.

        Returns:
            Logits, shape ``(batch, num_labels)``.
        """
        return self.head(self.embed(input_ids, attention_mask))


def text_classifier(name: str = "minilm", num_labels: int = 2, seed: int = 0) -> tuple[TextClassifier, Any]:
    """Build a :class:`TextClassifier` on a zoo text encoder, in eval mode, with its tokenizer.

    Args:
        name: a zoo text encoder (see :data:`TEXT_ENCODERS`).
        num_labels: number of classes.
        seed: seed of the head's initialisation.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ShiftkitError: ``name`` is not a text encoder of the zoo.
        AssetNotFoundError: the encoder is not installed.

    Example:
        >>> model, tok = text_classifier("minilm", num_labels=2, seed=0)
        >>> sum(p.numel() for p in model.head.parameters())
        770
    """
    if name not in TEXT_ENCODERS:
        raise ShiftkitError(
            f"{name!r} is not a zoo text encoder; text classifiers are built on: {', '.join(TEXT_ENCODERS)}"
        )
    from shiftkit import zoo

    encoder, tokenizer = zoo.load_model(name)
    return TextClassifier(encoder, num_labels, seed=seed).eval(), tokenizer


def minilm_classifier() -> tuple[TextClassifier, Any]:
    """The binary MiniLM sentiment classifier of ``shiftkit demo`` and ``shiftkit learn`` (seed 0).

    A ``module:function`` model spec for the command line, e.g. to fold a demo shift:
    ``shiftkit fold runs/demo/lora.safetensors --model shiftkit.recipes.models:minilm_classifier ...``.

    Example:
        >>> model, tok = minilm_classifier()
    """
    return text_classifier("minilm", num_labels=2, seed=0)


class ImageClassifier(nn.Module):
    """EfficientNet-Lite0 taking RGB images in ``[0, 1]``: ``net((x − 0.5) / 0.5)``.

    Example:
        >>> clf = ImageClassifier(net); clf(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in ``[0, 1]`` → ``(N, K)`` logits."""
        out: Tensor = self.net((x - 0.5) / 0.5)
        return out
