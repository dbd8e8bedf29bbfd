"""The worker process of the VADER suites and what every suite reports about its environment.

``shiftkit bench peft-vader`` runs each method in a fresh worker process (``python -m
shiftkit.bench._suite SPEC.json``) so that every row's peak memory is that method's own; the rows come from
the recipe :mod:`shiftkit.recipes.vader_classify`.

Example:
    >>> row = run_worker({"settings": {...}, "method": "lora", "stage": "/tmp/s", "result": "/tmp/r"})
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from shiftkit.bench.report import environment
from shiftkit.recipes.vader_classify import (
    VaderSettings,
    finish_row,
    load_vader,
    method_plan,
    train_encoder,
    train_probe,
)

__all__ = ["RssPeak", "run_worker", "worker_main"]


# --- the worker process of `shiftkit bench peft-vader` ------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssPeak:
    """Samples this process's resident set size every ``interval`` s while active; ``peak_mb`` / ``start_mb``.

    RSS counts what the process holds: model, activations, gradients, optimiser state, allocator caches.
    Linux only (reads ``/proc/self/statm``).

    Example:
        >>> with RssPeak() as meter:
        ...     train(...)
        >>> meter.peak_mb - meter.start_mb   # growth while training, MiB
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.start_mb, self.peak_mb = interval, 0.0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __enter__(self) -> RssPeak:
        self.start_mb = self.peak_mb = _rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and test one method in this (fresh) process; the spec names the method, settings and files.

    Spec keys: ``settings`` (a :class:`VaderSettings` as a dict), ``method``, ``stage`` (folder for the
    shift file), ``head_init`` (optional trained head to start from), ``head_out`` (the probe writes its
    head there), ``progress``.

    Example:
        >>> row = run_worker({"settings": {...}, "method": "lora", "stage": "/tmp/s", "result": "/tmp/r"})
        >>> row["peak_rss_mb"], row["train_mem_mb"]
    """
    import resource

    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    fields = {**spec["settings"], "methods": tuple(spec["settings"]["methods"])}
    s = VaderSettings(**fields)
    plan = method_plan(spec["method"], s)  # before loading anything: a bad plan fails in a second
    data = load_vader(s)
    stage, progress = Path(spec["stage"]), spec.get("progress")
    meter = RssPeak() if os.path.exists("/proc/self/statm") else None
    if plan.name == "probe":
        row, head = train_probe(data, plan, stage, progress, meter)
        if spec.get("head_out"):
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, spec["head_out"])
    else:
        if spec.get("head_init"):
            data.model.head.load_state_dict(load_file(spec["head_init"]))
        row = train_encoder(data, plan, stage, progress, meter)
        row["head_init"] = "probe" if spec.get("head_init") else "random"
    row = finish_row(row, plan, data)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    row["train_mem_mb"] = None if meter is None else max(0.0, meter.peak_mb - meter.start_mb)
    row["worker_seconds"] = time.perf_counter() - t0
    row["full_params"] = data.full_params
    row["environment"] = environment()
    return row


def worker_main(argv: list[str]) -> int:
    """``python -m shiftkit.bench._suite SPEC.json``: run :func:`run_worker`, write ``spec["result"]``.

    The result is ``{"ok": True, "row": {...}}`` or ``{"ok": False, "error": ..., "traceback": ...}``.

    Example:
        >>> worker_main(["/tmp/lora.spec.json"])
        0
    """
    spec = json.loads(Path(argv[0]).read_text())
    try:
        out: dict[str, Any] = {"ok": True, "row": run_worker(spec)}
    except Exception as err:  # reported as this method's failure; the suite goes on with the next
        out = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    Path(spec["result"]).write_text(json.dumps(out, default=str))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
