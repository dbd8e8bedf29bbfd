"""Routers: per-sample mixing weights ``α(x) ∈ R^{B×N}`` over a shift pool, from query features ``q(x)``.

A router is an ``nn.Module`` mapping queries ``(B, D)`` to weights ``(B, N)``; its ``query_fn(model, *args,
**kwargs) -> (B, D)`` computes the queries from the model's own forward arguments, on the *frozen base*
(routing is off while it runs). :func:`~shiftkit.merging.routing.attach_router_` calls it before each
forward.

* :class:`KeyQueryRouter` — FedIns (Feng et al., ICCV 2023, https://arxiv.org/abs/2308.06051):
  ``sim_j = cos(q(x), K_j)``, ``S(x) = top-k(sim)``, ``α_j = 1/k`` for ``j ∈ S(x)`` else 0. Keys come from
  data (:meth:`KeyQueryRouter.fit_keys`: normalised per-member centroids) or are learned with the FedIns term
  ``μ · (1 − Σ_{j∈S(x)} cos(q(x), K_j))`` (:func:`fedins_key_loss`).
* :class:`LearnedRouter` — PSEC (Liu et al., ICLR 2025, https://arxiv.org/abs/2502.05932):
  ``α(x; φ) = head(MLP_φ(q(x)))``, an MLP (hidden 256, 256) trained with the pool and base frozen.
* :class:`ConstantRouter` — the same ``α = c`` for every sample (a static mix, computed in output space).

Query functions (``hf_mean_pool_query``, ``default_query``) live in :mod:`shiftkit.merging.routing.queries`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.routing.queries import QueryFn, default_query

__all__ = ["ConstantRouter", "KeyQueryRouter", "LearnedRouter", "Router", "fedins_key_loss"]


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ShiftkitError("cannot tell the batch size: the forward got no tensor argument")


class Router(nn.Module):
    """Base class: ``forward(query (B, D)) -> α (B, N)``; :meth:`route` computes the query first.

    Subclasses implement ``forward``; override :meth:`route` to skip the query (``ConstantRouter``) and
    :meth:`aux_loss` to add a training term of their own (``KeyQueryRouter``).

    Args:
        members: the pool's member names (checked against the pool on attach) or their number.
        query_fn: ``fn(model, *args, **kwargs) -> (B, D)``; ``None`` uses
            :func:`~shiftkit.merging.routing.queries.default_query`.

    Example:
        >>> class Uniform(Router):
        ...     def forward(self, query): return query.new_full((query.shape[0], self.num_members), 0.5)
        >>> attach_router_(model, pool, Uniform(pool.names()))
    """

    def __init__(self, members: int | Sequence[str], query_fn: QueryFn | None = None) -> None:
        super().__init__()
        if isinstance(members, int):
            self.names: list[str] | None = None
            self.num_members = members
        else:
            self.names = [str(m) for m in members]
            self.num_members = len(self.names)
        if self.num_members < 1:
            raise ShiftkitError("a router needs at least one pool member")
        self.query_fn = query_fn
        self.last_query: Tensor | None = None

    def _ref(self) -> Tensor | None:
        return next(iter([*self.parameters(), *self.buffers()]), None)

    def query(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """Query features ``(B, D)`` of the inputs, without gradients, on the router's device."""
        fn = self.query_fn or default_query
        with torch.no_grad():
            q = fn(model, *args, **kwargs)
        if not isinstance(q, Tensor) or q.dim() != 2:
            got = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ShiftMismatchError(f"the router's query_fn must return (batch, dim) features, got {got}")
        ref = self._ref()
        return q.detach().to(device=ref.device if ref is not None else q.device, dtype=torch.float32)

    def route(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """Mixing weights ``(B, N)`` for one forward call's arguments (the query is kept: ``last_query``)."""
        q = self.query(model, args, kwargs)
        self.last_query = q
        return self(q)

    def aux_loss(self) -> Tensor | None:
        """A training term of the router itself on the last query (FedIns' key loss), or ``None``."""
        return None


class ConstantRouter(Router):
    """``α(x) = c`` for every sample: a static mix, applied in output space (no query is computed).

    Args:
        weights: ``(N,)`` the mixing weights ``c``.
        members: the pool's member names, to be checked on attach; default: just their number.

    Example:
        >>> sk_router = ConstantRouter([0.5, 0.5])
        >>> attach_router_(model, pool, sk_router)
        >>> y = model(x)   # = base + 0.5 ΔW_1 + 0.5 ΔW_2
    """

    def __init__(self, weights: Sequence[float] | Tensor, members: Sequence[str] | None = None) -> None:
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        super().__init__(list(members) if members is not None else int(w.numel()))
        if self.num_members != w.numel():
            raise ShiftkitError(f"{w.numel()} weights for {self.num_members} members")
        self.weights: Tensor
        self.register_buffer("weights", w)

    def forward(self, query: Tensor) -> Tensor:
        """``query (B, D) -> (B, N)``, every row ``c``."""
        return self.weights.expand(query.shape[0], -1)

    def route(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """``(B, N)`` rows ``c``; only the batch size of the inputs is read."""
        return self.weights.expand(_batch_size(args, kwargs), -1)


def fedins_key_loss(query: Tensor, keys: Tensor, top_k: int = 1) -> Tensor:
    """FedIns' key-matching term ``mean_b (1 − Σ_{j∈S(x_b)} cos(q_b, K_j))`` with ``S`` the top-k keys.

    Args:
        query: ``(B, D)`` query features (no gradient needed).
        keys: ``(N, D)`` keys (the gradient flows into the selected ones).
        top_k: number of selected keys ``k``; the term lies in ``[1 − k, 1 + k]``.

    Returns:
        A scalar; FedIns trains with ``(1 − μ)·task + μ·this`` (μ = 0.1).

    Example:
        >>> loss = fedins_key_loss(q, router.keys, top_k=1)
        >>> loss.backward()
    """
    sim = F.normalize(query.to(keys.dtype), dim=-1) @ F.normalize(keys, dim=-1).T
    top = sim.topk(min(top_k, keys.shape[0]), dim=-1).values
    return (1.0 - top.sum(-1)).mean()


class KeyQueryRouter(Router):
    """FedIns routing: the top-k keys by cosine similarity to the query, averaged (``α_j = scale/k``).

    Args:
        members: the pool's member names (or their number).
        dim: query dimension ``D``.
        top_k: members averaged per sample. Default 1: with one member per domain and a small pool, the
            best-matching member is the domain's own shift, and averaging in k>1 others dilutes it (FedIns
            uses k=3 of N=25 learned, non-domain-aligned members, i.e. ~12% of the pool — ⌈0.12·N⌉ = 1 for
            N ≤ 8).
        keys: ``(N, D)`` initial keys; default: truncated normal, std 0.02 (FedIns' init).
        scale: total weight of the selected members (default 1: their average, as FedIns). Like λ in task
            arithmetic; ``top_k=N, scale=c`` is exactly task arithmetic with ``λ = c/N`` on LoRA/SSF pools.
        mu: weight μ of :func:`fedins_key_loss` in :meth:`aux_loss` (FedIns: 0.1).
        query_fn: see :class:`Router`.

    Example:
        >>> router = KeyQueryRouter(pool.names(), dim=384, query_fn=hf_mean_pool_query("encoder"))
        >>> router.fit_keys({name: features_of_domain[name] for name in pool.names()})
        >>> attach_router_(model, pool, router)
    """

    def __init__(
        self,
        members: int | Sequence[str],
        dim: int,
        *,
        top_k: int = 1,
        keys: Tensor | None = None,
        scale: float = 1.0,
        mu: float = 0.1,
        query_fn: QueryFn | None = None,
    ) -> None:
        super().__init__(members, query_fn)
        if not 1 <= top_k <= self.num_members:
            raise ShiftkitError(f"top_k must be in [1, {self.num_members}], got {top_k}")
        if not math.isfinite(scale):
            raise ShiftkitError(f"scale must be finite, got {scale}")
        self.top_k = top_k
        self.scale = float(scale)
        self.mu = float(mu)
        if keys is None:
            keys = nn.init.trunc_normal_(torch.empty(self.num_members, dim), std=0.02)
        if tuple(keys.shape) != (self.num_members, dim):
            raise ShiftMismatchError(f"keys must be ({self.num_members}, {dim}), got {tuple(keys.shape)}")
        self.keys = nn.Parameter(keys.detach().to(torch.float32).clone())

    def similarity(self, query: Tensor) -> Tensor:
        """Cosine similarities ``(B, N)`` of ``query (B, D)`` to the keys."""
        return F.normalize(query.to(self.keys.dtype), dim=-1) @ F.normalize(self.keys, dim=-1).T

    def forward(self, query: Tensor) -> Tensor:
        """``query (B, D) -> α (B, N)``: ``scale/k`` on each sample's top-k keys, else 0 (no gradient)."""
        idx = self.similarity(query).topk(self.top_k, dim=-1).indices
        alpha = torch.zeros(query.shape[0], self.num_members, device=query.device)
        return alpha.scatter_(1, idx, self.scale / self.top_k)

    @torch.no_grad()
    def fit_keys(self, pool_queries: Mapping[str, Tensor] | Sequence[Tensor]) -> KeyQueryRouter:
        """Set each key to the normalised centroid of its member's queries.

        Args:
            pool_queries: ``{member name: (n_j, D) features}`` (all members) or a list in pool order.

        Example:
            >>> feats = {d: compute_queries(model, batches[d], qf) for d in pool.names()}
            >>> router.fit_keys(feats)
        """
        if isinstance(pool_queries, Mapping):
            names = self.names if self.names is not None else [str(i) for i in range(self.num_members)]
            if set(pool_queries) != set(names):
                raise ShiftMismatchError(
                    f"fit_keys needs features for exactly {names}, got {sorted(pool_queries)}"
                )
            feats = [pool_queries[n] for n in names]
        else:
            feats = list(pool_queries)
            if len(feats) != self.num_members:
                raise ShiftMismatchError(
                    f"fit_keys got {len(feats)} feature sets for {self.num_members} members"
                )
        for j, f in enumerate(feats):
            if f.dim() != 2 or f.shape[0] == 0 or f.shape[1] != self.keys.shape[1]:
                raise ShiftMismatchError(
                    f"member {j}: features must be (n>0, {self.keys.shape[1]}), got {tuple(f.shape)}"
                )
            self.keys[j] = F.normalize(f.to(self.keys).mean(0), dim=-1)
        return self

    def aux_loss(self) -> Tensor | None:
        """``μ · fedins_key_loss(last query, keys, top_k)``, or ``None`` before any forward or when μ = 0."""
        if self.last_query is None or self.mu == 0.0:
            return None
        return self.mu * fedins_key_loss(self.last_query, self.keys, self.top_k)


_HEADS = ("none", "softmax", "sigmoid")


class LearnedRouter(Router):
    """PSEC's context-aware composition: ``α(x) = head(MLP_φ(q(x)))``.

    Args:
        members: the pool's member names (or their number).
        dim: query dimension ``D``.
        hidden: hidden widths of the ReLU MLP; PSEC's reference uses (256, 256).
        head: ``"none"`` (PSEC: unconstrained α), ``"softmax"`` (α on the simplex) or ``"sigmoid"``
            (``scale · σ(z)``, each α in ``(0, scale)``) — bounded heads, against an unbounded α exploding.
        scale: the sigmoid head's upper bound.
        init_bias: every output starts at this logit. The final layer's weights start at zero (PSEC
            zero-initialises a new skill's row so behaviour is unchanged), so with ``head="none"`` and the
            default 0 the routed model starts as the base model exactly; ``init_bias=1/N`` starts at the
            uniform average. With ``"softmax"`` the start is always uniform ``1/N``.
        query_fn: see :class:`Router`.

    Example:
        >>> router = LearnedRouter(pool.names(), dim=384, query_fn=hf_mean_pool_query("encoder"))
        >>> attach_router_(model, pool, router)
        >>> train_router(model, router, batches, loss_fn=F.cross_entropy, epochs=3)
    """

    def __init__(
        self,
        members: int | Sequence[str],
        dim: int,
        *,
        hidden: Iterable[int] = (256, 256),
        head: str = "none",
        scale: float = 1.0,
        init_bias: float = 0.0,
        query_fn: QueryFn | None = None,
    ) -> None:
        super().__init__(members, query_fn)
        if head not in _HEADS:
            raise ShiftkitError(f"LearnedRouter head must be one of {_HEADS}, got {head!r}")
        self.head = head
        self.scale = float(scale)
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        last = nn.Linear(width, self.num_members)
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, init_bias)
        self.net = nn.Sequential(*layers, last)

    @property
    def out(self) -> nn.Linear:
        """The output layer (zero-initialised weights; one row per member)."""
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        return last

    @torch.no_grad()
    def add_member(self, name: str | None = None) -> LearnedRouter:
        """Grow the output layer by one zero-initialised row for a new pool member (PSEC skill expansion).

        With ``head="none"`` the existing members' weights are unchanged and the new one starts at
        ``α = 0`` (its row is zero), so the routed model computes exactly what it did before the expansion.
        Re-attach the router with the grown pool (``detach_router_`` then ``attach_router_``).

        Args:
            name: the new member's name (required when the router was built with names).

        Example:
            >>> pool.add("news", news_lora); detach_router_(model)
            >>> attach_router_(model, pool, router.add_member("news"))
        """
        if self.names is not None:
            if name is None or name in self.names:
                raise ShiftkitError(f"add_member needs a new member name, got {name!r}")
            self.names.append(name)
        old = self.out
        new = nn.Linear(
            old.in_features, old.out_features + 1, device=old.weight.device, dtype=old.weight.dtype
        )
        new.weight.zero_()
        new.bias.zero_()
        new.weight[:-1] = old.weight
        new.bias[:-1] = old.bias
        self.net[-1] = new
        self.num_members += 1
        return self

    def forward(self, query: Tensor) -> Tensor:
        """``query (B, D) -> α (B, N)``."""
        z = self.net(query.to(self.out.weight.dtype))
        if self.head == "softmax":
            return z.softmax(-1)
        if self.head == "sigmoid":
            return self.scale * torch.sigmoid(z)
        return z
