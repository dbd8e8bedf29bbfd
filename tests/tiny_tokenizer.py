"""A character tokenizer for tiny language models in tests: the Hugging Face call signature, nothing else.

Ids: ``0`` is a real character (``"a"``), so code that takes id 0 for padding (a reference quirk) miscounts;
``1`` is the pad token and ``2`` the BOS token that ``add_special_tokens=True`` puts first. Every other
character maps to ``3 + ord(c) % (vocab - 3)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class CharTokenizer:
    """``tok(texts, padding=, truncation=, max_length=, return_tensors=, add_special_tokens=)``."""

    def __init__(self, vocab: int = 50, pad: bool = True, padding_side: str = "right") -> None:
        self.vocab = vocab
        self.pad_token_id: int | None = 1 if pad else None
        self.bos_token_id = 2
        self.padding_side = padding_side

    def encode_one(self, text: str, special: bool = True) -> list[int]:
        ids = [0 if c == "a" else 3 + ord(c) % (self.vocab - 3) for c in text]
        return ([self.bos_token_id] if special else []) + ids

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> dict[str, Any]:
        one = isinstance(texts, str)
        rows = [self.encode_one(t, add_special_tokens) for t in ([texts] if one else texts)]
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding:
            if self.pad_token_id is None:
                raise ValueError("no pad token")
            width = max(len(r) for r in rows)
            fill = [[self.pad_token_id] * (width - len(r)) for r in rows]
            zeros = [[0] * (width - len(r)) for r in rows]
            if self.padding_side == "left":
                rows = [f + r for f, r in zip(fill, rows, strict=True)]
                masks = [z + m for z, m in zip(zeros, masks, strict=True)]
            else:
                rows = [r + f for f, r in zip(fill, rows, strict=True)]
                masks = [m + z for z, m in zip(zeros, masks, strict=True)]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}
        return {"input_ids": rows[0] if one else rows, "attention_mask": masks[0] if one else masks}

    def batch_decode(self, rows: Any, skip_special_tokens: bool = False) -> list[str]:
        """Ids back to text: ``0`` is ``"a"``, other ids map to letters (not the inverse of encoding)."""
        special = {self.pad_token_id, self.bos_token_id}
        out = []
        for row in rows:
            ids = [int(i) for i in row if not (skip_special_tokens and int(i) in special)]
            out.append(
                "".join("a" if i == 0 else chr(ord("b") + (i - 3) % 25) if i >= 3 else " " for i in ids)
            )
        return out
