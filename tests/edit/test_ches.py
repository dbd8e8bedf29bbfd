"""CHES / LN-CHES (spec combine-compress.md §8): the spec's toy numbers, y⁺ = y⁻ → 0, agreement with the
reference's batched rule (left-padded sequence: zero the positions before the last prompt token, drop the
final column, sum; length = (L − 1) − last prompt index) computed one sequence at a time, independence from
padding side and batch size, the reference script's off-by-one as a switch, skipped empty responses, and
the window rule of pair selection."""

from __future__ import annotations

import math

import pytest
import torch

from shiftkit import edit
from shiftkit.errors import ShiftkitError
from tiny_models import make
from tiny_tokenizer import CharTokenizer

PROMPTS = ["say hi:", "tell me a tale about cats.", "q"]
CHOSEN = [" hello there", " once a cat", " yes"]
REJECTED = [" go away now", " no", " yes indeed"]


def _llama() -> torch.nn.Module:
    return make("tiny_llama")[0].hf


def test_toy_values_from_the_spec() -> None:
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert float(edit.ches_from_hidden(pos, neg, length_normalized=False)) == -6.0
    assert math.isclose(float(edit.ches_from_hidden(pos, neg)), 2 / 9 - 8 / 9, rel_tol=1e-12)
    assert float(edit.ches_from_hidden(pos, pos)) == 0.0
    assert float(edit.ches_from_hidden(pos, pos, length_normalized=False)) == 0.0


def _reference_sum(
    model: torch.nn.Module, tok: CharTokenizer, prompt: str, response: str
) -> tuple[torch.Tensor, int]:
    """The reference's batched rule applied to one (unpadded) sequence."""
    p, r = tok.encode_one(prompt), tok.encode_one(response, special=False)
    ids = torch.tensor([p + r])
    h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].detach()
    last_prompt = len(p) - 1
    keep = h.clone()
    keep[:last_prompt] = 0
    keep = keep[:-1]
    return keep.sum(0), (ids.shape[1] - 1) - last_prompt


def test_matches_the_reference_rule_for_both_scores() -> None:
    model, tok = _llama(), CharTokenizer()
    for ln in (True, False):
        got = edit.ches(model, tok, PROMPTS, CHOSEN, REJECTED, length_normalized=ln, batch_size=2)
        for i in range(len(PROMPTS)):
            hp, n_p = _reference_sum(model, tok, PROMPTS[i], CHOSEN[i])
            hn, n_n = _reference_sum(model, tok, PROMPTS[i], REJECTED[i])
            hp, hn = hp.double(), hn.double()
            want = hp @ hn / (n_p * n_n) - hp @ hp / n_p**2 if ln else hp @ hn - hp @ hp
            assert math.isclose(float(got[i]), float(want), rel_tol=1e-4, abs_tol=1e-4), (ln, i)


def test_same_response_scores_zero_and_padding_side_does_not_matter() -> None:
    model = _llama()
    same = edit.ches(model, CharTokenizer(), PROMPTS, CHOSEN, CHOSEN)
    assert torch.allclose(same, torch.zeros(3, dtype=torch.float64), atol=1e-9)
    right = edit.ches(model, CharTokenizer(), PROMPTS, CHOSEN, REJECTED, batch_size=3)
    left = edit.ches(model, CharTokenizer(padding_side="left"), PROMPTS, CHOSEN, REJECTED, batch_size=3)
    single = edit.ches(model, CharTokenizer(), PROMPTS, CHOSEN, REJECTED, batch_size=1)
    assert torch.allclose(right, left) and torch.allclose(right, single, rtol=1e-5, atol=1e-6)


def test_include_final_token_adds_the_last_position() -> None:
    model, tok = _llama(), CharTokenizer()
    sums, counts = edit.response_sums(model, tok, PROMPTS, CHOSEN)
    more, more_counts = edit.response_sums(model, tok, PROMPTS, CHOSEN, include_final_token=True)
    assert torch.equal(more_counts, counts + 1)
    p, r = tok.encode_one(PROMPTS[0]), tok.encode_one(CHOSEN[0], special=False)
    h = model(input_ids=torch.tensor([p + r]), output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(more[0] - sums[0], h[-1].detach(), atol=1e-5)


def test_empty_responses_are_skipped_and_counted() -> None:
    model, tok = _llama(), CharTokenizer()
    with pytest.warns(UserWarning, match="skipped 1 of 3 pairs"):
        scores = edit.ches(model, tok, PROMPTS, [" hi", "", " ok"], REJECTED)
    assert math.isnan(float(scores[1])) and not torch.isnan(scores[[0, 2]]).any()
    # truncation can empty a response too
    with pytest.warns(UserWarning, match="skipped 3 of 3"):
        edit.ches(model, tok, PROMPTS, CHOSEN, REJECTED, max_length=2)


def test_select_pairs_window_rule() -> None:
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, float("nan")])  # ascending order: 1, 3, 4, 2, 0
    assert edit.select_pairs(scores, 2, 0.0).tolist() == [1, 3]
    assert edit.select_pairs(scores, 2, 1.0).tolist() == [2, 0]  # window moved left at the end
    assert edit.select_pairs(scores, 3, 0.5).tolist() == [3, 4, 2]  # idx = round(0.5 * 4) = 2, start 1
    assert edit.select_pairs(scores, 5).tolist() == [1, 3, 4, 2, 0]
    with pytest.raises(ShiftkitError, match=r"1\.\.5"):
        edit.select_pairs(scores, 6)
    with pytest.raises(ShiftkitError, match="quantile"):
        edit.select_pairs(scores, 2, 1.5)


def test_bad_input() -> None:
    model = _llama()
    with pytest.raises(ShiftkitError, match="pad token"):
        edit.ches(model, CharTokenizer(pad=False), PROMPTS, CHOSEN, REJECTED)
    with pytest.raises(ShiftkitError, match="3 prompts, 2 chosen"):
        edit.ches(model, CharTokenizer(), PROMPTS, CHOSEN[:2], REJECTED)
    with pytest.raises(ShiftkitError, match="one width"):
        edit.ches_from_hidden(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ShiftkitError, match="no tokens"):
        edit.ches_from_hidden(torch.ones(0, 3), torch.ones(2, 3))


def test_baselines_of_spec_section_8_2() -> None:
    tok = CharTokenizer()
    d = edit.edit_distance_similarity(
        tok, ["abc", "abc", "", "kitten", ""], ["abc", "abd", "ab", "sitting", ""]
    )
    assert d[:4].tolist() == [0.0, -1 / 3, -1.0, -3 / 7] and math.isnan(float(d[4]))
    model = _llama()
    got = edit.last_state_similarity(model, tok, PROMPTS, CHOSEN, REJECTED, batch_size=2)
    for i in range(3):
        last = []
        for r in (CHOSEN[i], REJECTED[i]):
            ids = torch.tensor([tok.encode_one(PROMPTS[i]) + tok.encode_one(r, special=False)])
            last.append(
                model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].detach().double()
            )
        assert math.isclose(float(got[i]), float(last[0] @ last[1]), rel_tol=1e-5)
