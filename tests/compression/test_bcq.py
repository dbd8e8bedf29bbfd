"""Binary-coding quantisation (ShiftAddLLM): the fitting steps against their formulas and brute force, the
output-error sweep, the lookup-table matmul against the dequantised dense matmul, ``sk.quantize_`` on a tiny
Llama, the ``bcq`` compressor and its errors."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch

import shiftkit as sk
from shiftkit.cli import main
from shiftkit.compression._bcq import (
    allocate_bits,
    apot,
    dequantize,
    fit_bcq,
    lut_matmul,
    nearest_codes,
    pack_codes,
    quantize_weight,
    unpack_codes,
)
from shiftkit.compression.bcq import BCQLinear
from shiftkit.core.shift import DELTA, Shift
from shiftkit.errors import CorruptFileError, ShiftkitError, UnknownMethodError
from tiny_models import make


def _delta(**tensors: torch.Tensor) -> Shift:
    return Shift(DELTA, None, dict(tensors), {k: tuple(v.shape) for k, v in tensors.items()})


def test_one_bit_is_sign_times_mean_magnitude() -> None:
    w = torch.tensor([[0.9, -0.3, 0.5, -0.1]])
    alpha, codes = fit_bcq(w, 1, rounds=3)
    assert torch.allclose(alpha, torch.tensor([[0.45]], dtype=alpha.dtype))
    assert torch.equal(codes[0, :, 0], torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=codes.dtype))


def test_two_bits_recover_an_exact_binary_code() -> None:
    # entries from {±1 ± 0.5}: two binary codes with α = (1, 0.5) reproduce them exactly
    g = torch.Generator().manual_seed(0)
    s1 = torch.randint(0, 2, (5, 40), generator=g) * 2 - 1
    s2 = torch.randint(0, 2, (5, 40), generator=g) * 2 - 1
    w = (s1 + 0.5 * s2).double()
    alpha, codes = fit_bcq(w, 2, rounds=5)
    assert torch.allclose(alpha, torch.tensor([1.0, 0.5], dtype=alpha.dtype).expand(5, 2))
    assert torch.allclose((alpha[:, None, :] * codes).sum(-1), w.to(alpha.dtype))


def test_nearest_codes_are_optimal_by_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    alpha = torch.sort(torch.rand(4, 3, generator=g, dtype=torch.float64), descending=True).values
    w = torch.randn(4, 50, generator=g, dtype=torch.float64)
    codes = nearest_codes(w, alpha)
    got = (alpha[:, None, :] * codes).sum(-1)
    combos = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=torch.float64)
    values = alpha @ combos.T  # (4, 8)
    best = (w[..., None] - values[:, None, :]).abs().min(-1).values
    assert torch.allclose((w - got).abs(), best)


def test_refinement_never_increases_the_error() -> None:
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    errs = []
    for rounds in (0, 1, 5, 20):
        a, c = fit_bcq(w, 3, rounds=rounds)
        errs.append(float((w - (a[:, None, :] * c).sum(-1)).norm()))
    assert all(b <= a + 1e-4 for a, b in itertools.pairwise(errs)) and errs[-1] < errs[0]


def test_apot_is_three_log_rounded_powers_of_two() -> None:
    # 0.3 → 2^-2 (log2 0.3 = −1.74), residual 0.05 → 2^-4, residual −0.0125 → −2^-6
    got = apot(torch.tensor([0.3, 0.75, 1.0, -6.0], dtype=torch.float64))
    assert got.tolist() == [0.25 + 0.0625 - 0.015625, 0.75, 1.0, -6.0]


def test_allocate_bits_under_budget() -> None:
    plan = allocate_bits({"a": 1.0, "b": 3.0, "c": 2.0}, {"a": 10, "b": 10, "c": 10}, [2, 3], 2.34)
    assert plan == {"a": 2, "b": 3, "c": 2}
    # every layer is raised to 3 bits before the most sensitive one gets 4
    plan = allocate_bits({"a": 1.0, "b": 3.0, "c": 2.0}, {"a": 10, "b": 10, "c": 10}, [2, 3, 4], 3.34)
    assert plan == {"a": 3, "b": 4, "c": 3}


def test_identity_hessian_equals_the_weight_objective() -> None:
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))
    a0, c0 = quantize_weight(w, 3, 16)
    a1, c1 = quantize_weight(w, 3, 16, hessian=torch.eye(32, dtype=torch.float64))
    assert torch.allclose(a0, a1) and torch.equal(c0, c1)


def test_output_objective_lowers_the_output_error() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    h = (x.T @ x / x.shape[0]).double()
    for bits in (2, 3):
        wq = dequantize(*quantize_weight(w, bits, 32), 32)
        wh = dequantize(*quantize_weight(w, bits, 32, hessian=h), 32)
        assert (x @ (w - wh).T).norm() < 0.9 * (x @ (w - wq).T).norm()


@pytest.mark.parametrize(("fin", "fout", "group"), [(64, 24, 16), (40, 8, -1), (13, 5, -1)])
def test_lookup_matmul_equals_the_dense_matmul(fin: int, fout: int, group: int) -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(fout, fin, generator=g)
    gs = fin if group == -1 else group
    alpha, codes = quantize_weight(w, 3, gs)
    packed = pack_codes(codes)
    assert torch.equal(unpack_codes(packed, fin), codes.float())
    x = torch.randn(2, 7, fin, generator=g)
    y = lut_matmul(x, packed, alpha.permute(2, 0, 1).contiguous(), gs, fin)
    ref = x @ dequantize(alpha, codes, gs).T
    assert y.shape == (2, 7, fout)
    assert torch.allclose(y, ref, atol=1e-5 * float(ref.abs().max()))


def test_quantize_tiny_llama() -> None:
    model, x = make("tiny_llama")
    for calib in (None, [x, x[:1]]):
        q = sk.quantize_(copy.deepcopy(model), method="bcq", bits=3, group_size=16, calib=calib)
        layers = [m for m in q.modules() if isinstance(m, BCQLinear)]
        assert len(layers) == 15 and not any(type(m) is torch.nn.Linear for m in q.modules())
        y_lut = q(x)
        for m in layers:
            m.use_lut = False
        y_dense = q(x)
        assert torch.allclose(y_lut, y_dense, atol=1e-5)
        with torch.no_grad():
            assert float((y_dense - model(x)).norm() / model(x).norm()) < 0.5
    auto = sk.quantize_(
        copy.deepcopy(model), method="bcq", bits="auto", budget=2.5, choices=(2, 3), calib=[x]
    )
    layers = [m for m in auto.modules() if isinstance(m, BCQLinear)]
    n = sum(m.in_features * m.out_features for m in layers)
    assert sum(m.bits * m.in_features * m.out_features for m in layers) / n <= 2.5
    assert {m.bits for m in layers} == {2, 3}


def test_bcq_compressor(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(6)
    tv = _delta(w=torch.randn(32, 64, generator=g), b=torch.randn(32, generator=g))
    small = sk.compress(tv, method="bcq", bits=2, group_size=32)
    back = sk.decompress(small)
    assert torch.equal(back["b"], tv["b"])  # 1-D tensors are carried as they are
    alpha, codes = quantize_weight(tv["w"], 2, 32)
    expect = dequantize(alpha.half().float(), codes, 32)  # scales stored as float16
    assert torch.allclose(back["w"], expect, atol=1e-6)
    assert small.nbytes < tv.nbytes / 4
    x = torch.randn(100, 64, generator=g)
    calibrated = sk.decompress(sk.compress(tv, method="bcq", bits=2, group_size=32, calib={"w": x}))
    assert (x @ (calibrated["w"] - tv["w"]).T).norm() < (x @ (back["w"] - tv["w"]).T).norm()
    auto = sk.compress(tv, method="bcq", bits="auto", budget=3, choices=(2, 3, 4))
    assert auto.encoding is not None and auto.encoding["average_bits"] <= 3
    path = tmp_path / "tv.safetensors"
    sk.save(tv, path)
    out = tmp_path / "tv.bcq.safetensors"
    assert (
        main(["compress", str(path), str(out), "--method", "bcq", "--bits", "2", "--group-size", "32"]) == 0
    )
    assert sk.decompress(sk.load(out)).allclose(back, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"group_size": 12}, "multiple of 8"),
        ({"group_size": 48}, "does not divide"),
        ({"bits": "auto"}, "budget"),
        ({"calib": {"w": torch.randn(4, 7)}}, "width 64"),
        ({"calib": {"nope": torch.randn(4, 64)}}, "does not quantise"),
    ],
)
def test_bad_parameters(params: dict, match: str) -> None:
    tv = _delta(w=torch.randn(32, 64))
    with pytest.raises(ShiftkitError, match=match):
        sk.compress(tv, method="bcq", **params)


def test_quantize_errors() -> None:
    model, _ = make("tiny_llama")
    with pytest.raises(UnknownMethodError, match="bcq"):
        sk.quantize_(model, method="gptq")
    with pytest.raises(ShiftkitError, match="calib is empty"):
        sk.quantize_(copy.deepcopy(model), method="bcq", calib=[])
    with pytest.raises(ShiftkitError, match="does not divide"):
        sk.quantize_(copy.deepcopy(model), method="bcq", group_size=24)
    with pytest.raises(ShiftkitError, match="calibration batch 0"):
        sk.quantize_(
            copy.deepcopy(model), method="bcq", calib=[torch.randn(2, 5, 7)]
        )  # floats, not token ids


def test_corrupt_bcq_payload() -> None:
    small = sk.compress(_delta(w=torch.randn(16, 32)), method="bcq", bits=2, group_size=16)
    codes = small["bcq.0.codes"][:, :8]  # rows cut off
    bad = Shift(small.method, None, {**small.tensors, "bcq.0.codes": codes}, small.base, small.encoding)
    with pytest.raises(CorruptFileError):
        sk.decompress(bad)
    enc = {**(small.encoding or {}), "quantized": {}}
    with pytest.raises(CorruptFileError):
        sk.decompress(Shift(small.method, None, small.tensors, small.base, enc))
