"""Test configuration: offline hubs, two threads, and the `assets` policy."""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from types import ModuleType

import pytest
import torch

torch.set_num_threads(2)


def require_assets() -> bool:
    """True when a missing offline asset must fail the test instead of skipping it (CI)."""
    return os.environ.get("SHIFTKIT_REQUIRE_ASSETS", "") not in ("", "0", "false")


def need_asset(name: str) -> None:
    """Skip (locally) or fail (CI) the calling test when the zoo asset ``name`` is not installed."""
    from shiftkit import zoo

    if zoo.is_installed(name):
        return
    msg = f"offline asset {name!r} is not installed ({zoo.install_hint(name)})"
    if require_assets():
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def mergekit() -> ModuleType:
    """mergekit (the merging tests' oracle), submodules imported; an ImportError fails (a dev dependency)."""
    for name in (
        "mergekit.config",
        "mergekit.merge",
        "mergekit.options",
        "mergekit.sparsify",
        "mergekit.merge_methods.registry",
    ):
        importlib.import_module(name)
    import mergekit as mk

    return mk
