"""Video sources: files, RTSP cameras and HTTP streams, decoded with PyAV into :class:`Frame`.

One :class:`VideoSource` per stream. PyAV blocks, so each source decodes in its own thread and
hands frames to the event loop through a small buffer whose behaviour is the source's policy:

* ``realtime``: keep only the newest ``queue_size`` frames (default 1, a mailbox). A slow
  consumer always gets the latest picture; the frames it never saw are counted as dropped.
* ``lossless``: a bounded queue; when it is full the decoder waits (backpressure). For files,
  audits and tests, where every frame matters more than latency.

Live sources (rtsp, rtsps, http, https) survive outages: a failed connection, a broken or
silent stream, or a stream that simply ends is retried with exponential backoff and full jitter,
forever unless ``Backoff.max_attempts`` is set, each attempt logged. A file ends the
stream at its end (or starts over with ``loop_file``). A file is paced to its own frame rate
by default (``pace``): each frame is decoded no earlier than its presentation time after the
first, so that a file behaves like a camera (``realtime`` then drops what a camera would);
``pace=False`` decodes flat out.

Every failure reaches the consumer as :class:`SourceError`, naming the source and the cause,
and only after every frame decoded before it: a truncated MP4 yields the frames that decoded,
then raises a SourceError that says "truncated". An MP4 whose index (moov box) sits at the end
of the file loses that index to truncation, so such a file yields no frames before the error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Final, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import av
import av.container
import av.error
import numpy as np
import numpy.typing as npt
import structlog

from stream.frames import Frame, StreamStats
from stream.runtime import Backoff
from stream.wire import Envelope
from veil.errors import ConfigError, SourceError

log = structlog.get_logger(__name__)

SourcePolicy = Literal["realtime", "lossless"]
LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "http", "https"})
DEFAULT_LOSSLESS_QUEUE = 16
# How long stop() waits for the decoder thread; longer only when FFmpeg sits in a blocking read,
# which PyAV's own timeouts end, after which the (daemon) thread notices the stop and exits.
_STOP_JOIN_S = 2.0
# Top-level ISO BMFF (MP4/MOV) boxes a file may start with; anything else is not such a file.
_ISO_BMFF_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pdin"})


# Cameras: the first retry after half a second, then up to 30 s apart, forever.
CAMERA_RECONNECT: Final = Backoff(initial_s=0.5, max_s=30.0)


def redact_url(url: str) -> str:
    """``url`` with any password replaced, for logs and error messages (cameras embed them)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def _iso_bmff_truncation(path: Path) -> str | None:
    """If ``path`` is an MP4/MOV whose top-level boxes run past its end, say where; else None."""
    size = path.stat().st_size
    offset = 0
    with path.open("rb") as handle:
        while offset < size:
            handle.seek(offset)
            header = handle.read(16)
            if len(header) < 8:
                return f"the file ends inside a box header at byte {offset}" if offset else None
            box_size, kind = struct.unpack(">I4s", header[:8])
            if offset == 0 and kind not in _ISO_BMFF_FIRST_BOXES:
                return None
            if box_size == 1:  # 64-bit size follows the type
                if len(header) < 16:
                    return f"the file ends inside the header of box {kind!r} at byte {offset}"
                (box_size,) = struct.unpack(">Q", header[8:16])
            elif box_size == 0:  # "extends to the end of the file": nothing to compare
                return None
            if box_size < 8:
                return None  # malformed rather than cut short; FFmpeg reports it
            if offset + box_size > size:
                name = kind.decode("latin-1")
                return (
                    f"box '{name}' at byte {offset} declares {box_size} bytes "
                    f"but the file ends at byte {size}"
                )
            offset += box_size
    return None


def _describe(error: BaseException, url: str) -> str:
    """A one-line cause for logs and messages, with the raw URL (and its password) taken out."""
    text = str(error).replace(url, redact_url(url)) or type(error).__name__
    return f"{type(error).__name__}: {text}"


def _checked_queue(
    label: str, policy: str, queue_size: int | None, open_s: float, read_s: float
) -> int:
    """The buffer size for ``policy``; ConfigError naming the setting out of range."""
    if policy not in ("realtime", "lossless"):
        raise ConfigError(f"{label}: policy must be 'realtime' or 'lossless', not {policy!r}")
    if queue_size is None:
        queue_size = 1 if policy == "realtime" else DEFAULT_LOSSLESS_QUEUE
    if queue_size < 1:
        raise ConfigError(f"{label}: queue_size must be >= 1, got {queue_size}")
    if open_s <= 0 or read_s <= 0:
        raise ConfigError(
            f"{label}: timeouts must be positive, got open {open_s} s and read {read_s} s"
        )
    return queue_size


class VideoSource:
    """Decodes one stream in a thread; read with ``async for frame in source.frames()``.

    ``url`` is a file path (or ``file://`` URL), ``rtsp://``/``rtsps://`` (TCP transport) or
    ``http://``/``https://``. Use as ``async with VideoSource(...) as source:`` or call
    :meth:`start` and :meth:`stop`. :attr:`stats` may be read at any time from any thread.
    """

    def __init__(
        self,
        stream_id: str,
        url: str | os.PathLike[str],
        *,
        policy: SourcePolicy = "realtime",
        queue_size: int | None = None,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 5.0,
        reconnect: Backoff | None = None,
        loop_file: bool = False,
        pace: bool = True,
    ) -> None:
        self.stream_id = stream_id
        self.url = os.fspath(url)
        self._label = f"video source {stream_id!r} ({redact_url(self.url)})"
        self.policy: SourcePolicy = policy
        self.queue_size = _checked_queue(
            self._label, policy, queue_size, open_timeout_s, read_timeout_s
        )
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.reconnect = reconnect or CAMERA_RECONNECT
        self.loop_file = loop_file
        self.pace = pace
        self._clock: tuple[float, float] | None = None  # (first pts, its monotonic time)

        parts = urlsplit(self.url)
        scheme = parts.scheme.lower()
        # One-letter "schemes" are Windows drive letters, i.e. paths.
        if scheme in ("", "file") or len(scheme) == 1:
            self.live = False
            self._path: Path | None = Path(unquote(parts.path) if scheme == "file" else self.url)
        elif scheme in LIVE_SCHEMES:
            self.live = True
            self._path = None
        else:
            raise SourceError(
                f"{self._label}: unsupported URL scheme {scheme!r}; use a file path, "
                "rtsp://, rtsps://, http:// or https://"
            )

        # Everything below is shared with the decoder thread and guarded by _state.
        self._state = threading.Condition()
        self._buffer: collections.deque[Frame] = collections.deque()
        self._finished = False
        self._error: SourceError | None = None
        self._next_sequence = 0
        self._decoded = 0
        self._dropped = 0
        self._reconnects = 0
        self._connected = False  # a container is open and decoding (a camera is up)
        self._last_error: str | None = None  # why the last connection failed or ended

        self._stopping = threading.Event()  # the decoder must stop (stop() and finish())
        self._discard = False  # stop(): buffered frames are dropped; finish(): handed out
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._rng = random.Random()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start decoding in a background thread. A source starts once."""
        if self._thread is not None:
            raise RuntimeError(f"{self._label} was already started; make a new VideoSource")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, name=f"veil-source-{self.stream_id}", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        """Stop decoding; frames still buffered are discarded and :meth:`get` returns None."""
        self._stopping.set()
        with self._state:
            self._discard = True
            self._finished = True
            self._state.notify_all()
        self._ready.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join, _STOP_JOIN_S)
            if thread.is_alive():
                log.warning("source.stop_pending", stream_id=self.stream_id, reason="blocked read")

    async def __aenter__(self) -> VideoSource:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def finish(self) -> None:
        """Stop decoding, keep what was decoded: :meth:`get` hands out every buffered frame
        (the one being decoded included), then None. A graceful stop of a lossless stream."""
        self._stopping.set()
        with self._state:
            self._state.notify_all()
        self._wake_consumer()

    # --- consumer side ---------------------------------------------------------------------

    @property
    def stats(self) -> StreamStats:
        with self._state:
            return StreamStats(self._decoded, self._dropped, self._reconnects)

    @property
    def connected(self) -> bool:
        """True while the source is open and decoding; False while a camera is unreachable,
        between reconnects, and once the stream has ended."""
        with self._state:
            return self._connected

    @property
    def last_error(self) -> str | None:
        """Why the last connection failed or ended (None before any failure)."""
        with self._state:
            return self._last_error

    def _set_connected(self, connected: bool, error: str | None = None) -> None:
        with self._state:
            self._connected = connected
            if error is not None:
                self._last_error = error

    async def get(self) -> Frame | None:
        """The next frame; None once the stream has ended or the source was stopped.

        Raises SourceError when the source failed, after every frame decoded before the failure.
        """
        if self._thread is None:
            raise RuntimeError(f"{self._label} is not started; use 'async with' or start()")
        while True:
            with self._state:
                if self._buffer and not self._discard:
                    frame = self._buffer.popleft()
                    self._state.notify_all()  # a lossless decoder may wait for room
                    return frame
                if self._finished:
                    if self._error is not None and not self._discard:
                        raise self._error
                    return None
                # Cleared under the lock, so a frame put after this check sets it again.
                self._ready.clear()
            await self._ready.wait()

    async def frames(self) -> AsyncIterator[Frame]:
        """Every frame until the stream ends; raises SourceError as :meth:`get` does."""
        while (frame := await self.get()) is not None:
            yield frame

    # --- decoder thread --------------------------------------------------------------------

    def _wake_consumer(self) -> None:
        loop = self._loop
        if loop is None:
            return
        # The loop may already be closed at shutdown; then nobody is waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._ready.set)

    def _run(self) -> None:
        error: SourceError | None = None
        try:
            if self.live:
                self._run_live()
            else:
                self._run_file()
        except SourceError as failure:
            error = failure
        except Exception as failure:  # the consumer must hear of any failure, not hang
            error = SourceError(f"{self._label}: decoder failed: {_describe(failure, self.url)}")
            error.__cause__ = failure
        with self._state:
            self._error = error
            self._finished = True
            self._connected = False
            if error is not None:
                self._last_error = str(error)
            self._state.notify_all()
        self._wake_consumer()

    def _open(self) -> av.container.InputContainer:
        options: dict[str, str] = {}
        if self.live:
            microseconds = str(round(self.read_timeout_s * 1_000_000))
            if urlsplit(self.url).scheme.lower().startswith("rtsp"):
                options["rtsp_transport"] = "tcp"
                # FFmpeg 5 (libavformat 59) renamed the RTSP socket timeout stimeout -> timeout.
                new_name = av.library_versions["libavformat"][0] >= 59
                options["timeout" if new_name else "stimeout"] = microseconds
            else:
                options["timeout"] = microseconds
        target = self.url if self._path is None else str(self._path)
        try:
            return av.open(
                target, options=options, timeout=(self.open_timeout_s, self.read_timeout_s)
            )
        except FileNotFoundError as error:
            raise SourceError(f"{self._label}: file not found") from error
        except (av.error.FFmpegError, OSError) as error:
            raise self._failure("cannot open", error) from error

    def _failure(self, what: str, error: BaseException) -> SourceError:
        cause = _describe(error, self.url)
        if self._path is not None:
            truncation = _iso_bmff_truncation(self._path)
            if truncation is not None:
                return SourceError(
                    f"{self._label}: truncated video ({truncation}) after {self._decoded} "
                    f"decoded frames: {cause}"
                )
            if what == "cannot open":
                return SourceError(f"{self._label}: not a readable video file: {cause}")
        return SourceError(f"{self._label}: {what}: {cause}")

    def _decode(self, container: av.container.InputContainer, pts_offset: float) -> float | None:
        """Decode every frame into the buffer; the end time of the last frame (pts + duration)."""
        if not container.streams.video:
            raise SourceError(f"{self._label}: no video stream in {container.format.name!r}")
        stream = container.streams.video[0]
        frame_s = float(1 / stream.average_rate) if stream.average_rate else 0.0
        end_s: float | None = None
        try:
            for packet in container.demux(stream):
                if self._stopping.is_set():
                    break
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError as error:
                    if not self.live:
                        raise
                    # A damaged packet from a camera: later key frames recover the picture.
                    log.debug("source.bad_packet", stream_id=self.stream_id, error=str(error))
                    continue
                for frame in decoded:
                    if not isinstance(frame, av.VideoFrame):
                        continue
                    pts = None if frame.time is None else frame.time + pts_offset
                    if pts is not None:
                        end_s = pts + frame_s
                        if self.pace and not self.live and self._wait_for(pts):
                            return end_s
                    pixels = np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8)
                    self._deliver(pixels, pts)
        except (av.error.FFmpegError, OSError) as error:
            raise self._failure("read failed", error) from error
        return end_s

    def _wait_for(self, pts: float) -> bool:
        """Until ``pts`` is due on the file's own clock; True when stopped meanwhile."""
        now = time.monotonic()
        if self._clock is None:
            self._clock = (pts, now)
        due = self._clock[1] + (pts - self._clock[0]) - now
        return due > 0 and self._stopping.wait(due)

    def _deliver(self, pixels: npt.NDArray[np.uint8], pts: float | None) -> None:
        with self._state:
            sequence = self._next_sequence
            self._next_sequence += 1
            self._decoded += 1
            frame = Frame(Envelope(self.stream_id, sequence, pts, time.time()), pixels)
            if self.policy == "realtime":
                while len(self._buffer) >= self.queue_size:
                    self._buffer.popleft()
                    self._dropped += 1
            else:
                while len(self._buffer) >= self.queue_size and not self._stopping.is_set():
                    self._state.wait()
            if self._discard:
                return
            self._buffer.append(frame)  # after finish() too: a decoded frame is never lost
        self._wake_consumer()

    def _run_file(self) -> None:
        assert self._path is not None
        if not self._path.is_file():
            reason = "is a directory, not a video file" if self._path.is_dir() else "file not found"
            raise SourceError(f"{self._label}: {reason}")
        pts_offset = 0.0
        while not self._stopping.is_set():
            decoded_before = self._decoded
            with self._open() as container:
                self._set_connected(True)
                end_s = self._decode(container, pts_offset)
            if self._stopping.is_set():
                return
            # FFmpeg may end a cut-short MP4 cleanly at a packet boundary; the boxes tell.
            truncation = _iso_bmff_truncation(self._path)
            if truncation is not None:
                raise SourceError(
                    f"{self._label}: truncated video ({truncation}) after {self._decoded} "
                    "decoded frames"
                )
            if not self.loop_file:
                return
            if self._decoded == decoded_before:
                raise SourceError(f"{self._label}: the file has no decodable frames to loop")
            # Later passes continue the timeline, so pts stays increasing across loops.
            if end_s is not None:
                pts_offset = end_s

    def _run_live(self) -> None:
        failures = 0  # consecutive connections that delivered no frame
        while not self._stopping.is_set():
            decoded_before = self._decoded
            try:
                with self._open() as container:
                    log.info("source.connected", stream_id=self.stream_id)
                    self._set_connected(True)
                    self._decode(container, 0.0)
                cause = "the stream ended"
            except SourceError as error:
                cause = str(error).removeprefix(f"{self._label}: ")
            self._set_connected(False, cause)
            if self._stopping.is_set():
                return
            if self._decoded > decoded_before:
                failures = 0
            failures += 1
            limit = self.reconnect.max_attempts
            if limit is not None and failures > limit:
                raise SourceError(
                    f"{self._label}: unreachable after {limit} reconnect attempts: {cause}"
                )
            delay = self.reconnect.delay_s(failures, self._rng)
            with self._state:
                self._reconnects += 1
            log.warning(
                "source.reconnect",
                stream_id=self.stream_id,
                source=redact_url(self.url),
                attempt=failures,
                delay_s=round(delay, 3),
                error=cause,
            )
            if self._stopping.wait(delay):
                return
