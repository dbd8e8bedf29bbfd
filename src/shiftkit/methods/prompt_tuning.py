"""Prompt tuning: soft tokens prepended to the input embeddings (Lester et al., EMNLP 2021, arXiv:2104.08691).

``inputs_embeds' = [P; E(input_ids)]`` with ``P ∈ R^{p×d}`` broadcast over the batch; the model is frozen.
Semantics follow PEFT 0.21.2's task wrappers: the attention mask gets ``p`` leading ones, token-level
``labels`` ``p`` leading ``-100`` (ignored by the loss), and ``position_ids`` are dropped with a warning (the
model then numbers all ``p + T`` positions itself). The output therefore has ``p`` extra leading positions.
``token_type_ids`` depend on PEFT's task type (``PromptTuningConfig.task_type``): its sequence- and token-
classification wrappers prepend ``p`` zeros (the prompt is segment A); its causal-LM and feature-extraction
wrappers drop them with a warning, and its question-answering wrapper drops them silently (a named
argument it never passes on), so every token, the second sentence of a pair included, is segment 0.
Without a task type shiftkit prepends zeros, which keeps a sentence pair's segments; set ``task_type`` to
compute exactly what that PEFT wrapper computes.
Two documented differences, both where PEFT's wrapper cannot run: token-classification ``labels`` get the
``-100`` prefix too (PEFT leaves them one row short of the logits, which the loss rejects), and
sequence-to-sequence models are not supported.
In cached generation steps the prompt is already in the cache: only the attention mask is extended.

Not foldable: the shift lives in the input space and costs ``p`` extra tokens at inference.
With ``num_virtual_tokens=0`` the model is unchanged (the zero initialisation).

How it plugs in: the wrapper wraps the input embedding (``get_input_embeddings()`` of the transformers
model) and leaves the embedding itself unchanged; on attach it installs a forward pre-hook on the outermost
module whose ``get_input_embeddings()`` returns it, which rewrites that model's inputs as above.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from shiftkit.core.config import ShiftConfig
from shiftkit.core.registry import register_method
from shiftkit.core.targets import find_input_embeddings, input_embedding_of
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import NotFoldableError, ShiftkitError, TargetNotFoundError

__all__ = ["DROP_TOKEN_TYPES", "PREPEND_TOKEN_TYPES", "PromptTuningConfig", "PromptTuningEmbedding"]

_INITS = ("random", "sample_vocab", "text")
#: PEFT task types whose wrapper prepends ``p`` zeros to ``token_type_ids`` (None: shiftkit's default)
PREPEND_TOKEN_TYPES: tuple[str | None, ...] = (None, "SEQ_CLS", "TOKEN_CLS")
#: PEFT task types whose wrapper drops ``token_type_ids``: causal LM and feature extraction in
#: ``_adjust_prompt_learning_kwargs``, question answering by never forwarding its named argument
DROP_TOKEN_TYPES: tuple[str, ...] = ("QUESTION_ANS", "CAUSAL_LM", "FEATURE_EXTRACTION")


@dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(ShiftConfig):
    """Prompt tuning settings (PEFT's ``PromptTuningConfig``, with lower-case init names).

    ``target_modules`` may stay ``None``: the method finds the model's input embedding itself.

    Attributes:
        num_virtual_tokens: ``p``, the number of soft tokens. 20 is PEFT's customary value (Lester et al.
            report that gains flatten beyond about 20 tokens); 0 leaves the model unchanged.
        init: ``"random"``: N(0, 1) entries, like PEFT's RANDOM (an ``nn.Embedding``'s default init);
            ``"sample_vocab"``: rows of the embedding table at random token ids (PEFT's SAMPLE_VOCAB, which
            keeps the prompt on the embedding manifold); ``"text"``: the embeddings of ``init_token_ids``,
            repeated or cropped to ``p`` (PEFT's TEXT; class-label initialisation is a text prompt).
        init_token_ids: token ids for ``init="text"``; build them with :meth:`from_text`.
        init_text: the text those ids came from (a record; written to PEFT exports).
        tokenizer_name_or_path: the tokenizer that produced them (a record; written to PEFT exports).
        task_type: PEFT's task type, whose wrapper's handling of ``token_type_ids`` the shift reproduces:
            ``"SEQ_CLS"`` and ``"TOKEN_CLS"`` prepend ``p`` zeros; ``"QUESTION_ANS"``, ``"CAUSAL_LM"``
            and ``"FEATURE_EXTRACTION"`` drop them. ``None`` (default) prepends zeros. Set by
            ``sk.import_peft`` and used as the default of ``sk.export_peft``.

    Example:
        >>> sk.attach_(bert, sk.PromptTuningConfig(num_virtual_tokens=8))
        >>> out = bert(input_ids=ids, attention_mask=mask).last_hidden_state   # (B, 8 + T, d)
        >>> opt = torch.optim.AdamW(sk.shift_parameters(bert), lr=3e-2)
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_token_ids: tuple[int, ...] | None = None
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    task_type: str | None = None

    # 2: task_type (PEFT's token_type_ids handling per task wrapper); version-1 files load with None
    version: ClassVar[int] = 2
    #: the task types whose PEFT wrapper prepends zeros to / drops ``token_type_ids`` (for interop)
    PREPEND_TOKEN_TYPES: ClassVar[tuple[str | None, ...]] = PREPEND_TOKEN_TYPES
    DROP_TOKEN_TYPES: ClassVar[tuple[str, ...]] = DROP_TOKEN_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_type not in (*PREPEND_TOKEN_TYPES, *DROP_TOKEN_TYPES):
            raise ShiftkitError(
                f"PromptTuningConfig.task_type must be None or one of "
                f"{[t for t in (*PREPEND_TOKEN_TYPES, *DROP_TOKEN_TYPES) if t]}, got {self.task_type!r} "
                "(sequence-to-sequence prompt tuning is not supported)"
            )
        p = self.num_virtual_tokens
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ShiftkitError(f"PromptTuningConfig.num_virtual_tokens must be an integer >= 0, got {p!r}")
        if self.init not in _INITS:
            raise ShiftkitError(f"PromptTuningConfig.init must be one of {_INITS}, got {self.init!r}")
        ids = self.init_token_ids
        if ids is not None:
            if isinstance(ids, str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ShiftkitError(f"PromptTuningConfig.init_token_ids must be a list of ints, got {ids!r}")
            ids = tuple(ids)
            object.__setattr__(self, "init_token_ids", ids)
            if self.init != "text":
                raise ShiftkitError("PromptTuningConfig.init_token_ids is only used with init='text'")
            if not ids or min(ids) < 0:
                raise ShiftkitError(
                    f"PromptTuningConfig.init_token_ids must be ids >= 0 (non-empty), got {ids}"
                )
        if self.init == "text" and ids is None:
            raise ShiftkitError(
                "PromptTuningConfig(init='text') needs init_token_ids; build it with "
                "PromptTuningConfig.from_text(tokenizer, text)"
            )

    @classmethod
    def from_text(
        cls, tokenizer: Any, text: str, *, num_virtual_tokens: int = 20, **fields: Any
    ) -> PromptTuningConfig:
        """A ``init="text"`` config whose prompt starts as the embeddings of ``text``.

        The text is tokenized as PEFT does (``tokenizer(text)["input_ids"]``, special tokens included);
        the ids are repeated or cropped to ``num_virtual_tokens`` at attach time.

        Args:
            tokenizer: a transformers tokenizer (any callable returning ``{"input_ids": [...]}``).
            text: the initial prompt, e.g. ``"Classify the sentiment of this review:"``.
            num_virtual_tokens: ``p``.
            **fields: other config fields (``target_modules``, ``modules_to_save``, ...).

        Example:
            >>> cfg = sk.PromptTuningConfig.from_text(tok, "Is this review positive?", num_virtual_tokens=8)
            >>> sk.attach_(model, cfg)
        """
        ids = tokenizer(text)["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if not ids:
            raise ShiftkitError(f"the tokenizer turned {text!r} into no tokens")
        name = getattr(tokenizer, "name_or_path", None)
        return cls(
            num_virtual_tokens=num_virtual_tokens,
            init="text",
            init_token_ids=tuple(int(i) for i in ids),
            init_text=text,
            tokenizer_name_or_path=name if isinstance(name, str) and name else None,
            **fields,
        )


def _init_prompt(weight: Tensor, config: PromptTuningConfig) -> Tensor:
    p = config.num_virtual_tokens
    vocab, dim = weight.shape
    with torch.no_grad():
        if config.init == "random" or p == 0:
            return torch.randn(p, dim, dtype=weight.dtype, device=weight.device)
        if config.init == "sample_vocab":
            ids = torch.randint(0, vocab, (p,), device=weight.device)
        else:
            assert config.init_token_ids is not None
            given = list(config.init_token_ids)
            if max(given) >= vocab:
                raise ShiftkitError(
                    f"init_token_ids contain id {max(given)}; the vocabulary has {vocab} rows"
                )
            # PEFT: crop a long text to p tokens, repeat a short one until it covers p
            ids = torch.tensor((given * math.ceil(p / len(given)))[:p], device=weight.device)
        return weight[ids].detach().clone()


class PromptTuningEmbedding(ShiftWrapper):
    """The input embedding of a transformers model with a prompt ``prompt_embeddings (p, d)``.

    Its own forward is the base embedding, unchanged: the prompt is prepended by a forward pre-hook on the
    model that owns the embedding (installed by :meth:`on_attach`), which embeds ``input_ids`` itself and
    passes ``inputs_embeds = [P; E(input_ids)]`` of shape ``(B, p + T, d)`` instead.
    """

    def __init__(self, base: nn.Embedding, config: PromptTuningConfig) -> None:
        super().__init__(base)
        self.num_virtual_tokens = config.num_virtual_tokens
        self.drop_token_types = config.task_type in DROP_TOKEN_TYPES
        self.prompt_embeddings = nn.Parameter(_init_prompt(base.weight, config))
        # hook id and owner path, not the handle: a deep copy of the model copies the owner's hook dict
        # (same id, the bound method re-bound to the copied wrapper), and on_detach finds it by id
        self._hook: tuple[str, int] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``ids (...) -> (..., d)``: the base embedding."""
        return self.base(x)

    def effective_params(self) -> dict[str, Tensor]:
        """Nothing: the embedding table is unchanged."""
        return {}

    def delta(self) -> dict[str, Tensor]:
        """Prompt tuning changes the inputs, not the weights: there is no weight delta."""
        raise NotFoldableError("prompt tuning shifts the inputs, not the weights: it has no weight delta")

    def on_attach(self, root: nn.Module, name: str) -> None:
        """Install the input-rewriting pre-hook on the outermost model whose input embedding is this one."""
        owner_name = next(
            (n for n, m in root.named_modules() if input_embedding_of(m) is self),
            None,
        )
        if owner_name is None:
            raise ShiftkitError(f"prompt tuning: no module's get_input_embeddings() returns {name!r}")
        owner = root.get_submodule(owner_name)
        handle = owner.register_forward_pre_hook(self._prepend_prompt, with_kwargs=True)
        self._hook = (owner_name, handle.id)

    def on_detach(self, root: nn.Module, name: str) -> None:
        """Remove the pre-hook (a no-op if :meth:`on_attach` never ran)."""
        if self._hook is None:
            return
        owner_name, hook_id = self._hook
        owner = root.get_submodule(owner_name)
        owner._forward_pre_hooks.pop(hook_id, None)
        owner._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        self._hook = None

    def _prepend_prompt(
        self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self.num_virtual_tokens == 0:
            return None  # the zero initialisation: leave every input exactly as it was
        args, kwargs = _as_keywords(owner, args, kwargs)
        p = self.num_virtual_tokens
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            return None
        if kwargs.get("position_ids") is not None:
            warnings.warn(
                "prompt tuning ignores position_ids (as PEFT does): the model numbers the prompt and the "
                "input positions itself",
                stacklevel=2,
            )
            kwargs["position_ids"] = None
        # the model derives cache positions from the (longer) inputs itself, as in PEFT's generate
        kwargs.pop("cache_position", None)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor):
            if mask.dim() != 2:
                raise ShiftkitError(
                    f"prompt tuning needs a 2-D attention mask, got shape {tuple(mask.shape)}"
                )
            # the mask always covers the user's tokens only (also in cached generation steps)
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
        if _cache_length(kwargs.get("past_key_values")) > 0:
            return args, kwargs  # a generation step after the first: the prompt is in the cache already
        if embeds is None:
            embeds = self.base(ids)
        batch = embeds.shape[0]
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        kwargs["input_ids"] = None
        types = kwargs.get("token_type_ids")
        if isinstance(types, Tensor) and self.drop_token_types:
            warnings.warn(
                "prompt tuning ignores token_type_ids with a question-answering, causal-LM or "
                "feature-extraction task type (as PEFT's wrappers for these task types do)",
                stacklevel=2,
            )
            kwargs["token_type_ids"] = None
        elif isinstance(types, Tensor):
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, p), types], dim=1)
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor) and _token_labels(labels, embeds.shape[1]):  # causal-LM labels
            kwargs["labels"] = torch.cat([labels.new_full((batch, p), -100), labels], dim=1)
        return args, kwargs


def _as_keywords(
    owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn positional arguments of ``owner.forward`` into keywords (``model(ids, mask)`` is common)."""
    if not args:
        return args, dict(kwargs)
    sig = inspect.signature(owner.forward)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return args, dict(kwargs)  # let the model's own forward report the bad call
    rest: tuple[Any, ...] = ()
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            rest = tuple(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return rest, out


def _token_labels(labels: Tensor, length: int) -> bool:
    # one integer label per input token; class labels and (B, num_labels) multi-label targets stay as they are
    return labels.dim() == 2 and not labels.is_floating_point() and labels.shape[1] == length


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        return int(length())
    if isinstance(cache, tuple | list) and cache and cache[0] is not None:  # legacy tuple caches
        return int(cache[0][0].shape[-2])
    return 0


@register_method(
    "prompt_tuning",
    config=PromptTuningConfig,
    targets=(nn.Embedding,),
    foldable=False,
    zero_init={"num_virtual_tokens": 0},
    default_targets="all",
    group=True,  # needs the root: only an embedding some model returns from get_input_embeddings() counts
)
def wrap_group(
    root: nn.Module, targets: list[tuple[str, nn.Module]], config: ShiftConfig
) -> list[ShiftWrapper | None]:
    """Give each input embedding among ``targets`` a prompt; other targeted embeddings stay untouched."""
    assert isinstance(config, PromptTuningConfig)
    owners = find_input_embeddings(root)
    if not owners:
        raise TargetNotFoundError(
            f"prompt tuning needs a transformers-style model with get_input_embeddings(); "
            f"{type(root).__name__} has none"
        )
    if not any(id(m) in owners for _, m in targets):
        raise TargetNotFoundError(
            "prompt tuning wraps the model's input embedding, which target_modules did not select "
            f"(selected: {[n for n, _ in targets][:5]})"
        )
    out: list[ShiftWrapper | None] = []
    for fqn, module in targets:
        if id(module) not in owners:
            out.append(None)  # declined: an embedding that is not an input embedding (BERT's positions)
            continue
        owner_name, owner = owners[id(module)]
        if "inputs_embeds" not in inspect.signature(owner.forward).parameters:
            raise ShiftkitError(
                f"prompt tuning needs a forward that accepts inputs_embeds; {owner_name or 'the model'} "
                f"({type(owner).__name__}) owning {fqn!r} does not"
            )
        out.append(PromptTuningEmbedding(module, config))  # type: ignore[arg-type]
    return out
