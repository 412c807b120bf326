"""Annotated MP4 per stream: drawn inside the trusted zone, the only place pixels exist.

The edge worker hands each frame it publishes to :meth:`AnnotatedWriter.keep`; when that
frame's detections come back from the outside, :meth:`AnnotatedWriter.on_detection` draws the
boxes on it and appends it to the stream's video. Frames wait in a bounded buffer per stream,
so a lost detection costs memory for at most ``max_pending`` frames.
"""

from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from stream.frames import Frame
from stream.wire import DetectionMessage


def draw(pixels: np.ndarray, msg: DetectionMessage) -> np.ndarray:  # type: ignore[type-arg]
    out = pixels.copy()
    for (x1, y1, x2, y2), score in zip(
        msg.detections.xyxy.tolist(), msg.detections.confidence.tolist(), strict=True
    ):
        cv2.rectangle(out, (int(x1), int(y1)), (int(x2), int(y2)), (0, 255, 0), 2)
        cv2.putText(
            out,
            f"{score:.2f}",
            (int(x1), max(12, int(y1) - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (0, 255, 0),
            1,
            cv2.LINE_AA,
        )
    cv2.putText(
        out,
        f"{msg.stream_id} #{msg.sequence} alpha {msg.alpha:.2f}",
        (8, 20),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.6,
        (255, 255, 255),
        2,
        cv2.LINE_AA,
    )
    return out


class AnnotatedWriter:
    def __init__(self, out_dir: Path, fps: int = 25, max_pending: int = 256) -> None:
        self.out_dir = Path(out_dir)
        self.fps = fps
        self.max_pending = max_pending
        self._pending: dict[str, OrderedDict[int, Frame]] = {}
        self._videos: dict[str, tuple[Any, Any]] = {}
        self.written: dict[str, int] = {}

    def path(self, stream_id: str) -> Path:
        return self.out_dir / f"{stream_id}.mp4"

    def keep(self, frame: Frame) -> None:
        pending = self._pending.setdefault(frame.stream_id, OrderedDict())
        pending[frame.sequence] = frame
        while len(pending) > self.max_pending:
            pending.popitem(last=False)

    def on_detection(self, msg: DetectionMessage) -> None:
        frame = self._pending.get(msg.stream_id, OrderedDict()).pop(msg.sequence, None)
        if frame is None:
            return
        container, video = self._open(msg.stream_id, frame)
        image = av.VideoFrame.from_ndarray(draw(frame.pixels, msg), format="bgr24")
        for packet in video.encode(image):
            container.mux(packet)
        self.written[msg.stream_id] = self.written.get(msg.stream_id, 0) + 1

    def _open(self, stream_id: str, frame: Frame) -> tuple[Any, Any]:
        if stream_id not in self._videos:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            container = av.open(str(self.path(stream_id)), mode="w")
            video = container.add_stream("mpeg4", rate=Fraction(self.fps))
            video.width = frame.pixels.shape[1] - frame.pixels.shape[1] % 2
            video.height = frame.pixels.shape[0] - frame.pixels.shape[0] % 2
            video.pix_fmt = "yuv420p"
            self._videos[stream_id] = (container, video)
        return self._videos[stream_id]

    def close(self) -> None:
        for container, video in self._videos.values():
            for packet in video.encode(None):
                container.mux(packet)
            container.close()
        self._videos.clear()
