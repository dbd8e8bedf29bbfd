"""Prompt tuning on BERT sentence pairs, for every PEFT task type, against the real peft package.

PEFT's task wrappers treat ``token_type_ids`` differently: sequence and token classification prepend
``p`` zeros; causal LM and feature extraction drop them (with a warning) and question answering drops
them silently, so the second sentence of a pair becomes segment 0. Before the fix shiftkit always
prepended zeros and differed from PEFT by ~2 on pairs with the last three task types. Each test builds
the adapter in PEFT, reads it with ``sk.import_peft`` (and attaches the same prompt directly with
``task_type``), compares outputs on sentence pairs, then writes it back with ``sk.export_peft`` and loads
it in PEFT again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk

peft = pytest.importorskip("peft")

P = 3


def _bert(task: str) -> nn.Module:
    import transformers as tf

    config = tf.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=2 if task == "QUESTION_ANS" else 3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
        is_decoder=task == "CAUSAL_LM",
    )
    cls = {
        "SEQ_CLS": tf.BertForSequenceClassification,
        "TOKEN_CLS": tf.BertForTokenClassification,
        "QUESTION_ANS": tf.BertForQuestionAnswering,
        "CAUSAL_LM": tf.BertLMHeadModel,
        "FEATURE_EXTRACTION": tf.BertModel,
    }[task]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = cls(config).eval()
        with torch.no_grad():  # segment embeddings far apart, so dropping the types shows in the output
            model.get_input_embeddings()  # (exists on every class)
            types = model.base_model.embeddings.token_type_embeddings.weight
            types.copy_(torch.randn(types.shape) * 2.0)
    return model


def _pairs() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(5, 50, (2, 7), generator=gen)
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _output(task: str) -> Callable[[Any], Tensor]:
    key = {"QUESTION_ANS": "start_logits", "FEATURE_EXTRACTION": "last_hidden_state"}.get(task, "logits")
    return lambda out: getattr(out, key)


TASKS = ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "FEATURE_EXTRACTION"]
DROPS = {"QUESTION_ANS", "CAUSAL_LM", "FEATURE_EXTRACTION"}
PEFT_WARNS = {"CAUSAL_LM", "FEATURE_EXTRACTION"}  # PEFT's QA wrapper drops them without a word


@pytest.fixture(params=TASKS)
def peft_adapter(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    task = request.param
    base = _bert(task)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    ).eval()
    with torch.no_grad():  # the prompt only: PEFT's trainable copy of a classifier head stays the base's
        for name, p in model.named_parameters():
            if "prompt_encoder" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    folder = tmp_path / "peft"
    model.save_pretrained(str(folder))
    with torch.no_grad(), pytest.warns(UserWarning) if task in PEFT_WARNS else _nothing():
        expected = _output(task)(model(**_pairs()))
    return {"task": task, "base": base, "folder": folder, "expected": expected, "peft_model": model}


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _run(model: nn.Module, task: str) -> Tensor:
    with torch.no_grad():
        if task in DROPS:
            with pytest.warns(UserWarning, match="ignores token_type_ids"):
                return _output(task)(model(**_pairs()))
        return _output(task)(model(**_pairs()))


def test_import_matches_peft_on_sentence_pairs(peft_adapter: dict[str, Any]) -> None:
    task, base = peft_adapter["task"], peft_adapter["base"]
    fresh = copy.deepcopy(base)
    shift = sk.import_peft(peft_adapter["folder"], model=fresh)
    assert shift.config.task_type == task
    sk.attach_(fresh, shift)
    torch.testing.assert_close(_run(fresh, task), peft_adapter["expected"], atol=1e-5, rtol=1e-5)


def test_direct_attach_with_the_task_type_matches_peft(peft_adapter: dict[str, Any]) -> None:
    task, base = peft_adapter["task"], peft_adapter["base"]
    prompt = peft_adapter["peft_model"].prompt_encoder["default"].embedding.weight.detach()
    ours = copy.deepcopy(base)
    sk.attach_(ours, sk.PromptTuningConfig(num_virtual_tokens=P, task_type=task))
    with torch.no_grad():
        sk.shift_parameters(ours)[0].copy_(prompt)
    torch.testing.assert_close(_run(ours, task), peft_adapter["expected"], atol=1e-5, rtol=1e-5)
    # without the task type shiftkit keeps the pair's segments: different from PEFT's drop
    if task in DROPS:
        plain = copy.deepcopy(base)
        sk.attach_(plain, sk.PromptTuningConfig(num_virtual_tokens=P))
        with torch.no_grad():
            sk.shift_parameters(plain)[0].copy_(prompt)
            out = _output(task)(plain(**_pairs()))
        assert float((out - peft_adapter["expected"]).abs().max()) > 1e-2


def test_export_round_trip_through_peft(peft_adapter: dict[str, Any], tmp_path: Path) -> None:
    task, base = peft_adapter["task"], peft_adapter["base"]
    fresh = copy.deepcopy(base)
    sk.attach_(fresh, sk.import_peft(peft_adapter["folder"], model=fresh))
    sk.export_peft(fresh, tmp_path / "back")  # the task type comes from the config
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back")).eval()
    assert loaded.peft_config["default"].task_type == task
    with torch.no_grad(), pytest.warns(UserWarning) if task in PEFT_WARNS else _nothing():
        again = _output(task)(loaded(**_pairs()))
    torch.testing.assert_close(again, peft_adapter["expected"], atol=1e-5, rtol=1e-5)


def test_export_with_a_task_type_of_other_semantics(tmp_path: Path) -> None:
    base = _bert("FEATURE_EXTRACTION")
    model = copy.deepcopy(base)
    sk.attach_(model, sk.PromptTuningConfig(num_virtual_tokens=P, task_type="SEQ_CLS"))
    with pytest.raises(sk.ShiftkitError, match="token_type_ids differently"):
        sk.export_peft(model, tmp_path / "a", task_type="FEATURE_EXTRACTION")
    plain = copy.deepcopy(base)
    sk.attach_(plain, sk.PromptTuningConfig(num_virtual_tokens=P))
    with pytest.warns(UserWarning, match="drops token_type_ids"):
        sk.export_peft(plain, tmp_path / "b", task_type="FEATURE_EXTRACTION")


def test_config_refuses_unknown_task_types_and_reads_version_1() -> None:
    with pytest.raises(sk.ShiftkitError, match="task_type"):
        sk.PromptTuningConfig(task_type="SEQ_2_SEQ_LM")
    from shiftkit.core.registry import config_from_dict

    old = {"method": "prompt_tuning", "version": 1, "config": {"num_virtual_tokens": 4}}
    assert config_from_dict(old).task_type is None  # files written before task_type keep their meaning
