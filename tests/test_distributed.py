"""Shifts trained on 2 CPU processes (gloo) equal single-process training: a DDP loop written out, and
``shiftkit learn`` launched by ``torchrun`` with DDP and with FSDP2 (the base sharded over the ranks).

DESIGN.md §6: shift modules are plain parameters, so PyTorch's own DDP trains them. Each rank sees half of
the global batch; DDP averages the gradients, which for equal shards is the gradient of the mean loss over
the whole batch. So the shift saved by rank 0 must equal the one trained in one process on the full batch.

The ranks are this file run as a script (``python test_distributed.py RANK WORLD PORT OUTDIR``), talking
over loopback only.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import shiftkit as sk

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 4
OPTIMIZERS = ("sgd", "adamw")


def build() -> nn.Module:
    """A seeded 2-layer MLP with a LayerNorm, LoRA r=2 on both linears (same init in every process)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
    sk.attach_(model, sk.LoRAConfig(r=2, lora_alpha=4.0, target_modules=["0", "3"]))
    return model


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``x (8, 6)``, ``y (8, 3)``: the same global batch in every process."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def train(
    model: nn.Module, params: list[nn.Parameter], opt_name: str, x: torch.Tensor, y: torch.Tensor
) -> None:
    """``STEPS`` steps of mean-squared error on ``x (n, 6)``, ``y (n, 3)``."""
    opt = make_optimizer(opt_name, params)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()


def _worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    # a short timeout: a rank whose peer died fails in a minute instead of gloo's default half hour
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        x, y = global_batch()
        shard = GLOBAL_BATCH // world
        xs, ys = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        for opt_name in OPTIMIZERS:
            model = build()
            # the frozen base (requires_grad=False) is left out of DDP's gradient buckets by DDP itself
            ddp = DDP(model)
            train(ddp, sk.shift_parameters(model), opt_name, xs, ys)
            # every rank saves, so the test can also check that the replicas stayed identical
            sk.save(sk.extract(ddp.module), out_dir / f"{opt_name}_rank{rank}.safetensors")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ddp(out_dir: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo on loopback whatever interfaces the machine has
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(WORLD), str(port), str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail("DDP ranks did not finish in 120 s:\n" + "\n".join(logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log}"


@pytest.mark.slow  # about 15 s: three processes each import torch and torch._dynamo (DDP, optimisers)
def test_ddp_gloo_two_processes_equals_single_process(tmp_path: Path) -> None:
    _run_ddp(tmp_path)
    x, y = global_batch()
    init = sk.extract(build())
    for opt_name in OPTIMIZERS:
        ranks = [sk.load(tmp_path / f"{opt_name}_rank{r}.safetensors") for r in range(WORLD)]

        ref_model = build()
        train(ref_model, sk.shift_parameters(ref_model), opt_name, x, y)
        ref = sk.extract(ref_model)

        # a control: one rank training alone on its half must differ, so the comparison has teeth
        half_model = build()
        half = GLOBAL_BATCH // WORLD
        train(half_model, sk.shift_parameters(half_model), opt_name, x[:half], y[:half])
        alone = sk.extract(half_model)

        assert ranks[0].method == "lora" and ranks[0].config == ref.config
        assert ranks[0].base == ref.base
        assert set(ranks[0].tensors) == {"0.lora_A", "0.lora_B", "3.lora_A", "3.lora_B"}
        for key, want in ref.tensors.items():
            for r in range(WORLD):
                torch.testing.assert_close(ranks[r][key], want, atol=1e-6, rtol=0, msg=f"{opt_name} {key}")
            # training moved the shift (B starts at zero), and the averaged gradient mattered
            assert not torch.equal(want, init[key]), f"{opt_name} {key} did not train"
        assert any(not torch.allclose(alone[k], ref[k], atol=1e-4) for k in ref.tensors), (
            f"{opt_name}: half-batch training equals full-batch training; the check proves nothing"
        )


# --- shiftkit learn under torchrun: DDP and FSDP2 ------------------------------------------------------
def tiny_text_classifier() -> tuple[nn.Module, object]:
    """A 2-layer BERT classifier (hidden 16, no dropout) on MiniLM's tokenizer: a ``learn`` model factory.

    Dropout off: each rank would otherwise draw its own masks and the comparison with one process could not
    be exact.
    """
    from transformers import BertConfig, BertModel

    from shiftkit import zoo
    from shiftkit.recipes.models import TextClassifier

    _, tok = zoo.load_model("minilm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        config = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        )
        encoder = BertModel(config, add_pooling_layer=False)
    return TextClassifier(encoder, 2, seed=1).eval(), tok


def _learn_config(path: Path, parallel: str) -> Path:
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "model": "test_distributed:tiny_text_classifier",
                "data": {"name": "vader", "domain": "tweets", "n_train": 48, "n_test": 16},
                "method": {"name": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
                "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8, "max_length": 24, "parallel": parallel},
            }
        )
    )
    return path


@pytest.mark.assets
@pytest.mark.slow  # two torchrun ranks start, import torch and train a tiny model: ~15 s
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_learn_under_torchrun_equals_one_process(parallel: str, tmp_path: Path) -> None:
    from conftest import need_asset
    from shiftkit.cli import main

    need_asset("minilm")
    need_asset("vader")
    cfg = _learn_config(tmp_path / "cfg.yaml", parallel)
    tests_dir = str(Path(__file__).parent)
    sys.path.insert(0, tests_dir)
    try:
        assert main(["learn", str(cfg), "--output", str(tmp_path / "one"), "--no-progress"]) == 0
    finally:
        sys.path.remove(tests_dir)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
    )
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(WORLD),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "shiftkit",
        "learn",
        str(cfg),
        "--output",
        str(tmp_path / "two"),
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = (
        sk.load(tmp_path / "one" / "shift.safetensors"),
        sk.load(tmp_path / "two" / "shift.safetensors"),
    )
    assert one.config == two.config and set(one.tensors) == set(two.tensors)
    for k, want in one.tensors.items():
        torch.testing.assert_close(two.tensors[k], want, atol=2e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.allclose(t, torch.zeros_like(t)) for k, t in one.tensors.items() if "lora_B" in k)
    import json

    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == WORLD and metrics["parallel"] == parallel
    one_m = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert abs(metrics["final_loss"] - one_m["final_loss"]) < 1e-4  # the logged loss is the global one


if __name__ == "__main__":  # a DDP rank, started by _run_ddp
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
