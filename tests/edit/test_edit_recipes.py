"""The recipes behind ``shiftkit edit`` and the ``edit-smollm2`` suite: response log-probabilities against
their formula, DPO's loss and direction, sampled continuations that depend only on the seed, the steering
table (each edit undone bit for bit), the file readers and the VADER-built data, and the suite end to end on
a tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import need_asset
from shiftkit import edit
from shiftkit.errors import ShiftkitError
from shiftkit.recipes.causal_lm import DPOSettings, dpo_train, generate, response_logprobs
from shiftkit.recipes.edit_lm import read_labelled, read_pairs, steer_table
from tiny_models import make
from tiny_tokenizer import CharTokenizer


def _llama() -> torch.nn.Module:
    return make("tiny_llama")[0].hf


def test_response_logprobs_is_the_sum_over_response_tokens() -> None:
    model, tok = _llama(), CharTokenizer()
    got = response_logprobs(model, tok, ["hi:", "a longer prompt:"], [" yes", " no way"], batch_size=2)
    for i, (p, r) in enumerate([("hi:", " yes"), ("a longer prompt:", " no way")]):
        ids = tok.encode_one(p) + tok.encode_one(r, special=False)
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].detach(), -1)
        n_p = len(tok.encode_one(p))
        want = sum(float(logp[j - 1, ids[j]]) for j in range(n_p, len(ids)))
        assert math.isclose(float(got[i]), want, rel_tol=1e-5)


def test_dpo_widens_the_margin_and_starts_at_log_2() -> None:
    model, tok = _llama(), CharTokenizer()
    prompts, chosen, rejected = (
        ["q:"] * 4,
        [" good", " fine", " nice", " ok"],
        [" bad", " awful", " no", " meh"],
    )
    before = response_logprobs(model, tok, prompts, chosen) - response_logprobs(model, tok, prompts, rejected)
    losses = dpo_train(model, tok, prompts, chosen, rejected, DPOSettings(epochs=5, batch_size=4, lr=1e-2))
    after = response_logprobs(model, tok, prompts, chosen) - response_logprobs(model, tok, prompts, rejected)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the first step
    assert losses[-1] < losses[0] and float((after - before).mean()) > 0
    with pytest.raises(ShiftkitError, match="0 prompts"):
        dpo_train(model, tok, [], [], [])


def test_generate_depends_only_on_the_seed() -> None:
    model, tok = _llama(), CharTokenizer()
    a = generate(model, tok, ["ab", "c"], samples=2, max_new_tokens=5, seed=3)
    torch.manual_seed(123)  # the global stream does not matter
    b = generate(model, tok, ["ab", "c"], samples=2, max_new_tokens=5, seed=3)
    assert a == b and len(a) == 4 and tok.padding_side == "right"


def test_steer_table_undoes_each_edit() -> None:
    model, tok = _llama(), CharTokenizer()
    state = {k: t.clone() for k, t in model.state_dict().items()}
    probe = edit.Probe(torch.randn(2, 16), torch.zeros(2), 1.0, 1.0, 1, 1)
    shift = edit.surgery(model, probe.direction, k=6, alpha=50.0)
    rows = steer_table(
        model, tok, probe, {"base": None, "edit": shift}, ["ab", "cd"], ppl_texts=["hello", "world"],
        samples=2, max_new_tokens=4, judge=lambda texts: [-1.0 if "b" in t else 0.0 for t in texts],
    )  # fmt: skip
    assert all(torch.equal(state[k], t) for k, t in model.state_dict().items())
    assert [r["edit"] for r in rows] == ["base", "edit"] and rows[1]["rows"] == 6 and rows[0]["rows"] == 0
    assert rows[0]["perplexity"] != rows[1]["perplexity"]  # the edit was in place while measuring
    assert all(0 <= r["judge_negative"] <= 1 and 0 <= r["probe_undesired"] <= 1 for r in rows)


def test_file_readers(tmp_path: Path) -> None:
    f = tmp_path / "texts.jsonl"
    f.write_text('{"text": "nice", "label": 0}\n\n{"text": "vile", "label": 1}\n')
    assert read_labelled(f) == (["nice", "vile"], [0, 1])
    t = tmp_path / "texts.tsv"
    t.write_text("1\tugh, bad\n0\tlovely\n")
    assert read_labelled(t) == (["ugh, bad", "lovely"], [1, 0])
    t.write_text("2\tugh\n")
    with pytest.raises(ShiftkitError, match="label must be 0 or 1"):
        read_labelled(t)
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n")
    data = read_pairs(p)
    assert (data.prompts, data.chosen, data.rejected, data.near) == (["x"], ["a"], ["b"], [False])
    p.write_text('{"prompt": "x"}\n')
    with pytest.raises(ShiftkitError, match=":1: expected"):
        read_pairs(p)
    with pytest.raises(ShiftkitError, match="no such file"):
        read_pairs(tmp_path / "none.jsonl")


@pytest.mark.assets
def test_vader_data_and_judge() -> None:
    need_asset("vader")
    from shiftkit.recipes.edit_lm import vader_behaviour, vader_judge, vader_preferences

    texts, labels = vader_behaviour(5, domains=("movies",))
    assert len(texts) == 10 and sum(labels) == 5
    neg = [t for t, lab in zip(texts, labels, strict=True) if lab == 1]
    # VADER's own scorer agrees that the negative class is negative (its ground truth is human ratings)
    assert sum(vader_judge(neg)) < 0 < sum(vader_judge([t for t in texts if t not in neg]))
    data = vader_preferences(6, 4, seed=1)
    assert len(data.prompts) == 10 and sum(data.near) == 4
    for c, r, near in zip(data.chosen, data.rejected, data.near, strict=True):
        if near:  # one word deleted
            assert len(r.split()) == len(c.split()) - 1 and set(r.split()) <= set(c.split())


def _tiny_factory() -> tuple[Any, CharTokenizer]:
    return _llama(), CharTokenizer()


@pytest.mark.assets
def test_suite_end_to_end_on_a_tiny_llama() -> None:
    need_asset("vader")
    need_asset("guardian-headlines")
    from shiftkit.bench import edit_smollm2 as suite

    settings = {**suite.SIZES["quick"], "seed": 0, "size": "quick", "edits": [[0.1, 5.0], [0.1, -5.0]]}
    payload = suite.run_suite(settings, model_factory=_tiny_factory)
    rows = payload["surgery"]["rows"]
    assert [r["edit"] for r in rows] == ["unedited", "k=0.1 alpha=5", "k=0.1 alpha=-5"]
    assert rows[1]["rows"] == round(0.1 * payload["surgery"]["gate_rows"]) and rows[1]["k"] == 0.1
    ches = payload["ches"]
    assert ches["pairs"] == 16 and ches["near_duplicates"] == 4 and len(ches["dpo"]) == 2
    assert all(
        0.0 <= ches[k] <= 1.0
        for k in ("auroc_ln_ches", "auroc_ches", "auroc_last_state", "auroc_edit_distance")
    )
    for name, fn in (("surgery", suite.surgery_rows), ("ches", suite.ches_rows)):
        table, columns = fn(payload)
        assert table and set(table[0]) == set(columns), name
    assert len(payload["verdicts"]) == 2 and "<table" in suite.render_html(payload)
