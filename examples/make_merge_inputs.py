r"""Make real, sharded inputs for the ``shiftkit merge`` walkthrough from the offline SmolLM2-135M asset.

Writes ``runs/merge-inputs/{base,tweets,movies,nyt}``: HF model folders with sharded safetensors
(``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``), ``config.json`` and the tokenizer
files. ``base`` is SmolLM2-135M-Instruct as shipped (θ0); each other folder is a short full fine-tune of it
(AdamW, causal-LM loss) on one domain of the VADER ground-truth corpus (tweets, movie-review snippets, NYT
editorial sentences), so every fine-tune has a real task vector τ_t = θ_t − θ0 that the merge combines.

``--eval FOLDER ...`` instead prints the held-out perplexity, exp(mean token NLL), of the base, the
fine-tunes and the given folders (e.g. a merge output) on sentences of each domain that training never saw.

Run from the repository root::

    python examples/make_merge_inputs.py
    shiftkit merge examples/merge_smollm2_ties.yaml runs/merged-smollm2 --max-shard-size 100MB
    python examples/make_merge_inputs.py --eval runs/merged-smollm2

Each AdamW step of a full fine-tune reads and writes ~2.7 GB of weights, gradients and moments, so speed is
memory-bound: the 24 default steps took 11 minutes on a busy shared 2-core VM (an idle machine is faster).
``--train REGEX`` fine-tunes only the matching parameters (the test uses it to stay fast; it saves little
here, as the forward pass over all 30 blocks remains).

TIES paper: https://arxiv.org/abs/2306.01708 ; task arithmetic: https://arxiv.org/abs/2212.04089
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

#: the VADER domains that become fine-tunes: short, informal / short, evaluative / long, formal sentences
DOMAINS: tuple[str, ...] = ("tweets", "movies", "nyt")
#: held-out sentences per domain (drawn first, so the training text never contains them)
N_HELD_OUT = 200


def domain_texts(domain: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split one VADER domain's sentences into (train, held-out), deterministically.

    Args:
        domain: ``"tweets"``, ``"movies"``, ``"amazon"`` or ``"nyt"``.
        seed: seed of the shuffle.

    Returns:
        ``(train_texts, held_out_texts)``; the held-out list has ``N_HELD_OUT`` sentences.

    Example:
        >>> train, held = domain_texts("tweets")
        >>> len(held)
        200
    """
    from shiftkit.zoo import load_dataset

    texts = load_dataset("vader")[domain].texts
    order = np.random.default_rng(seed).permutation(len(texts))
    held = [texts[i] for i in order[:N_HELD_OUT]]
    return [texts[i] for i in order[N_HELD_OUT:]], held


def token_windows(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize ``texts`` as one newline-joined stream and cut it into full windows.

    Args:
        tokenizer: a HF tokenizer.
        texts: sentences.
        seq_len: tokens per window.

    Returns:
        int64 token ids, shape ``(n_windows, seq_len)``.

    Example:
        >>> w = token_windows(tok, ["a b", "c d"] * 50, 16)
        >>> w.shape[1]
        16
    """
    ids = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def fine_tune(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    train: str | None = None,
) -> list[float]:
    """Full fine-tuning with AdamW on random batches of token windows (causal-LM loss), in place.

    Args:
        model: a causal LM (``model(input_ids=..., labels=...)`` returns ``.loss``); trained in place.
        windows: token ids, shape ``(n_windows, seq_len)``.
        steps: optimizer steps.
        batch_size: windows per step.
        lr: AdamW learning rate (no schedule, no weight decay: a few steps only).
        seed: seed of the batch sampling.
        train: regex (fullmatch) of the parameter names to train; ``None`` trains all of them. The others
            are frozen during the call only.

    Returns:
        The loss of every step.

    Example:
        >>> losses = fine_tune(lm, token_windows(tok, texts, 64), steps=2, batch_size=2, lr=1e-4, seed=0)
        >>> len(losses)
        2
    """
    gen = torch.Generator().manual_seed(seed)
    params = [p for n, p in model.named_parameters() if train is None or re.fullmatch(train, n)]
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:  # no gradient, no AdamW state: backward stops at the first trained layer
        p.requires_grad_(False)
    # weight_decay=0: decay would pull every weight toward 0 and blur the domain's task vector
    # fused: one kernel over all 135M parameters; the default for-each AdamW takes ~10 s a step on 2 cores
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    model.train()
    losses = []
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    for p in frozen:
        p.requires_grad_(True)
    del opt  # frees the 2 × 538 MB of AdamW moments before the next fine-tune
    return losses


def save_sharded(model: Any, tokenizer: Any, out: Path, max_shard_size: str) -> list[Path]:
    """Save ``model`` as an HF folder with sharded safetensors, plus the tokenizer files.

    Args:
        model: a transformers ``PreTrainedModel``.
        tokenizer: its tokenizer.
        out: the folder to write.
        max_shard_size: shard size for ``save_pretrained`` (``"200MB"`` gives 3 shards for 538 MB of fp32).

    Returns:
        The shard files written.

    Example:
        >>> shards = save_sharded(lm, tok, Path("runs/merge-inputs/base"), "200MB")
        >>> len(shards) >= 3
        True
    """
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return sorted(out.glob("model-*-of-*.safetensors"))


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of ``model`` over token windows.

    Args:
        model: a causal LM.
        windows: token ids, shape ``(n_windows, seq_len)``.
        batch_size: windows per forward pass.

    Returns:
        The perplexity.

    Example:
        >>> perplexity(lm, token_windows(tok, held_out, 64)) > 1.0
        True
    """
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        n = batch.shape[0] * (batch.shape[1] - 1)  # the loss is a mean over the shifted targets
        total += float(model(input_ids=batch, labels=batch).loss) * n
        count += n
    return math.exp(total / count)


def make_inputs(
    out: Path,
    *,
    domains: tuple[str, ...] = DOMAINS,
    steps: int = 8,
    batch_size: int = 4,
    seq_len: int = 64,
    lr: float = 1e-4,
    seed: int = 0,
    max_shard_size: str = "200MB",
    train: str | None = None,
    log: Any = print,
) -> dict[str, Path]:
    """Write the base and one fine-tune per domain under ``out`` as sharded HF folders.

    Args:
        out: output root; ``out/base`` and ``out/<domain>`` are (re)written.
        domains: VADER domains to fine-tune on, one model each.
        steps: AdamW steps per fine-tune.
        batch_size: windows per step.
        seq_len: tokens per window.
        lr: learning rate.
        seed: seed of the batches (fine-tune ``i`` uses ``seed + i``).
        max_shard_size: output shard size.
        train: regex of the parameter names to fine-tune (``None``: all, i.e. full fine-tuning).
        log: progress printer.

    Returns:
        Folder per name (``"base"`` and each domain).

    Example:
        >>> folders = make_inputs(Path("runs/merge-inputs"), steps=2)
        >>> sorted(folders)
        ['base', 'movies', 'nyt', 'tweets']
    """
    from shiftkit.zoo import load_model

    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folders = {"base": out / "base"}
    shards = save_sharded(model, tok, folders["base"], max_shard_size)
    log(f"[base] SmolLM2-135M as shipped -> {folders['base']} ({len(shards)} shards)")
    for i, domain in enumerate(domains):
        torch.manual_seed(seed + i)
        model.load_state_dict(theta0)  # every fine-tune starts from θ0
        texts, _ = domain_texts(domain)  # the split seed stays 0: --eval holds out the same sentences
        windows = token_windows(tok, texts, seq_len)
        t = time.perf_counter()
        losses = fine_tune(
            model, windows, steps=steps, batch_size=batch_size, lr=lr, seed=seed + i, train=train
        )
        folders[domain] = out / domain
        shards = save_sharded(model, tok, folders[domain], max_shard_size)
        log(
            f"[{domain}] {steps} AdamW steps on {len(windows)} windows of {seq_len} tokens: "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({time.perf_counter() - t:.1f}s) -> "
            f"{folders[domain]} ({len(shards)} shards)"
        )
    log(f"done in {time.perf_counter() - t0:.1f}s")
    return folders


def evaluate(folders: list[Path], domains: tuple[str, ...] = DOMAINS, windows: int = 8) -> None:
    """Print held-out perplexity per domain for each model folder.

    Args:
        folders: HF causal-LM folders (sharded or not).
        domains: VADER domains to evaluate on.
        windows: held-out windows of 64 tokens per domain.

    Example:
        >>> evaluate([Path("runs/merge-inputs/base"), Path("runs/merged-smollm2")])  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders[0])
    held = {d: token_windows(tok, domain_texts(d)[1], 64)[:windows] for d in domains}
    print(f"{'model':<40}" + "".join(f"{d:>10}" for d in domains) + f"{'mean':>10}")
    for folder in folders:
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        ppl = [perplexity(lm, held[d]) for d in domains]
        row = "".join(f"{p:>10.2f}" for p in ppl)
        print(f"{folder!s:<40}{row}{sum(ppl) / len(ppl):>10.2f}", flush=True)
        del lm


def main(argv: list[str] | None = None) -> int:
    """Command line: make the merge inputs, or ``--eval`` folders.

    Example:
        >>> main(["--steps", "2", "--out", "/tmp/merge-inputs"])  # doctest: +SKIP
        0
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/merge-inputs"), help="output root")
    # 8 steps × 4 × 64 tokens at lr 1e-4: each fine-tune's held-out perplexity on its own domain drops by
    # 20-55% (see --eval) with a few steps only
    p.add_argument("--steps", type=int, default=8, help="AdamW steps per fine-tune")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default="200MB", help="input shard size (538 MB fp32 -> 3 shards)")
    p.add_argument("--train", metavar="REGEX", help="train only parameters whose name matches (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--eval", nargs="*", type=Path, metavar="FOLDER", help="report perplexities instead")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval is not None:
        inputs = [args.out / "base", *(args.out / d for d in DOMAINS)]
        evaluate([f for f in inputs if f.is_dir()] + list(args.eval))
        return 0
    make_inputs(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        train=args.train,
    )
    print(
        "\nnext:\n"
        "  shiftkit merge examples/merge_smollm2_ties.yaml runs/merged-smollm2 --dry-run\n"
        "  shiftkit merge examples/merge_smollm2_ties.yaml runs/merged-smollm2 --max-shard-size 100MB\n"
        f"  python {sys.argv[0]} --eval runs/merged-smollm2\n"
        "  shiftkit merge examples/merge_smollm2_ties.yaml runs/smollm2-ties-delta.safetensors\n"
        "  shiftkit inspect runs/smollm2-ties-delta.safetensors"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
