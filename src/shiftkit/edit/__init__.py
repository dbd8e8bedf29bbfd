"""shiftkit.edit: change one behaviour of a language model with a tiny, reversible shift (Model Surgery), and
predict which preference pairs would shift it the wrong way (CHES); one file per tool, each registered by
one decorator (:mod:`~shiftkit.edit.registry`). Importing this package registers the built-in tools.

Example:
    >>> from shiftkit import edit
    >>> probe = edit.train_probe(model, tok, texts, labels)            # label 1: the behaviour to remove
    >>> shift = edit.surgery(model, probe.direction, k=0.02)           # a small delta; model untouched
    >>> with edit.apply_(model, shift):                                # undone bit for bit after the block
    ...     ...
    >>> scores = edit.ches(model, tok, prompts, chosen, rejected)      # LN-CHES per preference pair
    >>> keep = edit.select_pairs(scores, m=64)                         # the least alike pairs
"""

from __future__ import annotations

from shiftkit.edit.ches import (
    ches,
    ches_from_hidden,
    edit_distance_similarity,
    last_state_similarity,
    response_sums,
    select_pairs,
)
from shiftkit.edit.probe import Probe, hidden_features, train_probe
from shiftkit.edit.registry import EDIT_METHODS, EditSpec, get_method, list_methods, register_method
from shiftkit.edit.surgery import AppliedEdit, apply_, gate_cosines, surgery

__all__ = [
    "EDIT_METHODS",
    "AppliedEdit",
    "EditSpec",
    "Probe",
    "apply_",
    "ches",
    "ches_from_hidden",
    "edit_distance_similarity",
    "gate_cosines",
    "get_method",
    "hidden_features",
    "last_state_similarity",
    "list_methods",
    "register_method",
    "response_sums",
    "select_pairs",
    "surgery",
    "train_probe",
]
