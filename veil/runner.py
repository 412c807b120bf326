"""``veil run``: the whole pipeline on one host, on embedded defaults.

Starts (or connects to) the broker and Triton, exports the tail, runs the trusted-zone edge
worker and the outside detect worker, and prints detections as they arrive. In a deployment
each role runs alone (``veil edge``, ``veil detect``, ``veil triton``, ``veil broker``); this
module wires the same objects together for a demo, a test, or a single-box site.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from stream.kafka import DEFAULT_TOPICS, close_consumer, ensure_topics, make_consumer
from stream.wire import CLEAN_PROFILE, DetectionMessage, decode_detection
from veil.config import EMBEDDED, StreamConfig, VeilConfig
from veil.detectors import load_decoder, load_detector
from veil.detectors.base import InputGeometry, SplitDetector
from veil.errors import ProfileError, VeilError, WireFormatError
from veil.observability import StatusServer
from veil.profiles import NoiseProfile, ProfileBank
from workers.trusted.edge import EdgeStats, EdgeWorker
from workers.trusted.obfuscator import Obfuscator, ProfileTable, pick_device

log = structlog.get_logger(__name__)

CACHE = Path.home() / ".cache" / "veil"


@dataclass
class RunSummary:
    edge: EdgeStats
    detections: list[DetectionMessage] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"

    def latencies(self) -> list[float]:
        return [d.produced_time - d.capture_time for d in self.detections]

    def lines(self) -> list[str]:
        lat = sorted(self.latencies())
        per_stream: dict[str, list[int]] = {}
        for d in self.detections:
            per_stream.setdefault(d.stream_id, []).append(len(d.detections))
        out = [
            f"frames read {self.edge.frames_in}, published {self.edge.frames_published}, "
            f"detections received for {len(self.detections)} frames in {self.seconds:.1f} s "
            f"on {self.device}",
        ]
        if self.edge.frames_published:
            per_frame = self.edge.bytes_published / self.edge.frames_published
            out.append(f"bytes per frame on the wire: {per_frame:,.0f}")
        for sid, counts in sorted(per_stream.items()):
            out.append(
                f"stream {sid}: {len(counts)} frames, {sum(counts)} faces "
                f"(mean {statistics.fmean(counts):.2f} per frame)"
            )
        if lat:
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            out.append(
                f"end-to-end latency p50 {statistics.median(lat) * 1000:.0f} ms, "
                f"p99 {p99 * 1000:.0f} ms"
            )
        for sid, err in self.edge.source_errors.items():
            out.append(f"stream {sid} failed: {err}")
        return out


def default_bank(detector: SplitDetector, geometry: InputGeometry) -> Path:
    return CACHE / "banks" / f"{detector.name}-{detector.weights_id[:12]}-{geometry}"


def ensure_profiles(
    detector: SplitDetector,
    geometry: InputGeometry,
    bank_dir: Path,
    alphas: list[float],
    calibration_source: str | None,
    say: Callable[[str], None],
) -> None:
    """Calibrate missing alphas on the operator's own footage (the zero-config path)."""
    bank = ProfileBank(bank_dir)
    have = set(bank.alphas(detector.name, str(geometry)))
    missing = sorted({round(a, 2) for a in alphas if a > 0} - have)
    if not missing:
        return
    if calibration_source is None:
        raise ProfileError(
            f"no calibrated profile for alpha(s) {missing} in {bank_dir}; available: "
            f"{sorted(have) or 'none'}. Run `veil calibrate` first."
        )
    from veil.calibrate import calibrate, config_for, video_frames

    frames = video_frames(Path(calibration_source), every=1, limit=48)
    say(
        f"no noise profile for alpha {missing} yet: calibrating on {len(frames)} frames of "
        f"{calibration_source} (once; cached in {bank_dir})"
    )
    config = config_for(
        detector.name, alphas=tuple(missing), geometry=geometry, epochs=4, batch_size=8
    )
    calibrate(detector, frames, bank_dir, config, source=calibration_source, log=say)


def build_obfuscator(
    config: VeilConfig,
    calibration_source: str | None = None,
    say: Callable[[str], None] = print,
) -> Obfuscator:
    """The trusted zone's compute: detector, geometry, profile bank and per-stream noise.

    Missing profiles for the streams' alphas are calibrated on ``calibration_source`` when
    given, else refused with the list of available ones.
    """
    device = pick_device(config.model.device)
    weights = Path(config.model.weights) if config.model.weights else None
    detector = load_detector(config.model.name, weights, device)
    geometry = (
        InputGeometry.parse(config.model.geometry)
        if config.model.geometry
        else detector.default_geometry
    )
    bank_dir = (
        Path(config.profile_bank) if config.profile_bank else default_bank(detector, geometry)
    )
    alphas = [s.alpha for s in config.streams]
    ensure_profiles(detector, geometry, bank_dir, alphas, calibration_source, say)
    table = ProfileTable.from_bank(detector, geometry, ProfileBank(bank_dir), device)
    return Obfuscator(detector, geometry, table, device, config.batching.cuda_streams)


@contextlib.asynccontextmanager
async def broker_for(config: VeilConfig) -> AsyncIterator[tuple[str, bool]]:
    """(bootstrap servers, idempotent producers?)"""
    if config.kafka.bootstrap == EMBEDDED:
        from stream.broker import EmbeddedBroker

        async with EmbeddedBroker() as broker:
            yield broker.bootstrap_servers, False  # tansu refuses idempotent producers
    else:
        idem = True if config.kafka.idempotent is None else config.kafka.idempotent
        yield config.kafka.bootstrap, idem


def export_tail(
    detector: SplitDetector,
    geometry: InputGeometry,
    repo: Path,
    profiles: Sequence[NoiseProfile] = (),
) -> Any:
    """The tail repository at ``repo`` for ``detector`` at ``geometry`` serving ``profiles``
    (each tuned tail as its own model), exported unless the one there already is that."""
    from workers.untrusted.triton_repo import TailManifest, export_model_repository

    wanted = {CLEAN_PROFILE} | {p.profile_id for p in profiles}
    with contextlib.suppress(VeilError):
        manifest = TailManifest.read(repo)
        if (
            manifest.detector == detector.name
            and manifest.weights_id == detector.weights_id
            and manifest.geometry == geometry
            and set(manifest.profile_routes()) == wanted
        ):
            return manifest
    export_model_repository(detector, geometry, repo, profiles=profiles)
    return TailManifest.read(repo)


@contextlib.asynccontextmanager
async def triton_for(config: VeilConfig, repo: Path) -> AsyncIterator[str]:
    if config.triton.url == EMBEDDED:
        from workers.untrusted.triton_server import EmbeddedTriton

        async with EmbeddedTriton(repo) as server:
            yield server.grpc_url
    else:
        yield config.triton.url


async def collect_detections(
    bootstrap: str,
    streams: set[str],
    sink: list[DetectionMessage],
    on_message: Callable[[DetectionMessage], None],
    stop: asyncio.Event,
) -> None:
    consumer = await make_consumer(
        bootstrap,
        f"veil-sink-{time.time_ns()}",
        [DEFAULT_TOPICS.detections],
        client_id="veil-sink",
    )
    seen: set[tuple[str, int]] = set()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for r in records:
                    try:
                        msg = decode_detection(r.key, r.value, r.headers)
                    except WireFormatError as exc:
                        log.warning("sink.malformed_detection", reason=str(exc))
                        continue
                    if msg.stream_id not in streams or (msg.stream_id, msg.sequence) in seen:
                        continue  # at-least-once: a redelivery
                    seen.add((msg.stream_id, msg.sequence))
                    sink.append(msg)
                    on_message(msg)
    finally:
        await close_consumer(consumer)


def describe(msg: DetectionMessage) -> str:
    boxes = ", ".join(
        f"[{b[0]:.0f},{b[1]:.0f},{b[2]:.0f},{b[3]:.0f}]@{s:.2f}"
        for b, s in zip(
            msg.detections.xyxy.tolist(), msg.detections.confidence.tolist(), strict=True
        )
    )
    pts = f"{msg.pts:.2f}s" if msg.pts is not None else "-"
    return (
        f"{msg.stream_id} #{msg.sequence} pts={pts} alpha={msg.alpha:.2f} "
        f"faces={len(msg.detections)} {boxes}"
    )


async def run_pipeline(
    config: VeilConfig,
    *,
    say: Callable[[str], None] = print,
    print_detections: bool = True,
    calibrate_missing: bool = True,
    settle_timeout_s: float = 60.0,
    stop: asyncio.Event | None = None,
    on_detection: Callable[[DetectionMessage], None] | None = None,
) -> RunSummary:
    """Run every role until the (file) sources end, then drain and stop. SIGTERM/SIGINT stop
    reading at once; what was already read is still published and detected."""
    from workers.untrusted.detect import DetectWorker
    from workers.untrusted.tail_client import TritonTail

    started = time.perf_counter()
    if not config.streams:
        raise ProfileError("no streams configured")
    first_file = next((s.source for s in config.streams if "://" not in s.source), None)
    obfuscator = build_obfuscator(config, first_file if calibrate_missing else None, say)
    detector, geometry = obfuscator.detector, obfuscator.geometry
    device = obfuscator.device
    repo = Path(config.triton.model_repository)
    # Every profile the zone may apply gets its tail served, so live alpha changes keep working.
    manifest = export_tail(detector, geometry, repo, obfuscator.table.profiles)
    decoder = load_decoder(config.model.name)  # outside: architecture only, no weights
    detections: list[DetectionMessage] = []

    annotator = None
    if config.outputs.annotated_dir:
        from workers.trusted.annotate import AnnotatedWriter

        annotator = AnnotatedWriter(Path(config.outputs.annotated_dir))

    def on_message(msg: DetectionMessage) -> None:
        if annotator is not None:
            annotator.on_detection(msg)
        if print_detections:
            say(describe(msg))
        if on_detection is not None:
            on_detection(msg)

    async with broker_for(config) as (bootstrap, idempotent):
        await ensure_topics(bootstrap)
        async with triton_for(config, repo) as triton_url:
            say(
                f"broker {bootstrap}; triton {triton_url}; tail {manifest.python_model}; "
                f"device {device}; profiles {obfuscator.table.alphas}"
            )
            stop_sink = asyncio.Event()
            sink = asyncio.create_task(
                collect_detections(
                    bootstrap, {s.id for s in config.streams}, detections, on_message, stop_sink
                )
            )
            tail_model = config.triton.model or manifest.python_model
            async with TritonTail(triton_url, tail_model, manifest) as tail:
                worker = DetectWorker(
                    bootstrap,
                    tail,
                    decoder,
                    manifest,
                    idempotent=idempotent,
                    group_id=config.kafka.group_id,
                    max_batch=config.batching.max_batch,
                )
                await worker.start()
                detect_task = asyncio.create_task(worker.run())
                edge = EdgeWorker(
                    config.streams,
                    obfuscator,
                    bootstrap,
                    idempotent=idempotent,
                    quantisation=config.kafka.payload,
                    batching=config.batching,
                    max_request_size=config.kafka.max_request_size,
                    frame_hook=annotator.keep if annotator is not None else None,
                )
                await edge.start()
                status: StatusServer | None = None
                if config.observability.http_port is not None:
                    status = StatusServer(
                        config.observability.http_port, lambda: edge.ready and worker.ready
                    )
                    await status.start()
                    say(f"metrics and health on http://127.0.0.1:{status.port}/metrics")
                loop = asyncio.get_running_loop()
                stop_requested = stop or asyncio.Event()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.add_signal_handler(sig, stop_requested.set)
                run_task = asyncio.create_task(edge.run())
                waiter = asyncio.create_task(stop_requested.wait())
                await asyncio.wait({run_task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                await edge.stop()
                error = run_task.exception() if run_task.done() else None
                if not run_task.done():
                    run_task.cancel()
                # Wait until every published frame has come back as detections.
                deadline = time.monotonic() + settle_timeout_s
                while (
                    len(detections) < edge.stats.frames_published
                    and time.monotonic() < deadline
                    and not detect_task.done()
                ):
                    await asyncio.sleep(0.1)
                worker.request_stop()
                if status is not None:
                    await status.stop()
                await asyncio.gather(detect_task, return_exceptions=True)
                await worker.stop()
                stop_sink.set()
                await asyncio.gather(sink, return_exceptions=True)
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)
                if error is not None:
                    raise error
    if annotator is not None:
        annotator.close()
        for sid, count in annotator.written.items():
            say(f"annotated video: {annotator.path(sid)} ({count} frames)")
    summary = RunSummary(edge.stats, detections, time.perf_counter() - started, str(device))
    return summary


def demo_streams(alpha: float = 0.8) -> tuple[StreamConfig, ...]:
    from stream.demo_clip import make_demo_clip

    clip = CACHE / "demo" / "astronaut.mp4"
    if not clip.is_file():
        clip.parent.mkdir(parents=True, exist_ok=True)
        make_demo_clip(clip)
    return (StreamConfig(id="demo", source=str(clip), policy="lossless", alpha=alpha),)


def write_jsonl(path: Path, detections: list[DetectionMessage]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for d in detections:
            fh.write(
                json.dumps(
                    {
                        "stream": d.stream_id,
                        "sequence": d.sequence,
                        "pts": d.pts,
                        "capture_time": d.capture_time,
                        "produced_time": d.produced_time,
                        "model": d.model,
                        "profile_id": d.profile_id,
                        "alpha": d.alpha,
                        **d.detections.to_json(),
                    }
                )
                + "\n"
            )
