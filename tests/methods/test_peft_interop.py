"""PEFT adapter folders ↔ shiftkit shifts, checked against the real peft package in both directions."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import shiftkit as sk
from conftest import need_asset
from tiny_models import TinyCNN, make, make_tied_llama

peft = pytest.importorskip("peft")

Forward = Callable[[nn.Module], Tensor]


# --- helpers ------------------------------------------------------------------------------------------
def _hf(name: str) -> tuple[nn.Module, Tensor]:
    model, x = make_tied_llama() if name == "tiny_llama_tied" else make(name)
    return model.hf, x  # type: ignore[return-value]


def _seq_cls() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        config = BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            num_labels=3,
            attn_implementation="eager",
        )
        return BertForSequenceClassification(config).eval()


@torch.no_grad()
def _randomise(params: list[nn.Parameter]) -> None:
    gen = torch.Generator().manual_seed(3)
    for p in params:  # on top of the init, so PEFT's zero B and unit (IA)³ scales become non-trivial
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def _peft_adapter(base: nn.Module, config: Any, folder: Path) -> nn.Module:
    model = peft.get_peft_model(copy.deepcopy(base), config)
    _randomise([p for p in model.parameters() if p.requires_grad])
    model.eval().save_pretrained(str(folder))
    return model


def _first(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def _ids_forward(x: Tensor) -> Forward:
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    return lambda m: _first(m(input_ids=x, attention_mask=mask))


def _ours_from_peft(folder: Path, base: nn.Module, forward: Forward, **kw: Any) -> Tensor:
    fresh = copy.deepcopy(base)
    shift = sk.import_peft(folder, model=fresh, **kw)
    sk.attach_(fresh, shift)
    with torch.no_grad():
        return forward(fresh)


def _peft_from_ours(model: nn.Module, base: nn.Module, folder: Path, forward: Forward, **kw: Any) -> Tensor:
    sk.export_peft(model, folder, **kw)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return forward(loaded)


def _close(a: Tensor, b: Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


IA3_TARGETS = ["k_proj", "v_proj", "up_proj", "down_proj"]

# (name, tiny model, PEFT config, the equivalent shiftkit config, PEFT task type)
CASES: list[tuple[str, str, Callable[[], Any], Callable[[], sk.ShiftConfig], str | None]] = [
    (
        "lora-llama",
        "tiny_llama",
        lambda: peft.LoraConfig(
            r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]
        ),
        lambda: sk.LoRAConfig(
            r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]
        ),
        None,
    ),
    (
        "rslora-bert",
        "tiny_bert",
        lambda: peft.LoraConfig(
            r=4, lora_alpha=3, use_rslora=True, target_modules=["query", "value", "word_embeddings"]
        ),
        lambda: sk.LoRAConfig(
            r=4, lora_alpha=3, use_rslora=True, target_modules=["query", "value", "word_embeddings"]
        ),
        None,
    ),
    (
        # tied embeddings (SmolLM2's layout): PEFT's unmerged forward is what the shift computes
        "lora-llama-tied",
        "tiny_llama_tied",
        lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens", "lm_head"]),
        lambda: sk.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens", "lm_head"]),
        None,
    ),
    (
        "lora-llama-regex",
        "tiny_llama",
        lambda: peft.LoraConfig(r=2, target_modules=r".*\.(q|v)_proj"),
        lambda: sk.LoRAConfig(r=2, target_modules=r".*\.(q|v)_proj"),
        None,
    ),
    (
        "lora-bert-all-linear-gaussian",
        "tiny_bert",
        lambda: peft.LoraConfig(
            r=3, target_modules="all-linear", init_lora_weights="gaussian", lora_dropout=0.1
        ),
        lambda: sk.LoRAConfig(
            r=3, target_modules="all-linear", init_lora_weights="gaussian", lora_dropout=0.1
        ),
        None,
    ),
    (
        # per-module ranks and alphas (PEFT's keys are name-suffix regular expressions, first match wins)
        "lora-llama-rank-pattern",
        "tiny_llama",
        lambda: peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 1, "v_proj": 2},
            alpha_pattern={"up_proj": 3},
        ),
        lambda: sk.LoRAConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 1, "v_proj": 2},
            alpha_pattern={"up_proj": 3},
        ),
        None,
    ),
    ("ia3-llama", "tiny_llama", lambda: peft.IA3Config(), lambda: sk.IA3Config(), None),
    (
        "ia3-llama-feedforward",
        "tiny_llama",
        lambda: peft.IA3Config(
            target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
            feedforward_modules=["up_proj", "down_proj"],
        ),
        lambda: sk.IA3Config(
            target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
            feedforward_modules=["up_proj", "down_proj"],
        ),
        None,
    ),
    ("ia3-bert", "tiny_bert", lambda: peft.IA3Config(), lambda: sk.IA3Config(), None),
    (
        "prompt-llama",
        "tiny_llama",
        lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        lambda: sk.PromptTuningConfig(num_virtual_tokens=3),
        "CAUSAL_LM",
    ),
    (
        "prompt-bert",
        "tiny_bert",
        lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="FEATURE_EXTRACTION"),
        lambda: sk.PromptTuningConfig(num_virtual_tokens=3),
        "FEATURE_EXTRACTION",
    ),
]
IDS = [c[0] for c in CASES]


# --- both directions on tiny transformers --------------------------------------------------------------
@pytest.mark.parametrize(("name", "model", "peft_config", "ours", "task"), CASES, ids=IDS)
def test_peft_adapter_imports_exactly(
    name: str, model: str, peft_config: Callable[[], Any], ours: Any, task: str | None, tmp_path: Path
) -> None:
    base, x = _hf(model)
    forward = _ids_forward(x)
    reference = _peft_adapter(base, peft_config(), tmp_path)
    with torch.no_grad():
        expected = forward(reference)
    _close(_ours_from_peft(tmp_path, base, forward), expected)
    plain = forward(base)
    assert plain.shape != expected.shape or not torch.allclose(expected, plain, atol=1e-3)  # not a no-op


@pytest.mark.parametrize(("name", "model", "peft_config", "ours", "task"), CASES, ids=IDS)
def test_shiftkit_shift_exports_exactly(
    name: str,
    model: str,
    peft_config: Callable[[], Any],
    ours: Callable[[], Any],
    task: str | None,
    tmp_path: Path,
) -> None:
    base, x = _hf(model)
    forward = _ids_forward(x)
    shifted = copy.deepcopy(base)
    sk.attach_(shifted, ours())
    _randomise(sk.shift_parameters(shifted))
    with torch.no_grad():
        expected = forward(shifted)
    _close(_peft_from_ours(shifted, base, tmp_path / "out", forward, task_type=task), expected)
    # the same tensor names as PEFT itself writes for this adapter (PEFT adds embedding tables beside them)
    _peft_adapter(base, peft_config(), tmp_path / "theirs")
    theirs = {
        k for k in load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")) if "base_layer" not in k
    }
    assert set(load_file(str(tmp_path / "out" / "adapter_model.safetensors"))) == theirs


def test_shift_round_trip_through_peft_files(tmp_path: Path) -> None:
    base, _ = _hf("tiny_llama")
    sk.attach_(base, sk.LoRAConfig(r=3, lora_alpha=6, target_modules=["q_proj", "embed_tokens"]))
    _randomise(sk.shift_parameters(base))
    shift = sk.extract(base)
    sk.export_peft(shift, tmp_path / "a", model=base)
    back = sk.import_peft(tmp_path / "a")  # LoRA needs no model: shapes come from the tensors
    assert back.base == shift.base and set(back.tensors) == set(shift.tensors)
    assert all(torch.equal(back.tensors[k], t) for k, t in shift.tensors.items())
    assert (back.config.r, back.config.lora_alpha) == (3, 6.0)  # type: ignore[union-attr]
    written = peft.PeftConfig.from_pretrained(str(tmp_path / "a"))
    assert (written.peft_type, written.r, written.lora_alpha) == ("LORA", 3, 6)


# --- modules_to_save, convolutions, prefix ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_sequence_classifier_with_a_trained_head(kind: str, tmp_path: Path) -> None:
    base = _seq_cls()
    x = torch.randint(0, 50, (2, 5))
    forward = _ids_forward(x)
    if kind == "lora":
        config = peft.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"])
    else:
        config = peft.PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS")
    reference = _peft_adapter(base, config, tmp_path / "p")
    with torch.no_grad():
        expected = forward(reference)
    fresh = copy.deepcopy(base)
    shift = sk.import_peft(tmp_path / "p", model=fresh)
    assert shift.config is not None and shift.config.modules_to_save == ("classifier",)
    sk.attach_(fresh, shift)
    with torch.no_grad():
        _close(forward(fresh), expected)
    _close(_peft_from_ours(fresh, base, tmp_path / "o", forward, task_type="SEQ_CLS"), expected)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_convolutions(kind: str, tmp_path: Path) -> None:
    base, x = make("cnn")
    assert isinstance(base, TinyCNN)
    forward: Forward = lambda m: m(x)  # noqa: E731
    targets = ["conv1", "conv2", "head"]
    if kind == "lora":
        config: Any = peft.LoraConfig(r=2, target_modules=targets)
        ours: sk.ShiftConfig = sk.LoRAConfig(r=2, target_modules=targets)
    else:  # conv2 scales its input channels (4 in, 5 out), the others their outputs
        config = peft.IA3Config(target_modules=targets, feedforward_modules=["conv2"])
        ours = sk.IA3Config(target_modules=targets, feedforward_modules=["conv2"])
    reference = _peft_adapter(base, config, tmp_path / "p")
    with torch.no_grad():
        expected = forward(reference)
    _close(_ours_from_peft(tmp_path / "p", base, forward), expected)
    shifted = copy.deepcopy(base)
    sk.attach_(shifted, ours)
    _randomise(sk.shift_parameters(shifted))
    with torch.no_grad():
        expected = forward(shifted)
    _close(_peft_from_ours(shifted, base, tmp_path / "o", forward), expected)


def test_tied_embeddings_with_peft_weight_tying(tmp_path: Path) -> None:
    """PEFT's ``ensure_weight_tying`` ties the head's LoRA to the embedding's; the file holds both: exact."""
    base, x = _hf("tiny_llama_tied")
    forward = _ids_forward(x)
    config = peft.LoraConfig(r=2, target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True)
    reference = _peft_adapter(base, config, tmp_path / "p")
    with torch.no_grad():
        expected = forward(reference)
    _close(_ours_from_peft(tmp_path / "p", base, forward), expected)
    # the two LoRAs give the shared tensor one ΔW, so shiftkit folds it once and keeps the tie; PEFT's
    # own merge adds both into the shared tensor (twice)
    fresh = copy.deepcopy(base)
    sk.attach_(fresh, sk.import_peft(tmp_path / "p", model=fresh))
    sk.fold_(fresh)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    with torch.no_grad():
        _close(forward(fresh), expected)
        merged = forward(reference.merge_and_unload())
    assert float((merged - expected).abs().max()) > 1.0  # PEFT's merged model is not its adapter


def _conv_model(conv: nn.Conv2d) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return nn.Sequential(conv, nn.ReLU(), nn.Flatten()).eval()


def test_dilated_convolution_warns_and_matches_peft_merged_weights(tmp_path: Path) -> None:
    base = _conv_model(nn.Conv2d(3, 4, 3, padding=2, dilation=2))
    x = torch.randn(2, 3, 7, 7)
    reference = _peft_adapter(base, peft.LoraConfig(r=2, target_modules=["0"]), tmp_path / "p")
    with pytest.raises(RuntimeError):  # PEFT's unmerged branch runs lora_A without the dilation
        reference(x)
    fresh = copy.deepcopy(base)
    with pytest.warns(
        UserWarning, match=r"dilated \(dilation=\(2, 2\)\).*PEFT's unmerged LoRA branch ignores"
    ):
        shift = sk.import_peft(tmp_path / "p", model=fresh)
    sk.attach_(fresh, shift)
    with torch.no_grad():
        ours = fresh(x)
        merged = reference.merge_and_unload()(x)  # PEFT's merged weights apply the dilation: equal
    _close(ours, merged)
    with pytest.warns(UserWarning, match="dilated"):
        sk.export_peft(fresh, tmp_path / "back")
    # a 1×1 kernel is not affected by dilation: no warning
    one = _conv_model(nn.Conv2d(3, 4, 1, dilation=2))
    _peft_adapter(one, peft.LoraConfig(r=2, target_modules=["0"]), tmp_path / "one")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.import_peft(tmp_path / "one", model=copy.deepcopy(one))


def test_grouped_convolution_is_refused_for_its_real_reason(tmp_path: Path) -> None:
    base = _conv_model(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    with pytest.warns(UserWarning, match="groups > 1"):  # PEFT itself warns that it cannot merge it
        _peft_adapter(base, peft.LoraConfig(r=8, target_modules=["0"]), tmp_path / "p")
    for model in (copy.deepcopy(base), None):  # with the model, and from the tensors alone
        with pytest.raises(sk.ShiftkitError, match=r"grouped Conv2d \(groups=2\)") as err:
            sk.import_peft(tmp_path / "p", model=model)
        assert "rank" not in str(err.value)
    with pytest.raises(sk.ShiftkitError, match="groups=1"):  # attaching directly says the same
        sk.attach_(copy.deepcopy(base), sk.LoRAConfig(r=8, target_modules=["0"]))


def test_prefix_maps_a_classifier_encoder_to_the_plain_peft_model(tmp_path: Path) -> None:
    from shiftkit.recipes.models import TextClassifier

    encoder, x = _hf("tiny_bert")
    plain = copy.deepcopy(encoder)
    clf = TextClassifier(encoder, num_labels=2, seed=0).eval()
    sk.attach_(clf, sk.LoRAConfig(r=2, target_modules=["query", "value"]))
    _randomise(sk.shift_parameters(clf))
    forward = _ids_forward(x)
    with torch.no_grad():
        expected = forward(clf.encoder)
    _close(_peft_from_ours(clf, plain, tmp_path / "a", forward, prefix="encoder"), expected)
    fresh = TextClassifier(copy.deepcopy(plain), num_labels=2, seed=0).eval()
    sk.attach_(fresh, sk.import_peft(tmp_path / "a", model=fresh, prefix="encoder"))
    with torch.no_grad():
        _close(forward(fresh.encoder), expected)
    sk.detach_(clf)
    sk.attach_(clf, sk.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["head"]))
    with pytest.raises(sk.ShiftkitError, match="prefix"):  # the head is not part of the PEFT base model
        sk.export_peft(clf, tmp_path / "b", prefix="encoder")


# --- files ---------------------------------------------------------------------------------------------
def _lora_folder(tmp_path: Path) -> Path:
    base, _ = _hf("tiny_llama")
    sk.attach_(base, sk.LoRAConfig(r=2, target_modules=["q_proj"]))
    sk.export_peft(base, tmp_path / "a")
    return tmp_path / "a"


def test_new_folders_appear_whole_and_existing_ones_keep_other_files(tmp_path: Path) -> None:
    folder = _lora_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left behind
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (folder / "README.md").write_text("notes")
    base, _ = _hf("tiny_llama")
    sk.attach_(base, sk.LoRAConfig(r=4, target_modules=["v_proj"]))
    sk.export_peft(base, folder)
    assert (folder / "README.md").read_text() == "notes"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    assert all(".v_proj." in k for k in load_file(str(folder / "adapter_model.safetensors")))


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"peft_type": "LOHA"}, "LOHA"),
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"rank_pattern": {"q_proj": 4}}, "config says r=4"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
)
def test_unsupported_options_are_named(changes: dict[str, Any], option: str, tmp_path: Path) -> None:
    folder = _lora_folder(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(sk.ShiftkitError, match=option):
        sk.import_peft(folder)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(sk.ShiftkitError, match="no such folder"):
        sk.import_peft(tmp_path / "nope")
    folder = _lora_folder(tmp_path)
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(sk.CorruptFileError, match="safetensors"):
        sk.import_peft(folder)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(sk.CorruptFileError):
        sk.import_peft(folder)
    weights.unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(sk.ShiftkitError, match="never unpickles"):
        sk.import_peft(folder)
    weights.write_bytes(good)
    config.write_text("{not json")
    with pytest.raises(sk.CorruptFileError, match="JSON"):
        sk.import_peft(folder)
    config.unlink()
    with pytest.raises(sk.ShiftkitError, match=r"adapter_config\.json"):
        sk.import_peft(folder)


def test_foreign_keys_and_several_adapters(tmp_path: Path) -> None:
    folder = _lora_folder(tmp_path)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({**tensors, "base_model.model.model.norm.weight": torch.ones(16)}, str(path))
    with pytest.raises(sk.CorruptFileError, match=r"model\.norm\.weight"):
        sk.import_peft(folder)
    named = {k.replace(".weight", ".one.weight"): v for k, v in tensors.items()}
    named.update({k.replace(".weight", ".two.weight"): v.clone() for k, v in tensors.items()})
    save_file(named, str(path))
    with pytest.raises(sk.ShiftkitError, match="several adapters"):
        sk.import_peft(folder)
    save_file({k.replace(".weight", ".one.weight"): v for k, v in tensors.items()}, str(path))
    assert len(sk.import_peft(folder).tensors) == len(tensors)  # one named adapter is fine


def test_what_the_files_cannot_tell_needs_the_model(tmp_path: Path) -> None:
    base, _ = _hf("tiny_bert")
    _peft_adapter(base, peft.IA3Config(), tmp_path / "ia3")
    with pytest.raises(sk.ShiftkitError, match="model="):
        sk.import_peft(tmp_path / "ia3")
    _peft_adapter(
        base, peft.PromptTuningConfig(num_virtual_tokens=2, task_type="FEATURE_EXTRACTION"), tmp_path / "p"
    )
    with pytest.raises(sk.ShiftkitError, match="model="):
        sk.import_peft(tmp_path / "p")
    llama, _ = _hf("tiny_llama")
    with pytest.raises(sk.ShiftMismatchError, match="does not have"):
        sk.import_peft(tmp_path / "ia3", model=llama)


def test_embedding_tables_saved_by_peft_must_be_the_models(tmp_path: Path) -> None:
    base, _ = _hf("tiny_llama")
    with pytest.warns(UserWarning):
        _peft_adapter(base, peft.LoraConfig(r=2, target_modules=["embed_tokens"]), tmp_path)
    with pytest.warns(UserWarning, match="base weights"):
        sk.import_peft(tmp_path)  # without a model the table cannot be checked
    sk.import_peft(tmp_path, model=base)  # the same table: accepted silently
    other, _ = _hf("tiny_llama")
    with torch.no_grad():
        other.get_input_embeddings().weight.add_(1.0)
    with pytest.raises(sk.ShiftMismatchError, match="base weights"):
        sk.import_peft(tmp_path, model=other)


def test_export_refusals(tmp_path: Path) -> None:
    base, _ = _hf("tiny_llama")
    sk.attach_(base, sk.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(sk.ShiftkitError, match="task_type"):
        sk.export_peft(base, tmp_path / "a")
    with pytest.raises(sk.ShiftkitError, match="task_type"):
        sk.export_peft(base, tmp_path / "a", task_type="CLASSIFY")
    sk.detach_(base)
    sk.attach_(base, sk.SSFConfig())
    with pytest.raises(sk.ShiftkitError, match="ssf"):
        sk.export_peft(base, tmp_path / "a")
    assert not (tmp_path / "a").exists()


# --- real models ----------------------------------------------------------------------------------------
REAL = [
    ("minilm", lambda: peft.LoraConfig(r=4, target_modules=["query", "value"]), "FEATURE_EXTRACTION"),
    ("minilm", lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="FEATURE_EXTRACTION"), None),
    ("smollm2-135m", lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "CAUSAL_LM"),
    ("smollm2-135m", lambda: peft.IA3Config(), None),
    ("smollm2-135m", lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), None),
]


@pytest.fixture(scope="module")
def real() -> Iterator[Callable[[str], tuple[nn.Module, dict[str, Tensor]]]]:
    loaded: dict[str, tuple[nn.Module, dict[str, Tensor]]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two short sentences: one thread is many times faster on a busy 2-core machine

    def get(asset: str) -> tuple[nn.Module, dict[str, Tensor]]:
        need_asset(asset)
        if asset not in loaded:
            from shiftkit import zoo

            model, tok = zoo.load_model(asset)
            batch = dict(tok(["A short test.", "Hi"], padding=True, return_tensors="pt"))
            batch.pop("token_type_ids", None)
            loaded[asset] = model.eval(), batch
        return loaded[asset]

    yield get
    torch.set_num_threads(threads)


def _unwrap(peft_model: Any) -> nn.Module:
    # LoRA and (IA)³ layers live inside the base model: unload() puts the original layers back
    return (
        peft_model.get_base_model()
        if peft_model.peft_config["default"].is_prompt_learning
        else peft_model.unload()
    )


@pytest.mark.assets
@pytest.mark.parametrize(
    ("asset", "config", "task"), REAL, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(REAL)]
)
def test_real_models_both_directions(
    real: Callable[[str], tuple[nn.Module, dict[str, Tensor]]],
    asset: str,
    config: Callable[[], Any],
    task: str | None,
    tmp_path: Path,
) -> None:
    # one model object in turn carries PEFT's adapter, ours, then PEFT's again (deep copies take seconds)
    base, batch = real(asset)
    forward: Forward = lambda m: _first(m(**batch))  # noqa: E731
    pconfig = config()
    task = task or pconfig.task_type
    reference = peft.get_peft_model(base, pconfig)
    _randomise([p for p in reference.parameters() if p.requires_grad])
    reference.eval().save_pretrained(str(tmp_path / "p"))
    with torch.no_grad():
        expected = forward(reference)
    assert _unwrap(reference) is base
    sk.attach_(base, sk.import_peft(tmp_path / "p", model=base))
    try:
        with torch.no_grad():
            _close(forward(base), expected)
        sk.export_peft(base, tmp_path / "o", task_type=task)
    finally:
        sk.detach_(base)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "o")).eval()
    try:
        with torch.no_grad():
            _close(forward(loaded), expected)
    finally:
        _unwrap(loaded)
