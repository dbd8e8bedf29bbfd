"""The errors shiftkit raises on purpose.

Every error subclasses :class:`ShiftkitError`, so ``except sk.ShiftkitError`` catches anything shiftkit
raises deliberately, while bugs still surface as ordinary Python exceptions. Messages name the offending
modules, keys, shapes or files. This module is the lowest layer of the package: every other package may
import it and it imports nothing from shiftkit.
"""

from __future__ import annotations

__all__ = [
    "AssetNotFoundError",
    "CorruptFileError",
    "NotFoldableError",
    "ShiftMismatchError",
    "ShiftkitError",
    "TargetNotFoundError",
    "TiedWeightsError",
    "UnknownMethodError",
]


class ShiftkitError(Exception):
    """Base class of every error shiftkit raises on purpose."""


class NotFoldableError(ShiftkitError):
    """The attached shift cannot be baked into the base weights (e.g. a nonlinear adapter)."""


class ShiftMismatchError(ShiftkitError):
    """A shift does not fit a model or another shift: keys, shapes, dtypes or the base differ."""


class TiedWeightsError(ShiftkitError):
    """A write would change a tensor that several modules share (tied weights), not only the targeted one.

    The message names both modules; ``untie=True`` gives the targeted module its own tensor.
    """


class TargetNotFoundError(ShiftkitError):
    """A ``target_modules`` pattern matched no module of the model."""


class UnknownMethodError(ShiftkitError):
    """A method name is not in the registry it was looked up in."""


class CorruptFileError(ShiftkitError):
    """A file is truncated, corrupt, or not a shiftkit file."""


class AssetNotFoundError(ShiftkitError):
    """An offline model or dataset is not installed; the message names the command that installs it."""
