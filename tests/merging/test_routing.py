"""Per-input routing over shift pools: PSEC §5.4 and FedIns §6.4 sanity checks (combine-compress.md).

References are computed independently of the routed wrappers: the static merge is ``W0 + Σ c_i ΔW_i`` built
with ``sk.apply_`` from each member's own ``sk.to_delta``, single members run through plain ``sk.attach_``,
and the per-sample path is checked against batch-size-1 forwards.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_pool import member
from torch import Tensor, nn

import shiftkit as sk
from shiftkit.core.config import ShiftConfig
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging import (
    ConstantRouter,
    KeyQueryRouter,
    LearnedRouter,
    ShiftPool,
    attach_router_,
    compute_queries,
    detach_router_,
    extract_pool,
    fedins_key_loss,
    hf_mean_pool_query,
    routing_weights,
    train_router,
)
from tiny_models import make

LORA = {"r": 2, "lora_alpha": 4.0, "target_modules": "all"}
# SSF only where a delta exists in the base's own parameters (a bias-free Linear would gain a bias)
CASES = {
    "lora-mlp": ("mlp", sk.LoRAConfig(**LORA)),
    "lora-cnn": ("cnn", sk.LoRAConfig(**LORA)),
    "lora-embedding": ("embedding", sk.LoRAConfig(**LORA)),
    "lora+head-mlp": ("mlp", sk.LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"])),
    "ssf-mlp": ("mlp", sk.SSFConfig(target_modules=["fc1", "norm", "head"])),
    "ssf-cnn": ("cnn", sk.SSFConfig(target_modules=["conv2", "bn1"])),
    "ssf-block": ("mha_block", sk.SSFConfig(target_modules=["ln1", "ln2", "mlp.0", "mlp.2"])),
}


def pool_of(model: str, config: ShiftConfig, n: int = 3) -> ShiftPool:
    return ShiftPool({f"m{i}": member(model, config, 10 + i) for i in range(n)})


def static_merge(model: str, pool: ShiftPool, c: list[float]) -> nn.Module:
    ref, _ = make(model)
    for delta, ci in zip(pool.to_deltas(ref), c, strict=True):
        sk.apply_(ref, delta, scale=ci)
    return ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_constant_alpha_equals_static_merge(case: str) -> None:
    name, config = CASES[name_case := case]
    pool = pool_of(name, config)
    c = [0.3, -0.5, 1.2]
    model, x = make(name)
    attach_router_(model, pool, ConstantRouter(c, pool.names()))
    with torch.no_grad():
        torch.testing.assert_close(model(x), static_merge(name, pool, c)(x), atol=1e-5, rtol=0, msg=name_case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_alpha_is_base_and_unit_alpha_is_one_member(case: str) -> None:
    name, config = CASES[case]
    pool = pool_of(name, config)
    model, x = make(name)
    with torch.no_grad():  # the MHA fast path runs only without grad: compare like with like
        base_out = model(x)
    single, _ = make(name)
    sk.attach_(single, pool["m1"])
    attach_router_(model, pool, ConstantRouter([0.0, 0.0, 0.0]))
    with torch.no_grad():
        assert torch.equal(model(x), base_out)
        with routing_weights(model, torch.tensor([0.0, 1.0, 0.0])):
            torch.testing.assert_close(model(x), single(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "case", ["lora-mlp", "lora-cnn", "lora-embedding", "lora+head-mlp", "ssf-cnn", "ssf-block"]
)
def test_per_sample_mixing_equals_batch_of_one(case: str) -> None:
    name, config = CASES[case]
    pool = pool_of(name, config)
    model, x = make(name)
    x = torch.cat([x, x.flip(0)])  # at least 4 samples
    alpha = torch.randn(x.shape[0], 3)
    attach_router_(model, pool, ConstantRouter([1.0, 1.0, 1.0]))
    with torch.no_grad():
        with routing_weights(model, alpha):
            batched = model(x)
        for b in range(x.shape[0]):
            with routing_weights(model, alpha[b : b + 1]):
                torch.testing.assert_close(batched[b : b + 1], model(x[b : b + 1]), atol=1e-5, rtol=0)
        # a sample's output depends on its own row only: FedIns' batch-averaged gather would fail this
        with routing_weights(model, torch.eye(3)[torch.arange(x.shape[0]) % 3]):
            onehot = model(x)
        for j in range(3):
            single, _ = make(name)
            sk.attach_(single, pool[f"m{j}"])
            for b in range(j, x.shape[0], 3):
                torch.testing.assert_close(onehot[b : b + 1], single(x[b : b + 1]), atol=1e-5, rtol=0)


def test_different_lora_ranks_route_exactly() -> None:
    pool = ShiftPool(
        {f"m{i}": member("mlp", sk.LoRAConfig(r=r, target_modules="all"), i) for i, r in enumerate((1, 4))}
    )
    model, x = make("mlp")
    attach_router_(model, pool, ConstantRouter([0.7, -0.2]))
    torch.testing.assert_close(model(x), static_merge("mlp", pool, [0.7, -0.2])(x), atol=1e-5, rtol=0)


def clusters(n_per: int = 8, dim: int = 6, k: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 5.0 * torch.eye(dim)[:k]
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + 0.3 * torch.randn(k * n_per, dim, generator=g), labels


def test_top1_with_centroid_keys_picks_the_domain_member() -> None:
    pool = pool_of("mlp", sk.LoRAConfig(**LORA))
    x, labels = clusters()
    router = KeyQueryRouter(pool.names(), dim=6, top_k=1).fit_keys(
        {f"m{j}": x[labels == j] for j in range(3)}
    )
    torch.testing.assert_close(router.keys.norm(dim=-1), torch.ones(3))
    model, _ = make("mlp")
    attach_router_(model, pool, router)
    out = model(x)
    assert torch.equal(router(x).argmax(-1), labels)
    for j in range(3):
        single, _ = make("mlp")
        sk.attach_(single, pool[f"m{j}"])
        torch.testing.assert_close(out[labels == j], single(x[labels == j]), atol=1e-5, rtol=0)


def test_top_k_averages_the_selected_members() -> None:
    router = KeyQueryRouter(3, dim=2, top_k=2, keys=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    alpha = router(torch.tensor([[1.0, 0.1], [0.0, 1.0]]))
    torch.testing.assert_close(alpha, torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]))


@pytest.mark.parametrize("case", ["lora-mlp", "ssf-cnn"])
def test_top_all_with_scale_is_task_arithmetic(case: str) -> None:
    # α_j = scale/k on every member (k = N): the static merge with λ = scale/N for every member
    name, config = CASES[case]
    pool = pool_of(name, config)
    model, x = make(name)
    router = KeyQueryRouter(
        pool.names(), dim=4, top_k=3, scale=2.0, query_fn=lambda m, inp: torch.ones(len(inp), 4)
    )
    attach_router_(model, pool, router)
    with torch.no_grad():
        torch.testing.assert_close(model(x), static_merge(name, pool, [2 / 3] * 3)(x), atol=1e-5, rtol=0)
    with pytest.raises(ShiftkitError, match="scale"):
        KeyQueryRouter(3, dim=4, scale=float("nan"))


def test_fedins_key_loss_by_hand() -> None:
    # q = (1, 0); cos to the keys = 1, 0, 1/√2; top-2 sum 1 + 1/√2 → loss = −1/√2
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    loss = fedins_key_loss(torch.tensor([[2.0, 0.0]]), keys, top_k=2)
    torch.testing.assert_close(loss, torch.tensor(-(0.5**0.5)))
    loss.backward()
    assert keys.grad is not None and keys.grad[1].abs().sum() == 0  # unselected key gets no gradient


@pytest.mark.parametrize("case", ["lora-mlp", "ssf-mlp"])
def test_single_member_top1_is_the_plain_shift(case: str) -> None:
    name, config = CASES[case]
    pool = pool_of(name, config, n=1)
    model, x = make(name)
    attach_router_(model, pool, KeyQueryRouter(1, dim=6, top_k=1))
    single, _ = make(name)
    sk.attach_(single, pool["m0"])
    torch.testing.assert_close(model(x), single(x), atol=1e-5, rtol=0)


def two_domain_problem() -> tuple[ShiftPool, list[tuple[Tensor, Tensor]]]:
    """Domain d's targets are what member d computes: the router must send each domain to its member.

    The members adapt the last layer only, so the output is affine in α and the loss convex in α: a failure
    to learn is the router's, not a local minimum of the pool.
    """
    pool = pool_of("mlp", sk.LoRAConfig(r=2, lora_alpha=4.0, target_modules=["head"]), n=2)
    x, labels = clusters(n_per=16, k=2)
    y = torch.empty(x.shape[0], 3)
    for j in range(2):
        single, _ = make("mlp")
        sk.attach_(single, pool[f"m{j}"])
        with torch.no_grad():
            y[labels == j] = single(x[labels == j])
    return pool, [(x, y)]


def test_learned_router_starts_at_base_and_learns_the_domains() -> None:
    pool, batches = two_domain_problem()
    model, _ = make("mlp")
    x = batches[0][0]
    base_out = model(x)
    router = LearnedRouter(pool.names(), dim=6, hidden=(16,))
    attach_router_(model, pool, router)
    assert torch.equal(model(x), base_out)  # zero-initialised last layer: α = 0
    losses = train_router(model, router, batches, loss_fn=F.mse_loss, epochs=40, lr=3e-2, progress=False)
    assert losses[-1] < 0.1 * losses[0]
    alpha = router(x).detach()
    assert torch.equal(alpha.argmax(-1), torch.arange(2).repeat_interleave(16))
    assert all(p.grad is None for p in model.parameters())  # base and LoRA members untouched
    assert all(p.grad is not None for p in router.parameters())


def test_learned_router_grows_a_zero_row() -> None:
    router = LearnedRouter(["a", "b"], dim=3, hidden=(8,), init_bias=0.5)
    with torch.no_grad():
        router.out.weight.normal_()
    q = torch.randn(4, 3)
    before = router(q).detach()
    router.add_member("c")
    after = router(q).detach()
    assert router.names == ["a", "b", "c"] and router.num_members == 3
    assert torch.equal(after[:, :2], before) and torch.equal(after[:, 2], torch.zeros(4))
    with pytest.raises(ShiftkitError, match="new member name"):
        router.add_member("a")


@pytest.mark.parametrize("case", ["lora-mlp", "ssf-mlp", "lora+head-mlp"])
def test_bf16_model_routes_in_its_dtype(case: str) -> None:
    name, config = CASES[case]
    pool = pool_of(name, config)  # float32 members on a bfloat16 model
    c = [0.3, -0.5, 1.2]
    model, x = make(name)
    attach_router_(model.to(torch.bfloat16), pool, ConstantRouter(c))
    with torch.no_grad():
        y = model(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), static_merge(name, pool, c)(x), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_bounded_heads(head: str) -> None:
    router = LearnedRouter(4, dim=3, hidden=(8,), head=head, scale=2.0)
    alpha = router(torch.randn(5, 3))
    expected = 0.25 if head == "softmax" else 1.0  # zero logits: uniform softmax, 2·σ(0) = 1
    torch.testing.assert_close(alpha, torch.full((5, 4), expected))


def test_key_router_learns_keys_with_the_fedins_term() -> None:
    pool = pool_of("mlp", sk.LoRAConfig(**LORA), n=2)
    x, _ = clusters(k=2)
    router = KeyQueryRouter(2, dim=6, mu=1.0)
    model, _ = make("mlp")
    attach_router_(model, pool, router)
    before = fedins_key_loss(x, router.keys.detach())
    train_router(model, router, [(x, None)], loss_fn=lambda out, _: out.sum() * 0, epochs=30, lr=0.05)
    assert fedins_key_loss(x, router.keys.detach()) < before - 0.3
    with pytest.raises(ShiftkitError, match="does not depend on trainable"):
        model2, _ = make("mlp")
        r2 = KeyQueryRouter(2, dim=6, mu=0.0)
        attach_router_(model2, pool, r2)
        train_router(model2, r2, [(x, None)], loss_fn=lambda out, _: out.sum() * 0)


def test_detach_restores_the_model_bit_for_bit() -> None:
    model, x = make("mlp")
    model.head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {n: type(m) for n, m in model.named_modules()}
    out = model(x)
    pool = pool_of("mlp", sk.LoRAConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    attach_router_(model, pool, ConstantRouter([1.0, 2.0, 3.0]))
    assert not torch.equal(model(x), out)
    assert all(not p.requires_grad for p in model.parameters())
    detach_router_(model)
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.head.weight.requires_grad and model.fc1.weight.requires_grad
    assert torch.equal(model(x), out)
    with pytest.raises(ShiftkitError, match="no router"):
        detach_router_(model)


def test_extract_pool_round_trip_and_deepcopy() -> None:
    pool = ShiftPool(
        {
            f"m{i}": member("mlp", sk.LoRAConfig(r=r, target_modules="all", modules_to_save=["norm"]), i)
            for i, r in enumerate((1, 3))
        }
    )
    model, x = make("mlp")
    attach_router_(model, pool, ConstantRouter([0.5, 0.5]), train_members=True)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".base." not in n)
    back = extract_pool(model)
    for name in pool.names():
        assert back[name].allclose(pool[name], rtol=0, atol=0) and back[name].config == pool[name].config
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x))
    detach_router_(twin)
    assert not torch.equal(twin(x), model(x))  # the original keeps routing


def test_errors() -> None:
    pool = pool_of("mlp", sk.LoRAConfig(**LORA))
    model, x = make("mlp")
    with pytest.raises(ShiftMismatchError, match="router members"):
        attach_router_(model, pool, KeyQueryRouter(["a", "b", "c"], dim=6))
    with pytest.raises(ShiftMismatchError, match="router members"):
        attach_router_(model, pool, KeyQueryRouter(2, dim=6))
    sk.attach_(model, sk.LoRAConfig(r=1))
    with pytest.raises(ShiftkitError, match="shift attached"):
        attach_router_(model, pool, ConstantRouter([1.0, 1.0, 1.0]))
    sk.detach_(model)
    attach_router_(model, pool, ConstantRouter([1.0, 1.0, 1.0]))
    with pytest.raises(ShiftkitError, match="already has a router"):
        attach_router_(model, pool, ConstantRouter([1.0, 1.0, 1.0]))
    with pytest.raises(ShiftMismatchError, match="batch of 4"):
        with routing_weights(model, torch.ones(2, 3)):
            model(x)
    other, _ = make("cnn")
    with pytest.raises(ShiftMismatchError, match="does not have"):
        attach_router_(other, pool, ConstantRouter([1.0, 1.0, 1.0]))
    block, _ = make("mha_block")
    mha_pool = pool_of("mha_block", sk.LoRAConfig(r=1, target_modules=["attn.out_proj"]), n=1)
    with pytest.raises(ShiftkitError, match="MultiheadAttention"):
        attach_router_(block, mha_pool, ConstantRouter([1.0]))
    delta_pool = ShiftPool({"t": pool.to_deltas(make("mlp")[0])[0]})
    with pytest.raises(ShiftkitError, match="merge deltas statically"):
        attach_router_(make("mlp")[0], delta_pool, ConstantRouter([1.0]))


class TinyClassifier(nn.Module):
    """A TextClassifier-shaped model: HF encoder, mean pooling over the mask, linear head."""

    def __init__(self) -> None:
        super().__init__()
        encoder, _ = make("tiny_bert")
        self.encoder = encoder.hf
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def classifier_pool(base: TinyClassifier) -> ShiftPool:
    def one(seed: int) -> Any:
        model = copy.deepcopy(base)
        sk.attach_(model, sk.LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["head"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in sk.shift_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        return sk.extract(model)

    return ShiftPool({"a": one(1), "b": one(2)})


def test_hf_mean_pool_query_on_a_text_classifier() -> None:
    model = TinyClassifier().eval()
    fresh = copy.deepcopy(model)
    pool = classifier_pool(model)
    ids = torch.randint(1, 50, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    qf = hf_mean_pool_query("encoder")
    with torch.no_grad():
        h = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        expected = (h * m).sum(1) / m.sum(1)
        torch.testing.assert_close(qf(model, ids, mask), expected)
        feats = {"a": expected[:2], "b": expected[2:]}
        router = KeyQueryRouter(pool.names(), dim=16, query_fn=qf).fit_keys(feats)
        attach_router_(model, pool, router)
        batched = model(ids, mask)
        torch.testing.assert_close(router.last_query, expected)  # the query ran on the frozen base
        torch.testing.assert_close(compute_queries(model, [(ids, mask)], qf), expected)
        for b in range(4):
            torch.testing.assert_close(
                batched[b : b + 1], model(ids[b : b + 1], mask[b : b + 1]), atol=1e-5, rtol=0
            )
        picked = router(expected).argmax(-1)
        for b in range(4):
            single = copy.deepcopy(fresh)
            sk.attach_(single, pool.get(pool.names()[int(picked[b])]))
            torch.testing.assert_close(
                batched[b : b + 1], single(ids[b : b + 1], mask[b : b + 1]), atol=1e-5, rtol=0
            )


@pytest.mark.assets
def test_routing_a_minilm_classifier() -> None:
    """The merge-vader usage: θ0's mean-pooled features as queries, a LoRA pool on query/value."""
    from conftest import need_asset

    need_asset("minilm")
    from shiftkit.recipes.models import text_classifier

    model, tok = text_classifier("minilm", num_labels=2, seed=0)
    batch = tok(["a great film", "the battery died after two days, awful"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    qf = hf_mean_pool_query("encoder")
    with torch.no_grad():
        feats = model.embed(ids, mask)
        torch.testing.assert_close(qf(model, ids, mask), feats, atol=0, rtol=0)

    def one(seed: int) -> Any:
        m = copy.deepcopy(model)
        sk.attach_(m, sk.LoRAConfig(r=2, lora_alpha=4.0, target_modules=["query", "value"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in sk.shift_parameters(m):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        return sk.extract(m)

    pool = ShiftPool({"movies": one(1), "amazon": one(2)})
    router = KeyQueryRouter(pool.names(), dim=feats.shape[1], query_fn=qf)
    router.fit_keys({"movies": feats[:1], "amazon": feats[1:]})
    attach_router_(model, pool, router)
    with torch.no_grad():
        out = model(ids, mask)
        for b, name in enumerate(pool.names()):
            single = copy.deepcopy(model)
            detach_router_(single)
            sk.attach_(single, pool[name])
            torch.testing.assert_close(
                out[b : b + 1], single(ids[b : b + 1], mask[b : b + 1]), atol=1e-5, rtol=0
            )
