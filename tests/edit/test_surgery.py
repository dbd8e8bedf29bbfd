"""Model Surgery's edit (spec learn.md §11.5 sanity checks) on a tiny Llama: exactly k rows change, each by
α·v; selection is by rank of cosine over every layer; a hidden state with h·v > 0 raises each chosen gate
pre-activation by α(h·v); undo is bit-exact; the shift saves small; bad input is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import shiftkit as sk
from shiftkit import edit
from shiftkit.errors import ShiftkitError, TargetNotFoundError
from tiny_models import make


def _llama() -> torch.nn.Module:
    return make("tiny_llama")[0].hf


def _gates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.{i}.mlp.gate_proj.weight": layer.mlp.gate_proj.weight.detach().clone()
        for i, layer in enumerate(model.model.layers)
    }


def _direction(seed: int = 3) -> torch.Tensor:
    return torch.randn(16, generator=torch.Generator().manual_seed(seed))


def test_exactly_k_rows_change_each_by_alpha_v() -> None:
    model = _llama()
    v, alpha, k = _direction(), 0.75, 9
    before, state = _gates(model), {n: t.clone() for n, t in model.state_dict().items()}
    shift = edit.surgery(model, v, k=k, alpha=alpha)
    assert all(torch.equal(t, _gates(model)[n]) for n, t in before.items())  # surgery leaves the model alone
    sk.apply_(model, shift)
    after = _gates(model)
    changed = 0
    for name, w in before.items():
        diff = after[name] - w
        rows = (diff != 0).any(1)
        changed += int(rows.sum())
        # each changed row moved by α·v up to one float32 rounding of the sum
        expect = (alpha * v).expand(int(rows.sum()), -1)
        assert torch.allclose(diff[rows], expect, rtol=0, atol=2e-7)
    assert changed == k
    others = [n for n in state if "gate_proj" not in n]
    assert others and all(torch.equal(state[n], model.state_dict()[n]) for n in others)


def test_selection_is_by_global_cosine_rank() -> None:
    model = _llama()
    v = _direction()
    cos = edit.gate_cosines(model, v)
    # the cosines are the formula's
    w = model.model.layers[1].mlp.gate_proj.weight.detach()
    manual = (w @ v) / (w.norm(dim=1) * v.norm())
    assert torch.allclose(cos["model.layers.1.mlp.gate_proj.weight"], manual, atol=1e-6)
    shift = edit.surgery(model, v, k=10)
    chosen, rest = [], []
    for name, c in cos.items():
        idx = (
            shift.tensors[f"{name}.rows"]
            if f"{name}.rows" in shift.tensors
            else torch.tensor([], dtype=torch.long)
        )
        mask = torch.zeros_like(c, dtype=torch.bool)
        mask[idx] = True
        chosen.append(c[mask])
        rest.append(c[~mask])
    assert sum(t.numel() for t in chosen) == 10
    assert float(torch.cat(chosen).max()) <= float(torch.cat(rest).min())
    # both layers take part: the ranking is global, not per layer
    assert all(t.numel() > 0 for t in chosen)


def test_gate_preactivation_rises_by_alpha_h_dot_v() -> None:
    model = _llama()
    v, alpha = _direction(), 1.5
    h = v / v.norm() * 2.0 + 0.1 * _direction(9)  # a hidden state with h·v > 0
    assert float(h @ v) > 0
    gate = model.model.layers[0].mlp.gate_proj
    pre = gate(h).detach().clone()
    shift = edit.surgery(model, v, k=20, alpha=alpha)
    rows = shift.tensors["model.layers.0.mlp.gate_proj.weight.rows"]
    with edit.apply_(model, shift):
        post = gate(h).detach()
    rise = post - pre
    assert torch.allclose(rise[rows], torch.full((rows.numel(),), alpha * float(h @ v)), atol=1e-5)
    untouched = torch.ones_like(rise, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(rise[untouched], torch.zeros(int(untouched.sum())))


def test_undo_is_bit_exact_and_plain_revert_is_within_one_rounding() -> None:
    model = _llama()
    state = {k: t.clone() for k, t in model.state_dict().items()}
    shift = edit.surgery(model, _direction() * 3.7, k=0.25, alpha=1.0)
    handle = edit.apply_(model, shift)
    assert any(not torch.equal(state[k], t) for k, t in model.state_dict().items())
    handle.undo()
    assert all(torch.equal(state[k], t) for k, t in model.state_dict().items())
    handle.undo()  # twice is harmless
    # sk.apply_ with scale -1 is the float subtraction: back to within half an ulp of the edited value
    sk.apply_(model, shift)
    sk.apply_(model, shift, scale=-1.0)
    for k, t in model.state_dict().items():
        assert torch.allclose(t, state[k], rtol=0, atol=4e-7), k


def test_fraction_counts_rows_of_all_layers() -> None:
    model = _llama()
    total = sum(t.shape[0] for t in _gates(model).values())  # 2 layers x 32 rows
    shift = edit.surgery(model, _direction(), k=0.25)
    kept = sum(int(t.numel()) for n, t in shift.tensors.items() if n.endswith(".rows"))
    assert kept == round(0.25 * total)


def test_shift_saves_small_and_loads_equal(tmp_path: Path) -> None:
    model = _llama()
    shift = edit.surgery(model, _direction(), k=12, alpha=2.0)
    dense = sk.decompress(shift)
    assert dense.method == "delta" and shift.nbytes < dense.nbytes / 10
    path = tmp_path / "edit.safetensors"
    sk.save(shift, path)
    back = sk.load(path)
    again = sk.decompress(back)
    assert set(again.tensors) == set(dense.tensors)
    assert all(torch.equal(again[k], dense[k]) for k in dense.tensors)


def test_negative_alpha_moves_the_other_way() -> None:
    model = _llama()
    v = _direction()
    plus = sk.decompress(edit.surgery(model, v, k=5, alpha=1.0))
    minus = sk.decompress(edit.surgery(model, v, k=5, alpha=-1.0))
    assert all(torch.equal(plus[k], -minus[k]) for k in plus.tensors)


def test_other_modules_can_be_edited() -> None:
    model = _llama()
    shift = edit.surgery(model, _direction(), k=4, modules=("up_proj",))
    assert all("up_proj" in k for k in shift.base)


def test_bad_input() -> None:
    model = _llama()
    with pytest.raises(ShiftkitError, match="entries but"):
        edit.surgery(model, torch.ones(15), k=3)
    with pytest.raises(ShiftkitError, match="only 64 rows"):
        edit.surgery(model, _direction(), k=65)
    with pytest.raises(ShiftkitError, match="row count"):
        edit.surgery(model, _direction(), k=0)
    with pytest.raises(ShiftkitError, match="row count"):
        edit.surgery(model, _direction(), k=2.5)
    with pytest.raises(TargetNotFoundError, match="gate_proj"):
        edit.surgery(model, _direction(), k=3, modules="ffn_gate")
    with pytest.raises(ShiftkitError, match="finite"):
        edit.surgery(model, _direction(), k=3, alpha=float("nan"))
    with pytest.raises(ShiftkitError, match=r"nn\.Linear"):
        edit.surgery(model, _direction(), k=3, modules="mlp")
    with pytest.raises(ShiftkitError, match="deltas"):
        edit.apply_(model, sk.Shift("lora", None, {}))


def test_registered() -> None:
    assert edit.list_methods() == ["ches", "surgery"]
    assert edit.get_method("surgery").kind == "edit" and edit.get_method("ches").kind == "diagnose"
