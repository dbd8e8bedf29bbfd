"""Every registered method on the three real pretrained models, where the method applies.

MiniLM (BERT encoder), SmolLM2-135M (Llama decoder) and EfficientNet-Lite0 (convolutions + BatchNorm):
attach, forward and backward (gradients reach exactly the shift parameters), then fold (foldable methods:
same outputs, original architecture) or ``NotFoldableError``, and detach restores the model bit for bit.
A new method must add its row to ``CONFIGS``; a registered method without one fails
``test_every_registered_method_has_a_row``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from conftest import need_asset

pytestmark = pytest.mark.assets

Factory = Callable[[], Any] | None
_BERT_QV = ["query", "value"]
_LLAMA_QV = ["q_proj", "v_proj"]

# method -> model -> config factory; None = the method does not apply to that model (reason in a comment)
CONFIGS: dict[str, dict[str, Factory]] = {
    "lora": {
        "minilm": lambda: sk.LoRAConfig(target_modules=_BERT_QV),
        "smollm2-135m": lambda: sk.LoRAConfig(target_modules=_LLAMA_QV),
        "efficientnet-lite0": lambda: sk.LoRAConfig(target_modules=r".*_(expand|project)_conv|_fc"),
    },
    "ssf": {
        "minilm": lambda: sk.SSFConfig(target_modules="all"),
        "smollm2-135m": lambda: sk.SSFConfig(target_modules="all-linear"),
        "efficientnet-lite0": lambda: sk.SSFConfig(target_modules="all"),
    },
    "bitfit": {
        "minilm": lambda: sk.BitFitConfig(target_modules="all"),
        "smollm2-135m": None,  # Llama has no biases to tune
        "efficientnet-lite0": lambda: sk.BitFitConfig(target_modules="all"),
    },
    "svfit": {
        "minilm": lambda: sk.SVFitConfig(r=16, target_modules=_BERT_QV),
        "smollm2-135m": lambda: sk.SVFitConfig(
            r=16, target_modules=r"model\.layers\.[01]\.self_attn\.q_proj"
        ),
        "efficientnet-lite0": lambda: sk.SVFitConfig(r=16, target_modules=["_fc"]),
    },
    "ia3": {
        "minilm": lambda: sk.IA3Config(),  # PEFT's BERT defaults
        "smollm2-135m": lambda: sk.IA3Config(),  # PEFT's Llama defaults
        "efficientnet-lite0": lambda: sk.IA3Config(
            target_modules=r".*_(expand|project)_conv", feedforward_modules=r".*_project_conv"
        ),
    },
    "adapter": {
        "minilm": lambda: sk.AdapterConfig(target_modules=["output.dense"]),
        "smollm2-135m": lambda: sk.AdapterConfig(target_modules=["o_proj", "down_proj"]),
        "efficientnet-lite0": lambda: sk.AdapterConfig(target_modules=["_fc"], placement="parallel"),
    },
    "linear_adapter": {
        "minilm": lambda: sk.LinearAdapterConfig(
            target_modules=["query", "key", "value", "attention.output.dense"],
            after_modules=["attention.output.dense"],
        ),
        "smollm2-135m": lambda: sk.LinearAdapterConfig(target_modules=["o_proj"], position="after"),
        "efficientnet-lite0": lambda: sk.LinearAdapterConfig(target_modules=["_fc"]),
    },
    "prompt_tuning": {
        "minilm": lambda: sk.PromptTuningConfig(num_virtual_tokens=4),
        "smollm2-135m": lambda: sk.PromptTuningConfig(num_virtual_tokens=4),
        "efficientnet-lite0": None,  # no input token embeddings
    },
    "pego": {
        "minilm": lambda: sk.PEGOConfig(target_modules=_BERT_QV),
        "smollm2-135m": lambda: sk.PEGOConfig(target_modules=_LLAMA_QV),
        "efficientnet-lite0": lambda: sk.PEGOConfig(target_modules=["_fc"]),
    },
    "subspace": {
        "minilm": lambda: sk.SubspaceConfig(dim=64, target_modules=_BERT_QV),
        "smollm2-135m": lambda: sk.SubspaceConfig(dim=64, target_modules=_LLAMA_QV),
        "efficientnet-lite0": lambda: sk.SubspaceConfig(dim=64, target_modules="all"),
    },
    "rps": {
        "minilm": lambda: sk.RPSConfig(compression=0.05, target_modules=_BERT_QV),
        "smollm2-135m": lambda: sk.RPSConfig(compression=0.01, target_modules=_LLAMA_QV),
        "efficientnet-lite0": lambda: sk.RPSConfig(compression=0.1, target_modules=["_fc"]),
    },
    "pst": {
        "minilm": lambda: sk.PSTConfig(target_modules=_BERT_QV),
        "smollm2-135m": lambda: sk.PSTConfig(target_modules=_LLAMA_QV),
        "efficientnet-lite0": lambda: sk.PSTConfig(target_modules=["_fc"]),
    },
    "recursive": {
        "minilm": lambda: sk.RecursiveConfig(num_loops=2, r=4),
        "smollm2-135m": lambda: sk.RecursiveConfig(num_loops=2, r=4),
        "efficientnet-lite0": None,  # no stack of identical transformer layers to tie
    },
}
MODELS = ("minilm", "smollm2-135m", "efficientnet-lite0")
CASES = [
    pytest.param(method, model, id=f"{method}-{model}")
    for method, row in sorted(CONFIGS.items())
    for model in MODELS
    if row.get(model) is not None
]


@pytest.fixture(scope="module")
def real() -> Iterator[dict[str, tuple[nn.Module, Callable[[nn.Module], Tensor]]]]:
    """Lazily loaded ``name -> (model, run)``; ``run(model)`` returns a float output tensor."""
    from shiftkit import zoo

    cache: dict[str, tuple[nn.Module, Callable[[nn.Module], Tensor]]] = {}

    def get(name: str) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
        if name not in cache:
            need_asset(name)
            model, tok = zoo.load_model(name)
            if name == "efficientnet-lite0":
                x = torch.randn(2, 3, 64, 64)
                cache[name] = (model.eval(), lambda m: m(x))
            elif name == "minilm":
                batch = dict(
                    tok(["A fine film.", "The parcel never came."], padding=True, return_tensors="pt")
                )
                cache[name] = (model.eval(), lambda m: m(**batch).last_hidden_state)
            else:
                batch = dict(tok(["The weather today is", "Once upon a"], padding=True, return_tensors="pt"))
                cache[name] = (model.eval(), lambda m: m(**batch).logits)
        return cache[name]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: one thread is faster on a busy 2-core machine
    yield get  # type: ignore[misc]
    torch.set_num_threads(threads)


def test_every_registered_method_has_a_row() -> None:
    assert sorted(CONFIGS) == sk.list_methods()


@pytest.mark.parametrize(("method", "model_name"), CASES)
def test_method_on_real_model(method: str, model_name: str, real: Any) -> None:
    pristine, run = real(model_name)
    model = copy.deepcopy(pristine)
    with torch.no_grad():
        y_base = run(model)
    factory = CONFIGS[method][model_name]
    assert factory is not None
    sk.attach_(model, factory())
    params = sk.shift_parameters(model)
    assert params and sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in params
    )

    # forward + backward: gradients reach the shift and nothing else
    out = run(model)
    out.float().square().mean().backward()
    shift_ids = {id(p) for p in params}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.parameters() if id(p) not in shift_ids)

    with torch.no_grad():  # move away from the start so the fold check bites
        for p in params:
            p.grad = None
            p.add_(torch.randn_like(p) * 0.01)
        y_shifted = run(model)
    assert not torch.equal(y_shifted, y_base)

    if sk.get_method(method).foldable:
        folded = sk.fold_(copy.deepcopy(model))
        assert [type(m) for m in folded.modules()] == [type(m) for m in pristine.modules()]
        with torch.no_grad():
            y_folded = run(folded)
        scale = y_shifted.abs().max().clamp_min(1.0)
        assert float((y_folded - y_shifted).abs().max() / scale) < 1e-4
    else:
        with pytest.raises(sk.NotFoldableError):
            sk.fold_(model)

    sk.detach_(model)
    reference = pristine.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    with torch.no_grad():
        assert torch.equal(run(model), y_base)
