"""CONTRIBUTING.md's editing-tool example, run as written: registered by its one decorator, its shift small,
applied and undone bit for bit, and the logits of the damped tokens scaled as the docstring says."""

from __future__ import annotations

import torch

from contributing_docs import run_section_example
from shiftkit import edit
from shiftkit.edit.registry import EDIT_METHODS
from tiny_models import make


def test_contributing_edit_example() -> None:
    try:
        run_section_example("An editing tool")
        assert edit.get_method("token_damp").kind == "edit"
        model = make("tiny_llama")[0].hf
        ids = torch.tensor([[3, 7, 11, 4]])
        before = model(input_ids=ids).logits.detach()
        state = {k: t.clone() for k, t in model.state_dict().items()}
        shift = edit.get_method("token_damp").fn(model, [5, 9], alpha=0.5)
        assert shift.encoding is not None and shift.nbytes < model.lm_head.weight.numel()  # rows only
        with edit.apply_(model, shift):
            after = model(input_ids=ids).logits.detach()
        assert torch.allclose(after[..., [5, 9]], 0.5 * before[..., [5, 9]], atol=1e-5)
        others = [i for i in range(50) if i not in (5, 9)]
        assert torch.equal(after[..., others], before[..., others])
        assert all(torch.equal(state[k], t) for k, t in model.state_dict().items())
    finally:
        EDIT_METHODS._entries.pop("token_damp", None)
