"""Operating veil day to day, without servers: the command line's help and version, the checks
before start (real busy sockets, missing files; nothing may start), the outputs' writers
(JSON lines flushed one by one, H.264 at the source's rate, legible labels, rotation) and the
footage a profile was calibrated on."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
import structlog

from stream.broker import free_loopback_port
from stream.demo_clip import make_demo_clip
from stream.frames import Frame
from stream.wire import DetectionMessage, Envelope, Provenance
from tests.tiny_detector import TinyDetector
from veil import runner
from veil.cli import build_parser, main, stream_ids
from veil.config import OutputConfig, SigningConfig, StreamConfig, VeilConfig
from veil.detection_feed import DetectionFilter, parse_time
from veil.detections import Detections
from veil.errors import ConfigError
from veil.observability import configure_logging
from veil.outputs import LATENCY_SAMPLE, DetectionTally, JsonlWriter
from veil.preflight import check_port_free
from veil.profiles import ProfileBank
from workers.trusted import annotate
from workers.trusted.annotate import AnnotatedWriter, LabelStyle, Rotation

ROOT = Path(__file__).resolve().parents[1]


def _message(sid: str, seq: int, scores: tuple[float, ...] = (0.9,), t: float = 100.0) -> Any:
    boxes = np.array([[10 + 5 * i, 10, 60, 70] for i in range(len(scores))], np.float32)
    return DetectionMessage(
        Envelope(sid, seq, seq / 30, t + seq / 30),
        Provenance("tiny", "0" * 64, "none", 0.0),
        Detections(boxes.reshape(-1, 4), np.array(scores, np.float32)),
        t + seq / 30 + 0.05,
    )


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """main() points structlog at this test's captured stderr; later tests get the old one."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    """2 s of a moving face at 30 fps, 320x240."""
    return make_demo_clip(tmp_path / "clip30.mp4", seconds=2, fps=30, size=(320, 240))


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def nothing_may_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any start of the broker, Triton or the trusted zone's model fails the test."""

    def started(*_: object, **__: object) -> None:
        raise AssertionError("a server or the model started before the checks failed")

    from stream.broker import EmbeddedBroker
    from workers.untrusted.triton_server import EmbeddedTriton

    monkeypatch.setattr(EmbeddedBroker, "start", started)
    monkeypatch.setattr(EmbeddedTriton, "start", started)
    monkeypatch.setattr(runner, "build_obfuscator", started)


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("veil: error: ")
    return err[0]


# -- the command line --------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_help_shows_the_default_of_every_option() -> None:
    missing = []
    for parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue  # positionals, --help, --version
            text = formatter._expand_help(action) if action.help else ""
            assert "%(default)" not in text
            if "default" not in text and "(required)" not in text:
                missing.append(f"{parser.prog} {action.option_strings[0]}: {text!r}")
    assert not missing, missing
    run = next(p for p in _parsers(build_parser()) if p.prog == "veil run")
    assert "do not print each detection (default: off)" in " ".join(run.format_help().split())


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == "veil 0.1.0"


def test_sources_get_readable_unique_stream_ids() -> None:
    assert stream_ids(["/v/lobby.mp4", "rtsp://u:p@10.0.0.5:554/live/ch1", "/w/lobby.mp4"]) == [
        "lobby",
        "10.0.0.5-ch1",
        "lobby-2",
    ]


# -- checks before start -----------------------------------------------------------------------


def test_a_busy_http_port_is_one_line_before_anything_starts(
    tmp_path: Path,
    clip: Path,
    busy_port: int,
    nothing_may_start: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "busy.yaml"
    config.write_text(f"observability:\n  http_port: {busy_port}\n")
    code = main(["run", "--config", str(config), "--source", str(clip), "--alpha", "0"])
    assert code == 2
    line = _one_line(capsys)
    assert f"observability.http_port: port {busy_port} on 127.0.0.1 is already in use" in line


@pytest.mark.parametrize("case", ["missing", "not-a-video", "directory"])
def test_a_source_that_cannot_be_read_is_one_line_before_anything_starts(
    tmp_path: Path, case: str, nothing_may_start: None, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "lobby.mp4"
    if case == "not-a-video":
        source.write_text("this is not a video")
    elif case == "directory":
        source.mkdir()
    assert main(["run", "--source", str(source), "--alpha", "0"]) == 2
    line = _one_line(capsys)
    assert f"streams.lobby.source: {source}" in line
    expected = {"missing": "file not found", "not-a-video": "not a readable video"}
    assert expected.get(case, "is not a file") in line


def test_an_unreachable_camera_is_one_line_before_anything_starts(
    nothing_may_start: None, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_loopback_port()  # nothing listens there
    url = f"rtsp://admin:secret@127.0.0.1:{port}/live"
    assert main(["run", "--source", url, "--alpha", "0"]) == 2
    line = _one_line(capsys)
    assert f"cannot reach 127.0.0.1:{port}" in line and "streams.127.0.0.1-live.source" in line
    assert "secret" not in line  # the camera's password is not printed


def test_missing_weights_and_bank_are_named_before_anything_starts(
    tmp_path: Path, clip: Path, nothing_may_start: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "weights.yaml"
    config.write_text(f"model:\n  name: faceboxes\n  weights: {tmp_path / 'nope.pth'}\n")
    assert main(["run", "--config", str(config), "--source", str(clip)]) == 2
    assert f"model.weights: {tmp_path / 'nope.pth'}: file not found" in _one_line(capsys)
    assert main(["run", "--source", str(clip), "--bank", str(tmp_path / "nobank")]) == 2
    assert f"profile_bank: {tmp_path / 'nobank'}: no such folder" in _one_line(capsys)


def _cli(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "veil.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.monotonic() - started


def test_veil_broker_on_a_busy_port_is_one_line(busy_port: int) -> None:
    done, _ = _cli("broker", "--port", str(busy_port))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"veil: error: --port: port {busy_port} on 127.0.0.1 is already in use "
        "(choose another port or stop what listens there)"
    )
    assert "tansu" not in done.stdout + done.stderr  # it never started


def test_veil_run_on_a_busy_port_fails_at_once_without_a_traceback(
    tmp_path: Path, clip: Path, busy_port: int
) -> None:
    config = tmp_path / "busy.yaml"
    config.write_text(f"observability:\n  http_port: {busy_port}\n")
    done, took = _cli("run", "--config", str(config), "--source", str(clip), "--alpha", "0")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "already in use" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "tritonserver" not in done.stdout and "detect worker" not in done.stdout
    assert took < 20, took  # imports only: no server was started and stopped


def test_check_port_free_accepts_a_free_port() -> None:
    check_port_free("127.0.0.1", free_loopback_port(), "x")
    with pytest.raises(ConfigError, match=r"x: cannot listen on 203\.0\.113\.9"):
        check_port_free("203.0.113.9", 8080, "x")  # not an address of this host


# -- outputs -----------------------------------------------------------------------------------


def test_json_lines_are_on_disk_as_soon_as_written(tmp_path: Path) -> None:
    path = tmp_path / "out" / "d.jsonl"
    path.parent.mkdir()
    path.write_text('{"earlier": "run"}\n')
    writer = JsonlWriter(path)
    writer.write(_message("a", 0))
    # Read by another handle before close: flushed, and the earlier run's line kept.
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"earlier": "run"}
    assert json.loads(lines[1])["stream"] == "a" and json.loads(lines[1])["scores"] == [0.9]
    writer.close()


def test_the_summary_is_bounded_on_any_run_length() -> None:
    tally = DetectionTally()
    for seq in range(3 * LATENCY_SAMPLE):
        tally.add(_message("a" if seq % 2 else "b", seq))
    assert tally.frames == 3 * LATENCY_SAMPLE
    assert len(tally.latencies) == LATENCY_SAMPLE
    assert tally.streams["a"].faces == 3 * LATENCY_SAMPLE // 2
    assert any("p50 50 ms" in line for line in tally.lines())


def _frames(clip: Path) -> list[Frame]:
    with av.open(str(clip)) as container:
        return [
            Frame(
                Envelope("cam", i, f.time, 1000.0 + i * 0.1),
                np.asarray(f.to_ndarray(format="bgr24"), dtype=np.uint8),
            )
            for i, f in enumerate(container.decode(video=0))
        ]


def test_annotated_video_is_h264_at_the_source_rate(tmp_path: Path, clip: Path) -> None:
    frames = _frames(clip)
    writer = AnnotatedWriter(tmp_path, rates={"cam": Fraction(30)})
    for frame in frames:
        writer.keep(frame)
        writer.on_detection(_message("cam", frame.sequence))
    writer.close()
    with av.open(str(tmp_path / "cam.mp4")) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "h264"
        assert video.average_rate == 30
        assert sum(1 for _ in container.decode(video=0)) == len(frames) == 60


def test_without_libx264_another_codec_is_used_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = av.CodecContext.create

    def create(name: str, mode: str) -> Any:
        if name == "libx264":
            raise av.error.EncoderNotFoundError(0, "libx264")  # type: ignore[no-untyped-call]
        return real(name, mode)  # type: ignore[call-overload]

    configure_logging()  # to this test's stderr
    annotate.pick_codec.cache_clear()
    monkeypatch.setattr(av.CodecContext, "create", create)
    try:
        assert annotate.pick_codec() == "libvpx-vp9"
    finally:
        annotate.pick_codec.cache_clear()
    warned = [line for line in capsys.readouterr().err.splitlines() if "libx264" in line]
    assert len(warned) == 1 and "libvpx-vp9" in warned[0]


def test_labels_scale_with_the_frame_height() -> None:
    for height in (240, 720, 2160):
        style = LabelStyle.for_height(height)
        (_, text_h), _ = cv2.getTextSize(
            "0.98", cv2.FONT_HERSHEY_SIMPLEX, style.font_scale, style.text_thickness
        )
        assert text_h >= 0.025 * height, (height, text_h)  # the 0.5 scale of 1080p was 1%
        assert style.box_thickness >= height / 400


def test_a_live_stream_rotates_by_time(tmp_path: Path, clip: Path) -> None:
    frames = _frames(clip)  # capture times 0.1 s apart: 6 s in all
    writer = AnnotatedWriter(tmp_path, live={"cam"}, rotation=Rotation(2**30, 2.0))
    for frame in frames:
        writer.keep(frame)
        writer.on_detection(_message("cam", frame.sequence))
    writer.close()
    files = writer.files["cam"]
    assert len(files) == 3 and sum(count for _, count in files) == 60
    for path, count in files:
        assert path.name.startswith("cam-19700101-0016")
        with av.open(str(path)) as container:
            assert container.streams.video[0].codec_context.name == "h264"
            assert sum(1 for _ in container.decode(video=0)) == count


# -- profiles and the footage they came from ---------------------------------------------------


def test_a_profile_of_other_footage_is_named_and_new_footage_gets_its_own(
    tmp_path: Path, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "CACHE", tmp_path / "cache")
    other = make_demo_clip(tmp_path / "other.mp4", seconds=2, fps=10, size=(160, 120))
    det = TinyDetector()
    geometry = det.default_geometry
    said: list[str] = []
    first = runner.default_bank(det, geometry, str(clip))
    runner.ensure_profiles(det, geometry, first, [0.5], str(clip), said.append)
    assert "calibrating" in said[0] and str(clip) in said[0]
    (profile,) = ProfileBank(first).profiles()
    assert runner.calibrated_on(profile) == str(clip)
    # Other footage, no --bank: a bank of its own, calibrated on it.
    second = runner.default_bank(det, geometry, str(other))
    assert second != first and second.parent == first.parent
    # Other footage with --bank of the first: said plainly, with the way out.
    said.clear()
    runner.ensure_profiles(det, geometry, first, [0.5], str(other), said.append)
    assert len(said) == 1
    assert f"was calibrated on {clip}, not on {other}" in said[0] and "--bank" in said[0]


def test_the_alpha_command_names_the_real_broker_and_streams(tmp_path: Path) -> None:
    config = VeilConfig(
        streams=(
            StreamConfig(id="lobby", source="a.mp4", alpha=0.5),
            StreamConfig(id="door", source="b.mp4", alpha=0.5),
        )
    )
    command = runner.alpha_command(config, "127.0.0.1:40123", [0.5, 0.9])
    assert command == (
        "veil alpha set lobby 0.9 --bootstrap 127.0.0.1:40123  (streams: lobby, door)"
    )
    (tmp_path / "keys").mkdir()
    signed = replace(config, signing=SigningConfig(private_key=str(tmp_path / "keys")))
    assert f"--key {tmp_path / 'keys' / 'operator.key'}" in runner.alpha_command(
        signed, "h:1", [0.5]
    )


# -- detections tail filters -------------------------------------------------------------------


def test_detection_filters_and_times() -> None:
    where = DetectionFilter(frozenset({"a"}), since=100.0, until=101.0, min_score=0.5)
    assert where.apply(_message("b", 0)) is None
    assert where.apply(_message("a", 40)) is None  # captured at 101.33
    kept = where.apply(_message("a", 3, scores=(0.9, 0.3)))
    assert kept is not None and kept.detections.confidence.tolist() == pytest.approx([0.9])
    assert where.apply(_message("a", 3, scores=(0.3,))) is None
    assert parse_time("10m", "--since", now=1000.0) == 400.0
    assert parse_time("1700000000.5", "--since") == 1700000000.5
    assert parse_time("2024-05-01T00:00:00+00:00", "--since") == 1714521600.0
    with pytest.raises(ConfigError, match="--until 'yesterday'"):
        parse_time("yesterday", "--until")


def test_a_slow_encoder_skips_frames_instead_of_queueing_without_bound(tmp_path: Path) -> None:
    config = VeilConfig(
        streams=(StreamConfig(id="cam", source="a.mp4"),),
        outputs=OutputConfig(annotated_dir=str(tmp_path)),
    )
    outputs = runner._RunOutputs(config, {}, print, print_detections=False)
    release, done = threading.Event(), []

    class Slow:
        def __init__(self) -> None:
            self.files: dict[str, list[tuple[Path, int]]] = {}

        def on_detection(self, msg: DetectionMessage) -> None:
            release.wait(30)
            done.append(msg.sequence)

        def close(self) -> None:
            pass

    outputs.annotator = Slow()
    for seq in range(runner.ANNOTATE_BACKLOG + 44):
        outputs.on_message(_message("cam", seq))
    assert outputs.unannotated == 44
    release.set()
    asyncio.run(outputs.close())
    assert done == list(range(runner.ANNOTATE_BACKLOG))
