"""shiftkit.data: distribution-shift generators (image corruptions, streams) and image layouts."""

from shiftkit.data.corruptions import CORRUPTIONS, corrupt, corrupted_domains
from shiftkit.data.images import grey28_to_rgb32
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
    "corrupted_domains",
    "episodic",
    "gradual",
    "grey28_to_rgb32",
    "make_stream",
    "mixed",
]
