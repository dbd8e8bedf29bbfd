"""ComPEFT (sk.compress(method="compeft")): the spec's worked example, a from-the-formula reference on random
shifts, the on-disk code (Golomb–Rice gaps and bitmaps) against its size formula, edge cases, LoRA/(IA)³
inputs, the verbs that accept compressed shifts, and corrupt files."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shiftkit as sk
from shiftkit.compression._bits import (
    golomb_decode,
    golomb_encode,
    golomb_estimate_bits,
    golomb_parameter,
    kth_largest_magnitude,
)
from shiftkit.compression.registry import get_method
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import CorruptFileError, ShiftkitError
from tiny_models import make

TAU = torch.tensor([0.3, -0.1, 0.05, -0.4, 0, 0.2, -0.02, 0.01])


def _delta(**tensors: torch.Tensor) -> Shift:
    return Shift(DELTA, None, dict(tensors), {k: tuple(v.shape) for k, v in tensors.items()})


def _reference(shift: Shift, density: float, alpha: float) -> dict[str, torch.Tensor]:
    """ComPEFT as the spec writes it: one flat vector, kthvalue threshold, ties kept, α·σ·sign."""
    flat = torch.cat([t.reshape(-1).double() for t in shift.tensors.values()])
    d = flat.numel()
    k = math.floor(d * density)
    sigma = flat.std(unbiased=True)
    thr = flat.abs().kthvalue(d - k + 1).values if k else math.inf
    q = torch.sign(flat) * (flat.abs() >= thr)
    out, at = {}, 0
    for name, t in shift.tensors.items():
        out[name] = (alpha * sigma * q[at : at + t.numel()]).reshape(t.shape).to(t.dtype)
        at += t.numel()
    return out


def test_spec_worked_example() -> None:
    small = sk.compress(_delta(w=TAU), method="compeft", density=0.25)
    assert small.encoding is not None and small.encoding["sigma"] == pytest.approx(0.20798, abs=1e-5)
    out = sk.decompress(small)["w"]
    expect = torch.tensor([0.20798, 0, 0, -0.20798, 0, 0, 0, 0])
    assert torch.allclose(out, expect, atol=1e-5)
    stc = sk.decompress(sk.compress(_delta(w=TAU), method="compeft", density=0.25, alpha=-2))["w"]
    assert torch.allclose(stc, torch.tensor([0.35, 0, 0, -0.35, 0, 0, 0, 0]))
    # the reference code's signed mean: (0.3 − 0.4)/2 = −0.05 flips every sign
    signed = sk.compress(_delta(w=TAU), method="compeft", density=0.25, alpha=-2, stc_signed_mean=True)
    assert torch.allclose(sk.decompress(signed)["w"], torch.tensor([-0.05, 0, 0, 0.05, 0, 0, 0, 0]))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 1.0])
@pytest.mark.parametrize("alpha", [1.0, 3.5])
def test_matches_formula_on_random_shifts(density: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(3)
    shift = _delta(
        a=torch.randn(40, 30, generator=g), b=torch.randn(17, generator=g) * 3, c=torch.randn(5, 5, 2)
    )
    got = sk.decompress(sk.compress(shift, method="compeft", density=density, alpha=alpha))
    ref = _reference(shift, density, alpha)
    for k in shift.tensors:
        assert torch.allclose(got[k], ref[k], atol=1e-6), k


def test_ties_at_threshold_are_kept_and_zero_cases() -> None:
    small = sk.compress(_delta(w=torch.tensor([1.0, -1.0, 1.0, 0.5])), method="compeft", density=0.25)
    assert small.encoding is not None and small.encoding["nnz"] == 3
    zero = sk.compress(_delta(w=torch.zeros(10)), method="compeft", density=0.5)
    assert torch.equal(sk.decompress(zero)["w"], torch.zeros(10))
    assert zero.encoding is not None and zero.encoding["nnz"] == 0
    none = sk.compress(_delta(w=torch.randn(10)), method="compeft", density=0.05)  # ⌊10·0.05⌋ = 0
    assert torch.equal(sk.decompress(none)["w"], torch.zeros(10))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    p=st.floats(0.0, 1.0),
    b=st.integers(0, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_golomb_round_trip(n: int, p: float, b: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(rng.random(n) < p)
    unary, bits, rem = golomb_encode(pos, b)
    assert np.array_equal(golomb_decode(unary, bits, rem, pos.size, b), pos)


@pytest.mark.parametrize("p", [0.01, 0.05, 0.1, 0.2, 0.5])
def test_encoded_size_matches_the_golomb_estimate(p: float) -> None:
    # i.i.d. masks of a large shift: the data bytes are within 1 % of nnz·(b̄ + 1) bits (spec §4.3)
    d = 2_000_000
    g = torch.Generator().manual_seed(0)
    shift = _delta(w=torch.randn(d, generator=g))
    small = sk.compress(shift, method="compeft", density=p, payload="golomb")
    enc = small.encoding
    assert enc is not None
    b = golomb_parameter(p)
    assert b == {0.01: 6, 0.05: 4, 0.1: 3, 0.2: 2, 0.5: 0}[p]  # the spec's table
    estimate = enc["nnz"] * (golomb_estimate_bits(p, b) + 1) / 8
    assert small["compeft.data"].numel() == pytest.approx(estimate, rel=0.01)


def test_bitmap_and_auto_payloads_decode_the_same() -> None:
    shift = _delta(a=torch.randn(300, 20), b=torch.randn(64))
    outs = [
        sk.decompress(sk.compress(shift, method="compeft", density=0.6, payload=fmt))
        for fmt in ("auto", "golomb", "bitmap")
    ]
    assert outs[0].allclose(outs[1], rtol=0, atol=0) and outs[0].allclose(outs[2], rtol=0, atol=0)
    sizes = [
        sk.compress(shift, method="compeft", density=0.6, payload=f).nbytes
        for f in ("auto", "golomb", "bitmap")
    ]
    assert sizes[0] == min(sizes)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_lossless_setting_round_trips_bit_exactly(shape: list[int], dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * 10).to(dtype)
    t.view(-1)[0] = 0.0
    shift = _delta(x=t, y=torch.randn(7, generator=g).to(dtype))
    lossless = dict(get_method("compeft").lossless)
    back = sk.decompress(sk.compress(shift, method="compeft", **lossless))
    for k, v in shift.tensors.items():
        assert back[k].dtype == v.dtype
        assert torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)) or torch.equal(back[k], v)


def test_kth_largest_magnitude_exact() -> None:
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(1000, generator=g), torch.randn(33, generator=g) * 1e-3, torch.zeros(5)]
    flat = torch.cat(parts).abs()
    for k in (1, 2, 17, 500, 1037, 1038):
        assert kth_largest_magnitude(lambda: iter(parts), k) == float(
            torch.sort(flat, descending=True).values[k - 1]
        )


def test_lora_ia3_and_as_delta() -> None:
    model, _ = make("mlp")
    lora_model = sk.attach_(copy.deepcopy(model), sk.LoRAConfig(r=4))
    for p in sk.shift_parameters(lora_model):
        torch.nn.init.normal_(p)
    lora = sk.extract(lora_model)
    small = sk.compress(lora, method="compeft", density=0.3)
    back = sk.decompress(small)
    assert back.method == "lora" and set(back.tensors) == set(lora.tensors)
    ref = _reference(lora, 0.3, 1.0)  # the factors themselves, base 0 (the reference behaviour)
    assert all(torch.allclose(back[k], ref[k], atol=1e-6) for k in lora.tensors)
    dense = sk.compress(lora, method="compeft", density=0.3, as_delta=True)
    assert sk.decompress(dense).method == "delta"
    ref_d = _reference(sk.to_delta(lora), 0.3, 1.0)
    assert all(torch.allclose(sk.decompress(dense)[k], v, atol=1e-6) for k, v in ref_d.items())
    sk.attach_(copy.deepcopy(model), small)  # a compressed LoRA attaches as the LoRA it encodes

    ia3_model = sk.attach_(copy.deepcopy(model), sk.IA3Config(target_modules=["fc1", "fc2"]))
    for p in sk.shift_parameters(ia3_model):
        p.data += 0.1 * torch.randn_like(p)
    ia3 = sk.extract(ia3_model)
    got = sk.decompress(sk.compress(ia3, method="compeft", density=0.5))
    minus_one = Shift(DELTA, None, {k: v - 1 for k, v in ia3.tensors.items()}, {})
    for k, v in _reference(minus_one, 0.5, 1.0).items():
        assert torch.allclose(got[k], v + 1, atol=1e-6)


def test_verbs_accept_compressed_shifts(tmp_path: Path) -> None:
    base, x = make("mlp")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tv = sk.task_vector(base, tuned)
    small = sk.compress(tv, method="compeft", density=0.2)
    dense = sk.decompress(small)
    path = tmp_path / "tv.compeft.safetensors"
    sk.save(small, path)
    loaded = sk.load(path)
    assert loaded.encoding == small.encoding and sk.decompress(loaded).allclose(dense, rtol=0, atol=0)
    assert small.nbytes < tv.nbytes
    a, b = sk.apply_(copy.deepcopy(base), loaded), sk.apply_(copy.deepcopy(base), dense)
    assert torch.equal(a(x), b(x))
    m1 = sk.merge([loaded, tv], method="ties", density=0.5)
    m2 = sk.merge([dense, tv], method="ties", density=0.5)
    assert m1.allclose(m2, rtol=0, atol=0)
    pool = sk.ShiftPool({"c": loaded})
    assert pool["c"].encoding is None
    with pytest.raises(ShiftkitError, match="decompress"):
        _ = small + tv


def test_alpha_auto_picks_the_best_scale() -> None:
    g = torch.Generator().manual_seed(5)
    tv = _delta(w=torch.randn(500, generator=g))

    def score(s: Shift) -> float:  # closest to the dense shift
        return -float((s["w"] - tv["w"]).norm())

    grid = (0.25, 0.5, 1.0, 2.0, 4.0)
    small = sk.compress(tv, method="compeft", density=0.3, alpha="auto", alpha_grid=grid, evaluate=score)
    errs = {a: -score(_delta(w=_reference(tv, 0.3, a)["w"])) for a in grid}
    assert small.encoding is not None and small.encoding["params"]["alpha"] == min(errs, key=errs.__getitem__)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"density": True}, "density"),
        ({"alpha": -3}, "alpha"),
        ({"alpha": "auto"}, "evaluate"),
        ({"payload": "zip"}, "payload"),
        ({"bits": 3}, "compeft"),
    ],
)
def test_bad_parameters(params: dict, match: str) -> None:
    with pytest.raises(ShiftkitError, match=match):
        sk.compress(_delta(w=TAU), method="compeft", **params)


def test_not_a_delta_explains_what_to_do() -> None:
    model, _ = make("mlp")
    ssf = sk.extract(sk.attach_(copy.deepcopy(model), sk.SSFConfig()))
    with pytest.raises(ShiftkitError, match="to_delta"):
        sk.compress(ssf, method="compeft")
    with pytest.raises(ShiftkitError, match="Shift"):
        sk.compress({"w": TAU}, method="compeft")  # type: ignore[arg-type]


def test_corrupt_payload_is_a_corrupt_file_error(tmp_path: Path) -> None:
    small = sk.compress(_delta(w=torch.randn(1000)), method="compeft", density=0.1)
    table = small["compeft.table"].clone()
    table[0, 6] += 10_000  # points past the payload
    bad = Shift(small.method, None, {**small.tensors, "compeft.table": table}, small.base, small.encoding)
    with pytest.raises(CorruptFileError):
        sk.decompress(bad)
    data = small["compeft.data"].clone()
    data[:] = 255  # all ones: no unary terminators
    bad = Shift(small.method, None, {**small.tensors, "compeft.data": data}, small.base, small.encoding)
    with pytest.raises(CorruptFileError):
        sk.decompress(bad)
    path = tmp_path / "c.safetensors"
    sk.save(small, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError):
        sk.load(path)


def test_per_tensor_scope_matches_the_formula_per_tensor() -> None:
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(30, 20, generator=g), 0.01 * torch.randn(40, generator=g)  # very different scales
    shift = _delta(a=a, b=b)
    got = sk.decompress(sk.compress(shift, method="compeft", density=0.2, alpha=2.0, scope="tensor"))
    for k, t in shift.tensors.items():  # each tensor alone through the global formula
        assert torch.allclose(got[k], _reference(_delta(x=t), 0.2, 2.0)["x"], atol=1e-7)
    glob = sk.decompress(sk.compress(shift, method="compeft", density=0.2, scope="global"))
    assert int((glob["b"] != 0).sum()) == 0 < int((got["b"] != 0).sum())  # global top-k skips the small one
    with pytest.raises(ShiftkitError, match="scope"):
        sk.compress(shift, method="compeft", scope="layer")
