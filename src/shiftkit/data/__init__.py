"""shiftkit.data (see DESIGN.md section 2)."""

from shiftkit.data.corruptions import CORRUPTIONS, corrupt
from shiftkit.data.streams import (
    STREAM_KINDS,
    Domains,
    Stream,
    StreamBatch,
    continual,
    correlated,
    episodic,
    gradual,
    make_stream,
    mixed,
)

__all__ = [
    "CORRUPTIONS",
    "STREAM_KINDS",
    "Domains",
    "Stream",
    "StreamBatch",
    "continual",
    "correlated",
    "corrupt",
    "episodic",
    "gradual",
    "make_stream",
    "mixed",
]
