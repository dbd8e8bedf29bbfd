"""The core extension points: group wrappers sharing a parameter, on_attach/on_detach hooks, regularisers.

A throw-away method is registered for each test and removed afterwards, so the global registry (and the
conformance matrix) never sees it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from shiftkit.core import registry
from shiftkit.core.config import ShiftConfig
from shiftkit.core.wrapper import ShiftWrapper


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SharedConfig(ShiftConfig):
    pass


class _Offset(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(width))


class _SharedOffset(ShiftWrapper):
    """``base(x) + offset`` where one offset parameter is shared by every wrapper; counts root forwards."""

    def __init__(self, base: nn.Module, offset: _Offset) -> None:
        super().__init__(base)
        self.offset = offset
        self.hook_id: int | None = None
        self.root_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.offset.value

    def delta(self) -> dict[str, Tensor]:
        return {"bias": self.offset.value}

    def _count(self, module: nn.Module, args: tuple[object, ...]) -> None:
        self.root_calls += 1

    def on_attach(self, root: nn.Module, name: str) -> None:
        self.hook_id = root.register_forward_pre_hook(self._count).id

    def on_detach(self, root: nn.Module, name: str) -> None:
        if self.hook_id is not None:
            root._forward_pre_hooks.pop(self.hook_id, None)
            self.hook_id = None

    def regularization_loss(self) -> Tensor:
        return self.offset.value.pow(2).sum()


@pytest.fixture
def shared_method() -> Iterator[str]:
    name = "_test_shared_offset"

    def wrap_group(
        root: nn.Module, targets: list[tuple[str, nn.Module]], config: ShiftConfig
    ) -> list[ShiftWrapper]:
        offset = _Offset(targets[0][1].out_features)  # type: ignore[arg-type]
        return [_SharedOffset(m, offset) for _, m in targets]

    registry.register_method(name, config=_SharedConfig, targets=(nn.Linear,), foldable=True, group=True)(
        wrap_group
    )
    try:
        yield name
    finally:
        registry.METHODS._entries.pop(name, None)
        registry._BY_CONFIG.pop(_SharedConfig, None)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))


def test_shared_parameter_is_listed_and_saved_once(shared_method: str, tmp_path: Path) -> None:
    model = _model()
    sk.attach_(model, _SharedConfig())
    params = sk.named_shift_parameters(model)
    assert list(params) == ["0.offset.value"]  # the first wrapper holds the key
    with torch.no_grad():
        params["0.offset.value"].copy_(torch.arange(4.0))
    x = torch.randn(3, 4)
    want = model(x)
    sk.save(sk.extract(model), tmp_path / "s.safetensors")
    fresh = _model()
    sk.attach_(fresh, sk.load(tmp_path / "s.safetensors"))
    assert torch.equal(fresh(x), want)
    assert fresh[0].offset is fresh[2].offset  # still shared after the re-attach


def test_single_module_wrap_of_a_group_method_is_refused(shared_method: str) -> None:
    with pytest.raises(sk.ShiftkitError, match="share state"):
        sk.get_method(shared_method).wrap(nn.Linear(2, 2), _SharedConfig())


def test_hooks_installed_on_attach_and_removed_on_detach_and_fold(shared_method: str) -> None:
    for finish in (sk.detach_, sk.fold_):
        model = _model()
        sk.attach_(model, _SharedConfig())
        model(torch.randn(2, 4))
        assert model[0].root_calls == 1 and model[2].root_calls == 1
        assert len(model._forward_pre_hooks) == 2
        finish(model)
        assert len(model._forward_pre_hooks) == 0


def test_deep_copy_keeps_hooks_independent(shared_method: str) -> None:
    model = _model()
    sk.attach_(model, _SharedConfig())
    twin = copy.deepcopy(model)
    twin(torch.randn(2, 4))
    assert twin[0].root_calls == 1 and model[0].root_calls == 0  # the copy's hook calls the copy
    sk.detach_(twin)
    assert len(model._forward_pre_hooks) == 2  # detaching the copy left the original's hooks alone


def test_regularization_loss_sums_wrappers_and_is_zero_without_shift(shared_method: str) -> None:
    model = _model()
    assert float(sk.regularization_loss(model)) == 0.0
    sk.attach_(model, _SharedConfig())
    with torch.no_grad():
        model[0].offset.value.fill_(2.0)
    # two wrappers share one offset of four 2s: each contributes 4·2² = 16
    assert float(sk.regularization_loss(model).detach()) == pytest.approx(32.0)
    sk.regularization_loss(model).backward()
    assert model[0].offset.value.grad is not None


def test_failed_attach_removes_hooks(shared_method: str) -> None:
    model = _model()
    sk.attach_(model, _SharedConfig())
    bad = sk.extract(model)
    sk.detach_(model)
    bad.tensors["0.offset.value"] = torch.zeros(5)  # wrong shape: the load step fails after on_attach
    with pytest.raises(sk.ShiftMismatchError):
        sk.attach_(model, bad)
    assert len(model._forward_pre_hooks) == 0
    assert not any(isinstance(m, ShiftWrapper) for m in model.modules())


def test_wrappers_follow_the_mode_of_the_module_they_wrap() -> None:
    model = _model().eval()
    sk.attach_(model, sk.LoRAConfig(r=2, lora_dropout=0.5, target_modules=["0"], modules_to_save=["2"]))
    assert not any(m.training for m in model.modules())  # dropout stays off in an eval-mode model
    x = torch.randn(3, 4)
    assert torch.equal(model(x), model(x))
