"""Every registered method on CUDA in fp32, bf16 and fp16: attach, forward/backward, fold, save/load.

Marked ``gpu``; skipped where no CUDA device is present (CI has none: these run on a lent GPU machine).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import shiftkit as sk
from shiftkit.core.registry import get_method
from tiny_models import TINY_MODELS, make

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("model_name", sorted(TINY_MODELS))
@pytest.mark.parametrize("method", sk.list_methods())
def test_method_on_cuda(method: str, model_name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    spec = get_method(method)
    model, x = make(model_name)
    model = model.to("cuda", dtype)
    x = x.to("cuda", dtype) if x.is_floating_point() else x.to("cuda")
    base_out = model(x)
    try:
        sk.attach_(model, spec.config_cls(target_modules="all"))
    except sk.TargetNotFoundError as err:
        pytest.skip(f"{method} supports no module of {model_name}: {err}")
    params = sk.shift_parameters(model)
    assert params and all(p.device.type == "cuda" and p.dtype == dtype for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    out = model(x)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert not torch.equal(out, base_out)

    path = tmp_path / "s.safetensors"
    sk.save(sk.extract(model), path)
    fresh, _ = make(model_name)
    fresh = fresh.to("cuda", dtype)
    sk.attach_(fresh, sk.load(path))
    assert torch.equal(fresh(x), out)

    folded = copy.deepcopy(model)
    if spec.foldable:
        sk.fold_(folded)
        tol = TOL[dtype] * max(1.0, out.abs().max().item())
        assert (folded(x) - out).abs().max().item() <= tol
    else:
        with pytest.raises(sk.NotFoldableError):
            sk.fold_(folded)

    sk.detach_(model)
    assert torch.equal(model(x), base_out)
