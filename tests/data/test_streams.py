"""Tests of the test-time adaptation stream generators (spec §6.1, §6.17)."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from typing import Any

import pytest
import torch

from shiftkit.data.streams import (
    STREAM_KINDS,
    Stream,
    StreamBatch,
    continual,
    correlated,
    episodic,
    gradual,
    make_stream,
    mixed,
)
from shiftkit.errors import ShiftkitError

SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)


def _domain(
    ids: range, n_classes: int, *, dtype: torch.dtype = torch.int64
) -> tuple[torch.Tensor, torch.Tensor]:
    """x[i] = (id, id) identifies a sample; y cycles over the classes so the labels are interleaved."""
    idx = torch.tensor(list(ids), dtype=torch.float32)
    return torch.stack([idx, idx], dim=1), (torch.arange(len(ids)) % n_classes).to(dtype)


def _domains() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    # sizes 11, 7, 9 with batch 4 give partial last batches in every domain
    return {
        "fog": _domain(range(0, 11), 3),
        "snow": _domain(range(100, 107), 3),
        "blur": _domain(range(200, 209), 3),
    }


def _gradual_domains() -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    # id = 1000·domain + 100·severity + i: every (domain, severity, sample) is distinguishable
    return {
        name: {s: _domain(range(1000 * d + 100 * s, 1000 * d + 100 * s + 5), 2) for s in range(1, 6)}
        for d, name in enumerate(("fog", "snow"), start=1)
    }


def _build(kind: str, batch_size: int = 4, **options: Any) -> Stream:
    domains: Any = _gradual_domains() if kind == "gradual" else _domains()
    return make_stream(kind, domains, batch_size, **options)


def _ids(batch: StreamBatch) -> list[int]:
    return [int(v) for v in batch.x[:, 0]]


def _expected_ids(kind: str) -> list[int]:
    if kind == "gradual":
        return [
            int(v)
            for name in ("fog", "snow")
            for s in SEVERITIES
            for v in _gradual_domains()[name][s][0][:, 0]
        ]
    return [int(v) for x, _ in _domains().values() for v in x[:, 0]]


def _same(a: Stream, b: Stream) -> bool:
    pairs = list(zip(a, b, strict=True))
    return all(
        torch.equal(p.x, q.x) and torch.equal(p.y, q.y) and p.domains == q.domains and p.reset == q.reset
        for p, q in pairs
    )


KIND_OPTIONS = [
    ("episodic", {}),
    ("episodic", {"shuffle": True}),
    ("continual", {}),
    ("continual", {"shuffle": True}),
    ("gradual", {}),
    ("gradual", {"shuffle": True}),
    ("mixed", {}),
    ("correlated", {}),
    ("correlated", {"delta": 0.1}),
    ("correlated", {"delta": 0.1, "reset_each_domain": False}),
]


@pytest.mark.parametrize(("kind", "options"), KIND_OPTIONS)
def test_every_sample_exactly_once_with_its_label_and_domain(kind: str, options: dict[str, Any]) -> None:
    stream = _build(kind, **options)
    batches = list(stream)
    assert len(batches) == len(stream)
    seen = [i for b in batches for i in _ids(b)]
    assert Counter(seen) == Counter(_expected_ids(kind))
    for b in batches:
        assert b.y.dtype == torch.int64 and b.x.shape[0] == b.y.shape[0] == len(b.domains)
        for i, label, dom in zip(_ids(b), b.y.tolist(), b.domains):
            if kind == "gradual":  # id encodes domain, severity and position
                assert dom == f"{('fog', 'snow')[i // 1000 - 1]}@{i % 1000 // 100}" and label == i % 100 % 2
            else:
                name = ("fog", "snow", "blur")[i // 100]
                assert dom == name and label == (i % 100) % 3


@pytest.mark.parametrize(("kind", "options"), [k for k in KIND_OPTIONS if k[0] != "mixed"])
def test_batches_stay_inside_a_domain_and_only_the_last_is_short(kind: str, options: dict[str, Any]) -> None:
    stream = _build(kind, **options)
    assert all(len(set(b.domains)) == 1 for b in stream)
    sizes = {"fog": 11, "snow": 7, "blur": 9}
    for name, group in itertools.groupby(stream, key=lambda b: b.domains[0]):  # consecutive blocks differ
        n = 5 if kind == "gradual" else sizes[name]
        assert [len(b.y) for b in group] == [4] * (n // 4) + ([n % 4] if n % 4 else [])


def test_mixed_batches_are_full_size_except_the_last_and_mix_domains() -> None:
    stream = mixed(_domains(), 4, seed=3)
    lens = [len(b.y) for b in stream]
    assert lens == [4] * 6 + [3]  # 27 samples
    assert any(len(set(b.domains)) > 1 for b in stream)
    assert [b.reset for b in stream] == [True] + [False] * 6


@pytest.mark.parametrize(
    ("kind", "options", "policy"),
    [
        ("episodic", {}, "reset_each_shift"),
        ("continual", {}, "continual"),
        ("gradual", {}, "continual"),
        ("mixed", {}, "continual"),
        ("correlated", {}, "reset_each_shift"),
        ("correlated", {"reset_each_domain": False}, "continual"),
    ],
)
def test_reset_flags_follow_the_policy(kind: str, options: dict[str, Any], policy: str) -> None:
    stream = _build(kind, **options)
    batches = list(stream)
    first_of_domain = [i == 0 or b.domains[0] != batches[i - 1].domains[0] for i, b in enumerate(batches)]
    expected = first_of_domain if policy == "reset_each_shift" else [i == 0 for i in range(len(batches))]
    assert [b.reset for b in batches] == expected
    assert stream.describe()["reset_policy"] == policy


def test_gradual_runs_the_severity_sequence_per_domain() -> None:
    stream = gradual(_gradual_domains(), 5)  # one batch per severity block
    assert [b.domains[0] for b in stream] == [f"{n}@{s}" for n in ("fog", "snow") for s in SEVERITIES]
    assert stream.domain_names == tuple(f"{n}@{s}" for n in ("fog", "snow") for s in (1, 2, 3, 4, 5))
    record = stream.describe()
    assert record["severities"] == list(SEVERITIES) and record["samples_per_domain"]["fog@1"] == 10
    short = gradual(_gradual_domains(), 5, severities=(5, 1))
    assert [b.domains[0] for b in short] == ["fog@5", "fog@1", "snow@5", "snow@1"]


@pytest.mark.parametrize(("kind", "options"), KIND_OPTIONS)
def test_deterministic_and_reiterable(kind: str, options: dict[str, Any]) -> None:
    stream = _build(kind, seed=7, **options)
    assert _same(stream, stream)  # iterating twice
    assert _same(stream, _build(kind, seed=7, **options))  # rebuilding


@pytest.mark.parametrize(
    ("kind", "options"),
    [k for k in KIND_OPTIONS if k[1].get("shuffle") or k[0] == "mixed" or k[1].get("delta")],
)
def test_seed_changes_the_random_orders(kind: str, options: dict[str, Any]) -> None:
    assert not _same(_build(kind, seed=0, **options), _build(kind, seed=1, **options))


def test_unshuffled_streams_keep_the_input_order() -> None:
    assert [i for b in continual(_domains(), 4) for i in _ids(b)] == _expected_ids("continual")


def test_global_rng_is_untouched() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    list(_build("mixed", seed=5))
    list(_build("correlated", delta=0.5))
    assert torch.equal(state, torch.get_rng_state())


def test_correlated_delta_zero_sorts_each_domain_stably() -> None:
    stream = correlated(_domains(), 3)  # batch 3 <= every class size
    batches = list(stream)
    for name, (x, y) in _domains().items():
        got = [(lab, i) for b in batches if b.domains[0] == name for lab, i in zip(b.y.tolist(), _ids(b))]
        assert got == sorted(
            zip(y.tolist(), [int(v) for v in x[:, 0]])
        )  # sorted by label, then original order
    assert all(len(set(b.y.tolist())) <= 2 for b in batches)


def _label_skew(n_per_class: int = 60, n_classes: int = 10) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    y = torch.arange(n_per_class * n_classes) % n_classes
    return {"d": (torch.randn(len(y), 2, generator=torch.Generator().manual_seed(0)), y)}


def _mean_distinct(stream: Stream) -> float:
    batches = [b for b in stream if len(b.y) == stream.batch_size]
    return sum(len(set(b.y.tolist())) for b in batches) / len(batches)


def test_dirichlet_small_delta_is_far_more_correlated_than_iid() -> None:
    # batch = N/K = 60: an i.i.d. batch sees ~10·(1 − 0.9⁶⁰) ≈ 10 classes
    iid = _mean_distinct(continual(_label_skew(), 60, shuffle=True))
    small = _mean_distinct(correlated(_label_skew(), 60, delta=0.01))
    assert iid > 9.5
    assert small < 0.35 * iid


def test_dirichlet_large_delta_approaches_iid() -> None:
    # δ = 100: every chunk (~N/K samples) holds about N/K² of every class, so a chunk-sized batch sees
    # nearly all classes even though each class is contiguous inside its chunk
    iid = _mean_distinct(continual(_label_skew(), 60, shuffle=True))
    large = _mean_distinct(correlated(_label_skew(), 60, delta=100.0))
    medium = _mean_distinct(correlated(_label_skew(), 60, delta=1.0))
    assert large > 0.85 * iid
    assert _mean_distinct(correlated(_label_skew(), 60, delta=0.01)) < medium < large


def test_dirichlet_gives_up_deterministically() -> None:
    # K = 3 chunks must each get >= 10 samples, but the 98-sample class lands in one chunk at δ = 1e-4
    y = torch.tensor([0, 1] + [2] * 98)
    domains = {"skewed": (torch.zeros(100, 1), y)}
    for _ in range(2):
        with pytest.raises(ShiftkitError, match=r"'skewed'.*delta=0\.0001"):
            correlated(domains, 8, delta=1e-4)


@pytest.mark.parametrize(("kind", "options"), KIND_OPTIONS)
def test_describe_is_a_json_record(kind: str, options: dict[str, Any]) -> None:
    stream = _build(kind, seed=2, **options)
    record = json.loads(json.dumps(stream.describe()))
    assert record["kind"] == kind and record["batch_size"] == 4 and record["seed"] == 2
    assert record["n_batches"] == len(stream)
    assert record["n_samples"] == sum(record["samples_per_domain"].values()) == len(_expected_ids(kind))
    assert {"reset_policy", "delta", "severities", "shuffle"} <= set(record)
    assert list(record["samples_per_domain"]) == list(stream.domain_names)


def test_domain_names_in_first_appearance_order() -> None:
    assert episodic(_domains(), 4).domain_names == ("fog", "snow", "blur")
    assert set(mixed(_domains(), 4).domain_names) == {"fog", "snow", "blur"}


def test_labels_are_returned_as_int64() -> None:
    stream = continual({"a": _domain(range(5), 2, dtype=torch.int32)}, 2)
    assert all(b.y.dtype == torch.int64 for b in stream)
    mixed_stream = mixed({"a": _domain(range(3), 2, dtype=torch.int32), "b": _domain(range(10, 13), 2)}, 4)
    assert all(b.y.dtype == torch.int64 for b in mixed_stream)


def test_make_stream_dispatches_to_the_builder() -> None:
    assert _same(
        make_stream("correlated", _domains(), 4, delta=0.5, seed=3),
        correlated(_domains(), 4, delta=0.5, seed=3),
    )
    assert set(STREAM_KINDS) == {"episodic", "continual", "gradual", "mixed", "correlated"}


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_stream("shuffled", _domains(), 4), "episodic, continual, gradual, mixed, correlated"),
        (lambda: make_stream("mixed", _domains(), 4, shuffle=True), "shuffle"),
        (lambda: make_stream("episodic", _domains(), 4, delta=0.1), "delta"),
        (lambda: continual(_domains(), 0), "batch_size"),
        (lambda: continual(_domains(), 2.0), "batch_size"),  # type: ignore[arg-type]
        (lambda: continual(_domains(), True), "batch_size"),
        (lambda: continual(_domains(), 2, seed=-1), "seed"),
        (lambda: continual({}, 2), "non-empty"),
        (lambda: continual({"a": (torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))}, 2), "'a'.*3.*2"),
        (lambda: continual({"a": (torch.zeros(3, 2), torch.zeros(3))}, 2), "'a'.*integer"),
        (lambda: continual({"a": (torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.long))}, 2), "'a'.*1-D"),
        (
            lambda: continual({"a": (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))}, 2),
            "'a'.*no samples",
        ),
        (lambda: continual({"a": torch.zeros(3)}, 2), "'a'.*pair"),  # type: ignore[dict-item]
        (lambda: correlated(_domains(), 2, delta=-0.1), "delta"),
        (lambda: correlated(_domains(), 2, delta=float("nan")), "delta"),
        (lambda: gradual({"fog": {1: _domain(range(3), 2)}}, 2, severities=(1, 2)), "'fog'.*severity 2"),
        (lambda: gradual({"fog": {1: _domain(range(3), 2)}}, 2, severities=()), "severities"),
        (
            lambda: mixed(
                {"a": _domain(range(3), 2), "b": (torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))}, 2
            ),
            "'b'",
        ),
    ],
)
def test_invalid_arguments_raise(call: Any, match: str) -> None:
    with pytest.raises(ShiftkitError, match=match):
        call()
