"""Protocol tests for shiftkit.adapt: registry, source, reset, episodic, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shiftkit import adapt
from shiftkit.errors import ShiftkitError, UnknownMethodError
from tiny_models import make as make_tiny


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _shifted(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x + 1.0


def test_list_and_make() -> None:
    assert {"source", "norm", "tent"} <= set(adapt.list_methods())
    model, _ = make_tiny("cnn")
    assert isinstance(adapt.make("tent", model, lr=1e-3), adapt.Tent)


def test_unknown_method_lists_names() -> None:
    model, _ = make_tiny("cnn")
    with pytest.raises(UnknownMethodError, match="tent"):
        adapt.make("tnet", model)


def test_unknown_option_named() -> None:
    model, _ = make_tiny("cnn")
    with pytest.raises(ShiftkitError, match="momentum"):
        adapt.make("tent", model, momentum=0.5)
    with pytest.raises(ShiftkitError, match="lr"):
        adapt.make("norm", model, lr=1e-3)


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_lr(bad: float) -> None:
    model, _ = make_tiny("cnn")
    with pytest.raises(ShiftkitError, match="lr"):
        adapt.make("tent", model, lr=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_steps(bad: object) -> None:
    model, _ = make_tiny("cnn")
    with pytest.raises(ShiftkitError, match="steps"):
        adapt.make("tent", model, steps=bad)


def test_bad_optimizer() -> None:
    model, _ = make_tiny("cnn")
    with pytest.raises(ShiftkitError, match="optimizer"):
        adapt.make("tent", model, optimizer="rmsprop")


@pytest.mark.parametrize("name", ["norm", "tent"])
def test_model_without_norm_layers(name: str) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ShiftkitError, match=rf"{name}.*BatchNorm2d.*Sequential"):
        adapt.make(name, model)


def test_source_equals_eval_model() -> None:
    model, x = make_tiny("cnn")
    model.train()
    before = _state(model)
    reference = make_tiny("cnn")[0].eval()
    tta = adapt.make("source", model)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(tta(_shifted(x)), reference(_shifted(x)), rtol=0, atol=0)
        torch.testing.assert_close(tta(x), reference(x), rtol=0, atol=0)
    assert tta.adapted_parameters() == []
    _assert_state_equal(before, _state(model))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_reset_restores_model_and_optimizer(optimizer: str) -> None:
    model, x = make_tiny("cnn")
    before = _state(model)
    tta = adapt.make("tent", model, lr=1e-2, optimizer=optimizer, steps=2)
    assert tta.optimizer is not None
    opt_before = tta.optimizer.state_dict()
    first = tta(_shifted(x))
    tta(_shifted(x))
    assert not torch.equal(model.bn1.weight, before["bn1.weight"])
    assert tta.optimizer.state_dict()["state"]  # Adam moments / SGD momentum exist now
    tta.reset()
    _assert_state_equal(before, _state(model))
    assert tta.optimizer.state_dict() == opt_before
    # bit for bit: the same stream gives the same outputs again
    torch.testing.assert_close(tta(_shifted(x)), first, rtol=0, atol=0)


def test_episodic_resets_each_call() -> None:
    model, x = make_tiny("cnn")
    tta = adapt.make("tent", model, lr=1e-2, episodic=True)
    a = tta(_shifted(x))
    b = tta(_shifted(x))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    cont_model, _ = make_tiny("cnn")
    cont = adapt.make("tent", cont_model, lr=1e-2)
    torch.testing.assert_close(cont(_shifted(x)), a, rtol=0, atol=0)
    assert not torch.equal(cont(_shifted(x)), b)  # continual: the second batch sees the adapted model


def test_forward_under_no_grad_still_adapts() -> None:
    model, x = make_tiny("cnn")
    w0 = model.bn1.weight.detach().clone()
    tta = adapt.make("tent", model)
    with torch.no_grad():
        tta(_shifted(x))
    assert not torch.equal(model.bn1.weight, w0)


def test_subclass_adapting_parameters_needs_optimizer_and_loss() -> None:
    class NoOptimizer(adapt.TTAMethod):
        def collect_params(self) -> list[nn.Parameter]:
            return list(self.model.parameters())

    model = nn.Linear(3, 2)
    with pytest.raises(ShiftkitError, match="NoOptimizer adapts parameters but defines no optimizer"):
        NoOptimizer(model)

    class NoLoss(NoOptimizer):
        def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=0.1)

    with pytest.raises(ShiftkitError, match="NoLoss adapts parameters but defines no loss"):
        NoLoss(model)(torch.randn(4, 3))
