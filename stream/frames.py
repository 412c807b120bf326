"""What a video source hands to the trusted zone: decoded frames and the source's counters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream.wire import Envelope, EnvelopeFields


# eq=False: equality would compare pixel arrays element-wise, which is neither cheap nor a bool.
@dataclass(frozen=True, eq=False)
class Frame(EnvelopeFields):
    """One decoded picture of one stream, in its :class:`~stream.wire.Envelope`.

    The envelope's ``sequence`` counts decoded frames of this stream from 0, across
    reconnects and file loops, and is never reused: a gap between two frames a consumer sees is
    frames it missed (dropped by the realtime policy). ``pts`` is the source's presentation time
    in seconds (None when the source gives none); it restarts when a live source reconnects,
    while ``capture_time`` (unix seconds at decode) always moves forward. ``pixels`` is HxWx3
    uint8 BGR, the layout OpenCV and the detectors expect; treat it as read-only, since
    consumers may share one frame.
    """

    envelope: Envelope
    pixels: npt.NDArray[np.uint8]

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass(frozen=True)
class StreamStats:
    """A snapshot of a source's counters.

    ``decoded``: frames decoded so far. ``dropped``: frames the realtime policy discarded because
    a newer one arrived before the consumer took them (always 0 for lossless), so frames
    delivered == decoded - dropped - frames still waiting. ``reconnects``: reconnection attempts
    scheduled after an outage or a failed connection of a live source, successful or not.
    """

    decoded: int = 0
    dropped: int = 0
    reconnects: int = 0
