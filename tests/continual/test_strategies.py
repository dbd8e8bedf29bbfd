"""The continual strategies and the sequence runner on a tiny zero-shot text classifier: each strategy's
defining formula checked against a hand computation, the runner's matrix, metrics and resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from shiftkit import continual
from shiftkit.continual.base import TaskContext, kd_loss
from shiftkit.continual.fpf import sensitive_parameters
from shiftkit.errors import ShiftkitError, UnknownMethodError
from shiftkit.recipes.continual import ContinualTask, ZeroShotTextClassifier, run_sequence
from shiftkit.recipes.learn import TrainConfig

ZS = ZeroShotTextClassifier


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embeddings = nn.Embedding(40, 16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.norm(torch.tanh(self.proj(self.embeddings(input_ids))))


class CharTokenizer:
    """Characters → ids 1..39, padded: the call signature the classifier uses."""

    def __call__(self, texts: list[str], **_: Any) -> dict[str, Tensor]:
        ids = [[1 + ord(c) % 39 for c in t] for t in texts]
        width = max(map(len, ids))
        out = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            out[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return {"input_ids": out, "attention_mask": mask}


LABELS = [["aaaa", "bbbb"], ["cccc", "dddd"], ["eeee", "ffff"]]


#: the character a sentence of class c of task t repeats: its description's for tasks 0 and 1 (zero-shot
#: works), an unrelated one for task 2 (zero-shot is near chance; only training helps)
CHARS = [["a", "b"], ["c", "d"], ["x", "y"]]


def _batches(task: int, n: int = 32, seed: int = 0) -> list[dict[str, Tensor]]:
    """Class c of task t is a sentence repeating ``CHARS[t][c]`` plus noise characters."""
    g = torch.Generator().manual_seed(seed * 10 + task)
    tok = CharTokenizer()
    out = []
    for start in range(0, n, 8):
        labels = torch.arange(start, start + 8) % 2
        texts = []
        for y in labels.tolist():
            ch = CHARS[task][y]
            noise = "".join(chr(ord("k") + int(i)) for i in torch.randint(0, 10, (3,), generator=g))
            texts.append(ch * 3 + noise)
        out.append({**tok(texts), "labels": labels})
    return out


def _setup(n_tasks: int = 3) -> tuple[ZeroShotTextClassifier, list[ContinualTask]]:
    model = ZS(TinyEncoder(), CharTokenizer(), LABELS[:n_tasks], scale=10.0)
    tasks = [ContinualTask(f"t{i}", LABELS[i], _batches(i), _batches(i, 16, seed=1)) for i in range(n_tasks)]
    return model, tasks


TC = TrainConfig(epochs=1, lr=1e-2, warmup_ratio=0.0, grad_clip=0.0)


def _run(strategy: continual.Strategy, **kw: Any) -> tuple[Any, ZeroShotTextClassifier]:
    model, tasks = _setup()
    ref = [{k: v for k, v in b.items() if k != "labels"} for b in _batches(0, 16, seed=5)]
    res = run_sequence(
        model, tasks, strategy, TC, set_task=ZS.set_task_of, features=ZS.features_of, reference=ref,
        progress=False, **kw,
    )  # fmt: skip
    return res, model


def test_registry_and_make() -> None:
    assert continual.list_methods() == ["finetune", "fpf", "k_fpf", "lwf", "replay", "wise_ft", "zscl"]
    assert continual.get_method("zscl").uses == ("reference_data", "initial_model")
    with pytest.raises(ShiftkitError, match="unexpected keyword"):
        continual.make("lwf", strength=2)
    with pytest.raises(UnknownMethodError, match="zscl"):
        continual.make("zscI")
    with pytest.raises(ShiftkitError, match="avg_freq"):
        continual.make("zscl", avg_freq=0)


def test_runner_fills_the_matrix_and_learning_helps() -> None:
    res, _ = _run(continual.make("finetune"))
    assert len(res.accuracy) == 3 and all(len(r) == 3 for r in res.accuracy) and len(res.zero_shot) == 3
    assert res.accuracy[2][2] > res.zero_shot[2] + 0.2  # training helps where zero-shot cannot
    assert res.metrics == continual.mtil_metrics(res.accuracy, zero_shot=res.zero_shot)
    assert len(res.train_seconds) == 3


def test_runner_resumes_after_an_interruption(tmp_path: Path) -> None:
    calls = []

    def stop_at_task_2(model: nn.Module, index: int) -> None:
        calls.append(index)
        # set_task calls: zero-shot 0 1 2, then per task t: t and the evaluation 0 1 2; the 12th starts task 2
        if len(calls) == 12:
            raise KeyboardInterrupt
        ZS.set_task_of(model, index)

    model, tasks = _setup()
    with pytest.raises(KeyboardInterrupt):
        run_sequence(model, tasks, continual.make("finetune"), TC, set_task=stop_at_task_2,
                     checkpoint_dir=tmp_path, progress=False)  # fmt: skip
    assert calls[-1] == 2 and len(calls) == 12
    first, model_a = _run(continual.make("finetune"), checkpoint_dir=tmp_path / "whole")
    resumed, model_b = _run(continual.make("finetune"), checkpoint_dir=tmp_path)
    assert resumed.resumed_tasks == 2 and len(resumed.accuracy) == 3
    assert resumed.accuracy[:2] == first.accuracy[:2]  # the first two rows come from the checkpoint
    assert resumed.accuracy[2] == pytest.approx(first.accuracy[2])  # the same training continued
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    with pytest.raises(ShiftkitError, match="another run"):
        _run(continual.make("lwf"), checkpoint_dir=tmp_path)


def test_lwf_distils_towards_the_task_start_model() -> None:
    model, tasks = _setup()
    lwf = continual.make("lwf", weight=0.5, temperature=2.0)
    ctx = TaskContext(model=model, index=1, names=["a", "b", "c"], set_task=ZS.set_task_of)
    ZS.set_task_of(model, 1)
    lwf.begin_task(ctx)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    batch = {k: v for k, v in tasks[1].train[0].items() if k != "labels"}
    lwf.on_batch(batch)
    logits = model(**batch)
    expected = 0.5 * kd_loss(lwf.teacher(**batch), logits, 2.0)  # type: ignore[misc]
    got = lwf.extra_loss(logits)
    assert isinstance(got, Tensor) and float(got) == pytest.approx(float(expected)) and float(got) > 0
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.sub_(0.1)
    torch.testing.assert_close(lwf.teacher(**batch), teacher(**batch))  # type: ignore[misc]
    first = TaskContext(model=model, index=0, names=["a"], set_task=ZS.set_task_of)
    lwf.begin_task(first)
    assert lwf.extra_loss(logits) == 0.0


def test_zscl_weight_ensemble_is_the_mean_of_its_snapshots() -> None:
    model, tasks = _setup(1)
    snaps: list[dict[str, Tensor]] = []

    class Watch(continual.make("zscl", distill=0.0, l2=0.0, avg_freq=2).__class__):  # type: ignore[misc]
        def after_step(self) -> None:
            if self._steps % self.avg_freq == 0:
                snaps.append({n: p.detach().clone() for n, p in self.ctx.model.named_parameters()})
            super().after_step()

    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = Watch(distill=0.0, l2=0.0, avg_freq=2)
    ctx = TaskContext(
        model=model, index=0, names=["t0"], set_task=ZS.set_task_of, train_batches=tasks[0].train
    )
    strategy.begin_task(ctx)
    from shiftkit.recipes.learn import train

    train(
        model, list(model.parameters()), tasks[0].train, None, TC, progress=False, hooks=strategy
    )  # 4 steps
    last = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy.end_task(ctx)
    members = [start, *snaps, last]  # start, after steps 0 and 2, and the final weights (step 3)
    assert len(members) == 4
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, torch.stack([m[n] for m in members]).mean(0))


def test_zscl_distillation_matches_the_formula() -> None:
    model, _ = _setup(1)
    initial = continual.base.frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    ref = [{k: v for k, v in b.items() if k != "labels"} for b in _batches(0, 16, seed=3)]
    z = continual.make("zscl", l2=0.0, we=False, anchors=8, scale=20.0, temperature=2.0)
    ctx = TaskContext(model=model, index=0, names=["t0"], set_task=ZS.set_task_of, features=ZS.features_of,
                      reference=ref, initial=initial)  # fmt: skip
    z.begin_task(ctx)
    got = z.extra_loss(torch.zeros(1))
    anchors = ZS.features_of(initial, ref[0])[:8]
    t, s = ZS.features_of(initial, ref[0]), ZS.features_of(model, ref[0])
    r_, s_ = 20 * t @ anchors.T, 20 * s @ anchors.T
    assert float(got) == pytest.approx(float(kd_loss(r_, s_) + kd_loss(r_.T, s_.T)), rel=1e-5)
    with pytest.raises(ShiftkitError, match="reference data"):
        z.begin_task(TaskContext(model=model, index=0, names=["t0"], set_task=ZS.set_task_of))


def test_zscl_keeps_zero_shot_transfer_better_than_finetune() -> None:
    ft, _ = _run(continual.make("finetune"))
    zs, _ = _run(continual.make("zscl", avg_freq=2, distill=1.0, scale=10.0, anchors=16))
    assert zs.metrics["transfer"] >= ft.metrics["transfer"] - 1e-9


def test_wise_ft_interpolates_with_the_task_start() -> None:
    model, tasks = _setup(1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ft_model = copy.deepcopy(model)
    from shiftkit.recipes.learn import train

    train(ft_model, list(ft_model.parameters()), tasks[0].train, None, TC, progress=False)
    w = continual.make("wise_ft", alpha=0.25)
    ctx = TaskContext(model=model, index=0, names=["t0"], set_task=ZS.set_task_of)
    w.begin_task(ctx)
    train(model, list(model.parameters()), tasks[0].train, None, TC, progress=False, hooks=w)
    w.end_task(ctx)
    for (n, p), q in zip(model.named_parameters(), ft_model.parameters(), strict=True):
        torch.testing.assert_close(p, 0.75 * start[n] + 0.25 * q)
    with pytest.raises(ShiftkitError, match="alpha"):
        continual.make("wise_ft", alpha=1.5)


def test_replay_scores_old_examples_under_their_own_labels() -> None:
    model, tasks = _setup()
    r = continual.make("replay", memory=8, batch_size=6)
    ctx0 = TaskContext(
        model=model, index=0, names=["a", "b"], set_task=ZS.set_task_of, train_batches=tasks[0].train
    )
    r.begin_task(ctx0)
    assert r.extra_loss(torch.zeros(1)) == 0.0  # nothing remembered yet
    r.remember(ctx0)
    assert len(r.memory) == 8 and set(r.memory.items) == {0}
    ctx1 = TaskContext(
        model=model, index=1, names=["a", "b"], set_task=ZS.set_task_of, train_batches=tasks[1].train
    )
    ZS.set_task_of(model, 1)
    r.begin_task(ctx1)
    loss = r.extra_loss(torch.zeros(1))
    assert isinstance(loss, Tensor) and float(loss) > 0 and model.task == 1  # back on the current task
    gen_state = torch.Generator().manual_seed(0)
    (task, batch), = r.memory.sample(6, gen_state)  # fmt: skip
    ZS.set_task_of(model, task)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = torch.nn.functional.cross_entropy(model(**inputs), batch["labels"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_fpf_tunes_only_the_sensitive_modules() -> None:
    model, tasks = _setup(1)
    names = set(sensitive_parameters(model))
    assert names == {"encoder.norm.weight", "encoder.norm.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    f = continual.make("fpf", memory=16, steps=5, lr=1e-2)
    ctx = TaskContext(
        model=model, index=0, names=["t0"], set_task=ZS.set_task_of, train_batches=tasks[0].train
    )
    f.begin_task(ctx)
    f.end_task(ctx)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ShiftkitError, match="selected no parameter"):
        sensitive_parameters(model, ("nothing",))


def test_k_fpf_triggers_by_global_step() -> None:
    k = continual.make("k_fpf", every=3, steps=2, memory=8)
    res, _ = _run(k)
    assert k.global_step == 12 and k.rounds == 4  # 3 tasks × 4 steps, a round every 3 steps
    assert len(res.accuracy) == 3


def test_strategies_train_a_shift_alone() -> None:
    model, tasks = _setup()
    sk.attach_(model, sk.LoRAConfig(r=2, target_modules=["proj"]))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    res = run_sequence(model, tasks, continual.make("wise_ft"), TC, set_task=ZS.set_task_of, progress=False)
    assert len(res.accuracy) == 3
    for n, p in model.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base[n])
