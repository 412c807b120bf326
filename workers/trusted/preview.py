"""A live MJPEG preview of the annotated streams, served inside the trusted zone.

``veil run`` with ``outputs.preview`` hands every annotated frame to :meth:`LivePreview.put`
(from the annotation thread); ``GET /v1/streams/{id}/preview`` on the edge's HTTP port answers
``multipart/x-mixed-replace`` JPEGs of the newest frame, at most ``max_fps`` a second, which
browsers and VLC play as a live video. A frame is encoded to JPEG only while somebody watches
its stream, and only the newest one is kept: nothing queues, whatever the viewers do. The
preview shows the raw pixels: it is served by the trusted zone's HTTP server, under its bind
rules (loopback by default), never sent outside.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

BOUNDARY = "veilframe"
CONTENT_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"


@dataclass(frozen=True)
class PreviewFrame:
    sequence: int
    jpeg: bytes


class LivePreview:
    """The newest annotated frame per stream, as JPEG, for whoever watches it."""

    def __init__(self, max_fps: float = 10.0, quality: int = 80, max_width: int = 1280) -> None:
        self.interval = 1.0 / max_fps
        self.quality, self.max_width = quality, max_width
        self._lock = threading.Lock()
        self._latest: dict[str, PreviewFrame] = {}
        self._viewers: dict[str, int] = {}
        self.closed = False

    def watched(self, stream_id: str) -> bool:
        return self._viewers.get(stream_id, 0) > 0

    def put(self, stream_id: str, sequence: int, pixels: npt.NDArray[np.uint8]) -> None:
        """Offer one annotated BGR frame; encoded only while ``stream_id`` has a viewer."""
        if not self.watched(stream_id):
            return
        height, width = pixels.shape[:2]
        if width > self.max_width:
            size = (self.max_width, round(height * self.max_width / width))
            pixels = np.asarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), np.uint8)
        ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if ok:
            with self._lock:
                self._latest[stream_id] = PreviewFrame(sequence, jpeg.tobytes())

    def close(self) -> None:
        """Every viewer's stream ends after its current part."""
        self.closed = True

    async def parts(self, stream_id: str) -> AsyncIterator[bytes]:
        """The multipart body for one viewer: a part per new frame, until :meth:`close`."""
        self._viewers[stream_id] = self._viewers.get(stream_id, 0) + 1
        last = -1
        try:
            while not self.closed:
                with self._lock:
                    frame = self._latest.get(stream_id)
                if frame is not None and frame.sequence != last:
                    last = frame.sequence
                    yield part(frame)
                await asyncio.sleep(self.interval)
        finally:
            self._viewers[stream_id] -= 1


def part(frame: PreviewFrame) -> bytes:
    head = (
        f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(frame.jpeg)}\r\n"
        f"X-Sequence: {frame.sequence}\r\n\r\n"
    )
    return head.encode() + frame.jpeg + b"\r\n"
