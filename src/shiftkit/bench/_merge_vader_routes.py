"""``merge-vader`` routing rows: the four LoRA experts as a ``ShiftPool``, mixed per input by a router.

* FedIns-style key-query router (Feng et al., ICCV 2023, https://arxiv.org/abs/2308.06051): one key per
  domain = the normalised centroid of θ0's mean-pooled features ``q(x)`` on that domain's *training*
  sentences; each test sentence mixes the k LoRAs whose keys are most cosine-similar (``α_j = c/k``),
  with k and the total weight c chosen on the validation split (k = 4 is task arithmetic, λ = c/4).
  Nothing is trained.
* PSEC-style learned router (Liu et al., ICLR 2025, https://arxiv.org/abs/2502.05932):
  ``α(x) = softmax(MLP(q(x)))`` mixes the four LoRAs in output space, ``W(x) = W0 + Σ_j α_j(x) ΔW_j``; the MLP
  (one hidden layer of 64) is trained with cross-entropy on the labelled validation split of all domains,
  the base and the LoRAs frozen. The softmax head (PSEC leaves α unconstrained) keeps α on the simplex:
  with 256 validation sentences an unbounded α could scale the shifts up and overfit; it starts uniform.

Both run on each domain's test sentences and on the shuffled mixed-domain stream (batches that mix
domains, so every sentence is routed on its own). ``routed_to_own`` is the share of test sentences whose
largest α is their own domain's expert.

Example:
    >>> rows, failed = route_rows(data, experts)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import shiftkit as sk
from shiftkit.bench._merge_vader_merges import suite_settings
from shiftkit.recipes.learn import EncodedTexts, eval_batches, logits_accuracy, predict, text_batches
from shiftkit.recipes.vader_experts import DOMAINS, Experts, VaderSplits, evaluate, pooled, with_delta

__all__ = ["route_rows"]


#: (top_k, scale) settings of the key-query router, chosen on validation
ROUTE_GRID = ((1, 1.0), (1, 1.5), (2, 1.0), (2, 2.0), (4, 1.0), (4, 2.0))


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _routed_row(
    data: VaderSplits, model: torch.nn.Module, router: Any, label: str, seconds: float, notes: str
) -> dict[str, Any]:
    from shiftkit.merging.routing.attach import compute_queries

    acc = evaluate(model, data.test_batches)
    mixed = logits_accuracy(*predict(model, data.mixed))  # the shuffled stream, batches mixing domains
    own = []
    with torch.no_grad():
        for j, dom in enumerate(DOMAINS):
            q = compute_queries(model, [_inputs(b) for b in data.test_batches[dom]], router.query_fn)
            score = router.similarity(q) if hasattr(router, "similarity") else router(q)  # top-1 choice
            own.append((score.argmax(-1) == j).float())
    routed_own = float(torch.cat(own).mean())
    return {
        "row": label,
        "group": "route",
        "kind": "lora",
        "accuracy": acc,
        "mean": sum(acc.values()) / len(acc),
        "mixed": mixed,
        "mixed_pooled": pooled(acc, data),
        "routed_to_own": routed_own,
        "coef": f"own={routed_own:.2f}",
        "seconds": seconds,
        "notes": notes,
    }


def route_rows(
    data: VaderSplits, experts: Experts, *, progress: bool = False, log: Callable[[str], None] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The key-query and the learned router over the pool of the four LoRA experts (failures reported).

    Example:
        >>> rows, failed = route_rows(data, experts)
        >>> rows[0]["row"]
        'lora route: key-query (FedIns)'
    """
    from shiftkit.merging.routing.attach import attach_router_, compute_queries, detach_router_, train_router
    from shiftkit.merging.routing.queries import hf_mean_pool_query

    say = log or (lambda _m: None)
    s = suite_settings(data)
    pool = sk.ShiftPool({d: experts.lora[d] for d in DOMAINS})
    qf = hf_mean_pool_query("encoder")  # = TextClassifier.embed on the frozen base: θ0's pooled features
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    with with_delta(data, None) as model:
        label = "lora route: key-query (FedIns)"
        try:
            t0 = time.perf_counter()
            feats = {
                d: compute_queries(model, [_inputs(b) for b in eval_batches(data.train[d])], qf)
                for d in DOMAINS
            }
            router = sk.KeyQueryRouter(
                pool.names(), dim=feats[DOMAINS[0]].shape[1], top_k=1, mu=0.0, query_fn=qf
            )
            router.fit_keys(feats)
            attach_router_(model, pool, router)
            try:
                # top-k and the total weight (scale, like λ of task arithmetic) chosen on the validation
                # split only; top-k = 4 with scale c is exactly task arithmetic with λ = c/4
                grid = {}
                for k, c in ROUTE_GRID:
                    router.top_k, router.scale = k, c
                    val_acc = evaluate(model, data.val_batches)
                    grid[(k, c)] = sum(val_acc.values()) / len(val_acc)
                (k, c) = max(grid, key=lambda kc: (grid[kc], -kc[0], -kc[1]))
                router.top_k, router.scale = k, c
                rows.append(
                    _routed_row(
                        data,
                        model,
                        router,
                        label,
                        time.perf_counter() - t0,
                        f"keys = domain centroids of θ0 features on train data; top-{k} cosine, "
                        f"scale {c:g} (chosen on validation from {len(grid)} settings)",
                    )
                )
                rows[-1]["coef"] = f"top-{k}, scale {c:g}, own={rows[-1]['routed_to_own']:.2f}"
            finally:
                detach_router_(model)
            say(f"{label}: mixed {rows[-1]['mixed']:.3f}, routed to own {rows[-1]['routed_to_own']:.2f}")
        except Exception as err:  # reported in the table; the other router still runs
            failed.append({"row": label, "error": f"{type(err).__name__}: {err}"})
        label = "lora route: learned MLP (PSEC)"
        try:
            t0 = time.perf_counter()
            torch.manual_seed(s.seed)
            learned = sk.LearnedRouter(pool.names(), dim=384, hidden=(64,), head="softmax", query_fn=qf)
            attach_router_(model, pool, learned)
            try:
                union = [data.val[d] for d in DOMAINS]
                val = EncodedTexts(
                    [x for e in union for x in e.input_ids],
                    [y for e in union for y in e.labels],
                    union[0].pad_id,
                )
                batches = [(_inputs(b), b["labels"]) for b in text_batches(val, s.batch_size)]
                losses = train_router(
                    model,
                    learned,
                    batches,
                    loss_fn=F.cross_entropy,
                    epochs=s.router_epochs,
                    lr=s.router_lr,
                    progress=progress,
                )
                learned.eval()
                rows.append(
                    _routed_row(
                        data,
                        model,
                        learned,
                        label,
                        time.perf_counter() - t0,
                        f"softmax(MLP 384-64-4) on θ0 features, trained on the labelled validation "
                        f"split ({len(losses)} steps, lr {s.router_lr:g}, "
                        f"loss {losses[0]:.3f} → {losses[-1]:.3f})",
                    )
                )
            finally:
                detach_router_(model)
            say(f"{label}: mixed {rows[-1]['mixed']:.3f}, routed to own {rows[-1]['routed_to_own']:.2f}")
        except Exception as err:
            failed.append({"row": label, "error": f"{type(err).__name__}: {err}"})
    return rows, failed
