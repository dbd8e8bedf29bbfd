"""Light-PEFT on MiniLM / VADER tweets: LoRA on the whole model against Light-PEFT's estimate → prune → train.

Both rows train the paper's LoRA (r=8, α=16 on query, key, value, attention-output dense and intermediate
dense, the new head in ``modules_to_save``) with the ``peft-vader`` LoRA plan's optimiser settings (lr 2e-3,
batch 16, 2 epochs over 512 tweets, seed 0):

* ``lora``: the plain run;
* ``light-peft``: an estimation run of ``--estimate`` steps with Light-PEFT's masks and importance scores
  (:func:`shiftkit.recipes.light_peft.light_peft`), then the pruned model (heads ρ=1/3 per layer, FFN
  neurons ρ=1/3 global, LoRA modules ρ=0.75, ranks ρ=0.5 — the paper's script values unless given)
  trained for the same epochs from the pruned stage-1 LoRA.

Reported: accuracy on the 400 test sentences of each VADER domain, base and trainable parameters, the
training seconds (estimation separately), and the inference seconds over every test set after folding the
LoRA (the pruned base is the smaller, faster model). Both rows run in one process, one after the other.

Run: ``.venv/bin/python benchmarks/light_peft_vader.py`` (~3 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import _common as C


def _row(name: str, model: Any, data: Any, seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    import shiftkit as sk
    from shiftkit.recipes.learn import logits_accuracy, predict

    trainable = sum(p.numel() for p in sk.shift_parameters(model))
    sk.fold_(model)
    t = time.perf_counter()
    acc = {dom: round(logits_accuracy(*predict(model, b)), 4) for dom, b in data.tests.items()}
    infer = time.perf_counter() - t
    return {
        "method": name,
        "accuracy": acc,
        "mean_accuracy": round(sum(acc.values()) / len(acc), 4),
        "base_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": trainable,
        "train_seconds": round(seconds, 2),
        "infer_seconds": round(infer, 2),
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimate", type=int, default=16, help="estimation steps (of 64 training steps)")
    ap.add_argument("--module-ratio", type=float, default=0.75)
    ap.add_argument("--rank-ratio", type=float, default=0.5)
    ap.add_argument("--head-ratio", type=float, default=1 / 3)
    ap.add_argument("--ffn-ratio", type=float, default=1 / 3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=C.RESULTS / "light_peft_vader.json")
    args = ap.parse_args()
    C.setup_worker()
    import torch

    import shiftkit as sk
    from shiftkit.recipes.learn import text_batches, train
    from shiftkit.recipes.light_peft import LightPEFTSettings, light_peft
    from shiftkit.recipes.vader_classify import VaderSettings, load_vader, method_plan

    settings = VaderSettings(seed=args.seed)
    data = load_vader(settings)
    tc = method_plan("lora", settings).train
    lora = sk.LoRAConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "key", "value", "attention.output.dense", "intermediate.dense"],
        modules_to_save=("head",),
    )
    rows = []

    model = data.model
    torch.manual_seed(tc.seed)
    sk.attach_(model, lora)
    batches = text_batches(data.train, tc.batch_size)
    res = train(model, sk.shift_parameters(model), batches, None, tc, desc="lora")
    rows.append(_row("lora", model, data, res.seconds, {"steps": res.steps}))

    model.load_state_dict(data.base_state)
    torch.manual_seed(tc.seed)
    lp = LightPEFTSettings(
        estimate_steps=args.estimate,
        module_ratio=args.module_ratio,
        rank_ratio=args.rank_ratio,
        head_ratio=args.head_ratio,
        ffn_ratio=args.ffn_ratio,
    )
    t = time.perf_counter()
    found = light_peft(model, lora, batches, lp, tc)
    estimate_s = time.perf_counter() - t
    res = train(model, sk.shift_parameters(model), batches, None, tc, desc="light-peft")
    rows.append(
        _row(
            "light-peft",
            model,
            data,
            res.seconds,
            {
                "steps": res.steps,
                "estimate_steps": args.estimate,
                "estimate_seconds": round(estimate_s, 2),
                "heads_removed": sum(len(v) for v in found.heads.values()),
                "neurons_removed": sum(len(v) for v in found.neurons.values()),
                "modules_removed": len(found.modules),
                "lora_params": list(found.shift_params),
            },
        )
    )
    report = {"settings": vars(args) | {"out": str(args.out)}, "rows": rows, "env": C.environment()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| method | tweets | mean of 4 domains | base params | trainable | train s | inference s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f" (+{r['estimate_seconds']} estimate)" if "estimate_seconds" in r else ""
        print(
            f"| {r['method']} | {r['accuracy']['tweets']:.3f} | {r['mean_accuracy']:.3f} | "
            f"{r['base_params'] / 1e6:.1f}M | {r['trainable_params'] / 1e3:.0f}K | "
            f"{r['train_seconds']}{extra} | {r['infer_seconds']} |"
        )


if __name__ == "__main__":
    main()
