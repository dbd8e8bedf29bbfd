"""``rewarm``: continued pre-training of SmolLM2-135M on new text, phase after phase, under three
learning-rate schedules and three replay fractions (Ibrahim et al. 2024, arXiv:2403.08763; Gupta et al. 2023,
arXiv:2308.04014; spec combine-compress.md §9), sized for 2 CPU cores.

Text: the *old* distribution is Guardian headlines (general news English, close to what the model was
pre-trained on); the new phases are VADER's tweets, then its Amazon review snippets. Each phase trains
``steps`` AdamW steps (β 0.9/0.95, weight decay 0.1, clipping 1.0, peak LR ``lr``) on the phase's text, with
a fraction of every batch's rows replaced by old text (:class:`shiftkit.continual.ReplayMixer`: 0, 5 or 25 %).
The schedules:

* ``constant``: no re-warming, a small constant LR (``min_lr_ratio``·peak) throughout;
* ``rewarm``: every phase re-warms linearly over 10 % of its steps and decays by a cosine to 0.1·peak
  (:class:`shiftkit.continual.RewarmCosine`);
* ``infinite``: one warm-up and cosine cool-down to a constant plateau (0.55·peak), kept across phases with
  no re-warming, and an exponential anneal to 0.1·peak over the last quarter of the final phase
  (:class:`shiftkit.continual.InfiniteLR`).

After each phase: perplexity on held-out old text and on each new domain's held-out text. A last row
re-trains from the pretrained model on the union of the new text (both phases mixed, 5 % replay) with one
re-warmed schedule over the same total steps: the paper's "re-training on the union" baseline, whose cost
is every phase's steps again each time new data arrives.

Each finished run is kept in ``--out``/runs and reused when the suite is run again with the same settings, so
an interrupted suite resumes at the first unfinished run (``--fresh`` reruns everything).

Example:
    >>> parser = argparse.ArgumentParser(); add_arguments(parser)
    >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import copy
import html
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PHASES", "REPLAYS", "SCHEDULES", "SIZES", "add_arguments", "run", "run_suite", "table_rows"]

SCHEDULES: tuple[str, ...] = ("constant", "rewarm", "infinite")
REPLAYS: tuple[float, ...] = (0.0, 0.05, 0.25)
#: the new text of each phase (VADER domains)
PHASES: tuple[str, ...] = ("tweets", "amazon")

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"steps": 2, "batch_size": 4, "max_length": 32, "n_train": 32, "n_eval": 16, "lr": 1e-4},
    "default": {"steps": 16, "batch_size": 8, "max_length": 48, "n_train": 256, "n_eval": 64, "lr": 1e-4},
    "full": {"steps": 60, "batch_size": 8, "max_length": 64, "n_train": 960, "n_eval": 192, "lr": 1e-4},
}
MIN_LR_RATIO, CONSTANT_RATIO = 0.1, 0.55

EPILOG = """\
examples:
  shiftkit bench rewarm                                  # 3 schedules x 3 replay fractions + union (~20 min)
  shiftkit bench rewarm --schedules rewarm --replays 0 0.05
  shiftkit bench rewarm --quick                          # smoke test
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options to ``parser`` (no torch import)."""
    parser.description = (__doc__ or "").split("\n\nExample:")[0]
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 2 steps per phase")
    size.add_argument("--full", action="store_true", help="60 steps per phase")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, help="default: all")
    parser.add_argument("--replays", nargs="+", type=float, help="replay fractions (default: 0 0.05 0.25)")
    parser.add_argument("--no-union", action="store_true", help="skip the re-training-on-the-union row")
    parser.add_argument("--seed", type=int, default=0, help="data split and batch order (default 0)")
    parser.add_argument("--out", default="runs/rewarm", metavar="DIR", help="default: runs/rewarm")
    parser.add_argument(
        "--fresh", action="store_true", help="rerun every run (ignore the finished ones in --out)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """Run the suite: print the table, write results.json and report.html."""
    from shiftkit.bench.report import format_table, write_suite_outputs

    size = "quick" if args.quick else "full" if args.full else "default"
    settings = {**SIZES[size], "seed": args.seed, "size": size}
    payload = run_suite(
        settings,
        schedules=tuple(args.schedules or SCHEDULES),
        replays=tuple(args.replays if args.replays is not None else REPLAYS),
        union=not args.no_union,
        out=None if args.fresh else Path(args.out),
        log=lambda msg: print(f"[rewarm] {msg}", file=sys.stderr, flush=True),
    )
    rows, columns = table_rows(payload)
    print()
    print(format_table(rows, columns))
    print(f"\n{payload['verdict']}")
    write_suite_outputs(args.out, payload, render_html(payload), args.json)
    return 0


def _texts(settings: dict[str, Any]) -> dict[str, tuple[list[str], list[str]]]:
    """``name -> (train texts, held-out texts)`` for the old text and each phase."""
    from shiftkit import zoo

    n_tr, n_ev, seed = settings["n_train"], settings["n_eval"], settings["seed"]
    heads = zoo.load_dataset("guardian-headlines")
    gen = __import__("random").Random(seed)
    order = list(range(len(heads)))
    gen.shuffle(order)
    out = {"old": ([heads[i] for i in order[n_ev : n_ev + n_tr]], [heads[i] for i in order[:n_ev]])}
    for dom in PHASES:
        texts = list(zoo.load_dataset("vader")[dom].texts)
        idx = list(range(len(texts)))
        gen.shuffle(idx)
        out[dom] = ([texts[i] for i in idx[n_ev : n_ev + n_tr]], [texts[i] for i in idx[:n_ev]])
    return out


def _cycle(batches: list[dict[str, Any]], seed: int) -> Iterable[dict[str, Any]]:
    import random

    gen = random.Random(seed)
    while True:
        order = list(range(len(batches)))
        gen.shuffle(order)
        for i in order:
            yield batches[i]


def _schedule(name: str, opt: Any, steps: int, phases: int) -> Any:
    """The scheduler of ``name`` for one phase (``rewarm``) or for the whole run (the others)."""
    import torch

    from shiftkit.continual import InfiniteLR, RewarmCosine

    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: MIN_LR_RATIO)
    if name == "rewarm":
        return RewarmCosine(
            opt, warmup_steps=max(1, steps // 10), total_steps=steps, min_lr_ratio=MIN_LR_RATIO
        )
    total = steps * phases
    warm = max(1, steps // 10)
    anneal = max(1, steps // 4)
    return InfiniteLR(
        opt,
        warmup_steps=warm,
        plateau_start=min(steps, 10 * warm),
        cooldown_start=total - anneal,
        cooldown_steps=anneal,
        constant_ratio=CONSTANT_RATIO,
        min_lr_ratio=MIN_LR_RATIO,
    )


def _train_phase(model: Any, opt: Any, sched: Any, batches: Iterable[dict[str, Any]], steps: int) -> float:
    import torch

    model.train()
    it = iter(batches)
    start = time.perf_counter()
    for _ in range(steps):
        b = next(it)
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - start


def run_suite(
    settings: dict[str, Any],
    *,
    schedules: Sequence[str] = SCHEDULES,
    replays: Sequence[float] = REPLAYS,
    union: bool = True,
    model_factory: Callable[[], tuple[Any, Any]] | None = None,
    texts: dict[str, tuple[list[str], list[str]]] | None = None,
    out: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run every ``schedule × replay`` (and the union baseline); return the payload.

    Args:
        settings: a :data:`SIZES` entry plus ``seed``.
        schedules / replays: the grid.
        union: add the re-training-on-the-union row.
        model_factory: ``() -> (causal LM, tokenizer)``; default SmolLM2-135M from the zoo.
        texts: ``name -> (train, held-out)`` for ``"old"`` and each of :data:`PHASES`; default the zoo's.
        out: keep each finished run in ``out/runs/`` and reuse it when the suite is run again with the same
            settings (an interrupted suite resumes at the first unfinished run).
        log: progress messages.

    Raises:
        ShiftkitError: an unknown schedule, or a replay fraction outside [0, 1).
    """
    import torch

    from shiftkit import zoo
    from shiftkit._fileio import atomic_write_text
    from shiftkit.bench.report import environment
    from shiftkit.continual import ReplayMixer
    from shiftkit.errors import ShiftkitError

    bad = [s for s in schedules if s not in SCHEDULES]
    if bad:
        raise ShiftkitError(f"unknown schedule(s) {bad}; known: {', '.join(SCHEDULES)}")
    if any(not 0 <= r < 1 for r in replays):
        raise ShiftkitError(f"replay fractions must be in [0, 1), got {list(replays)}")
    start = time.perf_counter()
    torch.manual_seed(settings["seed"])
    base, tok = model_factory() if model_factory is not None else zoo.load_model("smollm2-135m")
    if getattr(tok, "pad_token_id", None) is None:
        tok.pad_token = tok.eos_token
    data = texts or _texts(settings)
    bs, ml, steps = settings["batch_size"], settings["max_length"], settings["steps"]
    from shiftkit.recipes.causal_lm import lm_batches, perplexity

    train = {k: lm_batches(tok, v[0], bs, ml) for k, v in data.items()}
    held = {k: lm_batches(tok, v[1], bs, ml) for k, v in data.items()}

    def evaluate(model: Any) -> dict[str, float]:
        return {k: perplexity(model, b) for k, b in held.items()}

    pretrained = evaluate(base)
    log("pretrained: " + ", ".join(f"{k} ppl {v:.1f}" for k, v in pretrained.items()))
    runs: list[dict[str, Any]] = []

    def optimizer(model: Any) -> Any:
        return torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), weight_decay=0.1)

    def kept(key: str, what: dict[str, Any]) -> dict[str, Any] | None:
        path = out / "runs" / f"{key}.json" if out is not None else None
        if path is None or not path.is_file():
            return None
        saved = json.loads(path.read_text())
        return saved["run"] if saved.get("fingerprint") == {**what, "settings": settings} else None

    def keep(key: str, what: dict[str, Any], run: dict[str, Any]) -> None:
        if out is not None:
            record = {"fingerprint": {**what, "settings": settings}, "run": run}
            atomic_write_text(out / "runs" / f"{key}.json", json.dumps(record) + "\n")

    for sched_name in schedules:
        for replay in replays:
            key, what = f"{sched_name}-{replay:g}", {"schedule": sched_name, "replay": replay}
            previous = kept(key, what)
            if previous is not None:
                log(f"{sched_name}, replay {replay:.2f}: finished in an earlier run (kept)")
                runs.append(previous)
                continue
            model = copy.deepcopy(base)
            opt = optimizer(model)
            sched = _schedule(sched_name, opt, steps, len(PHASES))
            phases, seconds = [], 0.0
            for p, dom in enumerate(PHASES):
                if sched_name == "rewarm" and p > 0:
                    for g in opt.param_groups:  # the next phase's schedule starts from the peak LR again
                        g["lr"] = g["initial_lr"]
                    sched = _schedule(sched_name, opt, steps, len(PHASES))
                mixed = ReplayMixer(_cycle(train[dom], settings["seed"] + p), _cycle(train["old"], p), replay)
                seconds += _train_phase(model, opt, sched, mixed, steps)
                phases.append({"phase": dom, "ppl": evaluate(model), "lr_end": opt.param_groups[0]["lr"]})
            last = phases[-1]["ppl"]
            log(f"{sched_name}, replay {replay:.2f}: " + ", ".join(f"{k} {v:.1f}" for k, v in last.items()))
            runs.append(
                {
                    "schedule": sched_name,
                    "replay": replay,
                    "phases": phases,
                    "steps": steps * len(PHASES),
                    "seconds": seconds,
                }
            )
            keep(key, what, runs[-1])
    union_run = kept("union", {"schedule": "union"}) if union else None
    if union_run is not None:
        log("union: finished in an earlier run (kept)")
        runs.append(union_run)
    elif union:
        model = copy.deepcopy(base)
        opt = optimizer(model)
        total = steps * len(PHASES)
        sched = _schedule("rewarm", opt, total, 1)
        pool = [b for dom in PHASES for b in train[dom]]
        mixed = ReplayMixer(_cycle(pool, settings["seed"]), _cycle(train["old"], 99), 0.05)
        seconds = _train_phase(model, opt, sched, mixed, total)
        ppl = evaluate(model)
        log("union: " + ", ".join(f"{k} {v:.1f}" for k, v in ppl.items()))
        # its cost when the second phase's data arrives: the first phase's steps are spent again
        runs.append(
            {
                "schedule": "union (re-train)",
                "replay": 0.05,
                "phases": [{"phase": "all", "ppl": ppl}],
                "steps": total + steps,
                "seconds": seconds,
            }
        )
        keep("union", {"schedule": "union"}, runs[-1])
    payload: dict[str, Any] = {
        "suite": "rewarm",
        "settings": settings,
        "phases": list(PHASES),
        "pretrained": pretrained,
        "runs": runs,
        "environment": environment(),
        "timings": {"total_seconds": time.perf_counter() - start},
    }
    payload["verdict"] = verdict(payload)
    return payload


def verdict(payload: dict[str, Any]) -> str:
    """The paper's finding, tested: does re-warming with replay reach the union re-training's new-text
    perplexity (within 5 %) while keeping old-text perplexity no worse than it (within 5 %)?"""
    runs = payload["runs"]
    union = next((r for r in runs if r["schedule"].startswith("union")), None)
    warm = [r for r in runs if r["schedule"] == "rewarm" and r["replay"] > 0]
    if union is None or not warm:
        return "verdict: needs the union row and a re-warmed run with replay"
    u = union["phases"][-1]["ppl"]
    best = min(warm, key=lambda r: r["phases"][-1]["ppl"][PHASES[-1]])
    b = best["phases"][-1]["ppl"]
    new_ok = all(b[d] <= 1.05 * u[d] for d in PHASES)
    old_ok = b["old"] <= 1.05 * u["old"]
    return (
        f"re-warm + {100 * best['replay']:.0f} % replay: new-text ppl "
        + ", ".join(f"{d} {b[d]:.1f} (union {u[d]:.1f})" for d in PHASES)
        + f", old {b['old']:.1f} (union {u['old']:.1f}) with {best['steps']} steps vs {union['steps']}: "
        + ("matches the union re-training" if new_ok and old_ok else "does NOT match the union re-training")
    )


def table_rows(payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """One row per run and phase: perplexity on old text and each phase's text."""
    names = ["old", *payload["phases"]]
    rows = [
        {
            "schedule": "pretrained",
            "replay": "",
            "after": "",
            **{n: f"{payload['pretrained'][n]:.1f}" for n in names},
            "steps": "0",
            "seconds": "",
        }
    ]
    for r in payload["runs"]:
        for ph in r["phases"]:
            rows.append(
                {
                    "schedule": r["schedule"],
                    "replay": f"{100 * r['replay']:.0f} %",
                    "after": ph["phase"],
                    **{n: f"{ph['ppl'][n]:.1f}" for n in names},
                    "steps": str(r["steps"]),
                    "seconds": f"{r['seconds']:.0f}",
                }
            )
    return rows, ["schedule", "replay", "after", *names, "steps", "seconds"]


def _plot_svg(payload: dict[str, Any]) -> str:
    """Old-text vs last-phase perplexity after the final phase, one point per run (lower-left is better)."""
    last = payload["phases"][-1]
    pts = [
        (
            r["phases"][-1]["ppl"]["old"],
            r["phases"][-1]["ppl"][last],
            f"{r['schedule']} {100 * r['replay']:.0f}%",
        )
        for r in payload["runs"]
    ]
    pts.append((payload["pretrained"]["old"], payload["pretrained"][last], "pretrained"))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    w, h, m = 640, 360, 60

    def px(v: float) -> float:
        return m + (v - x0) / max(x1 - x0, 1e-9) * (w - 2 * m)

    def py(v: float) -> float:
        return h - m - (v - y0) / max(y1 - y0, 1e-9) * (h - 2 * m)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
        'font-size="10">',
        f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle">old-text perplexity</text>',
        f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">'
        f"{html.escape(last)} perplexity</text>",
    ]
    for x, y, label in pts:
        parts.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="#36c"/>'
            f'<text x="{px(x) + 6:.1f}" y="{py(y) - 4:.1f}">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(payload: dict[str, Any]) -> str:
    """The report: the table, the verdict and the old-vs-new perplexity plot."""
    from shiftkit.bench.report import html_table, suite_page

    rows, columns = table_rows(payload)
    s = payload["settings"]
    intro = (
        f"Continued pre-training, phases {' then '.join(payload['phases'])}, {s['steps']} steps of "
        f"{s['batch_size']} texts per phase, peak LR {s['lr']}, seed {s['seed']}."
    )
    return suite_page("rewarm", intro, payload, html_table(rows, columns) + _plot_svg(payload))
