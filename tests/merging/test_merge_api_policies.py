"""``sk.merge`` input policies: ``on_missing="skip"`` (spec §0.3) and LoRA inputs (exact ΔW conversion)."""

from __future__ import annotations

import copy

import pytest
import torch

import shiftkit as sk
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import ShiftkitError, ShiftMismatchError
from tiny_models import make


def delta(**tensors: object) -> Shift:
    ts = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    return Shift(DELTA, None, ts, {k: tuple(v.shape) for k, v in ts.items()})


def test_skip_soup_of_two_gives_the_only_value_not_half() -> None:
    a = delta(w=[1.0, 2.0], b=[4.0])
    b = delta(w=[3.0, 0.0])
    skip = sk.merge([a, b], method="linear", on_missing="skip")
    zero = sk.merge([a, b], method="linear", on_missing="zero")
    torch.testing.assert_close(skip["w"], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(skip["b"], torch.tensor([4.0]))  # only a has it: a's value
    torch.testing.assert_close(zero["b"], torch.tensor([2.0]))  # zero drags the mean to the base
    assert list(skip.tensors) == ["w", "b"]


def test_skip_normalises_over_participating_weights_only() -> None:
    a, b, c = delta(w=[1.0], v=[10.0]), delta(w=[2.0]), delta(w=[4.0], v=[40.0])
    out = sk.merge([a, b, c], method="linear", weights=[1.0, 2.0, 3.0], on_missing="skip")
    torch.testing.assert_close(out["w"], torch.tensor([(1 + 4 + 12) / 6]))
    torch.testing.assert_close(out["v"], torch.tensor([(10 + 120) / 4]))
    # a sum is the same under skip and zero (a missing shift adds nothing either way)
    ta = sk.merge([a, b, c], weights=[1.0, 2.0, 3.0], on_missing="skip", lambda_=0.5)
    tz = sk.merge([a, b, c], weights=[1.0, 2.0, 3.0], on_missing="zero", lambda_=0.5)
    assert ta.allclose(tz)


def test_skip_ties_uses_the_participants_only() -> None:
    a, b = delta(w=[1.0, -3.0], v=[0.5, -0.5]), delta(w=[-2.0, -1.0])
    out = sk.merge([a, b], method="ties", density=1.0, on_missing="skip")
    torch.testing.assert_close(out["v"], torch.tensor([0.5, -0.5]))  # a alone: its own shift
    both = sk.merge([delta(w=[1.0, -3.0]), b], method="ties", density=1.0)
    torch.testing.assert_close(out["w"], both["w"])


def test_skip_refuses_whole_model_statistics_when_groups_differ() -> None:
    a, b = delta(w=[1.0, -3.0], v=[0.5, -0.5]), delta(w=[-2.0, -1.0])
    with pytest.raises(ShiftkitError, match="tensor-local"):
        sk.merge([a, b], method="ties", density=0.5, semantics="paper", on_missing="skip")
    same = sk.merge([a, a], method="ties", density=0.5, semantics="paper", on_missing="skip")
    ref = sk.merge([a, a], method="ties", density=0.5, semantics="paper")
    assert same.allclose(ref)


def test_skip_keeps_dtype_and_unknown_policy_lists_choices() -> None:
    a = Shift(DELTA, None, {"w": torch.ones(2, dtype=torch.bfloat16)}, {"w": (2,)})
    b = Shift(
        DELTA, None, {"w": torch.ones(2, dtype=torch.bfloat16), "x": torch.ones(1, dtype=torch.bfloat16)}
    )
    assert sk.merge([a, b], method="linear", on_missing="skip")["x"].dtype == torch.bfloat16
    with pytest.raises(ShiftkitError, match="skip"):
        sk.merge([a, b], on_missing="drop")
    with pytest.raises(ShiftMismatchError, match="skip"):
        sk.merge([a, b])


def _lora_shift(seed: int, targets: list[str]) -> tuple[torch.nn.Module, Shift]:
    base, _ = make("mlp")
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    sk.attach_(model, sk.LoRAConfig(r=2, lora_alpha=4.0, target_modules=targets, init_lora_weights=False))
    return base, sk.extract(model)


def test_merge_accepts_lora_and_mixes_with_deltas() -> None:
    base, l1 = _lora_shift(1, ["fc1", "fc2"])
    _, l2 = _lora_shift(2, ["fc1", "fc2"])
    d1 = sk.to_delta(sk.attach_(copy.deepcopy(base), l1))
    d2 = sk.to_delta(sk.attach_(copy.deepcopy(base), l2))
    for method, params in [("linear", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5})]:
        ref = sk.merge([d1, d2], method=method, **params)
        assert sk.merge([l1, l2], method=method, **params).allclose(ref, atol=1e-7)
        assert sk.merge([l1, d2], method=method, **params).allclose(ref, atol=1e-7)
    # a LoRA on fewer weights than a dense delta: skip averages each weight over the shifts that change it
    _, l3 = _lora_shift(3, ["fc1"])
    d3 = sk.to_delta(sk.attach_(copy.deepcopy(base), l3))
    out = sk.merge([l3, d2], method="linear", on_missing="skip")
    torch.testing.assert_close(out["fc2.weight"], d2["fc2.weight"])
    torch.testing.assert_close(out["fc1.weight"], (d3["fc1.weight"] + d2["fc1.weight"]) / 2)


def test_other_methods_still_need_to_delta() -> None:
    base, _ = make("mlp")
    ssf = sk.extract(sk.attach_(copy.deepcopy(base), sk.SSFConfig(target_modules=["fc1"])))
    with pytest.raises(ShiftkitError, match=r"sk\.to_delta"):
        sk.merge([ssf, ssf])
