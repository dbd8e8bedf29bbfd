"""Merging models whose vocabularies differ: the output tokenizer and embedding rows mapped by token.

What mergekit 0.1.5 does with ``tokenizer_source`` (or a ``tokenizer:`` block), done here the same way:

* the output vocabulary is the base's (``"base"``), one model's (a model path), or the *union*
  (``"union"``): the base's tokens in order, then every other model's tokens it lacks (regular tokens in
  their vocabulary order, then added tokens with their settings), plus the tokens the ``tokenizer:`` block
  names;
* every tensor with one row per token (input embedding, output head: 2-D, named like an embedding or a head,
  with as many rows as the model's ``vocab_size``) is rebuilt for each input with the output vocabulary's
  rows: the row of the same token string where the model has it; where it lacks it, a row chosen once per
  token from the models that have it: the only one (a token one fine-tune added keeps that fine-tune's row,
  so the merge leaves it as trained), else the base's, else their mean; a token no model has gets zeros;
  ``tokenizer: {tokens: {tok: {source: ..., force: true}}}`` chooses a token's row (a model's row for that
  token, another token's row ``{kind: model_token, model: ..., token: ...}``, or ``{kind: zero}``), ``force``
  even where every model has it;
* ``pad_to_multiple_of`` pads the rows with their mean; ``config.json``'s ``vocab_size`` is the new count;
  the tokenizer is saved with ``save_pretrained`` (with ``chat_template`` set when the recipe gives one).

The merge then runs on the rebuilt rows. One difference: mergekit orders the non-base models of a union by
a Python ``set`` (it can change between runs); here they come in recipe order.

Example:
    >>> vocab = build_vocab(recipe, checkpoints, index, jobs)   # None when nothing needs mapping
    >>> vocab.size
    49154
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError
from shiftkit.merging.stream.checkpoints import VOCAB_TENSOR, Checkpoint
from shiftkit.merging.stream.plan import Job
from shiftkit.merging.stream.recipe import ResolvedRecipe

__all__ = ["VocabMap", "build_vocab"]

_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in _TOKENIZER_MARKERS)


def _load_tokenizer(path: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as err:  # pragma: no cover - the hf extra
        raise ShiftkitError(
            f"merging vocabularies needs transformers (pip install 'shiftkit[hf]'): {err}"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as err:
        raise ShiftkitError(f"cannot load the tokenizer of {path}: {type(err).__name__}: {err}") from None


def _vocab_size(ck: Checkpoint, tok: Any) -> int:
    if ck.config_path is not None:
        cfg = json.loads(ck.config_path.read_text())
        size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
        if isinstance(size, int):
            return size
    return len(tok.get_vocab())


def _union(base_tok: Any, toks: list[tuple[Any, int]]) -> Any:
    """The base tokenizer plus every token the others have and it lacks.

    mergekit appends new tokens in ``get_vocab()`` order, which is a Rust hash map's (it changes between
    runs); here they come in input order, then token id order, so the same recipe gives the same ids.
    """
    import copy

    out_vocab: dict[str, int] = {}
    added: dict[str, Any] = {}
    for tok, size in toks:
        added_here = tok.added_tokens_decoder
        added_names = {info.content for info in added_here.values()}
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx >= size or token in added_names:
                continue
            out_vocab.setdefault(token, len(out_vocab))
        for idx, info in added_here.items():
            if idx < size:
                added.setdefault(info.content, info)
    res = copy.deepcopy(base_tok)
    base_vocab = base_tok.get_vocab()
    for token in out_vocab:
        if token not in added and token not in base_vocab:
            res.add_tokens(token)
    for info in added.values():
        res.add_tokens(info)
    return res


class VocabMap:
    """The output vocabulary and, per input checkpoint, where each output token's row comes from.

    Attributes:
        tokenizer: the output tokenizer.
        size: output rows (the vocabulary, padded to ``pad_to_multiple_of``).
        perms: per checkpoint index, the source row of every output token id (``-1``: the model lacks it).
    """

    def __init__(
        self,
        tokenizer: Any,
        perms: dict[int, list[int]],
        vocab_sizes: dict[int, int],
        vocabs: dict[int, dict[str, int]],
        base_index: int | None,
        tokens: dict[str, Any],
        pad_to: int | None,
        paths: dict[Path, int],
        chat_template: str | None,
        cks: list[Checkpoint],
    ) -> None:
        self.cks = cks
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab()
        n = len(self.vocab)
        self.size = n if not pad_to or n % pad_to == 0 else (n // pad_to + 1) * pad_to
        self.perms = perms
        self.vocab_sizes = vocab_sizes
        self.vocabs = vocabs
        self.base_index = base_index
        self.tokens = tokens
        self.paths = paths
        self.chat_template = chat_template

    def is_vocab(self, job: Job) -> bool:
        """Whether ``job``'s tensor has one row per token (rows rebuilt for the output vocabulary)."""
        ck_i, name = job.ref
        shape = self.cks[ck_i].shape(name)
        return (
            bool(VOCAB_TENSOR.search(job.out))
            and shape is not None
            and len(shape) == 2
            and shape[0] == self.vocab_sizes.get(ck_i, -1)
        )

    def shape(self, job: Job) -> tuple[int, ...]:
        """The output shape of ``job``'s tensor (more or fewer rows for vocabulary tensors)."""
        ck_i, name = job.ref
        shape = tuple(self.cks[ck_i].shape(name) or ())
        return (self.size, *shape[1:]) if self.is_vocab(job) else shape

    def _source_model(self, ref: Any) -> int:
        if isinstance(ref, dict):
            ref = ref.get("model")
        path = Path(str(ref)).resolve()
        if path not in self.paths:
            raise ShiftkitError(
                f"tokenizer.tokens names model {ref!r}, which is not one of the recipe's models"
            )
        return self.paths[path]

    def rebuild(self, job: Job, rows: dict[int, Tensor]) -> dict[int, Tensor]:
        """Each checkpoint's tensor with the output vocabulary's rows (``rows``: checkpoint index → tensor).

        Example:
            >>> out = vocab.rebuild(job, {0: base_embed, 1: tuned_embed})
        """
        models = list(rows)
        first = rows[models[0]]
        dtype, device, width = first.dtype, first.device, first.shape[1:]
        default: dict[str, Tensor] = {}
        for token, tid in self.vocab.items():
            cfg = self.tokens.get(token)
            force = bool(cfg and cfg.get("force"))
            has = [m for m in models if self.perms[m][tid] >= 0]
            if not force and len(has) == len(models):
                continue
            if cfg is not None and cfg.get("source") is not None:
                default[token] = self._configured_row(token, tid, cfg["source"], rows, width, dtype, device)
            elif len(has) == 1:
                default[token] = rows[has[0]][self.perms[has[0]][tid]]
            elif not has:
                default[token] = torch.zeros(width, dtype=dtype, device=device)
            elif self.base_index in has:
                b = self.base_index
                default[token] = rows[b][self.perms[b][tid]]
            else:
                default[token] = torch.stack([rows[m][self.perms[m][tid]] for m in has]).mean(0)
        out: dict[int, Tensor] = {}
        n = len(self.vocab)
        for m in models:
            new = torch.zeros((self.size, *width), dtype=dtype, device=device)
            perm = torch.tensor(self.perms[m], dtype=torch.long)
            keep = perm >= 0
            for token, tid in self.vocab.items():
                cfg = self.tokens.get(token)
                if cfg and cfg.get("force"):
                    keep[tid] = False
            ids = torch.arange(n)[keep]
            new[ids] = rows[m][perm[keep].to(device)]
            for token, row in default.items():
                tid = self.vocab[token]
                if not keep[tid]:
                    new[tid] = row
            if self.size > n:  # padding rows: the mean of the real ones (Hewitt, "vocab expansion")
                new[n:] = new[:n].mean(0)
            out[m] = new
        return out

    def _configured_row(
        self, token: str, tid: int, source: Any, rows: dict[int, Tensor], width: Any, dtype: Any, device: Any
    ) -> Tensor:
        if isinstance(source, dict) and source.get("kind") == "zero":
            return torch.zeros(width, dtype=dtype, device=device)
        if isinstance(source, dict) and source.get("kind") == "model_token":
            m = self._source_model(source)
            if m not in rows:
                raise ShiftkitError(f"token {token!r}: {source['model']} has no such tensor")
            if source.get("token_id") is not None:
                src_id = int(source["token_id"])
            else:
                src = source.get("token")
                if src not in self.vocabs[m]:
                    raise ShiftkitError(f"token {token!r}: {source['model']} has no token {src!r}")
                src_id = self.vocabs[m][src]
            if not 0 <= src_id < rows[m].shape[0]:
                raise ShiftkitError(f"token {token!r}: token id {src_id} is outside {source['model']}'s rows")
            return rows[m][src_id]
        m = self._source_model(source)
        if m not in rows or self.perms[m][tid] < 0:
            raise ShiftkitError(f"token {token!r}: {source} does not have it")
        return rows[m][self.perms[m][tid]]

    def save_tokenizer(self, folder: Path) -> list[Path]:
        """Write the output tokenizer (``save_pretrained``) with the recipe's chat template.

        Example:
            >>> files = vocab.save_tokenizer(Path("runs/merged"))
        """
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        before = set(folder.iterdir())
        self.tokenizer.save_pretrained(str(folder))
        return sorted(set(folder.iterdir()) - before)


def _chat_template(r: ResolvedRecipe, toks: dict[int, Any]) -> str | None:
    template = r.chat_template
    if not template:
        return None
    if template == "auto":  # the template most of the inputs have
        found = []
        for tok in toks.values():
            t = tok.chat_template
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if "{" not in template:
        raise ShiftkitError(
            "chat_template must be a Jinja template or 'auto' (mergekit's named templates are not bundled)"
        )
    return template


def build_vocab(
    r: ResolvedRecipe, cks: list[Checkpoint], index: dict[Path, int], jobs: list[Job]
) -> VocabMap | None:
    """The output vocabulary of ``r`` (``tokenizer_source`` or ``tokenizer:``) and the row maps, or ``None``
    when nothing needs mapping (the source is ``"base"``, every model has the base's vocabulary and no
    token is configured: the tokenizer files are then copied as they are).

    Raises:
        ShiftkitError: a tokenizer cannot be loaded, or the configured tokens name unknown models.
    """
    source = r.tokenizer_source
    if source is None:
        return None
    base_i = index[r.base] if r.base is not None else index[r.slices[0].inputs[0].model]
    toks: dict[int, Any] = {}
    sizes: dict[int, int] = {}
    for p, i in index.items():
        if cks[i].is_shift or not _has_tokenizer(p):
            continue
        toks[i] = _load_tokenizer(p)
        sizes[i] = _vocab_size(cks[i], toks[i])
    if base_i not in toks:
        if source == "base" and not r.tokenizer_tokens and not r.pad_to_multiple_of:
            return None  # nothing to map by token: the donor's files (if any) are copied
        raise ShiftkitError(f"{cks[base_i].path} has no tokenizer files; a vocabulary merge needs them")
    base_tok = toks[base_i]
    base_vocab = base_tok.get_vocab()
    if (
        source == "base"
        and not r.tokenizer_tokens
        and not r.pad_to_multiple_of
        and not r.chat_template
        and all(t.get_vocab() == base_vocab and sizes[i] == sizes[base_i] for i, t in toks.items())
    ):
        return None
    if any(v >= sizes[base_i] for v in base_vocab.values()):
        raise ShiftkitError(
            f"{cks[base_i].path}'s tokenizer has tokens past its config's vocab_size ({sizes[base_i]}); "
            "stripping them is not supported: fix vocab_size or the tokenizer"
        )
    if source == "base":
        out_tok = base_tok
    elif source == "union":
        order = [base_i, *[i for i in toks if i != base_i]]
        out_tok = _union(base_tok, [(toks[i], sizes[i]) for i in order])
    else:
        src_i = index.get(Path(source))
        out_tok = toks[src_i] if src_i in toks else _load_tokenizer(Path(source))
    for token in r.tokenizer_tokens or {}:
        if token not in out_tok.get_vocab():
            out_tok.add_tokens(token)
    vocab_out = out_tok.get_vocab()
    perms: dict[int, list[int]] = {}
    vocabs: dict[int, dict[str, int]] = {}
    for i in range(len(cks)):
        if cks[i].is_shift:
            continue
        v = toks[i].get_vocab() if i in toks else base_vocab  # no tokenizer: the base's, as mergekit assumes
        size = sizes.get(i, sizes[base_i])
        perm = [-1] * len(vocab_out)
        for token, new_id in vocab_out.items():
            old = v.get(token, -1)
            perm[new_id] = old if 0 <= old < size else -1
        perms[i] = perm
        vocabs[i] = v
        sizes.setdefault(i, size)
    return VocabMap(
        out_tok,
        perms,
        sizes,
        vocabs,
        base_i,
        dict(r.tokenizer_tokens or {}),
        r.pad_to_multiple_of,
        {p.resolve(): i for p, i in index.items()},
        _chat_template(r, toks),
        cks,
    )
