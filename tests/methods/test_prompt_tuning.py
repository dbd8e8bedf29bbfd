"""Prompt tuning pinned against its definition ([P; E(ids)], mask and labels extended) and the real peft."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import shiftkit as sk
from conftest import need_asset
from shiftkit.methods.prompt_tuning import PromptTuningEmbedding
from tiny_models import make


def _hf(name: str) -> tuple[nn.Module, torch.Tensor]:
    model, x = make(name)
    return model.hf, x  # type: ignore[return-value]


def _prompt(model: nn.Module) -> nn.Parameter:
    (param,) = sk.shift_parameters(model)
    return param


def _attach(model: nn.Module, p: int = 3, **kw: Any) -> nn.Parameter:
    sk.attach_(model, sk.PromptTuningConfig(num_virtual_tokens=p, **kw))
    return _prompt(model)


def _mask(x: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding on the first row
    return mask


# --- the definition ---------------------------------------------------------------------------------
@torch.no_grad()
def test_bert_output_is_the_base_on_prompt_plus_embeddings() -> None:
    model, x = _hf("tiny_bert")
    base = copy.deepcopy(model)
    prompt = _attach(model, p=4, target_modules=None)
    prompt.normal_()
    mask, types = _mask(x), torch.randint(0, 2, x.shape)
    out = model(input_ids=x, attention_mask=mask, token_type_ids=types).last_hidden_state
    embeds = torch.cat([prompt.expand(2, -1, -1), base.embeddings.word_embeddings(x)], 1)
    expected = base(
        inputs_embeds=embeds,
        attention_mask=torch.cat([torch.ones(2, 4, dtype=mask.dtype), mask], 1),
        token_type_ids=torch.cat([torch.zeros(2, 4, dtype=types.dtype), types], 1),
    ).last_hidden_state
    assert out.shape == (2, 4 + x.shape[1], 16)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    # positional arguments (model(ids, mask)) are rewritten the same way
    torch.testing.assert_close(model(x, mask, types).last_hidden_state, out, atol=0, rtol=0)


def test_only_the_input_embedding_gets_a_prompt() -> None:
    model, _ = _hf("tiny_bert")
    _attach(model, target_modules="all")  # word, position and token-type tables all match "all"
    emb = model.embeddings
    assert isinstance(emb.word_embeddings, PromptTuningEmbedding)
    assert list(sk.named_shift_parameters(model)) == ["embeddings.word_embeddings.prompt_embeddings"]
    assert type(emb.position_embeddings) is nn.Embedding  # declined: left unwrapped
    assert list(sk.extract(model).base) == ["embeddings.word_embeddings"]


@torch.no_grad()
def test_causal_lm_labels_are_prefixed_with_ignore_index() -> None:
    model, x = _hf("tiny_llama")
    base = copy.deepcopy(model)
    prompt = _attach(model, p=3)
    prompt.normal_()
    out = model(input_ids=x, labels=x)
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(x)], 1)
    labels = torch.cat([torch.full((2, 3), -100), x], 1)
    ref = base(inputs_embeds=embeds, labels=labels)
    assert out.logits.shape == (2, 3 + x.shape[1], 50)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_position_ids_are_dropped_with_a_warning() -> None:
    model, x = _hf("tiny_llama")
    prompt = _attach(model)
    prompt.normal_()
    plain = model(input_ids=x).logits
    with pytest.warns(UserWarning, match="position_ids"):
        shifted = model(input_ids=x, position_ids=torch.arange(5).expand(2, -1) + 7).logits
    torch.testing.assert_close(shifted, plain, atol=0, rtol=0)


@torch.no_grad()
def test_zero_tokens_leave_the_model_unchanged() -> None:
    model, x = _hf("tiny_llama")
    expected = model(input_ids=x, attention_mask=_mask(x)).logits
    sk.attach_(model, sk.PromptTuningConfig(num_virtual_tokens=0))
    assert torch.equal(model(input_ids=x, attention_mask=_mask(x)).logits, expected)


def test_gradients_reach_only_the_prompt() -> None:
    model, x = _hf("tiny_bert")
    prompt = _attach(model)
    model(input_ids=x).last_hidden_state.square().mean().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.grad is not None] == [
        "embeddings.word_embeddings.prompt_embeddings"
    ]


# --- initialisation -----------------------------------------------------------------------------------
def test_sample_vocab_copies_rows_of_the_embedding_table() -> None:
    model, _ = _hf("tiny_bert")
    table = model.embeddings.word_embeddings.weight.detach().clone()
    prompt = _attach(model, p=6, init="sample_vocab")
    assert all(any(torch.equal(row, t) for t in table) for row in prompt.detach())


@pytest.mark.parametrize(("p", "rows"), [(7, [4, 9, 2, 4, 9, 2, 4]), (2, [4, 9])])
def test_text_init_repeats_or_crops_the_ids(p: int, rows: list[int]) -> None:
    class Tok:
        name_or_path = "fake/tok"

        def __call__(self, text: str) -> dict[str, list[int]]:
            assert text == "go"
            return {"input_ids": [4, 9, 2]}

    config = sk.PromptTuningConfig.from_text(Tok(), "go", num_virtual_tokens=p)
    assert config.init_token_ids == (4, 9, 2) and config.tokenizer_name_or_path == "fake/tok"
    model, _ = _hf("tiny_llama")
    table = model.get_input_embeddings().weight.detach().clone()
    sk.attach_(model, config)
    torch.testing.assert_close(_prompt(model).detach(), table[rows], atol=0, rtol=0)


# --- lifecycle ----------------------------------------------------------------------------------------
@torch.no_grad()
def test_deep_copies_are_independent_and_detach_cleanly() -> None:
    model, x = _hf("tiny_bert")
    base_out = model(input_ids=x).last_hidden_state
    _attach(model).normal_()
    out = model(input_ids=x).last_hidden_state
    twin = copy.deepcopy(model)
    (hook,) = twin._forward_pre_hooks.values()
    assert hook.__self__ is twin.embeddings.word_embeddings  # re-bound to the copy's own wrapper
    torch.testing.assert_close(twin(input_ids=x).last_hidden_state, out, atol=0, rtol=0)
    _prompt(twin).add_(1.0)  # the copy's prompt is its own
    assert torch.equal(model(input_ids=x).last_hidden_state, out)
    sk.detach_(twin)
    assert not twin._forward_pre_hooks and not twin._forward_pre_hooks_with_kwargs
    assert torch.equal(twin(input_ids=x).last_hidden_state, base_out)
    assert torch.equal(model(input_ids=x).last_hidden_state, out)  # the original keeps its hook
    sk.detach_(model)
    assert not model._forward_pre_hooks and torch.equal(model(input_ids=x).last_hidden_state, base_out)


def test_not_foldable_and_no_weight_delta() -> None:
    model, _ = _hf("tiny_llama")
    _attach(model)
    with pytest.raises(sk.NotFoldableError):
        sk.fold_(model)
    with pytest.raises(sk.NotFoldableError):
        sk.to_delta(model)


def test_text_classifier_pools_over_prompt_and_tokens() -> None:
    from shiftkit.recipes.models import TextClassifier, mean_pool

    encoder, x = _hf("tiny_bert")
    clf = TextClassifier(encoder, num_labels=2, seed=0).eval()
    sk.attach_(clf, sk.PromptTuningConfig(num_virtual_tokens=2, modules_to_save=["head"]))
    prompt = sk.named_shift_parameters(clf)["encoder.embeddings.word_embeddings.prompt_embeddings"]
    with torch.no_grad():
        prompt.normal_()
        mask = _mask(x)
        hidden = clf.encoder(input_ids=x, attention_mask=mask).last_hidden_state  # (2, 2 + 5, 16)
        full = torch.cat([torch.ones(2, 2, dtype=mask.dtype), mask], 1)
        expected = clf.head(mean_pool(hidden, full))
        torch.testing.assert_close(clf(x, mask), expected, atol=1e-6, rtol=1e-6)


# --- errors -------------------------------------------------------------------------------------------
def test_model_without_input_embeddings_is_not_a_target() -> None:
    model, _ = make("embedding")  # an nn.Embedding, but no get_input_embeddings()
    with pytest.raises(sk.TargetNotFoundError, match="get_input_embeddings"):
        sk.attach_(model, sk.PromptTuningConfig())


def test_targets_without_the_input_embedding_are_refused() -> None:
    model, _ = _hf("tiny_bert")
    with pytest.raises(sk.TargetNotFoundError, match="input embedding"):
        sk.attach_(model, sk.PromptTuningConfig(target_modules=["position_embeddings"]))
    assert not sk.shift_parameters(model) and not model._forward_pre_hooks


@pytest.mark.parametrize(
    "fields",
    [
        {"num_virtual_tokens": -1},
        {"num_virtual_tokens": 2.0},
        {"init": "TEXT"},
        {"init": "text"},
        {"init": "text", "init_token_ids": ()},
        {"init": "random", "init_token_ids": (1, 2)},
        {"init": "text", "init_token_ids": (1, -2)},
    ],
)
def test_bad_configs(fields: dict[str, Any]) -> None:
    with pytest.raises(sk.ShiftkitError):
        sk.PromptTuningConfig(**fields)


def test_text_ids_beyond_the_vocabulary() -> None:
    model, _ = _hf("tiny_llama")
    with pytest.raises(sk.ShiftkitError, match="vocabulary"):
        sk.attach_(model, sk.PromptTuningConfig(init="text", init_token_ids=(3, 50)))


# --- the real peft package ------------------------------------------------------------------------------
def _peft_twin(model: nn.Module, p: int, task: str) -> Any:
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(
        copy.deepcopy(model), peft.PromptTuningConfig(num_virtual_tokens=p, task_type=task)
    )
    return ref.eval(), ref.prompt_encoder["default"].embedding.weight.detach()


@torch.no_grad()
def test_matches_peft_feature_extraction_and_causal_lm() -> None:
    bert, x = _hf("tiny_bert")
    ref, weight = _peft_twin(bert, 3, "FEATURE_EXTRACTION")
    _attach(bert).copy_(weight)
    mask = _mask(x)
    torch.testing.assert_close(
        bert(input_ids=x, attention_mask=mask).last_hidden_state,
        ref(input_ids=x, attention_mask=mask).last_hidden_state,
        atol=1e-6,
        rtol=1e-6,
    )
    llama, x = _hf("tiny_llama")
    ref, weight = _peft_twin(llama, 3, "CAUSAL_LM")
    _attach(llama).copy_(weight)
    ours, theirs = (
        llama(input_ids=x, attention_mask=mask, labels=x),
        ref(input_ids=x, attention_mask=mask, labels=x),
    )
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_greedy_generation_matches_peft() -> None:
    llama, x = _hf("tiny_llama")
    ref, weight = _peft_twin(llama, 3, "CAUSAL_LM")
    _attach(llama).copy_(weight)
    kw: dict[str, Any] = {"attention_mask": _mask(x), "max_new_tokens": 4, "do_sample": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both sides warn that generate's position_ids are ignored
        expected = ref.generate(input_ids=x, **kw)
        got = llama.generate(input_ids=x, **kw)
    assert torch.equal(got, expected)


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two short sentences: one thread is many times faster on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.assets
@pytest.mark.parametrize(("name", "task"), [("minilm", "FEATURE_EXTRACTION"), ("smollm2-135m", "CAUSAL_LM")])
@torch.no_grad()
def test_real_models_match_peft(name: str, task: str, one_thread: None) -> None:
    need_asset(name)
    peft = pytest.importorskip("peft")
    from shiftkit import zoo

    model, tok = zoo.load_model(name)
    batch = dict(tok(["A short test.", "Hi"], padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    key = "last_hidden_state" if task == "FEATURE_EXTRACTION" else "logits"
    # PEFT's prompt wrapper leaves the model itself alone: run it first, then attach ours to the same model
    ref = peft.get_peft_model(model, peft.PromptTuningConfig(num_virtual_tokens=4, task_type=task)).eval()
    expected = ref(**batch)[key]
    _attach(model, p=4).copy_(ref.prompt_encoder["default"].embedding.weight)
    got = model(**batch)[key]
    assert got.shape[1] == batch["input_ids"].shape[1] + 4
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.assets
def test_text_init_matches_peft_on_minilm() -> None:
    need_asset("minilm")
    peft = pytest.importorskip("peft")
    from shiftkit import zoo

    model, tok = zoo.load_model("minilm")
    text = "Is this review positive?"
    config = sk.PromptTuningConfig.from_text(tok, text, num_virtual_tokens=12)
    pconf = peft.PromptTuningConfig(
        num_virtual_tokens=12,
        task_type="FEATURE_EXTRACTION",
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=tok.name_or_path,
    )
    ref = peft.get_peft_model(model, pconf)  # leaves the model itself alone
    expected = ref.prompt_encoder["default"].embedding.weight.detach().clone()
    sk.attach_(model, config)
    torch.testing.assert_close(_prompt(model).detach(), expected, atol=0, rtol=0)
