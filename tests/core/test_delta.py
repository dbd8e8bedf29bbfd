"""Dense deltas: task vectors, the delta of an attached shift, and adding a delta in place."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import shiftkit as sk
from shiftkit.core.delta import base_tensors
from tiny_models import make


def _tuned(model: nn.Module, seed: int = 0) -> nn.Module:
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tuned.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return tuned


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_task_vector_is_tuned_minus_base(name: str) -> None:
    base, _ = make(name)
    tuned = _tuned(base)
    expected = {k: tuned.state_dict()[k] - v for k, v in base.state_dict().items() if v.is_floating_point()}
    for a, b in ((base, tuned), (base.state_dict(), tuned.state_dict())):
        tv = sk.task_vector(a, b)
        assert tv.method == "delta" and tv.config is None
        assert set(tv.tensors) == set(expected)  # BN running stats included, num_batches_tracked not
        for k, d in expected.items():
            assert torch.equal(tv[k], d), k
            assert tv.base[k] == tuple(d.shape)


def test_task_vector_mixing_module_and_state_dict() -> None:
    base, _ = make("mlp")
    tuned = _tuned(base)
    tv = sk.task_vector(base, tuned.state_dict())
    assert torch.equal(tv["fc1.weight"], tuned.fc1.weight - base.fc1.weight)


def test_task_vector_mismatches() -> None:
    base, _ = make("mlp")
    sd = base.state_dict()
    fewer = {k: v for k, v in sd.items() if k != "head.bias"}
    with pytest.raises(sk.ShiftMismatchError, match=r"head\.bias"):
        sk.task_vector(sd, fewer)
    other_shape = {**sd, "head.bias": torch.zeros(5)}
    with pytest.raises(sk.ShiftMismatchError, match=r"head\.bias.*\(3,\).*\(5,\)"):
        sk.task_vector(sd, other_shape)
    other_dtype = {**sd, "head.bias": sd["head.bias"].double()}
    with pytest.raises(sk.ShiftMismatchError, match=r"head\.bias.*float64"):
        sk.task_vector(sd, other_dtype)


def test_task_vector_refuses_a_model_with_a_shift_attached() -> None:
    base, _ = make("mlp")
    tuned = copy.deepcopy(base)
    sk.attach_(tuned, sk.LoRAConfig(target_modules="all"))
    with pytest.raises(sk.ShiftkitError, match="to_delta"):
        sk.task_vector(base, tuned)
    with pytest.raises(sk.ShiftkitError):
        sk.task_vector(base, [1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", [1.0, 0.5, -2.0])
def test_apply_with_scale(scale: float) -> None:
    base, _ = make("cnn")
    tuned = _tuned(base)
    tv = sk.task_vector(base, tuned)
    target = copy.deepcopy(base)
    sk.apply_(target, tv, scale=scale)
    for k, v in base.state_dict().items():
        got = target.state_dict()[k]
        if v.is_floating_point():
            torch.testing.assert_close(got, v + scale * (tuned.state_dict()[k] - v), atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(got, v)


def test_apply_unknown_key_or_shape() -> None:
    base, _ = make("mlp")
    tv = sk.task_vector(base, _tuned(base))
    unknown = sk.Shift("delta", None, {**tv.tensors, "fc9.weight": torch.zeros(2)}, {})
    reference = copy.deepcopy(base)
    with pytest.raises(sk.ShiftMismatchError, match=r"fc9\.weight"):
        sk.apply_(base, unknown)
    wrong = sk.Shift("delta", None, {"fc1.weight": torch.zeros(6, 8)}, {})
    with pytest.raises(sk.ShiftMismatchError, match=r"fc1\.weight"):
        sk.apply_(base, wrong)
    for k, v in reference.state_dict().items():  # checked before anything was added
        assert torch.equal(base.state_dict()[k], v)


def test_apply_refuses_method_shifts() -> None:
    model, _ = make("mlp")
    sk.attach_(model, sk.LoRAConfig(target_modules="all"))
    lora = sk.extract(model)
    with pytest.raises(sk.ShiftkitError, match="attach_"):
        sk.apply_(make("mlp")[0], lora)


def _lora_model(r: int = 4, alpha: float = 8.0) -> tuple[nn.Module, torch.Tensor, nn.Module]:
    model, x = make("mlp")
    base = copy.deepcopy(model)
    sk.attach_(model, sk.LoRAConfig(r=r, lora_alpha=alpha, target_modules=["fc1", "fc2", "head"]))
    with torch.no_grad():
        for p in sk.shift_parameters(model):
            p.normal_(0, 0.3)
    return model, x, base


def test_to_delta_of_lora_is_scaled_b_times_a() -> None:
    r, alpha = 4, 8.0
    model, _, _ = _lora_model(r, alpha)
    delta = sk.to_delta(model)
    assert set(delta.tensors) == {"fc1.weight", "fc2.weight", "head.weight"}
    for name in ("fc1", "fc2", "head"):
        wrapper = getattr(model, name)
        a, b = wrapper.lora_A.detach(), wrapper.lora_B.detach()
        by_hand = torch.zeros(b.shape[0], a.shape[1])
        for i in range(b.shape[0]):  # explicit sums, independent of any matmul in the library
            for j in range(a.shape[1]):
                by_hand[i, j] = (alpha / r) * sum(float(b[i, k]) * float(a[k, j]) for k in range(r))
        torch.testing.assert_close(delta[f"{name}.weight"], by_hand, atol=1e-6, rtol=1e-5)
        assert not delta[f"{name}.weight"].requires_grad


def test_apply_to_delta_reproduces_the_attached_model() -> None:
    model, x, base = _lora_model()
    with torch.no_grad():
        expected = model(x)
    sk.apply_(base, sk.to_delta(model))
    with torch.no_grad():
        torch.testing.assert_close(base(x), expected, atol=1e-5, rtol=1e-5)


def test_to_delta_equals_task_vector_of_the_folded_model() -> None:
    model, _, base = _lora_model()
    delta = sk.to_delta(model)
    folded = sk.fold_(copy.deepcopy(model))
    tv = sk.task_vector(base, folded)
    for k, d in tv.tensors.items():
        torch.testing.assert_close(d, delta.tensors.get(k, torch.zeros_like(d)), atol=1e-6, rtol=1e-5)


def test_to_delta_of_ssf_and_bitfit() -> None:
    model, _ = make("mlp")
    sk.attach_(model, sk.SSFConfig(target_modules=["fc1", "norm"]))
    d = sk.to_delta(model)
    w, b = model.fc1.base.weight, model.fc1.base.bias
    g, h = model.fc1.scale.detach(), model.fc1.shift.detach()
    torch.testing.assert_close(d["fc1.weight"], g[:, None] * w - w)
    torch.testing.assert_close(d["fc1.bias"], g * b + h - b)
    gn, bn = model.norm.base.weight, model.norm.base.bias
    gs, hs = model.norm.scale.detach(), model.norm.shift.detach()
    torch.testing.assert_close(d["norm.weight"], gs * gn - gn)
    torch.testing.assert_close(d["norm.bias"], gs * bn + hs - bn)

    model, _ = make("mlp")
    sk.attach_(model, sk.BitFitConfig(target_modules="all"))
    with torch.no_grad():
        model.head.bias_delta.fill_(0.5)
    d = sk.to_delta(model)
    assert set(d.tensors) == {"fc1.bias", "norm.bias", "head.bias"}
    assert torch.equal(d["head.bias"], torch.full((3,), 0.5))


def test_to_delta_needs_an_attached_shift() -> None:
    model, _ = make("mlp")
    with pytest.raises(sk.ShiftkitError, match="no shift"):
        sk.to_delta(model)


def test_base_tensors_look_through_wrappers_and_report_tied_weights_once() -> None:
    model, _ = make("embedding")
    model.lm_head.weight = model.embed.weight  # tie: lm_head (12, 6) == embed (12, 6)
    names = list(base_tensors(model))
    assert "embed.weight" in names and "lm_head.weight" not in names
    sk.attach_(model, sk.LoRAConfig(target_modules=["proj"]))
    assert list(base_tensors(model)) == names  # "proj.weight", not "proj.base.weight"
