"""aTLAS (combine-compress.md §3): the sanity checks of §3.4, learning behaviour, the merge method, errors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from shiftkit.merging.atlas.blocks import AtlasBlocks, atlas_partition, entropy_loss
from tiny_models import make


def tuned_copies(base: nn.Module, n: int, scale: float = 0.3, seed: int = 0) -> list[Shift]:
    """n task vectors: the base with seeded Gaussian noise on every floating tensor."""
    gen = torch.Generator().manual_seed(seed)
    tvs = []
    for _ in range(n):
        ft = copy.deepcopy(base)
        with torch.no_grad():
            for t in sk.core.delta.base_tensors(ft).values():
                t.add_(scale * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))
        tvs.append(sk.task_vector(base, ft))
    return tvs


def applied(base: nn.Module, delta: Shift) -> nn.Module:
    return sk.apply_(copy.deepcopy(base), delta)


def blocks_for(model: nn.Module, tvs: list[Shift], **kw: object) -> AtlasBlocks:
    args: dict[str, object] = {"blockwise": True, "partitions": 1, "partition_seed": 0} | kw
    return AtlasBlocks(model, tvs, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["mlp", "cnn", "tiny_llama"])
@pytest.mark.parametrize("kw", [{}, {"blockwise": False}, {"partitions": 3}])
def test_zero_lambda_is_the_base_model_bit_for_bit(name: str, kw: dict[str, object]) -> None:
    model, x = make(name)
    blocks = blocks_for(model, tuned_copies(model, 2), **kw)
    assert torch.equal(blocks.call(model, x), model(x))


def test_block_constant_lambda_is_task_arithmetic() -> None:
    model, x = make("mlp")
    tvs = tuned_copies(model, 3)
    c = [0.5, -1.25, 0.75]
    blocks = blocks_for(model, tvs)
    with torch.no_grad():
        blocks.lam.copy_(torch.tensor(c)[:, None, None].expand_as(blocks.lam))
    ta = sk.merge(tvs, method="task_arithmetic", weights=c)
    torch.testing.assert_close(blocks.call(model, x), applied(model, ta)(x))
    # the merge method with block-constant coefficients is task arithmetic too
    merged = sk.merge(tvs, method="atlas", coefficients={k: c for k in ta.keys()})
    assert merged.allclose(ta, rtol=0, atol=1e-7)
    # T = 1, λ = 1 everywhere: plain task arithmetic with λ = 1, i.e. the task vector itself
    one = sk.merge(tvs[:1], method="atlas", coefficients={k: [1.0] for k in ta.keys()})
    assert one.allclose(tvs[0], rtol=0, atol=0)


def test_merge_missing_block_falls_back_to_weights() -> None:
    a = Shift(DELTA, None, {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([4.0])})
    b = Shift(DELTA, None, {"w": torch.tensor([10.0, 20.0]), "b": torch.tensor([-1.0])})
    out = sk.merge([a, b], method="atlas", weights=[2.0, 3.0], coefficients={"w": [0.5, -0.1], "zz": [1, 1]})
    torch.testing.assert_close(out["w"], torch.tensor([0.5 - 1.0, 1.0 - 2.0]))  # 0.5·a − 0.1·b
    torch.testing.assert_close(out["b"], torch.tensor([8.0 - 3.0]))  # weights: 2·a + 3·b
    plain = sk.merge([a, b], method="atlas", weights=[2.0, 3.0])
    assert plain.allclose(sk.merge([a, b], method="task_arithmetic", weights=[2.0, 3.0]))


def test_gradient_matches_finite_differences_and_inner_product() -> None:
    model, x = make("mlp")
    model, x = model.double(), x.double()
    y = torch.tensor([0, 2, 1, 1])
    tvs = tuned_copies(model, 2)
    for kw in ({}, {"partitions": 3}):
        blocks = blocks_for(model, tvs, **kw)
        with torch.no_grad():
            blocks.lam.copy_(0.3 * torch.randn(blocks.lam.shape, dtype=torch.float64))
        F.cross_entropy(blocks.call(model, x), y).backward()
        assert blocks.lam.grad is not None
        grad = blocks.lam.grad.clone()
        # ∇_{p_b} L at the same parameters, then ⟨∇_{p_b} L, M_{b,k} ⊙ τ_{t,b}⟩
        params = {k: v.detach().requires_grad_() for k, v in blocks.params().items()}
        F.cross_entropy(functional_call(model, params, (x,)), y).backward()
        eps = 1e-6
        for b, key in enumerate(blocks.keys):
            part = blocks.parts[b]
            for t in range(2):
                for k in range(blocks.partitions):
                    tau = blocks.taus[b][t]
                    assert tau is not None
                    mask = torch.ones_like(tau) if part is None else (part == k).to(tau.dtype)
                    g = params[key].grad
                    assert g is not None
                    torch.testing.assert_close(grad[t, b, k], (g * mask * tau).sum(), rtol=1e-10, atol=1e-12)
                    with torch.no_grad():
                        blocks.lam[t, b, k] += eps
                        up = F.cross_entropy(blocks.call(model, x), y)
                        blocks.lam[t, b, k] -= 2 * eps
                        down = F.cross_entropy(blocks.call(model, x), y)
                        blocks.lam[t, b, k] += eps
                    fd = (up - down) / (2 * eps)
                    torch.testing.assert_close(grad[t, b, k], fd, rtol=1e-6, atol=1e-9)


def test_one_partition_and_constant_partitions_equal_blockwise() -> None:
    model, x = make("mlp")
    tvs = tuned_copies(model, 2)
    lam = 0.5 * torch.randn(2, 7, 1)
    flat, parted, one = (blocks_for(model, tvs, partitions=k) for k in (1, 4, 1))
    with torch.no_grad():
        flat.lam.copy_(lam)
        parted.lam.copy_(lam.expand(2, 7, 4))
        one.lam.copy_(lam)
    assert torch.equal(flat.call(model, x), one.call(model, x))
    torch.testing.assert_close(parted.call(model, x), flat.call(model, x))
    coefs = flat.coefficients()
    as_parts = {k: [[v] * 4 for v in vs] for k, vs in coefs.items()}
    merged = sk.merge(tvs, method="atlas", coefficients=coefs)
    assert merged.allclose(sk.merge(tvs, method="atlas", coefficients=as_parts, partition_seed=5))


def test_partition_is_seeded_by_name_and_covers_every_part() -> None:
    a = atlas_partition("fc1.weight", (40, 30), 4, seed=0)
    assert torch.equal(a, atlas_partition("fc1.weight", (40, 30), 4, seed=0))
    assert not torch.equal(a, atlas_partition("fc2.weight", (40, 30), 4, seed=0))
    assert not torch.equal(a, atlas_partition("fc1.weight", (40, 30), 4, seed=1))
    counts = torch.bincount(a.flatten().long(), minlength=4)
    assert counts.min() > 200  # uniform: about 300 entries each


def teacher_task() -> tuple[nn.Module, list[Shift], dict[str, list[float]], list[tuple[Tensor, Tensor]]]:
    """A base MLP, 2 task vectors and a teacher = base + blockwise combination Λ*; MSE to the teacher."""
    model, _ = make("mlp")
    tvs = tuned_copies(model, 2, scale=0.5)
    gen = torch.Generator().manual_seed(3)
    target = {k: (torch.rand(2, generator=gen) * 1.6 - 0.8).tolist() for k in tvs[0].keys()}
    teacher = applied(model, sk.merge(tvs, method="atlas", coefficients=target))
    xs = torch.randn(64, 6, generator=gen)
    with torch.no_grad():
        batches = [(xs[i : i + 16], teacher(xs[i : i + 16])) for i in range(0, 64, 16)]
    return model, tvs, target, batches


def coef_distance(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    return float(sum((torch.tensor(a[k]) - torch.tensor(b[k])).pow(2).sum() for k in a) ** 0.5)


def test_learning_recovers_a_known_combination() -> None:
    model, tvs, target, batches = teacher_task()
    zero = {k: [0.0, 0.0] for k in target}
    res = sk.learn_atlas(
        model, tvs, batches, loss_fn=F.mse_loss, epochs=15, lr=0.2, weight_decay=0.0, progress=False
    )
    assert len(res.history) == 15 * 4
    # measured 0.002 and 0.055 (60 epochs at lr 0.05 reach 3e-10 and 4e-5: Λ* is the optimum)
    assert sum(res.history[-4:]) < 0.02 * sum(res.history[:4])
    assert coef_distance(res.coefficients, target) < 0.15 * coef_distance(zero, target)
    # the exported shift is what was learned: the teacher's outputs are matched after apply_
    x, y = batches[0]
    assert F.mse_loss(applied(model, res.shift)(x), y) < 0.02 * F.mse_loss(model(x), y)


def test_supervised_cross_entropy_and_isotropic_variant() -> None:
    model, tvs, _, batches = teacher_task()
    labelled = [(x, y.argmax(-1)) for x, y in batches]
    res = sk.learn_atlas(model, tvs, labelled, epochs=10, lr=0.05, progress=False)
    assert sum(res.history[-4:]) < 0.7 * sum(res.history[:4])  # measured 0.44
    iso = sk.learn_atlas(model, tvs, labelled, blockwise=False, epochs=3, lr=0.05, progress=False)
    values = list(iso.coefficients.values())
    assert all(v == values[0] for v in values) and values[0] != [0.0, 0.0]
    ta = sk.merge(tvs, method="task_arithmetic", weights=values[0])
    assert iso.shift.allclose(ta, atol=1e-6)


def test_entropy_objective_lowers_entropy_without_labels() -> None:
    model, tvs, _, batches = teacher_task()
    inputs = [x for x, _ in batches]
    res = sk.learn_atlas(model, tvs, inputs, objective="entropy", epochs=8, lr=0.05, progress=False)
    xs = torch.cat(inputs)
    before, after = entropy_loss(model(xs)), entropy_loss(applied(model, res.shift)(xs))
    assert after < 0.1 * before  # measured 1.08 -> 0.016 nats
    torch.testing.assert_close(entropy_loss(torch.zeros(3, 4)), torch.tensor(4.0).log())


def test_merge_of_result_coefficients_is_result_shift() -> None:
    model, tvs, _, batches = teacher_task()
    for k in (1, 3):
        res = sk.learn_atlas(
            model, tvs, batches, loss_fn=F.mse_loss, partitions=k, partition_seed=7, epochs=2, progress=False
        )
        assert res.partitions == k and res.partition_seed == 7
        assert sk.merge(tvs, method="atlas", **res.merge_params).allclose(res.shift, rtol=0, atol=0)
        if k == 1:
            assert sk.merge(tvs, method="atlas", coefficients=res.coefficients).allclose(res.shift, atol=0)
        # the exported shift reproduces the learned model's outputs
        blocks = blocks_for(model, tvs, partitions=k, partition_seed=7)
        lam = torch.tensor([res.coefficients[key] for key in blocks.keys])  # (B, T) or (B, T, K)
        with torch.no_grad():
            blocks.lam.copy_(lam.transpose(0, 1).reshape(blocks.lam.shape))
        x = batches[0][0]
        torch.testing.assert_close(applied(model, res.shift)(x), blocks.call(model, x))


def test_hf_style_dict_batches_sequence_labels_and_forward_hook() -> None:
    llama, ids = make("tiny_llama")
    hf = llama.hf  # type: ignore[union-attr]
    tvs = tuned_copies(hf, 2, scale=0.02)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.roll(-1, 1)}
    res = sk.learn_atlas(hf, tvs, [batch], epochs=2, lr=0.01, progress=False)
    assert len(res.history) == 2 and set(res.coefficients) == set(tvs[0].keys())

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x: Tensor) -> SimpleNamespace:
            return SimpleNamespace(scores=self.fc(x))

    m = Wrapped()
    tv = tuned_copies(m, 1)
    x = torch.randn(4, 6)
    with pytest.raises(ShiftkitError, match="forward="):
        sk.learn_atlas(m, tv, [(x, torch.zeros(4, dtype=torch.long))], progress=False)
    res = sk.learn_atlas(
        m, tv, [x], objective="entropy", forward=lambda f, inp: f(inp).scores, progress=False
    )
    assert len(res.history) == 1


def test_model_is_left_unchanged() -> None:
    model, _ = make("cnn")
    model.train()
    model.bn1.eval()  # type: ignore[union-attr]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tvs = tuned_copies(model, 2)
    x = torch.randn(8, 3, 6, 6)
    res = sk.learn_atlas(model, tvs, [(x, torch.arange(8) % 3)] * 2, epochs=2, reg_gamma=0.5, progress=False)
    # BatchNorm running statistics are buffers, not blocks: frozen at the base value, coefficient 0
    assert res.coefficients["bn1.running_mean"] == [0.0, 0.0] and res.coefficients["conv1.weight"] != [
        0.0,
        0.0,
    ]
    assert torch.equal(res.shift["bn1.running_var"], torch.zeros(4))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.training and not model.bn1.training and model.conv1.training  # type: ignore[union-attr]


def test_missing_block_counts_as_zero_and_regularizer_value() -> None:
    model, x = make("mlp")
    tvs = tuned_copies(model, 2)
    partial = Shift(DELTA, None, {k: v for k, v in tvs[1].tensors.items() if k != "head.bias"})
    res = sk.learn_atlas(model, [tvs[0], partial], [(x, torch.tensor([0, 1, 2, 0]))], lr=0.1, progress=False)
    assert res.coefficients["head.bias"][1] == 0.0 and res.coefficients["head.bias"][0] != 0.0
    blocks = blocks_for(model, tvs)
    with torch.no_grad():
        blocks.lam.copy_(torch.arange(14.0).reshape(2, 7, 1) - 6)
    lam = blocks.lam.detach()[:, :, 0]  # (T, B)
    torch.testing.assert_close(blocks.regularizer(1), lam.abs().sum(0).mean())
    torch.testing.assert_close(blocks.regularizer(2), lam.pow(2).sum(0).sqrt().mean())


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 12, bias=False)
        self.out.weight = self.embed.weight  # tied

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.embed(ids))))


def test_tied_weights_are_one_block() -> None:
    torch.manual_seed(1)
    model, ids = TiedLM().eval(), torch.randint(0, 12, (3, 4))
    tvs = tuned_copies(model, 2)
    # the delta names both modules of the tied tensor, with one tensor (tests/core/test_tied_weights.py)
    assert tvs[0].tensors["out.weight"] is tvs[0].tensors["embed.weight"]
    blocks = blocks_for(model, tvs)
    assert blocks.keys == ["embed.weight", "mix.weight", "mix.bias"]
    assert torch.equal(blocks.call(model, ids), model(ids))
    with torch.no_grad():
        blocks.lam.copy_(torch.tensor([0.7, -0.4])[:, None, None].expand_as(blocks.lam))
    ta = applied(model, sk.merge(tvs, weights=[0.7, -0.4]))
    torch.testing.assert_close(blocks.call(model, ids), ta(ids))  # the tied head moved with the embedding


def test_bf16_model_keeps_task_vectors_in_bf16() -> None:
    model, x = make("mlp")
    model = model.to(torch.bfloat16)
    tvs = [tv.to(dtype=torch.float32) for tv in tuned_copies(model, 2)]
    blocks = blocks_for(model, tvs)
    assert all(t is not None and t.dtype == torch.bfloat16 for ts in blocks.taus for t in ts)
    assert blocks.lam.dtype == torch.float32
    xb = x.to(torch.bfloat16)
    assert torch.equal(blocks.call(model, xb), model(xb))


def test_errors_name_the_problem() -> None:
    model, x = make("mlp")
    tvs = tuned_copies(model, 2)
    batches = [(x, torch.tensor([0, 1, 2, 0]))]

    def learn(vectors: list[Shift], **kw: object) -> None:
        sk.learn_atlas(model, vectors, batches, progress=False, **kw)  # type: ignore[arg-type]

    extra = Shift(DELTA, None, {**tvs[1].tensors, "ghost.weight": torch.zeros(2)})
    with pytest.raises(ShiftMismatchError, match=r"ghost\.weight"):
        learn([tvs[0], extra])
    wrong = Shift(DELTA, None, {**tvs[1].tensors, "fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(ShiftMismatchError, match=r"fc1\.weight"):
        learn([tvs[0], wrong])
    nan = Shift(DELTA, None, {**tvs[1].tensors, "norm.bias": torch.full((8,), float("nan"))})
    with pytest.raises(ShiftkitError, match=r"norm\.bias"):
        learn([tvs[0], nan])
    lora = Shift("lora", None, {})
    with pytest.raises(ShiftkitError, match="delta"):
        learn([lora])
    with pytest.raises(ShiftkitError, match="blockwise"):
        learn(tvs, partitions=2, blockwise=False)
    with pytest.raises(ShiftkitError, match="objective"):
        learn(tvs, objective="fixmatch")
    with pytest.raises(ShiftkitError, match="labels"):
        sk.learn_atlas(model, tvs, [x], progress=False)
    with pytest.raises(ShiftkitError, match="iterator"):
        sk.learn_atlas(model, tvs, iter(batches), epochs=2, progress=False)
    with pytest.raises(ShiftkitError, match=r"fc2\.weight"):
        sk.merge(tvs, method="atlas", coefficients={"fc2.weight": [1.0, 2.0, 3.0]})
    with pytest.raises(ShiftkitError, match=r"head\.bias"):
        sk.merge(tvs, method="atlas", coefficients={"head.bias": [1.0, float("inf")]})
    with pytest.raises(ShiftkitError, match=r"head\.bias"):
        sk.merge(tvs, method="atlas", coefficients={"head.bias": [[1.0, 2.0], [3.0]]})


@pytest.mark.assets
def test_minilm_text_classifier_with_tokenised_batches() -> None:
    from conftest import need_asset

    need_asset("minilm")
    from shiftkit.recipes.learn import encode_texts, eval_batches, text_batches
    from shiftkit.recipes.models import text_classifier

    model, tok = text_classifier("minilm", num_labels=2, seed=0)
    texts = ["a wonderful film", "dull and far too long", "I loved it", "a waste of time"] * 2
    data = encode_texts(tok, texts, [1, 0, 1, 0] * 2, max_length=16)
    # task vectors of a partial fine-tune (last layer + head) keep this test light; the rest stays θ0
    gen = torch.Generator().manual_seed(0)
    own = {k: v for k, v in model.state_dict().items() if "layer.5." in k or k.startswith("head.")}
    tvs = [
        Shift(DELTA, None, {k: 1e-2 * torch.randn(v.shape, generator=gen) for k, v in own.items()})
        for _ in "ab"
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = eval_batches(data, batch_size=8)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        zero = blocks_for(model, tvs).call(model, inputs)
        assert torch.equal(zero, model(**inputs))
    res = sk.learn_atlas(model, tvs, text_batches(data, batch_size=4), epochs=2, lr=0.01, progress=False)
    assert len(res.history) == 4 and all(torch.isfinite(torch.tensor(res.history)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(res.coefficients) == len(tvs[0].keys()) and res.shift.keys() == tvs[0].keys()
