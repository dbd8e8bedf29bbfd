"""Router queries: the features ``q(x) ∈ R^{B×D}`` a router reads, computed on the frozen base model.

A query function is ``query_fn(model, *args, **kwargs) -> (B, D)``, called with the routed model and the
arguments of its forward while routing is off (see :mod:`shiftkit.merging.routing.attach`). For text
encoders the usual query is the mean-pooled last hidden state over the unmasked tokens,
``q(x) = Σ_t m_t h_t / Σ_t m_t`` — FedIns (https://arxiv.org/abs/2308.06051) uses the [CLS] state of a
separate frozen ViT instead; any module can be passed to :func:`hf_mean_pool_query` to do the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from shiftkit.core.functional import mean_pool
from shiftkit.errors import ShiftkitError

__all__ = ["QueryFn", "call_args", "default_query", "hf_mean_pool_query", "mean_pool"]

#: ``query_fn(model, *args, **kwargs) -> (B, D)``: called with the model and its forward arguments
QueryFn = Callable[..., Tensor]


def call_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward arguments from a batch's inputs: a tensor, a tuple/list (positional) or a dict (keyword).

    Example:
        >>> call_args({"input_ids": ids, "attention_mask": mask})
        ((), {'input_ids': ..., 'attention_mask': ...})
    """
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def hf_mean_pool_query(encoder: str | nn.Module | None = "encoder") -> QueryFn:
    """A query function: the mean-pooled last hidden state of a Hugging Face-style encoder.

    Args:
        encoder: where the encoder is: an attribute path of the routed model (``"encoder"`` for
            shiftkit's ``TextClassifier``, whose ``encoder`` is the HF model), an explicit module (e.g. a
            separate frozen model, as FedIns uses), or ``None`` for the routed model itself (a bare HF model).

    Returns:
        ``fn(model, input_ids, attention_mask=None, **ignored) -> (B, H)``; it calls
        ``encoder(input_ids=..., attention_mask=...)`` and mean-pools ``last_hidden_state`` (or the returned
        tensor) over the unmasked tokens — for ``TextClassifier`` this equals ``model.embed`` on the base.

    Example:
        >>> qf = hf_mean_pool_query("encoder")
        >>> router = KeyQueryRouter(pool.names(), dim=384, query_fn=qf)
        >>> qf(classifier, ids, mask).shape  # (B, 384)
    """

    def query(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> Tensor:
        if isinstance(encoder, nn.Module):
            enc = encoder
        elif encoder is None:
            enc = model
        else:
            try:
                enc = model.get_submodule(encoder)
            except AttributeError:
                raise ShiftkitError(
                    f"the model has no {encoder!r} submodule to compute router queries"
                ) from None
        out: Any = enc(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out if isinstance(out, Tensor) else out.last_hidden_state
        return mean_pool(hidden, attention_mask)

    return query


def default_query(model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    """The query used when a router has no ``query_fn``.

    Integer token ids (``input_ids`` or the first argument): the model's ``embed(...)`` if it has one
    (shiftkit's ``TextClassifier``: mean-pooled encoder states), else the model's own mean-pooled
    ``last_hidden_state``. A floating tensor input ``(B, ...)``: the input itself, flattened to ``(B, D)``.

    Example:
        >>> q = default_query(mlp, torch.randn(4, 6))   # float input: flattened
        >>> q.shape
        torch.Size([4, 6])
    """
    first = kwargs.get("input_ids", args[0] if args else None)
    if first is None:
        first = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
    if not isinstance(first, Tensor):
        raise ShiftkitError("cannot build router queries from these inputs: pass query_fn=... to the router")
    if first.is_floating_point():
        return first.flatten(1)
    embed = getattr(model, "embed", None)
    if callable(embed):
        out = embed(*args, **kwargs)
        if isinstance(out, Tensor):
            return out
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return hf_mean_pool_query(None)(model, first, mask)
