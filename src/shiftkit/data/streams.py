"""Test streams for online test-time adaptation, independent of any method.

The settings and the online protocol are those of the mariodoebler/test-time-adaptation benchmark.

A :class:`Stream` is an immutable, re-iterable description of the order in which test samples reach a
method, cut into :class:`StreamBatch` es that carry a ``reset`` flag (the protocol restores the adaptation
state before that batch). Domains are given as tensors ``name -> (x, y)``; dict order is stream order.

* ``episodic``: domains in order, reset at the first batch of every domain (mariodoebler's
  ``reset_each_shift``; it needs domain labels, so it is an oracle setting). The TENT code's *episodic*
  (reset before every batch) is a method option (``episodic=True`` of the adapt methods), not a stream.
* ``continual``: domains in order, reset only before the very first batch.
* ``gradual``: per domain, its severities ``1, 2, 3, 4, 5, 4, 3, 2, 1`` (CoTTA), samples labelled
  ``"name@severity"``; reset only first.
* ``mixed``: all domains concatenated and shuffled together; reset only first.
* ``correlated``: label-correlated order per domain. ``δ = 0``: each domain sorted by label. ``δ > 0``:
  NOTE's Dirichlet ordering with ``K`` = number of classes of the domain: for every class ``c`` (indices
  shuffled) draw ``p_c ~ Dir(δ·1_K)``, set ``p_{c,k} = 0`` for every chunk ``k`` already holding
  ``≥ N/K`` samples, renormalise and split the class at ``floor(cumsum(p_c)·n_c)``; redraw everything
  until every chunk holds ``≥ min(10, N // K)`` samples; emit the chunks in order, the classes of a chunk
  in random order, each class contiguous. Small δ → few labels per batch; large δ → every chunk holds
  every class in proportion (classes stay contiguous inside a chunk, so batches are not fully i.i.d.).

Batches never cross a domain boundary except in ``mixed`` (the last batch of a domain may be smaller, as
in the anchors). Randomness comes from ``numpy`` generators seeded from ``seed`` (never the global RNG),
so equal arguments give equal batches and iterating twice gives the same batches. A batch is gathered
from the source tensors by index when it is produced; the data is never copied as a whole.

References: Wang et al., "Tent", ICLR 2021, https://arxiv.org/abs/2006.10726 (protocol);
Wang et al., "CoTTA", CVPR 2022, https://arxiv.org/abs/2203.13591 (gradual);
Gong et al., "NOTE: Robust Continual Test-time Adaptation Against Temporal Correlation", NeurIPS 2022,
https://arxiv.org/abs/2208.05117 (Dirichlet ordering).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError

__all__ = [
    "STREAM_KINDS",
    "Domains",
    "Stream",
    "StreamBatch",
    "continual",
    "correlated",
    "episodic",
    "gradual",
    "make_stream",
    "mixed",
]

Domains = Mapping[str, tuple[Tensor, Tensor]]
STREAM_KINDS = ("episodic", "continual", "gradual", "mixed", "correlated")
# NOTE retries for up to 120 s; a fixed number of draws keeps the failure deterministic and fast. With
# the chunk cap a feasible split is usually found in the first few draws.
_MAX_DIRICHLET_DRAWS = 1000
# NOTE's minimum chunk size, lowered to N // K for domains too small to give every chunk 10 samples.
_MIN_CHUNK = 10


@dataclass(frozen=True)
class StreamBatch:
    """One batch of a test stream.

    Attributes:
        x: ``(B, ...)`` inputs.
        y: ``(B,)`` int64 labels, for scoring only (never given to the method).
        domains: per-sample domain name, length ``B``.
        reset: the protocol resets the adaptation state before this batch.

    Example:
        >>> b = StreamBatch(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), ("a", "a"), True)
        >>> b.reset
        True
    """

    x: Tensor
    y: Tensor
    domains: tuple[str, ...]
    reset: bool


@dataclass(frozen=True)
class _Source:
    name: str
    x: Tensor
    y: Tensor


@dataclass(frozen=True, eq=False, repr=False)
class Stream:
    """An immutable, re-iterable test stream; iterating yields :class:`StreamBatch` es.

    Build one with :func:`episodic`, :func:`continual`, :func:`gradual`, :func:`mixed`,
    :func:`correlated` or :func:`make_stream`, not directly.

    Attributes:
        kind: one of :data:`STREAM_KINDS`.
        batch_size: the largest batch size.
        seed: the seed every random order was drawn from.

    Example:
        >>> s = continual({"a": (torch.randn(5, 2), torch.arange(5))}, 2)
        >>> [len(b.y) for b in s], len(s)
        ([2, 2, 1], 3)
    """

    kind: str
    batch_size: int
    seed: int
    _sources: tuple[_Source, ...]
    _src: Tensor  # (N,) source index of every stream position
    _local: Tensor  # (N,) row inside that source
    _batches: tuple[tuple[int, int, bool], ...]  # (start, end, reset) per batch
    _options: tuple[tuple[str, Any], ...]  # kind-specific fields of describe()

    def __iter__(self) -> Iterator[StreamBatch]:
        for start, end, reset in self._batches:
            src, local = self._src[start:end], self._local[start:end]
            first = int(src[0])
            if bool((src == first).all()):
                source = self._sources[first]
                x, y = source.x[local], source.y[local]
            else:  # a mixed batch: gather every source's rows into their stream positions
                ref = self._sources[first].x
                x = torch.empty((end - start, *ref.shape[1:]), dtype=ref.dtype, device=ref.device)
                y = torch.empty(end - start, dtype=torch.int64, device=self._sources[first].y.device)
                for i in torch.unique(src).tolist():
                    mask = src == i
                    x[mask] = self._sources[i].x[local[mask]]
                    y[mask] = self._sources[i].y[local[mask]].to(y.device, torch.int64)
            names = tuple(self._sources[i].name for i in src.tolist())
            yield StreamBatch(x=x, y=y.to(torch.int64), domains=names, reset=reset)

    def __len__(self) -> int:
        return len(self._batches)

    def __repr__(self) -> str:
        return (
            f"Stream(kind={self.kind!r}, domains={len(self.domain_names)}, n_samples={len(self._src)}, "
            f"batch_size={self.batch_size}, n_batches={len(self)}, seed={self.seed})"
        )

    @property
    def domain_names(self) -> tuple[str, ...]:
        """Domain names in the order they first appear in the stream."""
        seen = dict.fromkeys(self._sources[i].name for i in torch.unique_consecutive(self._src).tolist())
        return tuple(seen)

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the setting, for result files (every result record carries its setting).

        Returns:
            ``kind``, ``reset_policy`` (``"reset_each_shift"`` or ``"continual"``), ``batch_size``,
            ``seed``, ``shuffle``, ``delta``, ``severities`` (``None`` where the kind has no such option),
            ``samples_per_domain`` (stream positions per domain name, first-appearance order),
            ``n_samples`` and ``n_batches``.

        Example:
            >>> s = episodic({"a": (torch.randn(4, 2), torch.arange(4))}, 2)
            >>> s.describe()["reset_policy"]
            'reset_each_shift'
        """
        counts = torch.bincount(self._src, minlength=len(self._sources)).tolist()
        per_domain = dict.fromkeys(self.domain_names, 0)
        for source, count in zip(self._sources, counts):
            per_domain[source.name] += count
        record: dict[str, Any] = {"kind": self.kind, "reset_policy": "continual", "shuffle": None}
        record.update({"delta": None, "severities": None})
        record.update(dict(self._options))
        record.update(
            {
                "batch_size": self.batch_size,
                "seed": self.seed,
                "samples_per_domain": per_domain,
                "n_samples": len(self._src),
                "n_batches": len(self),
            }
        )
        return record


def episodic(domains: Domains, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Stream:
    """Domains in order with a reset before the first batch of every domain (``reset_each_shift``).

    Args:
        domains: ``name -> (x (N, ...), y (N,) integer labels)``, in stream order.
        batch_size: samples per batch; a domain's last batch may be smaller.
        shuffle: shuffle each domain's samples (seeded) instead of keeping their order.
        seed: seed of the shuffles.

    Returns:
        The stream; ``describe()["reset_policy"] == "reset_each_shift"``.

    Example:
        >>> d = {"a": (torch.randn(3, 2), torch.arange(3)), "b": (torch.randn(2, 2), torch.arange(2))}
        >>> s = episodic(d, 2)
        >>> [b.reset for b in s]
        [True, False, True]
    """
    return _ordered("episodic", domains, batch_size, shuffle, seed, reset_each=True)


def continual(domains: Domains, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Stream:
    """Domains in order with a reset only before the very first batch.

    Args:
        domains: ``name -> (x (N, ...), y (N,) integer labels)``, in stream order.
        batch_size: samples per batch; a domain's last batch may be smaller.
        shuffle: shuffle each domain's samples (seeded) instead of keeping their order.
        seed: seed of the shuffles.

    Returns:
        The stream.

    Example:
        >>> d = {"a": (torch.randn(3, 2), torch.arange(3)), "b": (torch.randn(2, 2), torch.arange(2))}
        >>> s = continual(d, 2)
        >>> [b.reset for b in s]
        [True, False, False]
    """
    return _ordered("continual", domains, batch_size, shuffle, seed, reset_each=False)


def gradual(
    domains: Mapping[str, Mapping[int, tuple[Tensor, Tensor]]],
    batch_size: int,
    *,
    severities: Sequence[int] = (1, 2, 3, 4, 5, 4, 3, 2, 1),
    shuffle: bool = False,
    seed: int = 0,
) -> Stream:
    """For each domain, its data at every severity of ``severities`` in turn; reset only first.

    The default ``1, 2, 3, 4, 5, 4, 3, 2, 1`` is CoTTA's gradual setting; a severity listed twice replays
    that data (reshuffled when ``shuffle``).

    Args:
        domains: ``name -> {severity -> (x (N, ...), y (N,) integer labels)}``, in stream order.
        batch_size: samples per batch; batches never cross a severity change.
        severities: the severity sequence run for every domain.
        shuffle: shuffle each severity block (seeded).
        seed: seed of the shuffles.

    Returns:
        The stream; sample domain names are ``f"{name}@{severity}"``.

    Example:
        >>> d = {"fog": {s: (torch.randn(2, 3), torch.arange(2)) for s in range(1, 6)}}
        >>> gradual(d, 2).domain_names[:3]
        ('fog@1', 'fog@2', 'fog@3')
    """
    _check_common(domains, batch_size, seed)
    sev = _check_severities(severities)
    sources: dict[str, _Source] = {}
    for name, levels in domains.items():
        if not isinstance(levels, Mapping):
            raise ShiftkitError(f"gradual stream: domain {name!r} must map severity -> (x, y)")
        for s in sev:
            if s not in levels:
                raise ShiftkitError(
                    f"gradual stream: domain {name!r} has no severity {s} (has {sorted(levels)})"
                )
            label = f"{name}@{s}"
            if label not in sources:
                sources[label] = _source(label, levels[s])
    labels = list(sources)
    blocks = []
    for i, (name, s) in enumerate((n, s) for n in domains for s in sev):
        j = labels.index(f"{name}@{s}")
        blocks.append((j, _order(len(sources[labels[j]].y), shuffle, seed, i)))
    options = {"shuffle": bool(shuffle), "severities": list(sev)}
    return _build("gradual", batch_size, seed, list(sources.values()), blocks, False, options)


def mixed(domains: Domains, batch_size: int, *, seed: int = 0) -> Stream:
    """All domains concatenated and shuffled together (``mixed_domains``); reset only first.

    Batches hold ``batch_size`` samples except the last; score per domain with ``StreamBatch.domains``.

    Args:
        domains: ``name -> (x (N, ...), y (N,) integer labels)``; every ``x`` has the same trailing shape,
            dtype and device.
        batch_size: samples per batch.
        seed: seed of the shuffle.

    Returns:
        The stream.

    Example:
        >>> d = {"a": (torch.zeros(3, 2), torch.arange(3)), "b": (torch.ones(3, 2), torch.arange(3))}
        >>> s = mixed(d, 4)
        >>> [len(b.y) for b in s]
        [4, 2]
    """
    sources = _sources_of(domains, batch_size, seed)
    ref = sources[0].x
    for s in sources[1:]:
        if s.x.shape[1:] != ref.shape[1:] or s.x.dtype != ref.dtype or s.x.device != ref.device:
            raise ShiftkitError(
                f"mixed stream: domain {s.name!r} has inputs {tuple(s.x.shape[1:])} {s.x.dtype} on "
                f"{s.x.device}, domain {sources[0].name!r} {tuple(ref.shape[1:])} {ref.dtype} on {ref.device}"
            )
    src = np.concatenate([np.full(len(s.y), i, dtype=np.int64) for i, s in enumerate(sources)])
    local = np.concatenate([np.arange(len(s.y), dtype=np.int64) for s in sources])
    perm = np.random.default_rng(seed).permutation(len(src))
    return _build_positions("mixed", batch_size, seed, sources, src[perm], local[perm], [len(src)], False, {})


def correlated(
    domains: Domains,
    batch_size: int,
    *,
    delta: float = 0.0,
    seed: int = 0,
    reset_each_domain: bool = True,
) -> Stream:
    """Label-correlated order within each domain (``δ = 0``: sorted by label; ``δ > 0``: NOTE's Dirichlet).

    With ``δ = 0`` the sort is stable: samples of a class keep their original order (the plain sort of
    the anchors; shuffle the input first for another order) and ``seed`` is unused. With ``δ > 0`` see
    the module docstring; after ``1000`` failed draws a :class:`ShiftkitError` is raised (NOTE: 120 s).

    Args:
        domains: ``name -> (x (N, ...), y (N,) integer labels)``, in stream order.
        batch_size: samples per batch; a domain's last batch may be smaller.
        delta: Dirichlet concentration ``δ ≥ 0``; smaller is more correlated (NOTE uses 0.1).
        seed: seed of the Dirichlet draws and shuffles.
        reset_each_domain: reset at every domain's first batch (``reset_each_shift``) instead of only
            before the first batch (``continual``).

    Returns:
        The stream.

    Example:
        >>> s = correlated({"a": (torch.randn(6, 2), torch.tensor([1, 0, 1, 0, 1, 0]))}, 3)
        >>> [b.y.tolist() for b in s]
        [[0, 0, 0], [1, 1, 1]]
    """
    sources = _sources_of(domains, batch_size, seed)
    if (
        isinstance(delta, bool)
        or not isinstance(delta, (int, float))
        or not math.isfinite(delta)
        or delta < 0
    ):
        raise ShiftkitError(f"correlated stream: delta must be a finite number >= 0, got {delta!r}")
    blocks = []
    for i, s in enumerate(sources):
        labels = s.y.detach().cpu().numpy()
        if delta == 0:
            order = np.argsort(labels, kind="stable")
        else:
            order = _dirichlet_order(labels, float(delta), np.random.default_rng([seed, i]), s.name)
        blocks.append((i, order))
    options = {
        "delta": float(delta),
        "reset_policy": "reset_each_shift" if reset_each_domain else "continual",
    }
    return _build("correlated", batch_size, seed, sources, blocks, bool(reset_each_domain), options)


def make_stream(kind: str, domains: Any, batch_size: int, **options: Any) -> Stream:
    """Build a stream of ``kind`` (one of :data:`STREAM_KINDS`) with that kind's keyword options.

    Args:
        kind: ``"episodic"``, ``"continual"``, ``"gradual"``, ``"mixed"`` or ``"correlated"``.
        domains: as the builder of ``kind`` takes them (``gradual``: ``name -> {severity -> (x, y)}``).
        batch_size: samples per batch.
        **options: keyword options of that builder (``shuffle``, ``seed``, ``delta``, ...).

    Returns:
        The stream.

    Example:
        >>> s = make_stream("continual", {"a": (torch.randn(4, 2), torch.arange(4))}, 2, seed=1)
        >>> s.kind, len(s)
        ('continual', 2)
    """
    if kind not in _BUILDERS:
        raise ShiftkitError(f"unknown stream kind {kind!r}; choose one of {', '.join(STREAM_KINDS)}")
    builder = _BUILDERS[kind]
    params = inspect.signature(builder).parameters.values()
    accepted = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ShiftkitError(
            f"stream kind {kind!r} does not accept option(s) {', '.join(unknown)}; "
            f"it accepts {', '.join(accepted)}"
        )
    return builder(domains, batch_size, **options)


_BUILDERS: dict[str, Callable[..., Stream]] = {
    "episodic": episodic,
    "continual": continual,
    "gradual": gradual,
    "mixed": mixed,
    "correlated": correlated,
}


def _ordered(
    kind: str, domains: Domains, batch_size: int, shuffle: bool, seed: int, reset_each: bool
) -> Stream:
    sources = _sources_of(domains, batch_size, seed)
    blocks = [(i, _order(len(s.y), shuffle, seed, i)) for i, s in enumerate(sources)]
    options: dict[str, Any] = {"shuffle": bool(shuffle)}
    if reset_each:
        options["reset_policy"] = "reset_each_shift"
    return _build(kind, batch_size, seed, sources, blocks, reset_each, options)


def _order(n: int, shuffle: bool, seed: int, block: int) -> np.ndarray:
    # one generator per block, so a block's order does not depend on the sizes of the blocks before it
    return np.random.default_rng([seed, block]).permutation(n) if shuffle else np.arange(n)


def _build(
    kind: str,
    batch_size: int,
    seed: int,
    sources: list[_Source],
    blocks: list[tuple[int, np.ndarray]],
    reset_each: bool,
    options: dict[str, Any],
) -> Stream:
    src = np.concatenate([np.full(len(order), i, dtype=np.int64) for i, order in blocks])
    local = np.concatenate([np.asarray(order, dtype=np.int64) for _, order in blocks])
    sizes = [len(order) for _, order in blocks]
    return _build_positions(kind, batch_size, seed, sources, src, local, sizes, reset_each, options)


def _build_positions(
    kind: str,
    batch_size: int,
    seed: int,
    sources: list[_Source],
    src: np.ndarray,
    local: np.ndarray,
    block_sizes: list[int],
    reset_each: bool,
    options: dict[str, Any],
) -> Stream:
    batches: list[tuple[int, int, bool]] = []
    start = 0
    for size in block_sizes:  # batches never cross a block (domain / severity) boundary
        for offset in range(0, size, batch_size):
            reset = not batches or (reset_each and offset == 0)
            batches.append((start + offset, start + min(offset + batch_size, size), reset))
        start += size
    return Stream(
        kind=kind,
        batch_size=batch_size,
        seed=seed,
        _sources=tuple(sources),
        _src=torch.from_numpy(src),
        _local=torch.from_numpy(local),
        _batches=tuple(batches),
        _options=tuple(options.items()),
    )


def _dirichlet_order(labels: np.ndarray, delta: float, rng: np.random.Generator, name: str) -> np.ndarray:
    classes = np.unique(labels)
    k, n = len(classes), len(labels)
    cap, min_size = n / k, min(_MIN_CHUNK, n // k)
    for _ in range(_MAX_DIRICHLET_DRAWS):
        chunks: list[list[np.ndarray]] = [[] for _ in range(k)]  # per chunk, one index run per class
        sizes = np.zeros(k, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = np.nan_to_num(rng.dirichlet(np.full(k, delta)))
            p = np.where(sizes < cap, p, 0.0)
            if p.sum() > 0:
                p = p / p.sum()
            else:  # all mass on full chunks: the δ → 0 limit, one open chunk chosen uniformly
                p = np.zeros(k)
                p[rng.choice(np.flatnonzero(sizes < cap))] = 1.0
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for j, part in enumerate(np.split(idx, cuts)):
                if len(part):
                    chunks[j].append(part)
                    sizes[j] += len(part)
        if sizes.min() >= min_size:
            runs = [chunk[r] for chunk in chunks for r in rng.permutation(len(chunk))]
            return np.concatenate(runs)
    raise ShiftkitError(
        f"correlated stream: domain {name!r} ({n} samples, {k} classes) found no split into {k} chunks of "
        f">= {min_size} samples in {_MAX_DIRICHLET_DRAWS} Dirichlet draws (delta={delta}); use a larger "
        "delta or more samples per class"
    )


def _check_common(domains: Any, batch_size: int, seed: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ShiftkitError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ShiftkitError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(domains, Mapping) or len(domains) == 0:
        raise ShiftkitError("domains must be a non-empty mapping name -> (x, y)")
    for name in domains:
        if not isinstance(name, str):
            raise ShiftkitError(f"domain names must be str, got {name!r}")


def _check_severities(severities: Sequence[int]) -> tuple[int, ...]:
    sev = tuple(severities)
    if not sev or any(isinstance(s, bool) or not isinstance(s, int) for s in sev):
        raise ShiftkitError(
            f"gradual stream: severities must be a non-empty sequence of ints, got {severities!r}"
        )
    return sev


def _sources_of(domains: Domains, batch_size: int, seed: int) -> list[_Source]:
    _check_common(domains, batch_size, seed)
    return [_source(name, pair) for name, pair in domains.items()]


def _source(name: str, pair: Any) -> _Source:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ShiftkitError(f"domain {name!r} must be a pair (x, y) of tensors")
    x, y = pair
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() == 0:
        raise ShiftkitError(f"domain {name!r}: x must be a (N, ...) tensor and y a (N,) tensor")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ShiftkitError(f"domain {name!r}: y must be 1-D integer labels, got {tuple(y.shape)} {y.dtype}")
    if len(x) != len(y):
        raise ShiftkitError(f"domain {name!r}: x has {len(x)} samples but y has {len(y)}")
    if len(y) == 0:
        raise ShiftkitError(f"domain {name!r} has no samples")
    return _Source(name, x, y)
