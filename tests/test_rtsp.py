"""A live RTSP source against a real RTSP server that goes away mid-stream and comes back.

The server is GStreamer's gst-rtsp-server (tests/rtsp_server.py), run by the system Python;
``scripts/install-test-deps.sh`` installs it. The test skips only when that server is absent.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import av
import pytest
from structlog.testing import capture_logs

from stream.demo_clip import make_demo_clip
from stream.frames import Frame
from stream.runtime import Backoff
from stream.sources import VideoSource

SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
# The server needs PyGObject, which lives in the system Python, not in the project's venv.
GST_PYTHON = os.environ.get("VEIL_GST_PYTHON", "/usr/bin/python3")
_PROBE = (
    "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0');"
    "from gi.repository import Gst, GstRtspServer; Gst.init(None);"
    "missing = [e for e in ('qtdemux', 'rtph264pay', 'rtpmp4vpay')"
    " if Gst.ElementFactory.find(e) is None];"
    "print(' '.join(missing)); raise SystemExit(1 if missing else 0)"
)


def _server_unavailable() -> str | None:
    """Why the RTSP server cannot run here, or None when it can."""
    try:
        probe = subprocess.run(
            [GST_PYTHON, "-c", _PROBE], capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError:
        return f"{GST_PYTHON} not found (set VEIL_GST_PYTHON)"
    if probe.returncode != 0:
        last_error_line = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        detail = probe.stdout.strip() or last_error_line
        return f"gst-rtsp-server or GStreamer elements missing ({detail})"
    return None


class RtspServer:
    """The test server as a child process serving ``clip`` at rtsp://127.0.0.1:<port>/clip."""

    def __init__(self, clip: Path, port: int, codec: str) -> None:
        self.url = f"rtsp://127.0.0.1:{port}/clip"
        self._command = [
            GST_PYTHON,
            str(SERVER_SCRIPT),
            f"--port={port}",
            "--mount=/clip",
            f"--file={clip}",
            f"--codec={codec}",
        ]
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        process = subprocess.Popen(
            self._command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._process = process
        assert process.stdout is not None
        line = process.stdout.readline()  # the server prints READY once it listens
        if not line.startswith("READY"):
            self.stop()
            raise AssertionError(f"RTSP server did not start: {line!r}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def rtsp_server(tmp_path: Path) -> Iterator[RtspServer]:
    reason = _server_unavailable()
    if reason is not None:
        pytest.skip(f"RTSP test server absent: {reason}; run scripts/install-test-deps.sh")
    # Long enough that the served clip never ends during the test.
    clip = make_demo_clip(tmp_path / "served.mp4", seconds=60, fps=10, size=(320, 180))
    with av.open(str(clip)) as container:
        codec = container.streams.video[0].codec_context.name
    server = RtspServer(clip, _free_port(), codec)
    server.start()
    yield server
    server.stop()


async def _next(frames: Any, timeout_s: float = 15.0) -> Frame:
    frame: Frame = await asyncio.wait_for(anext(frames), timeout_s)
    return frame


async def _wait_for_attempts(
    logs: list[MutableMapping[str, Any]], count: int, timeout_s: float
) -> list[MutableMapping[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        attempts = [entry for entry in logs if entry["event"] == "source.reconnect"]
        if len(attempts) >= count:
            return attempts
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} reconnect attempts logged in {timeout_s} s: {logs}")


@pytest.mark.timeout(60)
async def test_rtsp_source_reconnects_after_the_server_restarts(rtsp_server: RtspServer) -> None:
    policy = Backoff(initial_s=0.2, max_s=0.5, jitter=0.5)
    source = VideoSource(
        "door-cam",
        rtsp_server.url,
        policy="realtime",
        open_timeout_s=5,
        read_timeout_s=2,
        reconnect=policy,
    )
    with capture_logs() as logs:
        async with source:
            frames = source.frames()
            before = [await _next(frames) for _ in range(5)]
            assert all(f.pixels.shape == (180, 320, 3) for f in before)

            rtsp_server.stop()
            attempts = await _wait_for_attempts(logs, count=2, timeout_s=20)
            assert [entry["attempt"] for entry in attempts[:2]] == [1, 2]
            assert all(0.0 <= entry["delay_s"] <= 0.5 for entry in attempts)
            assert all(entry["source"] == rtsp_server.url for entry in attempts)
            # The first attempt follows the outage; later ones fail to connect.
            assert "refused" in attempts[1]["error"].lower()

            restarted_at = time.time()
            rtsp_server.start()
            after: list[Frame] = []
            while len(after) < 5:
                frame = await _next(frames)
                if (
                    frame.envelope.capture_time > restarted_at
                ):  # skip a frame buffered before the outage
                    after.append(frame)
            stats = source.stats

    sequences = [f.sequence for f in before + after]
    assert sequences == sorted(set(sequences))  # continuing, never reused
    assert after[0].sequence > before[-1].sequence
    assert stats.reconnects >= 2
    assert stats.decoded >= len(before) + len(after)
    # Connected once at the start and again once the server was back.
    assert sum(entry["event"] == "source.connected" for entry in logs) >= 2
