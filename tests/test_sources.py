"""Video sources: files decoded losslessly and in realtime, failures, reconnection, demo clip."""

from __future__ import annotations

import asyncio
import functools
import http.server
import random
import socket
import threading
import time
from itertools import pairwise
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from stream.demo_clip import make_demo_clip, render_demo_frame
from stream.frames import Frame
from stream.runtime import Backoff
from stream.sources import VideoSource, redact_url
from veil.data import data_root
from veil.errors import ConfigError, SourceError

SINGLE_FACE_FRAMES = 72


@pytest.fixture
def single_face() -> Path:
    root = data_root(required=False)
    if root is None or not (root / "videos" / "single_face.mp4").is_file():
        pytest.skip("reference data absent: set VEIL_DATA to the folder holding videos/")
    return root / "videos" / "single_face.mp4"


def _faststart_video_copy(source: Path, target: Path) -> Path:
    """Remux the video stream with the index (moov) first, as streaming-friendly MP4s have it."""
    with (
        av.open(str(source)) as inp,
        av.open(str(target), "w", options={"movflags": "faststart"}) as out,
    ):
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        for packet in inp.demux(in_stream):
            if packet.dts is None:  # the flush packet carries no data
                continue
            packet.stream = out_stream
            out.mux(packet)
    return target


def _truncate(source: Path, target: Path, fraction: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


async def _collect(source: VideoSource) -> tuple[list[Frame], SourceError | None]:
    frames: list[Frame] = []
    try:
        async for frame in source.frames():
            frames.append(frame)
    except SourceError as error:
        return frames, error
    return frames, None


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_lossless_file_yields_every_frame_in_order(single_face: Path) -> None:
    async with VideoSource("cam0", single_face, policy="lossless", queue_size=4) as source:
        frames, error = await _collect(source)
        stats = source.stats
    assert error is None
    assert [f.sequence for f in frames] == list(range(SINGLE_FACE_FRAMES))
    assert all(f.stream_id == "cam0" for f in frames)
    pts = [f.envelope.pts for f in frames]
    assert pts[0] == 0.0
    assert all(b is not None and a is not None and b > a for a, b in pairwise(pts))
    assert pts[-1] == pytest.approx((SINGLE_FACE_FRAMES - 1) / 30, abs=1e-6)
    assert all(f.pixels.shape == (360, 640, 3) and f.pixels.dtype == np.uint8 for f in frames)
    assert all(b.envelope.capture_time >= a.envelope.capture_time for a, b in pairwise(frames))
    assert (stats.decoded, stats.dropped, stats.reconnects) == (SINGLE_FACE_FRAMES, 0, 0)
    # Channel order is BGR: OpenCV's own decoder (BGR by definition) sees the same picture.
    capture = cv2.VideoCapture(str(single_face))
    ok, opencv_first = capture.read()
    capture.release()
    assert ok
    difference = np.abs(opencv_first.astype(np.int16) - frames[0].pixels.astype(np.int16))
    assert float(difference.mean()) < 2.0
    swapped = np.abs(opencv_first[:, :, ::-1].astype(np.int16) - frames[0].pixels)
    assert float(swapped.mean()) > float(difference.mean()) + 2.0


async def test_realtime_slow_consumer_gets_newest_frames_and_counts_drops(
    single_face: Path,
) -> None:
    async with VideoSource("cam1", single_face, policy="realtime") as source:
        seen: list[Frame] = []
        async for frame in source.frames():
            seen.append(frame)
            await asyncio.sleep(0.05)  # a consumer far slower than the decoder
        stats = source.stats
    assert stats.decoded == SINGLE_FACE_FRAMES
    assert stats.dropped > 0
    assert len(seen) + stats.dropped == stats.decoded
    sequences = [f.sequence for f in seen]
    assert sequences == sorted(set(sequences))
    assert sequences[-1] == SINGLE_FACE_FRAMES - 1  # the newest frame always survives


async def test_lossless_decoder_waits_for_a_slow_consumer(single_face: Path) -> None:
    async with VideoSource("cam2", single_face, policy="lossless", queue_size=2) as source:
        deadline = time.monotonic() + 10
        while source.stats.decoded < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # long enough to decode the whole clip if nothing held it back
        # Two frames wait in the queue and one more is decoded, waiting for room.
        assert source.stats.decoded == 3
        first = await source.get()
        assert first is not None and first.sequence == 0
        frames, error = await _collect(source)
    assert error is None
    assert [f.sequence for f in frames] == list(range(1, SINGLE_FACE_FRAMES))
    assert source.stats.dropped == 0


async def test_truncated_mp4_yields_decoded_frames_then_reports_truncation(
    single_face: Path, tmp_path: Path
) -> None:
    intact = _faststart_video_copy(single_face, tmp_path / "faststart.mp4")
    truncated = _truncate(intact, tmp_path / "cut.mp4", 0.6)
    async with VideoSource("cut", truncated, policy="lossless") as source:
        frames, error = await _collect(source)
    assert error is not None
    assert 0 < len(frames) < SINGLE_FACE_FRAMES
    assert [f.sequence for f in frames] == list(range(len(frames)))
    message = str(error)
    assert "truncated" in message and "'cut'" in message and str(truncated) in message
    assert f"after {len(frames)} decoded frames" in message
    # Nothing decoded was lost or damaged: the last frame matches the intact file's.
    with av.open(str(intact)) as container:
        for index, reference in enumerate(container.decode(video=0)):
            if index == len(frames) - 1:
                expected = reference.to_ndarray(format="bgr24")
                break
    np.testing.assert_array_equal(frames[-1].pixels, expected)


async def test_truncated_mp4_with_trailing_index_reports_truncation(
    single_face: Path, tmp_path: Path
) -> None:
    # This file keeps its index (moov) at the end, so the cut removes it: nothing can decode.
    truncated = _truncate(single_face, tmp_path / "cut_index.mp4", 0.6)
    async with VideoSource("cut2", truncated, policy="lossless") as source:
        frames, error = await _collect(source)
    assert frames == []
    assert error is not None
    assert "truncated" in str(error) and "box 'mdat'" in str(error)


async def test_text_file_named_mp4_is_rejected(tmp_path: Path) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("these are meeting notes, not a video\n" * 20)
    async with VideoSource("fake", fake) as source:
        frames, error = await _collect(source)
    assert frames == []
    assert error is not None
    assert "not a readable video file" in str(error) and str(fake) in str(error)


async def test_missing_file_is_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.mp4"
    async with VideoSource("gone", missing) as source:
        with pytest.raises(SourceError, match=r"'gone'.*nowhere\.mp4.*file not found"):
            await source.get()


def test_unsupported_scheme_is_rejected() -> None:
    with pytest.raises(SourceError, match=r"unsupported URL scheme 'ftp'"):
        VideoSource("ftp", "ftp://example.org/clip.mp4")


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ConfigError, match="policy"):
        VideoSource("x", "clip.mp4", policy="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="queue_size"):
        VideoSource("x", "clip.mp4", queue_size=0)
    with pytest.raises(ConfigError, match="jitter"):
        Backoff(jitter=1.5)
    with pytest.raises(ConfigError, match="backoff"):
        Backoff(initial_s=2.0, max_s=1.0)


async def test_unreachable_rtsp_gives_up_after_max_attempts() -> None:
    url = f"rtsp://127.0.0.1:{_closed_port()}/x"
    policy = Backoff(initial_s=0.05, max_s=0.1, max_attempts=2)
    started = time.monotonic()
    with capture_logs() as logs:
        async with VideoSource("door", url, reconnect=policy, open_timeout_s=3) as source:
            frames, error = await _collect(source)
            stats = source.stats
    assert time.monotonic() - started < 10
    assert frames == []
    assert error is not None
    assert "'door'" in str(error) and url in str(error)
    assert "unreachable after 2 reconnect attempts" in str(error)
    assert "refused" in str(error).lower()
    attempts = [entry for entry in logs if entry["event"] == "source.reconnect"]
    assert [entry["attempt"] for entry in attempts] == [1, 2]
    assert all(0.0 <= entry["delay_s"] <= 0.1 for entry in attempts)
    assert all("refused" in entry["error"].lower() for entry in attempts)
    assert stats.reconnects == 2


def test_backoff_doubles_up_to_the_ceiling_and_full_jitter_spreads_it() -> None:
    plain = Backoff(initial_s=0.1, max_s=1.0, jitter=0.0)
    rng = random.Random(7)
    delays = [plain.delay_s(attempt, rng) for attempt in range(1, 7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert plain.delay_s(10_000, rng) == pytest.approx(1.0)  # retrying forever never overflows
    full = Backoff(initial_s=0.1, max_s=1.0, jitter=1.0)
    jittered = [full.delay_s(4, rng) for _ in range(200)]
    assert all(0.0 <= delay <= 0.8 for delay in jittered)
    assert min(jittered) < 0.2 and max(jittered) > 0.6


def test_passwords_are_redacted_from_urls() -> None:
    assert (
        redact_url("rtsp://admin:hunter2@10.0.0.5:554/live") == "rtsp://admin:***@10.0.0.5:554/live"
    )
    assert redact_url("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"
    source = VideoSource("cam", "rtsp://admin:hunter2@10.0.0.5/live")
    assert "hunter2" not in source._label


async def test_http_stream_that_ends_is_reconnected(tmp_path: Path) -> None:
    clip = make_demo_clip(tmp_path / "cam.mp4", seconds=1, fps=10, size=(160, 90))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{clip.name}"
    policy = Backoff(initial_s=0.05, max_s=0.1)
    try:
        with capture_logs() as logs:
            async with VideoSource("web", url, policy="lossless", reconnect=policy) as source:
                frames = []
                async for frame in source.frames():
                    frames.append(frame)
                    if len(frames) == 15:
                        break
                stats = source.stats
    finally:
        server.shutdown()
        server.server_close()
    # A live source that ends is an outage: the second connection starts the clip again.
    assert [f.sequence for f in frames] == list(range(15))
    assert [f.envelope.pts for f in frames] == pytest.approx(
        [i / 10 for i in range(10)] + [0.0, 0.1, 0.2, 0.3, 0.4]
    )
    np.testing.assert_array_equal(frames[10].pixels, frames[0].pixels)
    reconnects = [entry for entry in logs if entry["event"] == "source.reconnect"]
    assert reconnects and reconnects[0]["attempt"] == 1
    assert reconnects[0]["error"] == "the stream ended"
    assert stats.reconnects >= 1


async def test_looped_file_continues_sequence_and_pts(tmp_path: Path) -> None:
    clip = make_demo_clip(tmp_path / "short.mp4", seconds=1, fps=10, size=(160, 90))
    async with VideoSource("loop", clip, policy="lossless", loop_file=True) as source:
        frames = []
        async for frame in source.frames():
            frames.append(frame)
            if len(frames) == 25:
                break
    assert [f.sequence for f in frames] == list(range(25))
    pts = [f.envelope.pts for f in frames]
    assert pts == pytest.approx([i / 10 for i in range(25)])
    # The second pass shows the first picture again.
    np.testing.assert_array_equal(frames[10].pixels, frames[0].pixels)


async def test_stop_ends_the_stream(single_face: Path) -> None:
    source = VideoSource("cam3", single_face, policy="lossless", queue_size=2, loop_file=True)
    await source.start()
    assert await source.get() is not None
    started = time.monotonic()
    await source.stop()
    assert time.monotonic() - started < 2.0
    assert await source.get() is None


async def test_demo_clip_decodes_to_the_rendered_frames(tmp_path: Path) -> None:
    clip = make_demo_clip(tmp_path / "demo.mp4")
    async with VideoSource("demo", clip, policy="lossless") as source:
        frames, error = await _collect(source)
    assert error is None
    assert len(frames) == 40  # 4 s at 10 fps
    assert all(f.pixels.shape == (540, 960, 3) for f in frames)
    assert [f.envelope.pts for f in frames] == pytest.approx([i / 10 for i in range(40)])
    # The encoded clip is faithful to the rendering (PSNR above 30 dB) ...
    for index in (0, 20, 39):
        rendered = render_demo_frame(index / 39, (960, 540)).astype(np.float64)
        mse = float(np.mean((frames[index].pixels.astype(np.float64) - rendered) ** 2))
        assert 10 * np.log10(255.0**2 / mse) > 30.0
    # ... and the camera moves: first, middle and last frames differ clearly.
    middle = frames[20].pixels.astype(np.int16)
    assert float(np.abs(frames[0].pixels.astype(np.int16) - middle).mean()) > 20
    assert float(np.abs(frames[39].pixels.astype(np.int16) - middle).mean()) > 20


def test_demo_clip_is_deterministic_and_validates_arguments(tmp_path: Path) -> None:
    first = make_demo_clip(tmp_path / "a.mp4", seconds=1, fps=5, size=(320, 180))
    second = make_demo_clip(tmp_path / "b.mp4", seconds=1, fps=5, size=(320, 180))
    assert first.read_bytes() == second.read_bytes()
    with pytest.raises(ConfigError, match="even"):
        make_demo_clip(tmp_path / "c.mp4", size=(321, 180))
    with pytest.raises(ConfigError, match="fps"):
        make_demo_clip(tmp_path / "c.mp4", fps=0)
    with pytest.raises(ConfigError, match="no frames"):
        make_demo_clip(tmp_path / "c.mp4", seconds=0)


async def test_a_file_is_paced_to_its_frame_rate_unless_told_otherwise(tmp_path: Path) -> None:
    clip = make_demo_clip(tmp_path / "paced.mp4", seconds=1, fps=10, size=(160, 90))

    async def read(pace: bool) -> tuple[list[float], list[float | None]]:
        arrivals: list[float] = []
        pts: list[float | None] = []
        async with VideoSource("p", clip, policy="lossless", pace=pace) as source:
            async for frame in source.frames():
                arrivals.append(time.monotonic())
                pts.append(frame.envelope.pts)
        return [t - arrivals[0] for t in arrivals], pts

    paced, paced_pts = await read(True)
    flat, flat_pts = await read(False)
    assert paced_pts == flat_pts == pytest.approx([i / 10 for i in range(10)])
    # Never ahead of the file's clock (a loaded machine can only make it later).
    assert all(t >= (p or 0.0) - 0.02 for t, p in zip(paced, paced_pts, strict=True)), paced
    assert paced[-1] >= 0.88
    # Flat out is not held to that clock: its frames are there as soon as they decode.
    assert flat[-1] < paced[-1]
