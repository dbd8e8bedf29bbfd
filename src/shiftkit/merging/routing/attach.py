"""Per-input routing over a shift pool: every sample gets its own mixture of the members' shifts.

``attach_router_(model, pool, router)`` replaces each module the pool targets by a routed wrapper holding
all members' parameters, and installs a forward pre-hook on the root that computes the router's weights
``α ∈ R^{B×N}`` from the inputs before each forward. In output space, per sample ``b`` (exact, no
per-sample weight matrices are materialised):

* LoRA (PSEC, Liu et al., ICLR 2025, https://arxiv.org/abs/2502.05932):
  ``y_b = W0 x_b + b0 + Σ_j α_bj s_j B_j (A_j x_b)``, i.e. ``W(x_b) = W0 + Σ_j α_bj ΔW_j``.
* SSF (FedIns, Feng et al., ICCV 2023, https://arxiv.org/abs/2308.06051):
  ``γ(x_b) = 1 + Σ_j α_bj (γ_j − 1)``, ``β(x_b) = Σ_j α_bj β_j`` (``= Σ_j α_bj γ_j`` when ``Σ_j α_bj = 1``),
  applied per sample on the channel axis, broadcast over tokens / spatial positions.
* ``modules_to_save`` copies (a classifier head: FedIns' classifier pool):
  ``base(x) + Σ_j α_j (f_j(x) − base(x))``.

So a constant ``α = c`` equals the statically merged model ``W0 + Σ_j c_j ΔW_j`` (``pool.merge(weights=c)``),
``α = 0`` is the base, and ``α = e_i`` is member ``i`` alone. ``detach_router_`` restores the model bit for
bit. Routers live in :mod:`shiftkit.merging.routing.routers`; :func:`train_router` fits a router's
parameters with the pool and the base frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from shiftkit.core.attach import attached_wrappers, module_shape
from shiftkit.core.registry import get_method
from shiftkit.core.shift import DELTA, Shift, split_key
from shiftkit.core.targets import iter_base_modules
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.routing.pool import ShiftPool
from shiftkit.merging.routing.queries import QueryFn, call_args, default_query
from shiftkit.merging.routing.routed_modules import (
    RoutedCopies,
    RoutedLoRA,
    RoutedModule,
    RoutedSSF,
    RoutingContext,
)
from shiftkit.merging.routing.routers import Router
from shiftkit.methods.lora.config import LoRAConfig

__all__ = [
    "attach_router_",
    "compute_queries",
    "detach_router_",
    "extract_pool",
    "routing_weights",
    "train_router",
]

_KEY = "_shiftkit_router"
_SHIFT_STATE = "_shiftkit_state"


def _state(model: nn.Module) -> dict[str, Any] | None:
    return model.__dict__.get(_KEY)


def _require(model: nn.Module, verb: str) -> dict[str, Any]:
    st = _state(model)
    if st is None:
        raise ShiftkitError(f"cannot {verb}: no router is attached to this model (use attach_router_ first)")
    return st


def _pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    st = _state(module)
    if st is None:
        return
    ctx: RoutingContext = st["ctx"]
    if ctx.busy:  # the query function called the root again: that forward runs the base
        return
    if ctx.fixed is not None:
        ctx.alpha = ctx.fixed
        return
    router: Router = st["router"]
    ctx.busy = True
    try:
        alpha = router.route(module, args, kwargs)
    finally:
        ctx.busy = False
    n = st["num_members"]
    if not isinstance(alpha, Tensor) or alpha.dim() != 2 or alpha.shape[1] != n:
        got = tuple(alpha.shape) if isinstance(alpha, Tensor) else type(alpha).__name__
        raise ShiftMismatchError(f"the router must return (batch, {n}) weights, got {got}")
    ctx.alpha = alpha


def _post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    st = _state(module)
    if st is not None and not st["ctx"].busy:
        st["ctx"].alpha = None


def _member_roles(pool: ShiftPool) -> dict[str, list[dict[str, Tensor]]]:
    """``{module: [member j's {role: tensor}]}`` in one pass over the pool."""
    out: dict[str, list[dict[str, Tensor]]] = {n: [{} for _ in range(len(pool))] for n in pool.base}
    for j, shift in enumerate(pool.shifts()):
        for key, t in shift.tensors.items():
            owner, role = split_key(key, shift.base)
            out[owner][j][role] = t
    return out


def _build(
    pool: ShiftPool, fqn: str, roles: list[dict[str, Tensor]], module: nn.Module, ctx: RoutingContext
) -> RoutedModule:
    if any(r.startswith("saved.") for r in roles[0]):
        states = [{r[len("saved.") :]: t for r, t in m.items()} for m in roles]
        return RoutedCopies(module, ctx, states)
    spec = get_method(pool.method or "")
    if not isinstance(module, spec.targets):
        raise ShiftMismatchError(f"{fqn!r} is a {type(module).__name__}, which {spec.name} does not wrap")
    if spec.name == "lora":
        if not isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding):
            raise ShiftkitError(f"routed LoRA cannot wrap {fqn!r} ({type(module).__name__})")
        scalings = [
            s.config.scaling_of(fqn) if isinstance(s.config, LoRAConfig) else 1.0 for s in pool.shifts()
        ]
        return RoutedLoRA(module, ctx, [(m["lora_A"], m["lora_B"]) for m in roles], scalings)
    return RoutedSSF(module, ctx, [m["scale"] for m in roles], [m["shift"] for m in roles])


def attach_router_(
    model: nn.Module, pool: ShiftPool, router: Router, *, train_members: bool = False
) -> nn.Module:
    """Route every forward of ``model`` through ``pool``, per sample, with weights from ``router``.

    The base is frozen (flags restored by :func:`detach_router_`); pool members are frozen unless
    ``train_members`` (FedIns trains the pool jointly; read it back with :func:`extract_pool`). The
    router stays a separate module: move it to the model's device yourself. Inputs must be batch-first.

    Args:
        model: the base model the pool was made for, with no shift or router attached.
        pool: a LoRA or SSF pool (members may include ``modules_to_save`` copies such as a head).
        router: a :class:`~shiftkit.merging.routing.routers.Router` with one output per member (names
            checked).
        train_members: make the members' stacked parameters trainable.

    Returns:
        ``model``, for chaining.

    Raises:
        ShiftMismatchError: the pool does not fit the model, or the router's members differ from the pool's.
        ShiftkitError: the model already carries a shift or a router; an unsupported method or module.

    Example:
        >>> router = KeyQueryRouter(pool.names(), dim=384, query_fn=hf_mean_pool_query("encoder"))
        >>> attach_router_(model, pool, router.fit_keys(features))
        >>> logits = model(input_ids, attention_mask)   # each sample uses its closest member
    """
    if _state(model) is not None:
        raise ShiftkitError("the model already has a router attached; call detach_router_(model) first")
    if attached_wrappers(model) or model.__dict__.get(_SHIFT_STATE) is not None:
        raise ShiftkitError("the model has a shift attached; detach or fold it before attaching a router")
    if not isinstance(pool, ShiftPool) or len(pool) == 0:
        raise ShiftkitError("attach_router_ needs a non-empty ShiftPool")
    if pool.method not in ("lora", "ssf"):
        raise ShiftkitError(
            f"routing supports LoRA and SSF pools, not {pool.method!r}"
            + (" (merge deltas statically with pool.merge)" if pool.method == DELTA else "")
        )
    if not isinstance(router, Router):
        raise ShiftkitError(f"router must be a shiftkit Router, got {type(router).__name__}")
    if router.num_members != len(pool) or (router.names is not None and router.names != pool.names()):
        raise ShiftMismatchError(
            f"router members {router.names or router.num_members} differ from the pool's {pool.names()}"
        )
    modules = dict(iter_base_modules(model))
    missing = [n for n in pool.base if n not in modules]
    if missing:
        raise ShiftMismatchError(f"the pool targets modules this model does not have: {missing[:5]}")
    bad = [
        f"{n}: pool {s} vs model {module_shape(modules[n])}"
        for n, s in pool.base.items()
        if tuple(s) != module_shape(modules[n])
    ]
    if bad:
        raise ShiftMismatchError(f"the pool does not fit this model's shapes: {'; '.join(bad[:5])}")
    for n in pool.base:
        parent = modules.get(n.rpartition(".")[0]) if "." in n else model
        if isinstance(parent, nn.MultiheadAttention):
            raise ShiftkitError(f"cannot route {n!r}: nn.MultiheadAttention reads its weights directly")
    ctx = RoutingContext()
    roles = _member_roles(pool)
    wrappers = {n: _build(pool, n, roles[n], modules[n], ctx) for n in pool.base}  # all before mutating
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for n, w in wrappers.items():
        w.train(w.base.training)
        for p in w.named_shift_parameters().values():
            p.requires_grad_(train_members)
        _set_child(model, n, w)
    pre = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    post = model.register_forward_hook(_post_hook, always_call=True)
    model.__dict__[_KEY] = {
        "router": router,
        "ctx": ctx,
        "num_members": len(pool),
        "pool": [(name, s.method, s.config, dict(s.base), list(s.tensors)) for name, s in pool.items()],
        "requires_grad": flags,
        "hooks": (pre.id, post.id),
    }
    return model


def _set_child(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new


def _routed(model: nn.Module) -> list[tuple[str, RoutedModule]]:
    return [(n, m) for n, m in iter_base_modules(model) if isinstance(m, RoutedModule)]


def detach_router_(model: nn.Module) -> nn.Module:
    """Remove the router and the routed wrappers; the model is restored bit for bit.

    Example:
        >>> detach_router_(model)
        >>> model(x)   # the base model again
    """
    st = _require(model, "detach the router")
    pre, post = st["hooks"]
    for d in (model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs):
        d.pop(pre, None)
    for d in (model._forward_hooks, model._forward_hooks_with_kwargs, model._forward_hooks_always_called):
        d.pop(post, None)
    for n, w in _routed(model):
        _set_child(model, n, w.base)
    model.__dict__.pop(_KEY, None)
    for n, p in model.named_parameters():
        p.requires_grad_(st["requires_grad"].get(n, True))
    return model


@contextlib.contextmanager
def routing_weights(model: nn.Module, alpha: Tensor) -> Iterator[None]:
    """Force the mixing weights (the router is not called) inside the ``with`` block.

    Args:
        model: a model with a router attached.
        alpha: ``(B, N)`` per-sample weights for the next forwards' batch, or ``(N,)`` for every sample
            (e.g. an oracle one-hot of each sample's known domain, or constant weights).

    Example:
        >>> with routing_weights(model, torch.tensor([1.0, 0.0])):
        ...     y = model(x)     # member 0 alone
    """
    st = _require(model, "set routing weights")
    if alpha.dim() not in (1, 2) or alpha.shape[-1] != st["num_members"]:
        raise ShiftMismatchError(
            f"routing weights must be (B, {st['num_members']}) or ({st['num_members']},)"
        )
    ctx: RoutingContext = st["ctx"]
    previous, ctx.fixed = ctx.fixed, alpha
    try:
        yield
    finally:
        ctx.fixed = previous


def extract_pool(model: nn.Module) -> ShiftPool:
    """The routed members as a :class:`ShiftPool` again (copies; after ``train_members=True`` training).

    Example:
        >>> attach_router_(model, pool, router, train_members=True)
        >>> train_router(model, router, batches, loss_fn=F.cross_entropy)
        >>> trained = extract_pool(model)
    """
    st = _require(model, "extract the pool")
    routed = dict(_routed(model))
    out = ShiftPool()
    for j, (name, method, config, base, keys) in enumerate(st["pool"]):
        tensors = {
            f"{fqn}.{role}": t.detach().clone()
            for fqn, w in routed.items()
            for role, t in w.member_tensors(j).items()
        }
        out.add(name, Shift(method, config, {k: tensors[k] for k in keys}, base))
    return out


@torch.no_grad()
def compute_queries(model: nn.Module, batches: Iterable[Any], query_fn: QueryFn | None = None) -> Tensor:
    """Query features of many inputs on the base model (routing off), concatenated: ``(n, D)``.

    Args:
        model: the base model (a router may be attached: it is bypassed).
        batches: inputs per batch: a tensor, a tuple of positional arguments or a dict of keyword ones.
        query_fn: as for the router; ``None`` uses :func:`~shiftkit.merging.routing.queries.default_query`.

    Example:
        >>> qf = hf_mean_pool_query("encoder")
        >>> feats = {d: compute_queries(model, [(ids, mask)], qf) for d, (ids, mask) in by_domain.items()}
        >>> router.fit_keys(feats)
    """
    st = _state(model)
    ctx: RoutingContext | None = None if st is None else st["ctx"]
    fn = query_fn or default_query
    outs = []
    previous = ctx.busy if ctx is not None else False
    if ctx is not None:
        ctx.busy = True
    try:
        for inputs in batches:
            args, kwargs = call_args(inputs)
            outs.append(fn(model, *args, **kwargs).detach().float())
    finally:
        if ctx is not None:
            ctx.busy = previous
    if not outs:
        raise ShiftkitError("compute_queries got no batches")
    return torch.cat(outs)


def train_router(
    model: nn.Module,
    router: Router,
    batches: Iterable[tuple[Any, Any]],
    *,
    loss_fn: Callable[[Any, Any], Tensor],
    epochs: int = 1,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    progress: bool | None = None,
) -> list[float]:
    """Fit the router (and, with ``train_members=True``, the members) with AdamW; base frozen.

    Each step: ``loss = loss_fn(model(*inputs), target) + router.aux_loss()`` (FedIns' key term for a
    :class:`~shiftkit.merging.routing.routers.KeyQueryRouter` with μ > 0), backward, step. The parameters
    trained are the router's plus anything in the model that requires grad — after :func:`attach_router_` that
    is nothing unless ``train_members=True``. lr 3e-4 is PSEC's. The model's train/eval mode is left as is.

    Args:
        model: a model with ``router`` attached.
        router: the attached router.
        batches: ``(inputs, target)`` pairs, inputs as in :func:`compute_queries`; must be re-iterable
            (a list or a DataLoader) when ``epochs > 1``.
        loss_fn: ``loss_fn(output, target) -> scalar``.
        epochs: passes over ``batches``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        progress: tqdm bar; ``None`` shows it only on a terminal.

    Returns:
        The loss of every step.

    Example:
        >>> attach_router_(model, pool, router)
        >>> losses = train_router(model, router, [((ids, mask), y)], loss_fn=F.cross_entropy, epochs=5)
        >>> losses[-1] < losses[0]
    """
    st = _require(model, "train a router")
    if st["router"] is not router:
        raise ShiftkitError("train_router: this router is not the one attached to the model")
    if epochs > 1 and iter(batches) is batches:
        raise ShiftkitError("train_router needs re-iterable batches (a list or DataLoader) for epochs > 1")
    params, seen = [], set()
    for p in [*router.parameters(), *model.parameters()]:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ShiftkitError("train_router: nothing to train (the router has no trainable parameters)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    was_training = router.training
    router.train()
    losses: list[float] = []
    bar = tqdm(desc="router", disable=None if progress is None else not progress, leave=False)
    try:
        for _ in range(epochs):
            for inputs, target in batches:
                args, kwargs = call_args(inputs)
                loss = loss_fn(model(*args, **kwargs), target)
                aux = router.aux_loss()
                if aux is not None:
                    loss = loss + aux
                if not loss.requires_grad:
                    raise ShiftkitError(
                        "train_router: the loss does not depend on trainable parameters (top-k routing "
                        "is not differentiable: give KeyQueryRouter mu > 0 to learn its keys)"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        router.train(was_training)
    return losses
