"""``recursive``: SmolLM2-135M turned into a relaxed recursive transformer (Bae et al., ICLR 2025).

The 30 layers of SmolLM2-135M are tied into K = 15 shared blocks run twice (``num_loops=2``, cycle
sharing, average init) and relaxed by a depth-wise LoRA per layer and projection, initialised by the
truncated SVD of the tying residual (:mod:`shiftkit.methods.recursive`). The suite reports:

* parameters of the original model and of the recursive one (shared blocks + LoRAs + untied embeddings
  and norms: what a saved recursive model needs), the reduction, and the shift file's size;
* held-out perplexity of the original model, of the strict recursive model (r = 0), of the relaxed model
  right after the conversion, and after a short recovery fine-tune (shared weights and LoRAs trained with
  AdamW on next-token prediction);
* ``max |folded - attached|``: the relaxed model folded (un-tied) into a vanilla Llama, compared with it.

Text: the Rotten Tomatoes review snippets of the zoo (``load_dataset("rotten-tomatoes")``, 12.8k
snippets of ~24 tokens). Snippets are shuffled with the seed and split by document: the first 10 % are
held out, the rest train. Each split is tokenised, joined with EOS and cut into ``seq_len``-token sequences.

Example:
    >>> parser = argparse.ArgumentParser(); add_arguments(parser)
    >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SIZES", "RecursiveSettings", "add_arguments", "run", "run_suite"]


@dataclass(frozen=True, kw_only=True)
class RecursiveSettings:
    """What the suite converts, trains and measures.

    Attributes:
        num_loops: N; 30 layers / 2 = 15 shared blocks, the mildest tying of the paper.
        sharing: ``"cycle"`` or ``"sequence"``.
        init: ``"average"``: the init recommended for relaxed (LoRA) models (Bae et al., ICLR 2025).
        r: LoRA rank per layer and projection. 64 (hidden 576) keeps a 25 % parameter reduction; rank 128
            would halve it (12 %) for residuals that are still far from captured (layers of this model are
            nearly uncorrelated: the tying residual holds half the weights' energy, rank 64 a third of it).
        seq_len: tokens per sequence.
        batch_size: sequences per training step.
        steps: recovery fine-tune steps: 40 took 4.8 minutes (7.2 s a step, one thread on a busy 2-core
            machine) and the whole suite 6.6 minutes.
        lr: AdamW peak learning rate (10 % linear warm-up, cosine decay); weight decay 0: decaying the
            shared weights would pull them to zero, not to the original model.
        eval_sequences: held-out sequences for every perplexity (the same ones each time).
        heldout_fraction: share of the snippets held out.
        strict_row: also measure the strict recursive model (r = 0, no LoRA; no SVD, a few seconds more).
        seed: data split, batch order.
    """

    model: str = "smollm2-135m"
    num_loops: int = 2
    sharing: str = "cycle"
    init: str = "average"
    r: int = 64
    seq_len: int = 128
    batch_size: int = 4
    steps: int = 40
    lr: float = 3e-4
    eval_sequences: int = 32
    heldout_fraction: float = 0.1
    strict_row: bool = True
    seed: int = 0


SIZES: dict[str, dict[str, Any]] = {
    "quick": {"steps": 2, "eval_sequences": 2, "seq_len": 64, "batch_size": 2, "strict_row": False},
    "default": {},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's command-line options.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--quick"]).quick
        True
    """
    d = RecursiveSettings()
    parser.add_argument("--quick", action="store_true", help="tiny run for tests: 2 steps, 2 eval sequences")
    parser.add_argument("--r", type=int, metavar="R", help=f"LoRA rank (default {d.r}; 0 = strict)")
    parser.add_argument("--num-loops", type=int, metavar="N", help=f"loops (default {d.num_loops})")
    parser.add_argument("--sharing", choices=("cycle", "sequence"), help=f"default {d.sharing}")
    parser.add_argument("--init", choices=("average", "stepwise", "lower", "upper"), help=f"default {d.init}")
    parser.add_argument("--steps", type=int, metavar="N", help=f"recovery steps (default {d.steps})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr:g})")
    parser.add_argument("--eval-sequences", type=int, metavar="N", help=f"default {d.eval_sequences}")
    parser.add_argument("--seed", type=int, default=0, help="data split and batch order (default 0)")
    parser.add_argument("--out", default="runs/recursive", metavar="DIR", help="default: runs/recursive")
    parser.add_argument("--json", metavar="PATH", help="also write the results JSON to PATH")
    parser.add_argument("--keep-shift", action="store_true", help="also keep the shift file in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads (default: torch's; 1 is faster on a busy machine)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the suite from parsed options: print the table, write results.json and report.html.

    Example:
        >>> run(parser.parse_args(["--quick"]))  # doctest: +SKIP
        0
    """
    from shiftkit._fileio import atomic_write_text
    from shiftkit.bench.report import format_table

    opts = {
        "r": args.r,
        "num_loops": args.num_loops,
        "sharing": args.sharing,
        "init": args.init,
        "steps": args.steps,
        "lr": args.lr,
        "eval_sequences": args.eval_sequences,
    }
    import torch

    size = SIZES["quick" if args.quick else "default"]
    settings = RecursiveSettings(
        **{**size, **{k: v for k, v in opts.items() if v is not None}, "seed": args.seed}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        payload = run_suite(
            settings,
            args.out,
            keep_shift=args.keep_shift,
            progress=False if args.no_progress else None,
            log=lambda msg: print(f"[recursive] {msg}", file=sys.stderr, flush=True),
        )
    finally:
        torch.set_num_threads(threads)
    print(format_table(*table_rows(payload)))
    p = payload["params"]
    print(
        f"\nparameters {p['original']:,} -> {p['recursive']:,} ({100 * p['reduction']:.1f} % fewer); "
        f"shift file {payload['shift_file_bytes'] / 2**20:.1f} MiB; "
        f"max |folded - attached| {payload['max_fold_diff']:.1e}"
    )
    print(f"finished in {payload['timings']['total_seconds']:.0f} s; report: {args.out}/report.html")
    if args.json:
        atomic_write_text(args.json, json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


def _sequences(tok: Any, texts: list[str], seq_len: int) -> Any:
    """Tokenise ``texts``, join them with EOS, cut into ``(n, seq_len)`` int64 sequences (rest dropped)."""
    import torch

    ids: list[int] = []
    for row in tok(texts, add_special_tokens=False)["input_ids"]:
        ids += [*row, tok.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _perplexity(model: Any, seqs: Any, batch_size: int) -> float:
    """``exp`` of the mean next-token NLL over every predicted token of ``seqs (n, T)``."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            x = seqs[i : i + batch_size]
            loss = model(input_ids=x, labels=x).loss  # mean over the x.shape[0]·(T−1) predicted tokens
            n = x.shape[0] * (x.shape[1] - 1)
            total, count = total + float(loss) * n, count + n
    return math.exp(total / count)


def _recover(model: Any, train: Any, s: RecursiveSettings, progress: bool | None) -> dict[str, Any]:
    """The recovery fine-tune: every shift parameter (shared weights, LoRAs), next-token loss, AdamW."""
    import torch
    from tqdm.auto import tqdm

    import shiftkit as sk
    from shiftkit.recipes.learn import cosine_schedule

    params = sk.shift_parameters(model)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    warmup = max(1, s.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: cosine_schedule(i, s.steps, warmup))
    order = list(range(len(train)))
    random.Random(s.seed).shuffle(order)
    losses: list[float] = []
    bar = tqdm(
        total=s.steps, desc="recovery", disable=None if progress is None else not progress, leave=False
    )
    model.train()
    start = time.perf_counter()
    try:
        for step in range(s.steps):
            pick = [order[(step * s.batch_size + j) % len(order)] for j in range(s.batch_size)]
            x = train[pick]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        model.eval()
    return {"steps": s.steps, "seconds": time.perf_counter() - start, "losses": losses}


def run_suite(
    settings: RecursiveSettings,
    out_dir: str | Path,
    *,
    keep_shift: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Convert, measure, recover, measure; write ``<out_dir>/{results.json, report.html}``.

    Returns:
        The payload written to ``results.json``.

    Example:
        >>> payload = run_suite(RecursiveSettings(**SIZES["quick"]), "runs/recursive")
        >>> payload["params"]["reduction"] > 0
        True
    """
    import os
    import platform

    import torch

    import shiftkit as sk
    from shiftkit import zoo
    from shiftkit._fileio import atomic_write_text
    from shiftkit.methods.recursive import RecursiveConfig, find_layer_stack, recursive_parameter_count

    say = log or (lambda _msg: None)
    s = settings
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> None:
        timings[name] = time.perf_counter() - since

    t = time.perf_counter()
    model, tok = zoo.load_model(s.model)
    texts, _ = zoo.load_dataset("rotten-tomatoes")
    docs = list(range(len(texts)))
    random.Random(s.seed).shuffle(docs)
    n_held = int(len(docs) * s.heldout_fraction)
    held = _sequences(tok, [texts[i] for i in docs[:n_held]], s.seq_len)[: s.eval_sequences]
    train = _sequences(tok, [texts[i] for i in docs[n_held:]], s.seq_len)
    lap("load", t)
    say(f"{s.model}: {len(texts)} snippets, {len(held)} held-out and {len(train)} training sequences")
    eval_bs = 8
    stages: list[dict[str, Any]] = []
    original = sum(p.numel() for p in model.parameters())
    num_layers = len(find_layer_stack(model)[1])

    t = time.perf_counter()
    stages.append({"stage": "original", "params": original, "ppl": _perplexity(model, held, eval_bs)})
    lap("eval_original", t)
    say(f"original: held-out perplexity {stages[-1]['ppl']:.2f}")
    config = RecursiveConfig(num_loops=s.num_loops, sharing=s.sharing, init=s.init, r=s.r)
    if s.strict_row and s.r > 0:
        t = time.perf_counter()
        sk.attach_(model, config.replace(r=0))
        count = recursive_parameter_count(model)
        ppl = _perplexity(model, held, eval_bs)
        stages.append({"stage": "strict recursive (r=0)", "params": count["recursive"], "ppl": ppl})
        sk.detach_(model)
        lap("strict", t)
        say(f"strict recursive: held-out perplexity {ppl:.2f}")

    t = time.perf_counter()
    sk.attach_(model, config)
    lap("convert", t)
    count = recursive_parameter_count(model)
    say(
        f"converted in {timings['convert']:.1f} s: {count['original']:,} -> {count['recursive']:,} parameters"
    )
    t = time.perf_counter()
    stages.append(
        {
            "stage": f"relaxed r={s.r}, converted",
            "params": count["recursive"],
            "ppl": _perplexity(model, held, eval_bs),
        }
    )
    lap("eval_converted", t)
    say(f"relaxed, converted: held-out perplexity {stages[-1]['ppl']:.2f}")

    train_result = _recover(model, train, s, progress)
    t = time.perf_counter()
    ppl = _perplexity(model, held, eval_bs)
    stages.append(
        {"stage": f"relaxed r={s.r}, recovered ({s.steps} steps)", "params": count["recursive"], "ppl": ppl}
    )
    lap("eval_recovered", t)
    say(f"recovered in {train_result['seconds']:.0f} s: held-out perplexity {ppl:.2f}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        path = Path(tmp) / "recursive.safetensors"
        sk.save(sk.extract(model), path)
        file_bytes = path.stat().st_size
        if keep_shift:
            os.replace(path, out / "recursive.safetensors")
    lap("save", t)
    t = time.perf_counter()
    x = held[:2]
    with torch.no_grad():  # the relaxed model is not needed any more: fold (un-tie) it in place
        attached = model(input_ids=x).logits
        sk.fold_(model)
        max_fold = float((model(input_ids=x).logits - attached).abs().max())
    lap("fold_check", t)
    payload = {
        "suite": "recursive",
        "title": "recursive: SmolLM2-135M as a relaxed recursive transformer",
        "settings": dataclasses.asdict(s),
        "data": {
            "dataset": "rotten-tomatoes",
            "snippets": len(texts),
            "heldout_snippets": n_held,
            "heldout_sequences": len(held),
            "train_sequences": len(train),
            "split": "by snippet (document), shuffled with the seed; each split joined with EOS and chunked",
        },
        "params": {
            **count,
            "layers": num_layers,
            "slots": num_layers // s.num_loops,
        },
        "stages": stages,
        "shift_file_bytes": file_bytes,
        "max_fold_diff": max_fold,
        "train": train_result,
        "environment": {
            "torch": torch.__version__,
            "shiftkit": sk.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "timings": {**timings, "total_seconds": time.perf_counter() - t0},
    }
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.html", render_html(payload))
    return payload


def table_rows(payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """The printed table: stage, parameters (and % of the original), held-out perplexity."""
    from shiftkit.bench.report import human_count

    original = payload["stages"][0]["params"]
    rows = [
        {
            "stage": st["stage"],
            "parameters": human_count(st["params"]),
            "% of original": f"{100 * st['params'] / original:.1f}%",
            "held-out ppl": f"{st['ppl']:.4g}",
        }
        for st in payload["stages"]
    ]
    return rows, ["stage", "parameters", "% of original", "held-out ppl"]


def _loss_svg(losses: list[float]) -> str:
    """Training loss per step as an inline SVG polyline."""
    if len(losses) < 2:
        return ""
    w, h, pad = 640, 220, 40
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    pts = " ".join(
        f"{pad + (w - 2 * pad) * i / (len(losses) - 1):.1f},{h - pad - (h - 2 * pad) * (v - lo) / span:.1f}"
        for i, v in enumerate(losses)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        'aria-label="training loss">'
        f'<text x="{pad}" y="20" font-size="13">recovery fine-tune: loss per step '
        f"({losses[0]:.2f} → {losses[-1]:.2f})</text>"
        f'<polyline fill="none" stroke="#0072B2" stroke-width="2" points="{pts}"/>'
        f'<text x="{pad}" y="{h - 12}" font-size="11">step 1</text>'
        f'<text x="{w - pad}" y="{h - 12}" font-size="11" text-anchor="end">step {len(losses)}</text></svg>'
    )


def render_html(payload: dict[str, Any]) -> str:
    """The report: settings, the stage table, parameter breakdown and the recovery loss curve."""
    esc = html.escape
    rows, columns = table_rows(payload)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(r[c])}</td>" for c in columns) + "</tr>" for r in rows)
    s, p, d = payload["settings"], payload["params"], payload["data"]
    breakdown = ", ".join(f"{k} {p[k]:,}" for k in ("shared", "lora", "untied"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(payload["title"])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}}
table{{border-collapse:collapse}}th,td{{border-bottom:1px solid #ddd;padding:.3em .7em;text-align:right}}
th:first-child,td:first-child{{text-align:left}}.note{{color:#555;font-size:.9em}}</style></head><body>
<h1>{esc(payload["title"])}</h1>
<p>{esc(s["model"])}: {p["layers"]} layers tied into {p["slots"]} shared blocks run {s["num_loops"]}
times ({esc(s["sharing"])} sharing, {esc(s["init"])} init), depth-wise LoRA rank {s["r"]} from the SVD of the
tying residual. Held-out perplexity on {d["heldout_sequences"]} sequences of {s["seq_len"]} tokens of Rotten
Tomatoes snippets ({esc(d["split"])}); recovery: {s["steps"]} AdamW steps of batch {s["batch_size"]},
lr {s["lr"]:g}.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p class="note">Recursive parameters = {esc(breakdown)} (shared blocks + LoRAs + untied embeddings and norms:
what a saved recursive model needs); {100 * p["reduction"]:.1f} % fewer than the original. Shift file
{payload["shift_file_bytes"] / 2**20:.1f} MiB. Folded (un-tied) into a vanilla Llama, the relaxed model's
logits differ by at most {payload["max_fold_diff"]:.1e}.</p>
{_loss_svg(payload["train"]["losses"])}
<p class="note">torch {esc(str(payload["environment"]["torch"]))},
{payload["environment"]["threads"]} threads; whole run {payload["timings"]["total_seconds"]:.0f} s.</p>
</body></html>
"""
