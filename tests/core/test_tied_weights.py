"""Tied weights: a shift of a module whose weight another module shares never changes the other module.

The tiny Llama below ties ``lm_head.weight`` to ``model.embed_tokens.weight`` (one ``nn.Parameter``, as in
SmolLM2). Before the fix, ``fold_`` wrote a shift of ``lm_head`` into the shared tensor, so the embedding
changed too and the folded model computed something else than the attached one. Every foldable method that
can target the head (or the embedding) is tested from the registry: the fold is refused by default and
exact with ``untie=True``; ``to_delta`` / ``apply_``, ``task_vector``, ``merge``, save/load and the
streaming merge follow the same rule (a write names every parameter it changes).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from conftest import need_asset
from shiftkit.core.tying import model_names
from tiny_models import TinyTiedLlama, make_tied_llama

HEAD, EMB = "hf.lm_head", "hf.model.embed_tokens"


def _attaches(name: str, target: str) -> bool:
    model, _ = make_tied_llama()
    try:
        sk.attach_(model, sk.get_method(name).config_cls(target_modules=[target]))
    except sk.ShiftkitError:  # bitfit: the head has no bias; recursive: only the layer stack is tied
        return False
    return True


def _foldable_head_methods() -> list[Any]:
    """Every foldable registered method × the tied module(s) it can wrap (from the registry)."""
    out = []
    for name in sk.list_methods():
        spec = sk.get_method(name)
        if not spec.foldable:
            continue
        for target, kind in ((HEAD, nn.Linear), (EMB, nn.Embedding)):
            if any(issubclass(kind, t) for t in spec.targets) and _attaches(name, target):
                out.append(pytest.param(name, target, id=f"{name}-{target.rsplit('.', 1)[1]}"))
    return out


CASES = _foldable_head_methods()


def test_the_matrix_covers_the_head_methods() -> None:
    covered = {p.values[0] for p in CASES}
    assert {"lora", "ssf", "ia3", "svfit", "pego", "linear_adapter", "subspace"} <= covered
    assert ("lora", EMB) in {p.values for p in CASES}


def _attach_one(model: nn.Module, method: str, target: str) -> None:
    spec = sk.get_method(method)
    sk.attach_(model, spec.config_cls(target_modules=target if "(" in target else [target]))
    with torch.no_grad():
        for p in sk.shift_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)


@torch.no_grad()
def _out(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def _tied(model: TinyTiedLlama) -> bool:
    return model.hf.lm_head.weight is model.hf.model.embed_tokens.weight


@pytest.mark.parametrize(("method", "target"), CASES)
def test_fold_of_a_tied_module_is_refused_then_exact_with_untie(method: str, target: str) -> None:
    model, x = make_tied_llama()
    shared = model.hf.lm_head.weight.detach().clone()
    _attach_one(model, method, target)
    attached = _out(model, x)
    with pytest.raises(sk.TiedWeightsError, match=r"untie=True") as err:
        sk.fold_(model)
    other = EMB if target == HEAD else HEAD
    assert f"{other}.weight" in str(err.value) and f"{target}.weight" in str(err.value)
    assert torch.equal(_out(model, x), attached), "a refused fold changed the model"
    with pytest.warns(UserWarning, match="untied 1 weight"):
        sk.fold_(model, untie=True)
    torch.testing.assert_close(_out(model, x), attached, atol=1e-5, rtol=1e-5)
    assert not _tied(model)
    # the module the user did not target keeps the original tensor, bit for bit
    untouched = model.hf.model.embed_tokens.weight if target == HEAD else model.hf.lm_head.weight
    assert torch.equal(untouched, shared)
    assert model.hf.config.tie_word_embeddings is False


def test_untied_fold_survives_save_pretrained(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    model, x = make_tied_llama()
    _attach_one(model, "lora", HEAD)
    attached = _out(model, x)
    with pytest.warns(UserWarning, match=r"config.tie_word_embeddings set to False"):
        sk.fold_(model, untie=True)
    model.hf.save_pretrained(tmp_path / "folded")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "folded").eval()
    assert again.lm_head.weight is not again.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, attached, atol=1e-5, rtol=1e-5)


def test_both_tied_modules_targeted() -> None:
    model, x = make_tied_llama()
    _attach_one(model, "lora", r"hf\.(lm_head|model\.embed_tokens)")
    attached = _out(model, x)
    with pytest.raises(sk.TiedWeightsError, match="different values"):
        sk.fold_(model)
    with pytest.warns(UserWarning, match="untied 2 weight"):
        sk.fold_(model, untie=True)
    torch.testing.assert_close(_out(model, x), attached, atol=1e-5, rtol=1e-5)


def test_modules_to_save_on_a_tied_head() -> None:
    model, x = make_tied_llama()
    shared = model.hf.model.embed_tokens.weight.detach().clone()
    sk.attach_(model, sk.LoRAConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.hf.lm_head.saved.weight.mul_(1.5)
    attached = _out(model, x)
    with pytest.raises(sk.TiedWeightsError):
        sk.fold_(model)
    with pytest.warns(UserWarning):
        sk.fold_(model, untie=True)
    torch.testing.assert_close(_out(model, x), attached, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.hf.model.embed_tokens.weight, shared)


def test_detach_keeps_the_tie() -> None:
    model, x = make_tied_llama()
    expected = _out(model, x)
    _attach_one(model, "lora", HEAD)
    sk.detach_(model)
    assert _tied(model)
    assert torch.equal(_out(model, x), expected)


def test_to_delta_and_apply_need_untie() -> None:
    model, x = make_tied_llama()
    _attach_one(model, "lora", HEAD)
    attached = _out(model, x)
    delta = sk.to_delta(model)
    assert list(delta.tensors) == [f"{HEAD}.weight"]  # the head only: the delta names what it changes
    fresh, _ = make_tied_llama()
    before = _out(fresh, x)
    with pytest.raises(sk.TiedWeightsError, match=r"hf.model.embed_tokens.weight"):
        sk.apply_(fresh, delta)
    assert torch.equal(_out(fresh, x), before) and _tied(fresh)
    with pytest.warns(UserWarning, match="untied"):
        sk.apply_(fresh, delta, untie=True)
    torch.testing.assert_close(_out(fresh, x), attached, atol=1e-5, rtol=1e-5)
    assert not _tied(fresh)


def _tuned_tied(scale: float = 0.05) -> TinyTiedLlama:
    tuned, _ = make_tied_llama()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in tuned.parameters():  # parameters() lists the tied tensor once: it stays tied
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    assert _tied(tuned)
    return tuned


def test_task_vector_of_tied_models_names_both_modules_with_one_tensor(tmp_path: Path) -> None:
    base, x = make_tied_llama()
    tuned = _tuned_tied()
    tv = sk.task_vector(base, tuned)
    assert tv.tensors[f"{HEAD}.weight"] is tv.tensors[f"{EMB}.weight"]
    assert tv.aliases() == {f"{HEAD}.weight": f"{EMB}.weight"}
    target, _ = make_tied_llama()
    sk.apply_(target, tv)  # a consistent change of the shared tensor: no untie needed, still tied
    assert _tied(target)
    torch.testing.assert_close(_out(target, x), _out(tuned, x), atol=1e-5, rtol=1e-5)
    # the file stores the tied tensor once and gives both names back
    sk.save(tv, tmp_path / "tv.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tv.safetensors"), framework="pt") as fh:
        assert f"{HEAD}.weight" not in fh.keys() and f"{EMB}.weight" in fh.keys()
    back = sk.load(tmp_path / "tv.safetensors")
    assert back.tensors[f"{HEAD}.weight"] is back.tensors[f"{EMB}.weight"]
    assert back.nbytes == tv.nbytes < sum(t.numel() * 4 for t in tv.tensors.values())
    # arithmetic keeps one tensor under both names
    half = 0.5 * back
    assert half.tensors[f"{HEAD}.weight"] is half.tensors[f"{EMB}.weight"]


def test_task_vector_against_a_checkpoint_that_stores_the_tied_tensor_once() -> None:
    base, _x = make_tied_llama()
    tuned = _tuned_tied()
    state = {k: v for k, v in tuned.state_dict().items() if not k.endswith("lm_head.weight")}
    tv = sk.task_vector(base, state)  # the file has no head: it is the embedding, as HF reads it
    assert tv.tensors[f"{HEAD}.weight"] is tv.tensors[f"{EMB}.weight"]
    full = sk.task_vector(base.state_dict(), tuned.state_dict())  # state_dict() lists both names
    assert full.aliases() == {f"{HEAD}.weight": f"{EMB}.weight"}


def test_task_vector_of_an_untied_tuned_model_needs_untie_to_apply() -> None:
    base, x = make_tied_llama()
    tuned = copy.deepcopy(base)
    _attach_one(tuned, "lora", HEAD)
    with pytest.warns(UserWarning):
        sk.fold_(tuned, untie=True)
    tv = sk.task_vector(base, tuned)
    assert torch.count_nonzero(tv.tensors[f"{EMB}.weight"]) == 0
    assert torch.count_nonzero(tv.tensors[f"{HEAD}.weight"]) > 0
    target, _ = make_tied_llama()
    with pytest.raises(sk.TiedWeightsError):
        sk.apply_(target, tv)
    with pytest.warns(UserWarning):
        sk.apply_(target, tv, untie=True)
    torch.testing.assert_close(_out(target, x), _out(tuned, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "ties"])
def test_merge_of_tied_task_vectors_keeps_the_tie(method: str) -> None:
    base, _x = make_tied_llama()
    tvs = [sk.task_vector(base, _tuned_tied(s)) for s in (0.03, 0.05)]
    params = {"density": 0.5} if method != "task_arithmetic" else {}
    merged = sk.merge(tvs, method=method, **params)
    # seeded DARE would draw two different masks for the two names if it merged them separately
    assert merged.tensors[f"{HEAD}.weight"] is merged.tensors[f"{EMB}.weight"]
    target, _ = make_tied_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no untie warning: the tie is kept
        sk.apply_(target, merged)
    assert _tied(target)


def test_learn_atlas_takes_tied_task_vectors() -> None:
    base, x = make_tied_llama()
    tvs = [sk.task_vector(base, _tuned_tied(s)) for s in (0.03, 0.05)]
    labels = torch.randint(0, 50, (2 * 5,), generator=torch.Generator().manual_seed(2))

    def forward(fm: Any, inputs: Tensor) -> Tensor:
        return fm(inputs).reshape(-1, 50)

    result = sk.learn_atlas(base, tvs, [(x, labels)] * 3, forward=forward, progress=False)
    assert f"{EMB}.weight" in result.coefficients and f"{HEAD}.weight" not in result.coefficients
    assert result.shift.tensors[f"{HEAD}.weight"] is result.shift.tensors[f"{EMB}.weight"]
    sk.apply_(base, result.shift)  # one block for the shared tensor: the tie is kept
    assert _tied(base)


def test_streaming_merge_of_a_head_shift_into_a_tied_checkpoint_says_why(tmp_path: Path) -> None:
    model, _ = make_tied_llama()
    model.hf.save_pretrained(tmp_path / "base")
    _attach_one(model, "lora", "lm_head")
    shift = sk.extract(model)
    # the shift file's names are the HF model's own (the checkpoint is model.hf)
    renamed = sk.Shift(
        "lora",
        shift.config,
        {k.removeprefix("hf."): v for k, v in shift.tensors.items()},
        {k.removeprefix("hf."): v for k, v in shift.base.items()},
    )
    sk.save(renamed, tmp_path / "head.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\n"
        f"models:\n  - model: {tmp_path / 'head.safetensors'}\n    parameters: {{weight: 1.0}}\n"
    )
    with pytest.raises(sk.TiedWeightsError, match="tie_word_embeddings"):
        sk.merge_recipe(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_fold_untie(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from shiftkit.cli import main

    model, _x = make_tied_llama()
    _attach_one(model, "lora", HEAD)
    sk.save(sk.extract(model), tmp_path / "head.safetensors")
    spec = "tiny_models:make_tied_llama"
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))
    rc = main(["fold", str(tmp_path / "head.safetensors"), "--model", spec, "--output", str(tmp_path / "a")])
    assert rc == 2 and "Pass --untie" in capsys.readouterr().err
    args = ["fold", str(tmp_path / "head.safetensors"), "--model", spec, "--output", str(tmp_path / "b")]
    with pytest.warns(UserWarning):
        rc = main([*args, "--untie"])
    assert rc == 0
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "b" / "model.safetensors"))
    fresh, _ = make_tied_llama()
    fresh.load_state_dict(state)  # loading a state dict copies into the tied tensor...
    assert not torch.equal(state[f"{HEAD}.weight"], state[f"{EMB}.weight"])  # ...but the file holds both


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_lora_on_the_tied_head() -> None:
    need_asset("smollm2-135m")
    from shiftkit import zoo

    model, tok = zoo.load_model("smollm2-135m")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tok(["The weather today is", "Merging models"], return_tensors="pt", padding=True)["input_ids"]
    names = model_names(model)
    assert names.aliases("lm_head.weight") == ["model.embed_tokens.weight"]
    sk.attach_(model, sk.LoRAConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        attached = model(input_ids=ids).logits
        with pytest.raises(sk.TiedWeightsError, match=r"model\.embed_tokens\.weight"):
            sk.fold_(model)
        with pytest.warns(UserWarning, match="untied 1 weight"):
            sk.fold_(model, untie=True)
        folded = model(input_ids=ids).logits
    assert float((folded - attached).abs().max()) < 1e-3
    assert model.lm_head.weight is not model.model.embed_tokens.weight
