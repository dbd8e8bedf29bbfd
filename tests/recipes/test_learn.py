"""The training loop, its schedule and batching, and the ``shiftkit learn`` YAML config."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from shiftkit.recipes.learn import (
    EncodedTexts,
    TrainConfig,
    TrainHooks,
    accuracy,
    cosine_schedule,
    encode_texts,
    eval_batches,
    param_groups,
    text_batches,
    train,
)
from shiftkit.recipes.learn_run import build_model, load_run_config, method_config, parse_run_config
from shiftkit.recipes.models import TextClassifier, mean_pool

ROOT = Path(__file__).resolve().parents[2]


# --- a tiny text classifier and a separable toy task ------------------------------------------------
class TinyEncoder(nn.Module):
    """Embedding → Linear → tanh → LayerNorm; token states ``(batch, seq, 16)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(40, 16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.norm(torch.tanh(self.proj(self.embeddings(input_ids))))


class CharTokenizer:
    """Characters → ids 1..39 (0 is padding), truncated; the interface ``encode_texts`` needs."""

    pad_token_id = 0

    def __call__(self, texts: list[str], truncation: bool = True, max_length: int = 64) -> dict:
        return {"input_ids": [[1 + ord(c) % 39 for c in t][:max_length] or [1] for t in texts]}


def tiny_factory() -> tuple[nn.Module, CharTokenizer]:
    """A ``module:function`` model factory, as a user would write one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = TinyEncoder()
    return TextClassifier(encoder, num_labels=2, hidden_size=16, seed=0), CharTokenizer()


def toy_data(n: int = 64, seed: int = 0) -> EncodedTexts:
    """Class 1 uses tokens 2..9, class 0 tokens 20..27; lengths 3..8: linearly separable after pooling."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for i in range(n):
        y = i % 2
        length = int(torch.randint(3, 9, (1,), generator=g))
        lo = 2 if y else 20
        ids.append(torch.randint(lo, lo + 8, (length,), generator=g).tolist())
        labels.append(y)
    return EncodedTexts(ids, labels, pad_id=0)


def _params(model: nn.Module, method: str) -> list[nn.Parameter]:
    if method == "full":
        return list(model.parameters())
    if method == "probe":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
        return list(model.head.parameters())  # type: ignore[union-attr]
    sk.attach_(model, method_config(method, {"target_modules": ["proj"]}, head=True))
    return sk.shift_parameters(model)


# --- schedule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # warm-up starts from 0
        (5, 0.5),  # half-way through a 10-step warm-up
        (10, 1.0),  # peak
        (35, 0.5 * (1 + math.cos(math.pi * 0.25))),  # a quarter into the decay
        (60, 0.5),  # half-way: cos(pi/2) = 0
        (110, 0.0),  # the end
    ],
)
def test_cosine_schedule_known_steps(step: int, expected: float) -> None:
    assert cosine_schedule(step, total=110, warmup=10) == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow  # importing transformers takes seconds
def test_cosine_schedule_matches_transformers() -> None:
    optimization = pytest.importorskip("transformers.optimization")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = optimization.get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=50)
    for step in range(50):
        assert cosine_schedule(step, 50, 7) == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        opt.step()
        ref.step()


def test_cosine_schedule_without_warmup_starts_at_peak() -> None:
    assert cosine_schedule(0, total=10, warmup=0) == 1.0


# --- batching ---------------------------------------------------------------------------------------
def test_batches_pad_dynamically_and_eval_batches_keep_labels() -> None:
    data = EncodedTexts([[5, 6, 7], [8], [9, 10]], [1, 0, 1], pad_id=0)
    (batch,) = list(text_batches(data, batch_size=3, shuffle=False))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    ev = eval_batches(data, batch_size=2)  # sorted by length: [8], [9, 10] | [5, 6, 7]
    assert [b["input_ids"].shape[1] for b in ev] == [2, 3]
    assert sorted(torch.cat([b["labels"] for b in ev]).tolist()) == [0, 1, 1]


def test_encode_texts_truncates_and_reads_pad_id() -> None:
    data = encode_texts(CharTokenizer(), ["abcdef", ""], [1, 0], max_length=4)
    assert [len(x) for x in data.input_ids] == [4, 1]
    assert data.pad_id == 0 and data.labels == [1, 0]


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


# --- the loop ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["full", "probe", "lora", "ssf", "bitfit"])
def test_loss_decreases_on_separable_task(method: str) -> None:
    model, _ = tiny_factory()
    params = _params(model, method)
    data = toy_data()
    cfg = TrainConfig(epochs=8, lr=3e-2, batch_size=16, warmup_ratio=0.1, seed=0)
    res = train(model, params, text_batches(data, cfg.batch_size), None, cfg, progress=False)
    assert res.steps == 8 * 4
    first, last = sum(res.losses[:4]) / 4, sum(res.losses[-4:]) / 4
    assert last < 0.5 * first, (method, first, last)
    assert accuracy(model, eval_batches(data)) > 0.9
    assert not model.training  # left in eval mode


def test_no_weight_decay_on_vectors() -> None:
    """With zero gradients Adam's update is 0, so only decoupled weight decay moves a parameter:
    a matrix shrinks by prod(1 - lr_t * wd), a vector must not move at all."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 2)
            self.matrix = nn.Parameter(torch.ones(3, 3))
            self.vector = nn.Parameter(torch.ones(3))
            self.column = nn.Parameter(torch.ones(3, 1))  # a vector in PEFT's (IA)³ layout

        def forward(self, input: Tensor) -> Tensor:
            # the extra parameters get gradients that are exactly zero
            return self.head(input) + 0.0 * (self.matrix.sum() + self.vector.sum() + self.column.sum())

    model = Model()
    groups = param_groups(model.parameters(), 0.1)
    assert {id(p) for p in groups[0]["params"]} == {id(model.matrix), id(model.head.weight)}
    assert groups[1]["weight_decay"] == 0.0

    batches = [{"input": torch.randn(4, 2), "labels": torch.tensor([0, 1, 0, 1])}] * 5
    cfg = TrainConfig(epochs=2, lr=0.5, weight_decay=0.1, warmup_ratio=0.2, grad_clip=0.0)
    res = train(model, list(model.parameters()), batches, None, cfg, progress=False)
    total, warmup = res.steps, round(0.2 * res.steps)
    factor = math.prod(1 - 0.5 * cosine_schedule(s, total, warmup) * 0.1 for s in range(total))
    assert torch.equal(model.vector.detach(), torch.ones(3))
    assert torch.equal(model.column.detach(), torch.ones(3, 1))
    torch.testing.assert_close(model.matrix.detach(), torch.full((3, 3), factor))


def test_gradient_clipping_bounds_the_first_step() -> None:
    # clip_grad_norm_ rescales the gradients in place, so after the step they hold what AdamW saw
    model = nn.Linear(3, 2)
    seen: list[float] = []
    hook = model.weight.register_hook(lambda g: seen.append(float(g.norm())) or None)
    batches = [{"input": torch.full((2, 3), 1e3), "labels": torch.tensor([0, 1])}]
    train(model, list(model.parameters()), batches, None, TrainConfig(epochs=1, lr=1e-3), progress=False)
    hook.remove()
    assert seen and seen[0] > 1.0  # the raw gradient is large ...
    norm = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None))
    assert norm == pytest.approx(1.0, rel=1e-4)  # ... and was clipped to grad_clip = 1


def test_seed_determinism() -> None:
    """train() seeds what it draws (shuffling, dropout): the global RNG state before it is irrelevant."""
    torch.manual_seed(0)
    model, _ = tiny_factory()
    _params(model, "lora")  # LoRA's A is drawn here, once

    def run(seed: int, noise: int) -> tuple[list[float], Tensor]:
        m = copy.deepcopy(model)
        params = sk.shift_parameters(m)
        torch.manual_seed(noise)  # disturb the global RNG: train() must not depend on it
        cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=8, seed=seed)
        res = train(m, params, text_batches(toy_data(), cfg.batch_size), None, cfg, progress=False)
        return res.losses, torch.cat([p.detach().flatten() for p in params])

    a, b, c = run(0, noise=1), run(0, noise=2), run(1, noise=1)
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert a[0] != c[0]  # another seed shuffles differently


def test_periodic_evaluation() -> None:
    model, _ = tiny_factory()
    calls: list[bool] = []

    def eval_fn() -> dict[str, float]:
        calls.append(model.training)
        return {"accuracy": 0.5}

    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=8, eval_every=3)
    res = train(model, _params(model, "full"), text_batches(toy_data(), 8), eval_fn, cfg, progress=False)
    assert [s for s, _ in res.evals] == [3, 6, 8]  # every 3 steps, and once at the end
    assert calls == [False, False, False]  # evaluated in eval mode
    assert res.final_metrics == {"accuracy": 0.5}


def test_hooks_run_in_order_and_max_steps_stops_the_run() -> None:
    model = nn.Linear(3, 2)
    events: list[str] = []

    class Hooks(TrainHooks):
        def on_batch(self, inputs: Any) -> None:
            events.append(f"batch:{sorted(inputs)}")

        def extra_loss(self, logits: Tensor) -> Tensor:
            events.append("loss")
            return 1e3 * model.bias.square().sum()  # a term the step must see

        def after_backward(self) -> None:
            events.append(f"grad:{model.bias.grad is not None}")

        def after_step(self) -> None:
            events.append("step")

    batches = [{"input": torch.ones(2, 3), "labels": torch.tensor([0, 1])}] * 5
    with torch.no_grad():
        model.bias.fill_(1.0)
    cfg = TrainConfig(epochs=3, lr=1e-2, warmup_ratio=0.0, max_steps=4)
    res = train(model, list(model.parameters()), batches, None, cfg, progress=False, hooks=Hooks())
    assert res.steps == 4 and len(res.losses) == 4  # of 15
    assert events[:4] == ["batch:['input']", "loss", "grad:True", "step"] and len(events) == 16
    assert res.losses[0] > 2e3  # 1e3 · Σ bias² (2 entries of 1) is in the loss
    with pytest.raises(sk.ShiftkitError, match="max_steps"):
        TrainConfig(max_steps=-1)


def test_light_peft_example_config_is_valid() -> None:
    cfg = load_run_config(ROOT / "examples" / "learn_vader_light_peft.yaml")
    assert cfg.prune is not None and cfg.prune.estimate_steps == 16 and cfg.method == "lora"


def test_train_rejects_nothing_to_train() -> None:
    model, _ = tiny_factory()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(sk.ShiftkitError, match="no parameter requires grad"):
        train(model, model.parameters(), text_batches(toy_data(), 8), None, TrainConfig(), progress=False)


def test_train_config_validation_names_the_field() -> None:
    with pytest.raises(sk.ShiftkitError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)


# --- YAML config ------------------------------------------------------------------------------------
def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("model: minilm\nepochs: 3\n", "epochs"),
        ("data: {name: vader, domian: tweets}\n", "domian"),
        ("train: {epochs: 1, learning_rate: 0.1}\n", "learning_rate"),
        ("method: {name: lora, rank: 4}\n", "rank"),
        ("method: {name: full, r: 4}\n", "r"),
    ],
)
def test_unknown_yaml_keys_are_named(tmp_path: Path, text: str, name: str) -> None:
    with pytest.raises(sk.ShiftkitError, match=name):
        load_run_config(_write(tmp_path, text))


def test_yaml_config_parses(tmp_path: Path) -> None:
    cfg = load_run_config(
        _write(
            tmp_path,
            "model: minilm\n"
            "data: {domain: movies, n_train: 40, eval_domains: all}\n"
            "method: {name: lora, r: 4, target_modules: [query, value]}\n"
            "train: {epochs: 1, lr: 5e-4}\n"  # PyYAML reads 5e-4 as a string: accepted as a float
            "output: runs/x\n",
        )
    )
    assert cfg.data.domain == "movies" and cfg.data.eval_domains == ("tweets", "movies", "amazon", "nyt")
    assert cfg.train.lr == 5e-4 and cfg.train.epochs == 1
    lora = method_config(cfg.method, cfg.method_options, head=True)
    assert isinstance(lora, sk.LoRAConfig)
    assert lora.r == 4 and lora.target_modules == ("query", "value") and lora.modules_to_save == ("head",)


def test_yaml_type_errors_and_unknown_methods(tmp_path: Path) -> None:
    with pytest.raises(sk.ShiftkitError, match=r"train\.epochs"):
        load_run_config(_write(tmp_path, "train: {epochs: two}\n"))
    with pytest.raises(sk.UnknownMethodError, match="lroa"):
        parse_run_config({"method": {"name": "lroa"}})
    with pytest.raises(sk.ShiftkitError, match="not valid YAML"):
        load_run_config(_write(tmp_path, "model: [unclosed\n"))


def test_example_config_is_valid() -> None:
    cfg = load_run_config(ROOT / "examples" / "learn_vader_lora.yaml")
    assert cfg.model == "minilm" and cfg.method == "lora" and cfg.output


def test_module_function_model_loading() -> None:
    model, tok = build_model(f"{__name__}:tiny_factory")
    assert isinstance(model, TextClassifier) and isinstance(tok, CharTokenizer)
    batch = next(iter(text_batches(encode_texts(tok, ["hi", "there"], [0, 1], 8), 2, shuffle=False)))
    assert model(batch["input_ids"], batch["attention_mask"]).shape == (2, 2)
    with pytest.raises(sk.ShiftkitError, match="no_such_factory"):
        build_model(f"{__name__}:no_such_factory")
    with pytest.raises(sk.ShiftkitError, match="cannot load model factory"):
        build_model("shiftkit_no_such_module:f")
    with pytest.raises(sk.ShiftkitError, match="is not a zoo text encoder"):
        build_model("resnet50")


def test_text_classifier_head_is_seeded() -> None:
    enc_a, enc_b = TinyEncoder(), TinyEncoder()
    before = torch.random.get_rng_state()
    a = TextClassifier(enc_a, 2, hidden_size=16, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    b = TextClassifier(enc_b, 2, hidden_size=16, seed=3)
    assert torch.equal(a.head.weight, b.head.weight)
    with pytest.raises(sk.ShiftkitError, match="hidden size"):
        TextClassifier(TinyEncoder(), 2)
