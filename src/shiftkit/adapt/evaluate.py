"""Run a test-time adaptation method over a stream and score it the way the anchors do.

Online protocol (as the TENT, EATA and SAR references): for every batch the method predicts *and then* adapts;
the prediction made for a sample is the one scored (no second look after the update). The adaptation state is
reset whenever the stream says so (``StreamBatch.reset``: every domain start for the ``episodic`` stream, only
the start for ``continual``). Error % = 100·(1 − accuracy) per domain; ``mean_error`` is the mean over domains
(the anchors' "mean" column) and ``overall_error`` is over all samples.

Example:
    >>> from shiftkit import adapt
    >>> from shiftkit.data import streams
    >>> run = adapt.evaluate(adapt.make("norm", model), streams.continual(domains, batch_size=64))
    >>> run.mean_error, run.errors["gaussian_noise"]
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from shiftkit.adapt.base import TTAMethod
from shiftkit.errors import ShiftkitError

if TYPE_CHECKING:
    from shiftkit.data.streams import StreamBatch

__all__ = ["TTARun", "evaluate"]


@dataclass(frozen=True)
class TTARun:
    """The scores of one method over one stream.

    Attributes:
        method: the method's registry name.
        errors: error % per domain, in stream order.
        counts: samples scored per domain.
        mean_error: mean of ``errors`` over domains (the anchors' "mean").
        overall_error: error % over all samples.
        seconds: wall time of the run (prediction and adaptation).
        images_per_second: samples / seconds.
        collapse_resets: resets made by the collapse guard (SAR's model recovery included).
        nonfinite_batches: batches whose outputs held NaN or ±Inf (a diverged method; those samples are
            scored by ``argmax`` like any other, so a non-zero count means the errors are unreliable).
        stream: the stream's ``describe()`` record, when it has one.
    """

    method: str
    errors: dict[str, float]
    counts: dict[str, int]
    mean_error: float
    overall_error: float
    seconds: float
    images_per_second: float
    collapse_resets: int
    nonfinite_batches: int = 0
    stream: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy.

        Example:
            >>> json.dumps(run.to_dict())
        """
        return asdict(self)


def evaluate(
    method: TTAMethod,
    stream: Iterable[StreamBatch],
    *,
    progress: bool | None = None,
    desc: str | None = None,
    device: str | torch.device | None = None,
) -> TTARun:
    """Run ``method`` over ``stream`` online (predict, then adapt) and return its error per domain.

    Args:
        method: a method from :func:`shiftkit.adapt.make`; it is reset before the first batch.
        stream: batches from :mod:`shiftkit.data.streams` (anything yielding objects with ``x``, ``y``,
            ``domains`` and ``reset``).
        progress: a tqdm bar (``None``: only on a terminal).
        desc: the bar's label (default: the method's name).
        device: move each batch there (the model must already be on it).

    Returns:
        The :class:`TTARun` with per-domain and mean error %.

    Raises:
        ShiftkitError: the stream is empty, or the outputs are not ``(N, K)`` scores for ``N`` labels.

    Example:
        >>> run = evaluate(adapt.make("tent", model), streams.episodic(domains, 64))
        >>> f"{run.mean_error:.1f}"
    """
    from tqdm.auto import tqdm

    wrong: dict[str, int] = {}
    seen: dict[str, int] = {}
    total = getattr(stream, "__len__", None)
    bar = tqdm(
        stream,
        total=total() if callable(total) else None,
        desc=desc or method.name,
        disable=(not progress) if progress is not None else None,
        leave=False,
        unit="batch",
    )
    method.reset()
    resets_before = method.collapse_resets
    start = time.perf_counter()
    first = True
    nonfinite = 0
    for batch in bar:
        if batch.reset and not first:
            method.reset()
        first = False
        x = batch.x if device is None else batch.x.to(device)
        outputs = method(x)
        if outputs.dim() != 2 or outputs.shape[0] != len(batch.y):
            raise ShiftkitError(
                f"adapt.evaluate needs (N, K) class scores for a batch of {len(batch.y)} labels, but "
                f"{method.name!r} returned shape {tuple(outputs.shape)}"
            )
        if not bool(torch.isfinite(outputs).all()):
            nonfinite += 1
        hits = (outputs.argmax(-1).cpu() == batch.y).tolist()
        for dom, hit in zip(batch.domains, hits, strict=True):
            seen[dom] = seen.get(dom, 0) + 1
            wrong[dom] = wrong.get(dom, 0) + (not hit)
    seconds = time.perf_counter() - start
    if not seen:
        raise ShiftkitError("adapt.evaluate got an empty stream (no batches)")
    errors = {d: 100.0 * wrong[d] / seen[d] for d in seen}
    n = sum(seen.values())
    describe = getattr(stream, "describe", None)
    return TTARun(
        method=method.name,
        errors=errors,
        counts=dict(seen),
        mean_error=sum(errors.values()) / len(errors),
        overall_error=100.0 * sum(wrong.values()) / n,
        seconds=seconds,
        images_per_second=n / seconds if seconds > 0 else float("inf"),
        collapse_resets=method.collapse_resets - resets_before,
        nonfinite_batches=nonfinite,
        stream=describe() if callable(describe) else {},
    )
