"""The continual building blocks: MTIL metrics against hand-computed values, the schedules against the
spec's sanity values (combine-compress.md §9), the weight ensemble against a plain mean, the replay mixer's
row counts and padding, and their refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import shiftkit as sk
from shiftkit import continual
from shiftkit.errors import ShiftkitError


# --- metrics ------------------------------------------------------------------------------------------
def test_mtil_metrics_by_hand() -> None:
    a = [
        [0.90, 0.40, 0.30],
        [0.80, 0.85, 0.35],
        [0.70, 0.75, 0.95],
    ]
    m = continual.mtil_metrics(a, zero_shot=[0.5, 0.45, 0.3])
    assert m["transfer"] == pytest.approx((0.40 + (0.30 + 0.35) / 2) / 2)  # columns 1 and 2, rows above
    assert m["avg"] == pytest.approx(sum(map(sum, a)) / 9)
    assert m["last"] == pytest.approx((0.70 + 0.75 + 0.95) / 3)
    assert m["forgetting"] == pytest.approx(((0.90 - 0.70) + (0.85 - 0.75)) / 2)
    assert m["bwt"] == -m["forgetting"]
    assert m["zero_shot"] == pytest.approx((0.45 + 0.3) / 2)
    assert m["transfer_gain"] == pytest.approx(m["transfer"] - m["zero_shot"])
    one = continual.mtil_metrics([[0.7]])
    assert one == {"transfer": 0.0, "avg": 0.7, "last": 0.7, "forgetting": 0.0, "bwt": -0.0}


def test_mtil_anchor_reading() -> None:
    """A model that keeps its zero-shot accuracy on unseen tasks and its learned ones: no gain, no loss."""
    z = torch.tensor([0.6, 0.6, 0.6, 0.6])
    keep = torch.full((4, 4), 0.6)
    keep.fill_diagonal_(0.9)
    keep = torch.where(torch.arange(4)[:, None] > torch.arange(4)[None, :], torch.tensor(0.9), keep)
    m = continual.mtil_metrics(keep, zero_shot=z)
    assert m["transfer"] == pytest.approx(0.6) and m["transfer_gain"] == pytest.approx(0.0)
    assert m["last"] == pytest.approx(0.9) and m["forgetting"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("a", "match"),
    [([[0.1, 0.2]], "square"), ([], "square"), ([[float("nan")]], "NaN"), ([["x"]], "numbers")],
)
def test_mtil_bad_input(a: object, match: str) -> None:
    with pytest.raises(ShiftkitError, match=match):
        continual.mtil_metrics(a)  # type: ignore[arg-type]
    with pytest.raises(ShiftkitError, match="one accuracy per task"):
        continual.mtil_metrics([[0.5]], zero_shot=[0.1, 0.2])


# --- schedules ----------------------------------------------------------------------------------------
def _opt(lr: float = 3e-4) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = [sched.optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()
        out.append(sched.optimizer.param_groups[0]["lr"])
    return out


def test_rewarm_cosine_spec_values() -> None:
    """Spec §9.1: S = 10 000, T_w = 100, η_max = 3e-4, η_min = 3e-5."""
    sched = continual.RewarmCosine(_opt(), warmup_steps=100, total_steps=10_000, min_lr_ratio=0.1)
    f = sched.factor
    assert 3e-4 * f(50) == pytest.approx(1.5e-4)
    assert 3e-4 * f(100) == pytest.approx(3e-4)
    assert 3e-4 * f(5050) == pytest.approx(1.65e-4)
    assert 3e-4 * f(10_000) == pytest.approx(3e-5) and 3e-4 * f(12_000) == pytest.approx(3e-5)
    lrs = _lrs(sched, 150)
    assert lrs[0] == 0.0 and lrs[50] == pytest.approx(1.5e-4) and lrs[100] == pytest.approx(3e-4)
    assert lrs[150] < lrs[100]
    state = sched.state_dict()
    again = continual.RewarmCosine(_opt(), warmup_steps=100, total_steps=10_000, min_lr_ratio=0.1)
    again.load_state_dict(state)
    assert again.last_epoch == 150


def test_rewarm_matches_torch_for_the_cosine_part() -> None:
    """After the warm-up, the decay is CosineAnnealingLR's closed form from η_max to η_min."""
    s = continual.RewarmCosine(_opt(1.0), warmup_steps=10, total_steps=110, min_lr_ratio=0.2)
    for t in (10, 35, 60, 110):
        x = (t - 10) / 100
        assert s.factor(t) == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi * x)))


def test_infinite_lr_spec_values() -> None:
    """Spec §9.2: T_w = 100, T_cd = 1000, T_ann = 9000, T_end = 10 000, η_const = 1.65e-4 (ratio 0.55)."""
    sched = continual.InfiniteLR(
        _opt(),
        warmup_steps=100,
        cooldown_start=9000,
        cooldown_steps=1000,
        constant_ratio=0.55,
        min_lr_ratio=0.1,
    )
    lr = lambda t: 3e-4 * sched.factor(t)  # noqa: E731
    assert lr(550) == pytest.approx(2.325e-4)
    assert lr(5000) == pytest.approx(1.65e-4)
    assert lr(9500) == pytest.approx(7.036e-5, rel=1e-3)  # geometric mean of η_const and η_min
    assert lr(10_000) == pytest.approx(3e-5) and lr(20_000) == pytest.approx(3e-5)
    for t in (100, 1000, 9000):  # continuous at the phase boundaries: one step moves the LR very little
        assert abs(lr(t + 1) - lr(t)) < 4e-6 and abs(lr(t) - lr(t - 1)) < 4e-6
    open_ended = continual.InfiniteLR(_opt(), warmup_steps=100, cooldown_steps=1000)
    assert open_ended.factor(50_000) == pytest.approx(0.55)  # a plateau until an anneal is asked for
    open_ended.anneal_from(50_000)
    assert open_ended.factor(51_000) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda o: continual.RewarmCosine(o, warmup_steps=200, total_steps=100), "exceeds total_steps"),
        (lambda o: continual.RewarmCosine(o, warmup_steps=-1, total_steps=100), "warmup_steps"),
        (lambda o: continual.RewarmCosine(o, 1, 10, min_lr_ratio=1.5), "min_lr_ratio"),
        (lambda o: continual.InfiniteLR(o, 100, cooldown_start=500), "cooldown_start"),
        (lambda o: continual.InfiniteLR(o, 10, constant_ratio=0.05, min_lr_ratio=0.1), "exceeds constant"),
    ],
)
def test_schedule_refusals(make: object, match: str) -> None:
    with pytest.raises(ShiftkitError, match=match):
        make(_opt())  # type: ignore[operator]


# --- weight ensemble ----------------------------------------------------------------------------------
def test_weight_ensemble_is_the_plain_mean() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    we = continual.WeightEnsemble(model)
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * (i + 1))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        we.update(model)
    we.apply_(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, torch.stack([s[k] for s in states]).mean(0))
    assert we.count == 4


def test_weight_ensemble_on_a_shift_averages_the_shift_only() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sk.attach_(model, sk.LoRAConfig(r=2, target_modules=["0"], init_lora_weights=False))
    we = continual.WeightEnsemble(model)
    assert we.shift and all("lora" in n for n in we.names)
    start = {n: p.detach().clone() for n, p in sk.named_shift_parameters(model).items()}
    with torch.no_grad():
        for p in sk.shift_parameters(model):
            p.add_(1.0)
    we.update(model)
    we.apply_(model)
    for n, p in sk.named_shift_parameters(model).items():
        torch.testing.assert_close(p, start[n] + 0.5)
    sk.detach_(model)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    with pytest.raises(ShiftkitError, match="parameters changed"):
        we.update(model)


# --- replay -------------------------------------------------------------------------------------------
def test_replay_mixer_rows_order_and_padding() -> None:
    new = [
        {"input_ids": torch.full((8, 5), i), "attention_mask": torch.ones(8, 5, dtype=torch.long)}
        for i in range(3)
    ]
    old = [
        {"input_ids": torch.full((3, 7), 100 + i), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
        for i in range(2)
    ]
    mixed = list(continual.ReplayMixer(new, old, fraction=0.25))
    assert len(mixed) == 3 and len(continual.ReplayMixer(new, old, 0.25)) == 3
    first = mixed[0]
    assert first["input_ids"].shape == (8, 7)  # padded to the longer old sequences
    assert (first["input_ids"][:6, :5] == 0).all() and (first["attention_mask"][:6, 5:] == 0).all()
    assert first["input_ids"][6:, 0].tolist() == [100, 100]  # two old rows replace two new ones
    # old rows are taken in order and cycled: 2 + 2 + 2 rows from batches of 3
    sources = [int(b["input_ids"][r, 0]) for b in mixed for r in (6, 7)]
    assert sources == [100, 100, 100, 101, 101, 101]
    plain = list(continual.ReplayMixer([torch.zeros(4, 2)], [torch.ones(4, 2)], fraction=0.5))
    assert plain[0].sum() == 4.0
    none = list(continual.ReplayMixer(new, old, fraction=0.0))
    assert none[0] is new[0]


def test_replay_mixer_keeps_small_fractions_over_the_run() -> None:
    """5 % of batches of 8 rows: 0.4 rows per batch, given as whole rows carried over the batches."""
    new = [torch.zeros(8, 1)] * 40
    mixed = list(continual.ReplayMixer(new, [torch.ones(8, 1)], fraction=0.05))
    per_batch = [int(b.sum()) for b in mixed]
    assert sum(per_batch) == 16 and set(per_batch) == {0, 1}  # 0.05 · 320 rows
    assert all(b.shape == (8, 1) for b in mixed)


def test_replay_mixer_refusals() -> None:
    with pytest.raises(ShiftkitError, match="fraction"):
        continual.ReplayMixer([], [], fraction=1.0)
    with pytest.raises(ShiftkitError, match="yields no batch"):
        list(continual.ReplayMixer([torch.zeros(4, 2)], [], fraction=0.5))
    with pytest.raises(ShiftkitError, match="keys"):
        list(continual.ReplayMixer([{"a": torch.zeros(4)}], [{"b": torch.zeros(4)}], fraction=0.5))
