"""The core: the Shift value, configs, registries, target matching, the attach/fold machinery, file I/O."""

from __future__ import annotations

from shiftkit.core.attach import (
    attach_,
    attached_method,
    detach_,
    extract,
    fold_,
    named_shift_parameters,
    regularization_loss,
    shift_parameters,
)
from shiftkit.core.config import ShiftConfig, config_to_dict
from shiftkit.core.delta import apply_, base_tensors, task_vector, to_delta
from shiftkit.core.io import load, read_metadata, save
from shiftkit.core.registry import (
    METHODS,
    DenseDelta,
    MethodSpec,
    Registry,
    config_from_dict,
    get_method,
    list_methods,
    load_plugins,
    register_method,
)
from shiftkit.core.shift import DELTA, Shift
from shiftkit.core.wrapper import ShiftModule, ShiftWrapper, is_shift_module
from shiftkit.errors import (
    CorruptFileError,
    NotFoldableError,
    ShiftkitError,
    ShiftMismatchError,
    TargetNotFoundError,
    UnknownMethodError,
)

__all__ = [
    "DELTA",
    "METHODS",
    "CorruptFileError",
    "DenseDelta",
    "MethodSpec",
    "NotFoldableError",
    "Registry",
    "Shift",
    "ShiftConfig",
    "ShiftMismatchError",
    "ShiftModule",
    "ShiftWrapper",
    "ShiftkitError",
    "TargetNotFoundError",
    "UnknownMethodError",
    "apply_",
    "attach_",
    "attached_method",
    "base_tensors",
    "config_from_dict",
    "config_to_dict",
    "detach_",
    "extract",
    "fold_",
    "get_method",
    "is_shift_module",
    "list_methods",
    "load",
    "load_plugins",
    "named_shift_parameters",
    "read_metadata",
    "register_method",
    "regularization_loss",
    "save",
    "shift_parameters",
    "task_vector",
    "to_delta",
]
