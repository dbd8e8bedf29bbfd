"""The registry of language-model editing and diagnosis tools: one :class:`EditSpec` per name.

A tool is one file in this package with one decorator on its entry function::

    @register_method("surgery", kind="edit")
    def surgery(model, direction, *, k, alpha) -> Shift: ...

``kind="edit"`` tools return a shift (a reversible change of the model's parameters, applied with
``sk.apply_``); ``kind="diagnose"`` tools return scores about data or a model and change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from shiftkit.core.registry import Registry
from shiftkit.errors import ShiftkitError

__all__ = ["EDIT_METHODS", "KINDS", "EditSpec", "get_method", "list_methods", "register_method"]

KINDS = ("edit", "diagnose")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class EditSpec:
    """What the registry knows about an editing or diagnosis tool.

    Attributes:
        name: registry name, equal to the tool's file name (``"surgery"``).
        fn: the entry function.
        kind: ``"edit"`` (returns a shift) or ``"diagnose"`` (returns scores).
    """

    name: str
    fn: Callable[..., Any]
    kind: str


EDIT_METHODS: Registry[EditSpec] = Registry("edit tool", package="shiftkit.edit")


def register_method(name: str, *, kind: str) -> Callable[[F], F]:
    """Decorator registering an editing (``kind="edit"``) or diagnosis (``"diagnose"``) tool.

    Raises:
        ShiftkitError: an unknown ``kind``.

    Example:
        >>> @register_method("ches", kind="diagnose")
        ... def ches(model, tokenizer, prompts, chosen, rejected): ...
    """
    if kind not in KINDS:
        raise ShiftkitError(f"edit tool {name!r}: kind must be one of {KINDS}, got {kind!r}")

    def deco(fn: F) -> F:
        EDIT_METHODS.add(name, EditSpec(name, fn, kind))
        return fn

    return deco


def get_method(name: str) -> EditSpec:
    """The :class:`EditSpec` registered as ``name``."""
    return EDIT_METHODS.get(name)


def list_methods(kind: str | None = None) -> list[str]:
    """Names of the registered tools (of one ``kind``), sorted (``edit.list_methods()``)."""
    return [n for n, s in EDIT_METHODS.items() if kind is None or s.kind == kind]
