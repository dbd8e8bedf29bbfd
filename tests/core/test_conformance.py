"""Conformance: every registered method × every tiny model satisfies the STYLE.md invariants.

The matrix is built from ``sk.list_methods()``, so a new method is tested here without touching this file.
A combination is skipped only when the method supports no module of the model (``TargetNotFoundError``
with ``target_modules="all"``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from shiftkit.core.attach import attached_wrappers
from shiftkit.core.config import ShiftConfig, config_to_dict
from shiftkit.core.registry import config_from_dict
from shiftkit.core.wrapper import is_shift_module
from tiny_models import TINY_MODELS, make

METHODS = sk.list_methods()
MODELS = sorted(TINY_MODELS)
CASES = [pytest.param(m, k, id=f"{m}-{k}") for m in METHODS for k in MODELS]


# --- helpers ---------------------------------------------------------------------------------------------
def _config(method: str, zero: bool = False, **overrides: Any) -> ShiftConfig:
    spec = sk.get_method(method)
    if zero:
        if spec.zero_init is None:
            pytest.skip(f"{method} has no zero initialisation")
        overrides = {**spec.zero_init, **overrides}
    overrides.setdefault("target_modules", "all")
    return spec.config_cls(**overrides)


def _attach(model: nn.Module, method: str, zero: bool = False, **overrides: Any) -> nn.Module:
    config = _config(method, zero, **overrides)
    try:
        sk.attach_(model, config)
    except sk.TargetNotFoundError as err:
        if config.target_modules == "all":
            pytest.skip(f"{method} supports no module of this model: {err}")
        raise
    return model


@torch.no_grad()
def _randomise(model: nn.Module, std: float = 0.1) -> None:
    # added to the initial values: scales stay near 1, LoRA's zero B becomes non-zero
    for p in sk.shift_parameters(model):
        p.add_(torch.randn_like(p) * std)


@torch.no_grad()
def _out(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype) if x.is_floating_point() else x


@contextmanager
def _same_rng() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        yield


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _no_wrappers(model: nn.Module) -> None:
    assert not [n for n, m in model.named_modules() if is_shift_module(m)]
    assert "_shiftkit_state" not in model.__dict__


def _assert_plain_architecture(folded: nn.Module, original: nn.Module) -> None:
    """Same module tree and types; parameter names equal plus only params the base had as ``None``."""
    _no_wrappers(folded)
    assert [(n, type(m)) for n, m in folded.named_modules()] == [
        (n, type(m)) for n, m in original.named_modules()
    ]
    before = {n for n, _ in original.named_parameters()}
    after = {n for n, _ in folded.named_parameters()}
    assert before <= after
    for name in after - before:  # e.g. SSF creates the bias of a bias-free conv
        owner, _, attr = name.rpartition(".")
        mod = original.get_submodule(owner)
        assert attr in ("weight", "bias") and getattr(mod, attr, None) is None, name
    assert set(folded.state_dict()) - set(original.state_dict()) == after - before


# --- invariants ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_zero_init_is_identity(method: str, model_name: str) -> None:
    model, x = make(model_name)
    expected = _out(model, x)
    _attach(model, method, zero=True)
    assert torch.equal(_out(model, x), expected)


@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_fold_equals_attached(method: str, model_name: str) -> None:
    model, x = make(model_name)
    original = copy.deepcopy(model)
    _attach(model, method)
    _randomise(model)
    attached = _out(model, x)
    assert not torch.equal(attached, _out(original, x)), "the randomised shift changed nothing"
    if not sk.get_method(method).foldable:
        with pytest.raises(sk.NotFoldableError):
            sk.fold_(model)
        assert sk.shift_parameters(model), "a refused fold must leave the shift attached"
        return
    sk.fold_(model)
    torch.testing.assert_close(_out(model, x), attached, atol=1e-5, rtol=1e-5)
    _assert_plain_architecture(model, original)
    assert _flags(model) == {
        n: True for n in _flags(model)
    }  # flags restored (new biases train like the rest)


@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_fold_in_train_mode_then_eval(method: str, model_name: str) -> None:
    """Train-mode forward (BN batch stats, running-stat updates) folds equivalently, in train and eval."""
    model, x = make(model_name)
    _attach(model, method)
    _randomise(model)
    model.train()
    # this check is about batch statistics; dropout in a shift branch (LoRA, linear adapters) is random in
    # training by design and has nothing to fold, so it is switched off here
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    if not sk.get_method(method).foldable:
        with pytest.raises(sk.NotFoldableError):
            sk.fold_(model)
        return
    folded = sk.fold_(copy.deepcopy(model))
    with _same_rng():
        y_attached = _out(model, x)
    with _same_rng():
        y_folded = _out(folded, x)
    torch.testing.assert_close(y_folded, y_attached, atol=1e-5, rtol=1e-5)
    # both updated their BN running statistics identically; eval mode must agree too
    model.eval()
    folded.eval()
    torch.testing.assert_close(_out(folded, x), _out(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_detach_restores_bit_for_bit(method: str, model_name: str) -> None:
    model, x = make(model_name)
    # a mixed requires_grad pattern must come back exactly, not "all True"
    first = next(model.parameters())
    first.requires_grad_(False)
    original = copy.deepcopy(model)
    y0 = _out(model, x)
    _attach(model, method)
    _randomise(model)
    sk.detach_(model)
    _assert_state_equal(model, original)
    assert _flags(model) == _flags(original)
    assert [(n, type(m)) for n, m in model.named_modules()] == [
        (n, type(m)) for n, m in original.named_modules()
    ]
    _no_wrappers(model)
    assert torch.equal(_out(model, x), y0)
    _attach(model, method)  # the model is clean: a new shift attaches


@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_save_load_attach_reproduces(method: str, model_name: str, tmp_path: Path) -> None:
    model, x = make(model_name)
    fresh = copy.deepcopy(model)
    _attach(model, method)
    _randomise(model)
    expected = _out(model, x)
    shift = sk.extract(model)
    path = tmp_path / f"{method}.safetensors"
    sk.save(shift, path)
    loaded = sk.load(path)
    assert loaded.method == method
    assert loaded.config == shift.config
    assert loaded.base == shift.base
    assert set(loaded.tensors) == set(shift.tensors)
    for k, t in shift.tensors.items():
        assert torch.equal(loaded.tensors[k], t), k
    sk.attach_(fresh, loaded)
    assert torch.equal(_out(fresh, x), expected)
    params = sk.named_shift_parameters(fresh)
    assert all(p.requires_grad for p in params.values())
    # every stored tensor is a shift parameter, or a buffer the wrapper declares (PST's sparsity)
    buffers = {f"{fqn}.{role}" for fqn, w in attached_wrappers(fresh) for role in w.named_shift_buffers()}
    assert set(params) | buffers == set(shift.tensors) and not set(params) & buffers


@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_only_shift_parameters_train(method: str, model_name: str) -> None:
    model, x = make(model_name)
    model.train()
    _attach(model, method)
    _randomise(model)  # LoRA's zero B would give A a zero (but present) gradient; keep it non-trivial
    shift_ids = {id(p) for p in sk.shift_parameters(model)}
    assert shift_ids
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == shift_ids
    buffers = {f"{fqn}.{role}" for fqn, w in attached_wrappers(model) for role in w.named_shift_buffers()}
    assert set(sk.named_shift_parameters(model)) | buffers == set(sk.extract(model).tensors)
    out = model(x)
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        if id(p) in shift_ids:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sk.shift_parameters(model))


@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_bf16_attach_forward_fold(method: str, model_name: str) -> None:
    model, x = make(model_name)
    model = model.to(torch.bfloat16)
    xb = _cast(x, torch.bfloat16)
    _attach(model, method)
    for p in sk.shift_parameters(model):
        assert p.dtype == torch.bfloat16
    _randomise(model, std=0.05)
    attached = _out(model, xb)
    assert attached.dtype == torch.bfloat16 and torch.isfinite(attached).all()
    if not sk.get_method(method).foldable:
        return
    sk.fold_(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    torch.testing.assert_close(_out(model, xb).float(), attached.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("method", METHODS)
def test_mha_out_proj_shift_counts(method: str) -> None:
    """``nn.MultiheadAttention`` reads ``out_proj.weight``/``.bias`` itself: the shift must still count."""
    model, x = make("mha_block")
    base = _out(model, x)
    spec = sk.get_method(method)
    accepts = spec.accepts or (lambda m: True)
    if not (isinstance(model.attn.out_proj, spec.targets) and accepts(model.attn.out_proj)):
        pytest.skip(f"{method} does not wrap Linear layers with a bias")
    sk.attach_(model, _config(method, target_modules=["attn.out_proj"]))
    assert is_shift_module(model.attn.out_proj)
    _randomise(model)
    shifted = _out(model, x)
    assert not torch.allclose(shifted, base, atol=1e-4)
    # the attention reads exactly the effective weight: recompute it with plain tensors
    w, b = model.attn.out_proj.weight, model.attn.out_proj.bias
    reference = copy.deepcopy(model)
    sk.detach_(reference)
    with torch.no_grad():
        reference.attn.out_proj.weight.copy_(w)
        if b is not None:
            reference.attn.out_proj.bias.copy_(b)
    torch.testing.assert_close(shifted, _out(reference, x), atol=1e-5, rtol=1e-5)
    # and the gradient reaches the shift parameters through that property
    model.train()
    model(x).square().mean().backward()
    grads = [p.grad for p in sk.shift_parameters(model)]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads if g is not None)


# --- config round trip (per method) ----------------------------------------------------------------------
def _non_default(cls: type[ShiftConfig]) -> ShiftConfig:
    """A config of ``cls`` with every field changed from its default (generic over methods)."""
    base_fields = {f.name for f in dataclasses.fields(ShiftConfig)}
    changes: dict[str, Any] = {
        "target_modules": ["fc1", "head"],
        "exclude_modules": r"head\..*",
        "target_types": ["Linear", "LayerNorm"],
        "modules_to_save": ["head"],
    }
    for f in dataclasses.fields(cls):
        if f.name in base_fields or f.default is dataclasses.MISSING:
            continue
        d = f.default
        if isinstance(d, bool):
            changes[f.name] = not d
        elif isinstance(d, int):
            changes[f.name] = d + 1
        elif isinstance(d, float):
            changes[f.name] = d + 0.25
    try:
        return cls(**changes)
    except sk.ShiftkitError:  # a method-specific field rejected the generic change: keep the base fields
        return cls(**{k: v for k, v in changes.items() if k in base_fields})


@pytest.mark.parametrize("method", METHODS)
def test_config_dict_round_trip(method: str) -> None:
    import json

    cls = sk.get_method(method).config_cls
    for config in (cls(), cls(target_modules="all"), _non_default(cls)):
        data = config_to_dict(config)
        assert data["method"] == method
        assert data["version"] == cls.version
        # through JSON, as in a file
        back = config_from_dict(json.loads(json.dumps(data)))
        assert type(back) is cls
        assert back == config
        assert hash(back) == hash(config)
    assert _non_default(cls) != cls()


# --- the registry contract the matrix relies on ----------------------------------------------------------
def test_a_method_can_declare_that_it_has_no_zero_init() -> None:
    """``register_method(..., zero_init=None)`` must mean "no zero init" (the suite then skips that check)."""
    from shiftkit.core import registry

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class _NoZeroConfig(ShiftConfig):
        pass

    name = "_test_no_zero_init"
    try:
        registry.register_method(
            name, config=_NoZeroConfig, targets=(nn.Linear,), foldable=False, zero_init=None
        )(lambda module, config: module)
        assert sk.get_method(name).zero_init is None
    finally:  # leave the global registry as it was for every other test
        registry.METHODS._entries.pop(name, None)
        registry._BY_CONFIG.pop(_NoZeroConfig, None)
    assert name not in sk.list_methods()
