"""Model Surgery's behaviour probe: features are the last hidden state mean-pooled over the attention mask
(not over ids != 0, the reference's quirk), independent of padding; the probe learns a separable behaviour and
reports held-out accuracy; its direction is the raw undesired-class row; bad input is refused."""

from __future__ import annotations

import pytest
import torch

from shiftkit import edit
from shiftkit.errors import ShiftkitError
from tiny_models import make
from tiny_tokenizer import CharTokenizer


def _llama() -> torch.nn.Module:
    return make("tiny_llama")[0].hf


def test_features_are_the_masked_mean_of_the_last_hidden_state() -> None:
    model, tok = _llama(), CharTokenizer()
    texts = ["banana", "xy", "a cat sat"]  # "a" is token id 0: a real token, not padding
    feats = edit.hidden_features(model, tok, texts, batch_size=3)
    for i, text in enumerate(texts):
        ids = torch.tensor([tok.encode_one(text)])
        last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        # hidden_states[-1] is the base model's output, after the final norm
        assert torch.allclose(last, model.model(input_ids=ids).last_hidden_state[0], atol=1e-6)
        assert torch.allclose(feats[i], last.mean(0), atol=1e-5)


def test_features_do_not_depend_on_padding_side_or_batch() -> None:
    model = _llama()
    texts = ["abc", "a much longer text here", "zz"]
    right = edit.hidden_features(model, CharTokenizer(padding_side="right"), texts, batch_size=3)
    left_tok = CharTokenizer(padding_side="left")
    left = edit.hidden_features(model, left_tok, texts, batch_size=3)
    one = edit.hidden_features(model, CharTokenizer(), texts, batch_size=1)
    assert torch.allclose(right, one, atol=1e-5) and torch.allclose(left, one, atol=1e-5)
    assert left_tok.padding_side == "left"  # restored


def _separable(n: int = 40) -> tuple[list[str], list[int]]:
    gen = torch.Generator().manual_seed(0)
    texts, labels = [], []
    for i in range(n):
        bad = i % 2
        body = "".join("qwrt"[int(j)] for j in torch.randint(0, 4, (6,), generator=gen))
        texts.append(("zzzzzz" if bad else "bbbbbb") + body)
        labels.append(bad)
    return texts, labels


def test_probe_learns_a_separable_behaviour() -> None:
    model, tok = _llama(), CharTokenizer()
    texts, labels = _separable()
    probe = edit.train_probe(model, tok, texts, labels, epochs=200, lr=1e-2, batch_size=8, held_out=0.25)
    assert probe.accuracy == 1.0 and probe.train_accuracy == 1.0
    assert probe.n_train + probe.n_held_out == len(texts) and probe.n_held_out == 10
    assert torch.equal(probe.direction, probe.weight[1])  # the raw row, not w1 - w0 or normalised
    p = probe.score_texts(model, tok, ["zzzzzzqqqq", "bbbbbbqqqq"])
    assert float(p[0]) > 0.5 > float(p[1])


def test_probe_from_precomputed_features_equals_the_direct_one() -> None:
    model, tok = _llama(), CharTokenizer()
    texts, labels = _separable()
    feats = edit.hidden_features(model, tok, texts)
    a = edit.train_probe(model, tok, texts, labels, epochs=3, features=feats)
    b = edit.train_probe(model, tok, texts, labels, epochs=3)
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and a.accuracy == b.accuracy


def test_bad_input() -> None:
    model, tok = _llama(), CharTokenizer()
    texts, labels = _separable(8)
    with pytest.raises(ShiftkitError, match="pad token"):
        edit.train_probe(model, CharTokenizer(pad=False), texts, labels)
    with pytest.raises(ShiftkitError, match="8 texts but 7 labels"):
        edit.train_probe(model, tok, texts, labels[:7])
    with pytest.raises(ShiftkitError, match=r"0 \(acceptable\) or 1"):
        edit.train_probe(model, tok, texts, [2] * 8)
    with pytest.raises(ShiftkitError, match="two texts of each class"):
        edit.train_probe(model, tok, texts, [1] * 8)
    with pytest.raises(ShiftkitError, match="held_out"):
        edit.train_probe(model, tok, texts, labels, held_out=1.0)
    with pytest.raises(ShiftkitError, match="no texts"):
        edit.hidden_features(model, tok, [])
    with pytest.raises(ShiftkitError, match="hidden_states"):
        edit.hidden_features(_NoStates(), tok, ["abc"])


class _NoStates(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, **kwargs: object) -> dict[str, torch.Tensor]:
        return {"logits": self.w}
