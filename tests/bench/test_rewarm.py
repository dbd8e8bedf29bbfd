"""``shiftkit bench rewarm``: the suite end to end on a tiny Llama (every schedule, replay and the union row),
perplexity against its formula, the verdict, and the refusals."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from shiftkit.bench import rewarm as rw
from shiftkit.errors import ShiftkitError
from shiftkit.recipes.causal_lm import lm_batches, perplexity


class CharTok:
    """Characters → ids 3..49, right-padded with 0 (the calls the suite makes of a Hugging Face tokenizer)."""

    pad_token_id = 0
    eos_token = "\n"

    def __call__(self, texts: list[str], **kw: Any) -> dict[str, torch.Tensor]:
        ids = [[3 + ord(c) % 47 for c in t][: kw.get("max_length", 64)] or [3] for t in texts]
        width = max(map(len, ids))
        out = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            out[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return {"input_ids": out, "attention_mask": mask}


def _factory() -> tuple[Any, CharTok]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), CharTok()


def _texts() -> dict[str, tuple[list[str], list[str]]]:
    words = {"old": "the news today", "tweets": "lol so good", "amazon": "great product buy"}
    return {k: ([f"{w} {i}" for i in range(8)], [f"{w} x{i}" for i in range(4)]) for k, w in words.items()}


SETTINGS = {"steps": 3, "batch_size": 4, "max_length": 16, "n_train": 8, "n_eval": 4, "lr": 1e-2, "seed": 0}


def test_suite_runs_every_schedule_replay_and_the_union() -> None:
    payload = rw.run_suite(SETTINGS, replays=(0.0, 0.25), model_factory=_factory, texts=_texts())
    runs = payload["runs"]
    assert [(r["schedule"], r["replay"]) for r in runs[:-1]] == [
        (s, f) for s in rw.SCHEDULES for f in (0.0, 0.25)
    ]
    assert runs[-1]["schedule"].startswith("union") and runs[-1]["steps"] == 3 * 2 + 3
    for r in runs[:-1]:
        assert [p["phase"] for p in r["phases"]] == list(rw.PHASES)
        assert all(math.isfinite(v) for p in r["phases"] for v in p["ppl"].values())
    # training on the new text lowers its perplexity below the pretrained model's
    rewarm = next(r for r in runs if r["schedule"] == "rewarm" and r["replay"] == 0.0)
    assert rewarm["phases"][0]["ppl"]["tweets"] < payload["pretrained"]["tweets"]
    # the schedules end where they should: re-warm decays to 0.1·peak, constant stays at 0.1·peak
    assert rewarm["phases"][-1]["lr_end"] == pytest.approx(0.1 * 1e-2)
    constant = next(r for r in runs if r["schedule"] == "constant")
    assert constant["phases"][0]["lr_end"] == pytest.approx(0.1 * 1e-2)
    rows, columns = rw.table_rows(payload)
    assert columns[:4] == ["schedule", "replay", "after", "old"] and rows[0]["schedule"] == "pretrained"
    assert "<svg" in rw.render_html(payload) and "union" in payload["verdict"]


def test_perplexity_is_exp_of_the_mean_token_nll() -> None:
    model, tok = _factory()
    batches = lm_batches(tok, ["abc", "hello there"], 2, 16)
    logits = model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
    nll, n = 0.0, 0
    for i, length in enumerate(batches[0]["attention_mask"].sum(1).tolist()):
        logp = torch.log_softmax(logits[i, : length - 1], -1)
        target = batches[0]["input_ids"][i, 1:length]
        nll -= float(logp.gather(1, target[:, None]).sum())
        n += length - 1
    assert perplexity(model, batches) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_verdict_reads_the_union_row() -> None:
    ppl = {"old": 10.0, "tweets": 20.0, "amazon": 30.0}
    runs = [
        {"schedule": "rewarm", "replay": 0.05, "phases": [{"phase": "amazon", "ppl": ppl}], "steps": 10},
        {
            "schedule": "union (re-train)",
            "replay": 0.05,
            "phases": [{"phase": "all", "ppl": ppl}],
            "steps": 15,
        },
    ]
    assert "matches the union" in rw.verdict({"runs": runs})
    runs[0]["phases"][0]["ppl"] = {**ppl, "amazon": 40.0}
    assert "does NOT match" in rw.verdict({"runs": runs})
    assert "needs the union row" in rw.verdict({"runs": runs[:1]})


def test_refusals() -> None:
    with pytest.raises(ShiftkitError, match="unknown schedule"):
        rw.run_suite(SETTINGS, schedules=("cosine",), model_factory=_factory, texts=_texts())
    with pytest.raises(ShiftkitError, match="replay"):
        rw.run_suite(SETTINGS, replays=(1.0,), model_factory=_factory, texts=_texts())


def test_finished_runs_are_kept_and_reused(tmp_path: Any) -> None:
    kw: dict[str, Any] = {
        "replays": (0.0,),
        "schedules": ("rewarm",),
        "model_factory": _factory,
        "out": tmp_path,
    }
    first = rw.run_suite(SETTINGS, texts=_texts(), **kw)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["rewarm-0.json", "union.json"]
    seen: list[str] = []
    again = rw.run_suite(SETTINGS, texts=_texts(), log=seen.append, **kw)
    assert again["runs"] == first["runs"] and sum("kept" in m for m in seen) == 2
    other = {**SETTINGS, "steps": 2}  # other settings: run again, not read back
    third = rw.run_suite(other, texts=_texts(), union=False, **kw)
    assert third["runs"][0]["steps"] == 4
