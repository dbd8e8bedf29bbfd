"""Fixtures shared by the merging tests."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def mergekit() -> ModuleType:
    """mergekit (the oracle), its submodules imported; an ImportError fails the tests (a dev dependency)."""
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
