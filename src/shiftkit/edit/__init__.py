"""shiftkit.edit: change one behaviour of a language model with a tiny, reversible shift (Model Surgery), and
predict which preference pairs would shift it the wrong way (CHES); one file per tool, each registered by
one decorator (:mod:`~shiftkit.edit.registry`). Importing this package registers the built-in tools (none
yet: the editing issue adds them)."""

from __future__ import annotations

from shiftkit.edit.registry import EDIT_METHODS, EditSpec, get_method, list_methods, register_method

__all__ = ["EDIT_METHODS", "EditSpec", "get_method", "list_methods", "register_method"]
