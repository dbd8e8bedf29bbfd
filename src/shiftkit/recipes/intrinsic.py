"""Measure a task's intrinsic dimension ``d_int90`` (Li et al., ICLR 2018, arXiv:1804.08838).

1. Train the full model from ``θ0`` (all ``D`` parameters) and record its best accuracy ``p_full``.
2. For each ``dim`` of a grid, train only ``d`` of a random-subspace shift ``θ = θ0 + P d``
   (:class:`~shiftkit.methods.subspace.SubspaceConfig`) from the same ``θ0``, data and budget.
3. ``d_int90`` is the smallest grid ``dim`` whose best accuracy is ``≥ 0.9 · p_full``; optionally
   interpolated linearly in ``dim`` between the two grid points that bracket the crossing.

Both trainings use the learn recipe's loop (:func:`shiftkit.recipes.learn.train`), so any model called as
``model(**batch_without_labels)`` returning logits works, e.g. an ``nn.Sequential`` on
:func:`~shiftkit.recipes.learn.tensor_batches`.

Example:
    >>> res = intrinsic_dimension(mlp, tensor_batches(x, y, 64), list(tensor_batches(xt, yt, 256)),
    ...                           dims=[10, 100, 1000], train_config=TrainConfig(epochs=20, lr=3e-2))
    >>> res.d_int90, res.d_int90_interpolated
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from shiftkit.core.attach import attach_, shift_parameters
from shiftkit.errors import ShiftkitError
from shiftkit.methods.subspace import SubspaceConfig
from shiftkit.recipes.learn import Batch, Batches, TrainConfig, TrainResult, accuracy, train

__all__ = ["DEFAULT_DIMS", "IntrinsicDimResult", "crossing", "intrinsic_dimension"]

#: roughly log-spaced (1-2-5 steps), the paper's style of grid; d_int90 of small tasks lies inside it
DEFAULT_DIMS = (10, 20, 50, 100, 200, 500, 1000)


@dataclass
class IntrinsicDimResult:
    """What :func:`intrinsic_dimension` measured.

    Attributes:
        dims: the grid, ascending.
        accuracy: best evaluation accuracy of the subspace model at each ``dims`` entry.
        p_full: best accuracy of full training.
        threshold: the fraction of ``p_full`` to reach (0.9 for ``d_int90``).
        d_int90: smallest grid ``dim`` reaching ``threshold · p_full``; ``None`` if none does.
        d_int90_interpolated: the crossing interpolated linearly between the bracketing grid points (the
            first grid point when it already passes); ``None`` if none passes.
        num_params: ``D``, the parameters of the model (all of them train in the full run).
        projection: the random projection used.
        seconds: training time of each subspace run.
        full_seconds: training time of the full run.

    Example:
        >>> res = intrinsic_dimension(net, loader, test_batches, dims=[10, 100])
        >>> res.to_dict()["target"] == 0.9 * res.p_full
        True
    """

    dims: list[int]
    accuracy: list[float]
    p_full: float
    threshold: float
    d_int90: int | None
    d_int90_interpolated: float | None
    num_params: int
    projection: str
    seconds: list[float] = field(default_factory=list)
    full_seconds: float = 0.0

    @property
    def target(self) -> float:
        """The accuracy to reach: ``threshold · p_full``."""
        return self.threshold * self.p_full

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (with ``target``)."""
        return {**asdict(self), "target": self.target}


def crossing(dims: Sequence[int], scores: Sequence[float], target: float) -> tuple[int | None, float | None]:
    """The smallest ``dim`` with ``score ≥ target``, and the crossing interpolated linearly in ``dim``.

    Args:
        dims: ascending grid.
        scores: the metric at each grid point.
        target: the level to reach.

    Returns:
        ``(grid dim, interpolated dim)``; ``(None, None)`` when no score reaches ``target``.

    Example:
        >>> crossing([10, 100, 1000], [0.5, 0.7, 0.95], target=0.8)
        (1000, 460.0)
    """
    for k, (dim, score) in enumerate(zip(dims, scores, strict=True)):
        if score >= target:
            if k == 0:
                return dim, float(dim)
            lo, s_lo = dims[k - 1], scores[k - 1]
            return dim, lo + (target - s_lo) * (dim - lo) / (score - s_lo)
    return None, None


def _best(result: TrainResult) -> float:
    values = [m["accuracy"] for _, m in result.evals if "accuracy" in m]
    if not values:
        raise ShiftkitError("intrinsic_dimension: the evaluation returned no 'accuracy'")
    return max(values)


def intrinsic_dimension(
    model: nn.Module | Callable[[], nn.Module],
    train_batches: Batches,
    eval_batches: Iterable[Batch],
    dims: Sequence[int] = DEFAULT_DIMS,
    *,
    train_config: TrainConfig | None = None,
    full_config: TrainConfig | None = None,
    projection: str = "fastfood",
    seed: int = 0,
    threshold: float = 0.9,
    target_modules: str | Sequence[str] | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> IntrinsicDimResult:
    """Train the full model, then a subspace shift for each ``dim``; return the accuracies and ``d_int90``.

    Args:
        model: ``θ0``: a module (deep-copied for every run, so all runs start from the same weights) or a
            factory that returns the same initial weights on every call. Called as ``model(**inputs)``
            with a batch's entries other than ``"labels"``; returns logits ``(batch, classes)``.
        train_batches: training batches with a ``"labels"`` entry ``(batch,)`` (a DataLoader).
        eval_batches: evaluation batches (a list, iterated once per evaluation).
        dims: the grid of subspace sizes (sorted and de-duplicated).
        train_config: settings of the subspace runs. Set ``eval_every`` to record the best accuracy
            during training, as the paper does; the default config evaluates at the end only.
        full_config: settings of the full run (default: ``train_config``).
        projection: ``"fastfood"``, ``"sparse"`` or ``"dense"``.
        seed: seed of the random projections (the same ``P`` family for every ``dim``).
        threshold: the fraction of ``p_full`` to reach.
        target_modules: which modules' parameters form ``θ`` (default: all).
        progress: tqdm bars, as in :func:`~shiftkit.recipes.learn.train`.
        log: called with one line of text after each run (e.g. ``print``).

    Returns:
        The grid, per-dim accuracy, ``p_full`` and ``d_int90``.

    Example:
        >>> res = intrinsic_dimension(net, loader, test_batches, dims=[10, 100, 1000])
        >>> print(res.d_int90, res.p_full)
    """
    grid = sorted(set(int(d) for d in dims))
    if not grid or grid[0] < 1:
        raise ShiftkitError(f"intrinsic_dimension: dims must be positive integers, got {list(dims)}")
    if not 0 < threshold <= 1:
        raise ShiftkitError(f"intrinsic_dimension: threshold must be in (0, 1], got {threshold}")
    cfg = train_config or TrainConfig()
    full_cfg = full_config or cfg
    say = log or (lambda _: None)
    batches = list(eval_batches)

    def fresh() -> nn.Module:
        return copy.deepcopy(model) if isinstance(model, nn.Module) else model()

    def evaluate(net: nn.Module) -> Callable[[], dict[str, float]]:
        return lambda: {"accuracy": accuracy(net, batches)}

    net = fresh()
    num_params = sum(p.numel() for p in net.parameters())
    for p in net.parameters():
        p.requires_grad_(True)
    full = train(net, list(net.parameters()), train_batches, evaluate(net), full_cfg, progress=progress)
    p_full = _best(full)
    say(f"full: {num_params:,} parameters, accuracy {p_full:.4f} ({full.seconds:.1f} s)")

    scores, seconds = [], []
    for dim in grid:
        net = fresh()
        attach_(net, SubspaceConfig(dim=dim, projection=projection, seed=seed, target_modules=target_modules))
        run = train(net, shift_parameters(net), train_batches, evaluate(net), cfg, progress=progress)
        scores.append(_best(run))
        seconds.append(run.seconds)
        say(f"dim {dim}: accuracy {scores[-1]:.4f} ({run.seconds:.1f} s)")
    d90, d90_interp = crossing(grid, scores, threshold * p_full)
    return IntrinsicDimResult(
        dims=grid,
        accuracy=scores,
        p_full=p_full,
        threshold=threshold,
        d_int90=d90,
        d_int90_interpolated=d90_interp,
        num_params=num_params,
        projection=projection,
        seconds=seconds,
        full_seconds=full.seconds,
    )
