"""Annotated video per stream: drawn inside the trusted zone, the only place pixels exist.

The edge worker hands each frame it publishes to :meth:`AnnotatedWriter.keep`; when that
frame's detections come back from the outside, :meth:`AnnotatedWriter.on_detection` draws the
boxes on it and appends it to the stream's video. Frames wait in a bounded buffer per stream,
so a lost detection costs memory for at most ``max_pending`` frames.

Video is H.264 (libx264) in MP4, which browsers play; a PyAV build without libx264 falls back
to VP9 (also browser-playable in MP4), then MPEG-4 Part 2, with a one-line warning. A file
source's video runs at the file's own frame rate, timed by its presentation times; a live
source's is timed by capture time and rotated into a new file by size or age.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av
import cv2
import numpy as np
import numpy.typing as npt
import structlog

from stream.frames import Frame
from stream.wire import DetectionMessage
from workers.trusted.preview import LivePreview

log = structlog.get_logger(__name__)

# Browser-playable first; mpeg4 (every FFmpeg has it) only as the last resort.
CODECS = ("libx264", "libvpx-vp9", "mpeg4")
_OPTIONS = {"libx264": {"preset": "veryfast", "crf": "23"}, "libvpx-vp9": {"deadline": "realtime"}}
LIVE_TIME_BASE = Fraction(1, 90_000)  # a live video's timestamps: capture time, 90 kHz
_NOMINAL_RATE = 25  # the encoder's rate hint for a live video (its timestamps rule)
Pixels = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class LabelStyle:
    """Font scale and line widths for a frame height: the same legibility at 360p and 4K."""

    font_scale: float
    text_thickness: int
    box_thickness: int

    @classmethod
    def for_height(cls, height: int) -> LabelStyle:
        return cls(max(0.5, height / 720), max(1, round(height / 360)), max(2, round(height / 270)))


def _label(out: Pixels, text: str, origin: tuple[int, int], style: LabelStyle, color: Any) -> None:
    """``text`` on a filled dark box above-left of ``origin``, readable on any background."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (w, h), base = cv2.getTextSize(text, font, style.font_scale, style.text_thickness)
    x, y = origin[0], max(h + base, origin[1])
    cv2.rectangle(out, (x, y - h - base), (x + w, y + base // 2), (0, 0, 0), cv2.FILLED)
    thickness = style.text_thickness
    cv2.putText(
        out, text, (x, y - base // 2), font, style.font_scale, color, thickness, cv2.LINE_AA
    )


def draw(pixels: Pixels, msg: DetectionMessage) -> Pixels:
    out = pixels.copy()
    style = LabelStyle.for_height(out.shape[0])
    for (x1, y1, x2, y2), score in zip(
        msg.detections.xyxy.tolist(), msg.detections.confidence.tolist(), strict=True
    ):
        top_left = (int(x1), int(y1))
        cv2.rectangle(out, top_left, (int(x2), int(y2)), (0, 255, 0), style.box_thickness)
        _label(out, f"{score:.2f}", top_left, style, (0, 255, 0))
    header = f"{msg.stream_id} #{msg.sequence} alpha {msg.alpha:.2f}"
    _label(out, header, (0, 0), style, (255, 255, 255))
    return out


@functools.cache
def pick_codec() -> str:
    """The first of :data:`CODECS` whose encoder opens in this PyAV build (checked once)."""
    for name in CODECS:
        try:
            context = cast(Any, av.CodecContext.create(name, "w"))
            context.width, context.height, context.pix_fmt = 64, 64, "yuv420p"
            context.time_base = Fraction(1, _NOMINAL_RATE)
            context.open()
        except (av.error.FFmpegError, OSError, ValueError):
            continue
        if name != CODECS[0]:
            playable = "" if name == "libvpx-vp9" else "; browsers will not play it"
            log.warning(f"annotated video: no libx264 in this PyAV build, using {name}{playable}")
        return name
    raise RuntimeError(f"no video encoder among {CODECS} in this PyAV build")


@dataclass(frozen=True)
class Rotation:
    """A live stream's video starts a new file past ``max_bytes`` or ``max_seconds``."""

    max_bytes: int
    max_seconds: float


class _Video:
    """One open MP4 of one stream; ``rate`` None: timed by capture time (a live source)."""

    def __init__(self, path: Path, frame: Frame, rate: Fraction | None, codec: str) -> None:
        self.path = path
        self.rate = rate
        self.container: Any = av.open(str(path), mode="w")
        options = _OPTIONS.get(codec, {})
        self.stream = cast(Any, self.container.add_stream(codec, rate or _NOMINAL_RATE, options))
        self.stream.width = frame.width - frame.width % 2
        self.stream.height = frame.height - frame.height % 2
        self.stream.pix_fmt = "yuv420p"
        self.time_base = Fraction(1, 1) / rate if rate else LIVE_TIME_BASE
        if rate is None:
            self.stream.time_base = self.stream.codec_context.time_base = LIVE_TIME_BASE
        self.started = frame.capture_time
        self.origin: float | None = None
        self.last_pts = -1
        self.frames = 0
        self.bytes = 0

    def _pts(self, frame: Frame) -> int:
        clock = frame.capture_time if self.rate is None or frame.pts is None else frame.pts
        if self.origin is None:
            self.origin = clock
        pts = round((clock - self.origin) / self.time_base)
        return max(pts, self.last_pts + 1)  # strictly increasing, whatever the source says

    def write(self, pixels: Pixels, frame: Frame) -> None:
        even = np.ascontiguousarray(pixels[: self.stream.height, : self.stream.width])
        image = av.VideoFrame.from_ndarray(even, format="bgr24")
        image.pts = self.last_pts = self._pts(frame)
        image.time_base = self.time_base
        self._mux(self.stream.encode(image))
        self.frames += 1

    def _mux(self, packets: Any) -> None:
        for packet in packets:
            self.bytes += packet.size
            self.container.mux(packet)

    def close(self) -> None:
        self._mux(self.stream.encode(None))
        self.container.close()


class AnnotatedWriter:
    """One annotated MP4 per file stream, at the rate ``rates`` gives for it (its source's);
    for the streams in ``live``, a series of MP4s, one per ``rotation`` period or size. With
    ``preview``, every annotated frame is offered to the live preview too; ``out_dir`` None:
    the preview alone, no files."""

    def __init__(
        self,
        out_dir: Path | None,
        rates: Mapping[str, Fraction | None] | None = None,
        live: Collection[str] = (),
        rotation: Rotation | None = None,
        max_pending: int = 256,
        preview: LivePreview | None = None,
    ) -> None:
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.preview = preview
        self.rates = dict(rates or {})
        self.live = frozenset(live)
        self.rotation = rotation
        self.max_pending = max_pending
        self._pending: dict[str, OrderedDict[int, Frame]] = {}
        self._videos: dict[str, _Video] = {}
        self.files: dict[str, list[tuple[Path, int]]] = {}  # per stream: (file, frames), closed

    def keep(self, frame: Frame) -> None:
        pending = self._pending.setdefault(frame.stream_id, OrderedDict())
        pending[frame.sequence] = frame
        while len(pending) > self.max_pending:
            pending.popitem(last=False)

    def on_detection(self, msg: DetectionMessage) -> None:
        frame = self._pending.get(msg.stream_id, OrderedDict()).pop(msg.sequence, None)
        if frame is None:
            return
        preview = self.preview
        if self.out_dir is None and (preview is None or not preview.watched(msg.stream_id)):
            return  # nobody looks: nothing to draw
        drawn = draw(frame.pixels, msg)
        if preview is not None:
            preview.put(msg.stream_id, msg.sequence, drawn)
        if self.out_dir is None:
            return
        video = self._video(frame)
        video.write(drawn, frame)
        rotation = self.rotation
        if (
            rotation is not None
            and msg.stream_id in self.live
            and (
                video.bytes >= rotation.max_bytes
                or frame.capture_time - video.started >= rotation.max_seconds
            )
        ):
            self._close(msg.stream_id)

    def _path(self, stream_id: str, frame: Frame) -> Path:
        assert self.out_dir is not None
        if stream_id not in self.live:
            return self.out_dir / f"{stream_id}.mp4"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(frame.capture_time))
        path = self.out_dir / f"{stream_id}-{stamp}.mp4"
        n = 1
        while path.exists():
            n += 1
            path = self.out_dir / f"{stream_id}-{stamp}-{n}.mp4"
        return path

    def _video(self, frame: Frame) -> _Video:
        sid = frame.stream_id
        if sid not in self._videos:
            assert self.out_dir is not None
            self.out_dir.mkdir(parents=True, exist_ok=True)
            rate = None if sid in self.live else self.rates.get(sid)
            self._videos[sid] = _Video(self._path(sid, frame), frame, rate, pick_codec())
        return self._videos[sid]

    def _close(self, stream_id: str) -> None:
        video = self._videos.pop(stream_id)
        video.close()
        self.files.setdefault(stream_id, []).append((video.path, video.frames))

    def close(self) -> None:
        for stream_id in list(self._videos):
            self._close(stream_id)
