"""``rows``: store a delta that changes few rows as those rows only, and a rank-1 row edit (every changed
row a multiple of one vector, as Model Surgery writes) as row indices, one coefficient per row and the vector.

Lossless with the default ``atol=0``; ``atol > 0`` also drops rows whose every entry is at most that large.
The format is :mod:`shiftkit.core.rows`.

Example:
    >>> small = sk.compress(edit_delta, method="rows")
    >>> small.nbytes / edit_delta.nbytes
    0.0004...
"""

from __future__ import annotations

from shiftkit.compression.registry import register_method
from shiftkit.core.rows import ROWS, decode_rows, decode_rows_tensor, encode_rows
from shiftkit.core.shift import Shift

__all__ = ["rows"]


@register_method(ROWS, decompress=decode_rows, decompress_tensor=decode_rows_tensor, lossless={"atol": 0.0})
def rows(shift: Shift, *, atol: float = 0.0) -> Shift:
    """Encode a dense delta keeping only its changed rows (see the module docstring).

    Args:
        shift: a dense delta.
        atol: rows whose every entry has magnitude ``<= atol`` count as unchanged (0: only zero rows).

    Raises:
        ShiftkitError: ``shift`` is not a dense delta, or ``atol < 0``.
    """
    return encode_rows(shift, atol=atol)
