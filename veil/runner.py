"""``veil run``: the whole pipeline on one host, on embedded defaults.

Starts (or connects to) the broker and Triton, exports the tail, runs the trusted-zone edge
worker and the outside detect worker, and prints detections as they arrive. In a deployment
each role runs alone (``veil edge``, ``veil detect``, ``veil triton``, ``veil broker``); this
module wires the same objects together for a demo, a test, or a single-box site.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from stream.frames import Frame
from stream.kafka import TopicNames, close_consumer, ensure_topics, make_consumer
from stream.runtime import Supervisor, stop_on_signals
from stream.signing import (
    PIPELINE_ROLES,
    ROLE_DETECT,
    RoleKeys,
    Verifier,
    keys_for,
    log_signing_state,
)
from stream.wire import CLEAN_PROFILE, DetectionMessage, decode_detection
from veil.config import EMBEDDED, KafkaSecurityConfig, StreamConfig, TritonTlsConfig, VeilConfig
from veil.detectors import load_decoder, load_detector
from veil.detectors.base import InputGeometry, SplitDetector
from veil.errors import ConfigError, ProfileError, VeilError, WireFormatError
from veil.observability import StatusServer
from veil.profiles import NoiseProfile, ProfileBank
from workers.trusted.edge import EdgeStats, EdgeWorker
from workers.trusted.obfuscator import Obfuscator, ProfileTable, pick_device

log = structlog.get_logger(__name__)
T = TypeVar("T")

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
async def broker_for(config: VeilConfig, supervisor: Supervisor) -> AsyncIterator[tuple[str, bool]]:
    """(bootstrap servers, idempotent producers?). An embedded broker is a supervised child:
    its death fails the graph (and it dies with this process)."""
    kafka_security(config)  # refuses security settings for the embedded broker
    if config.kafka.bootstrap == EMBEDDED:
        from stream.broker import EmbeddedBroker

        data_dir = Path(config.kafka.data_dir) if config.kafka.data_dir else None
        async with EmbeddedBroker(data_dir=data_dir) as broker:
            supervisor.add("broker", broker.watch, background=True)
            await ensure_topics(broker.bootstrap_servers, topics=topics_of(config))
            yield broker.bootstrap_servers, False  # tansu refuses idempotent producers
    else:
        idem = True if config.kafka.idempotent is None else config.kafka.idempotent
        yield config.kafka.bootstrap, idem


def _external_only(value: T, default: T, embedded: bool, name: str, what: str) -> T | None:
    """``value`` for an external server; None for an embedded one (plaintext on loopback),
    which refuses settings that would not apply to it."""
    if not embedded:
        return value
    if value != default:
        raise ConfigError(
            f"{name} applies to an external {what}; the embedded one listens in plaintext on "
            f"loopback (leave {name} unset with the embedded {what})"
        )
    return None


def kafka_security(config: VeilConfig) -> KafkaSecurityConfig | None:
    """How veil's Kafka clients connect: ``kafka.security`` for an external broker."""
    embedded = config.kafka.bootstrap == EMBEDDED
    return _external_only(
        config.kafka.security, KafkaSecurityConfig(), embedded, "kafka.security", "broker"
    )


def triton_tls(config: VeilConfig) -> TritonTlsConfig | None:
    """``triton.tls`` for an external Triton; None for the embedded tritonserver."""
    embedded = config.triton.url == EMBEDDED
    return _external_only(config.triton.tls, TritonTlsConfig(), embedded, "triton.tls", "Triton")


def topics_of(config: VeilConfig) -> TopicNames:
    return TopicNames(config.kafka.topic_prefix)


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
async def triton_for(config: VeilConfig, repo: Path, supervisor: Supervisor) -> AsyncIterator[str]:
    """Triton's gRPC URL; an embedded tritonserver is a supervised child like the broker."""
    triton_tls(config)  # refuses TLS settings for the embedded server before it starts
    if config.triton.url == EMBEDDED:
        from workers.untrusted.triton_server import EmbeddedTriton

        async with EmbeddedTriton(repo) as server:
            supervisor.add("triton", server.watch, background=True)
            yield server.grpc_url
    else:
        yield config.triton.url


def read_detection(record: Any, verifier: Verifier | None = None) -> DetectionMessage | None:
    """A detection record verified with the detect key (when ``verifier`` is given) and
    decoded; None, with a warning, for one that is unsigned, forged, tampered or malformed."""
    try:
        if verifier is not None:
            verifier.verify(record.key, record.value, record.headers or (), ROLE_DETECT)
    except WireFormatError as exc:
        log.warning("sink.unverified_detection", offset=record.offset, reason=str(exc))
        return None
    try:
        return decode_detection(record.key, record.value, record.headers)
    except WireFormatError as exc:
        log.warning("sink.malformed_detection", reason=str(exc))
        return None


async def collect_detections(
    bootstrap: str,
    topics: TopicNames,
    streams: set[str],
    sink: list[DetectionMessage],
    on_message: Callable[[DetectionMessage], None],
    verifier: Verifier | None = None,
    security: KafkaSecurityConfig | None = None,
) -> None:
    """A background stage of ``veil run``: the detections of ``streams``, once each (only
    those the detect key signed, when ``verifier`` is given)."""
    consumer = await make_consumer(
        bootstrap,
        f"veil-sink-{time.time_ns()}",
        [topics.detections],
        client_id="veil-sink",
        security=security,
    )
    seen: set[tuple[str, int]] = set()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for r in records:
                    msg = read_detection(r, verifier)
                    if msg is None:
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


@dataclass
class Graph:
    """What :func:`serve` built: the supervisor and the workers of the roles asked for."""

    supervisor: Supervisor
    edge: EdgeWorker | None = None
    detect: Any = None  # DetectWorker (imported lazily: the outside's module)
    detections: list[DetectionMessage] = field(default_factory=list)


async def serve(
    config: VeilConfig,
    roles: frozenset[str],
    *,
    obfuscator: Obfuscator | None = None,
    say: Callable[[str], None] = print,
    on_detection: Callable[[DetectionMessage], None] | None = None,
    settle_timeout_s: float = 60.0,
    frame_hook: Callable[[Frame], None] | None = None,
    stop: asyncio.Event | None = None,
) -> Graph:
    """The one graph builder: ``{"edge"}`` (``veil edge``), ``{"detect"}`` (``veil detect``) or
    ``{"edge", "detect", "sink"}`` (``veil run``: then, once the sources end, the detect
    worker runs until every published frame came back, ``settle_timeout_s`` at most).

    Runs until the graph ends; raises the first stage error. Returns the graph for its stats.
    """
    graph = Graph(Supervisor("veil-" + "+".join(sorted(roles))))
    sup = graph.supervisor
    # Keys are read (and a missing one refused) before anything starts.
    log_signing_state(config.signing)
    keys = {r: keys_for(config.signing, r) for r in PIPELINE_ROLES if r in roles}
    async with contextlib.AsyncExitStack() as stack:
        # First in, last out: /readyz answers 503 while the rest stops after a failure.
        await stack.enter_async_context(_status(config, sup, say))
        bootstrap, idempotent = await stack.enter_async_context(broker_for(config, sup))
        if "detect" in roles:
            # Under veil run the detect worker outlives the edge (it stops once drained).
            graph.detect = await _detect_role(
                config, stack, sup, bootstrap, idempotent, keys["detect"], own_stop="sink" in roles
            )
            say(f"detect worker: {graph.detect.manifest.detector} tail on {bootstrap}")
        if "edge" in roles:
            assert obfuscator is not None, "the edge role needs the trusted zone's obfuscator"
            graph.edge = EdgeWorker(
                config.streams,
                obfuscator,
                bootstrap,
                idempotent=idempotent,
                quantisation=config.kafka.payload,
                batching=config.batching,
                topics=topics_of(config),
                max_request_size=config.kafka.max_request_size,
                frame_hook=frame_hook,
                signer=keys["edge"].signer,
                control_verifier=keys["edge"].verifier,
                security=kafka_security(config),
            )
            await stack.enter_async_context(graph.edge)
            graph.edge.attach(sup)
        if "sink" in roles:
            _attach_sink(
                config, graph, bootstrap, say, on_detection, settle_timeout_s, keys["sink"].verifier
            )
        if stop is not None:
            sup.add("stop", partial(_stop_on, stop, sup), background=True)
        with stop_on_signals(sup):
            await sup.run()
    return graph


async def _stop_on(event: asyncio.Event, supervisor: Supervisor) -> None:
    await event.wait()
    supervisor.request_stop()


async def _detect_role(
    config: VeilConfig,
    stack: contextlib.AsyncExitStack,
    supervisor: Supervisor,
    bootstrap: str,
    idempotent: bool,
    keys: RoleKeys,
    *,
    own_stop: bool,
) -> Any:
    from workers.untrusted.detect import DetectWorker
    from workers.untrusted.tail_client import TritonTail
    from workers.untrusted.triton_repo import TailManifest

    repo = Path(config.triton.model_repository)
    manifest = TailManifest.read(repo)
    # The outside needs the architecture only, for anchors and box decoding: no weights.
    decoder = load_decoder(manifest.detector)
    url = await stack.enter_async_context(triton_for(config, repo, supervisor))
    tail = TritonTail(
        url,
        config.triton.model or manifest.python_model,
        manifest,
        timeout_s=config.triton.timeout_s,
        tls=triton_tls(config),
    )
    worker = DetectWorker(
        bootstrap,
        tail,
        decoder,
        manifest,
        idempotent=idempotent,
        group_id=config.kafka.group_id,
        topics=topics_of(config),
        max_batch=config.batching.max_batch,
        signer=keys.signer,
        verifier=keys.verifier,
        security=kafka_security(config),
    )
    await stack.enter_async_context(worker)
    worker.attach(supervisor, stop=asyncio.Event() if own_stop else None)
    return worker


def _attach_sink(
    config: VeilConfig,
    graph: Graph,
    bootstrap: str,
    say: Callable[[str], None],
    on_detection: Callable[[DetectionMessage], None] | None,
    settle_timeout_s: float,
    verifier: Verifier | None = None,
) -> None:
    def on_message(msg: DetectionMessage) -> None:
        if on_detection is not None:
            on_detection(msg)

    streams = {s.id for s in config.streams}
    graph.supervisor.add(
        "sink",
        partial(
            collect_detections,
            bootstrap,
            topics_of(config),
            streams,
            graph.detections,
            on_message,
            verifier,
            kafka_security(config),
        ),
        background=True,
    )
    graph.supervisor.add("settle", partial(_settle, graph, settle_timeout_s, say))


async def _settle(graph: Graph, timeout_s: float, say: Callable[[str], None]) -> None:
    """Once the edge has published its last frame, wait for every detection, then stop the
    detect worker (a foreground stage of ``veil run``)."""
    assert graph.edge is not None and graph.detect is not None
    await graph.edge.finished.wait()
    deadline = time.monotonic() + timeout_s
    while len(graph.detections) < graph.edge.stats.frames_published:
        if time.monotonic() > deadline:
            say(
                f"gave up waiting after {timeout_s:.0f} s: "
                f"{graph.edge.stats.frames_published - len(graph.detections)} frames have no "
                "detections"
            )
            break
        await asyncio.sleep(0.05)
    graph.detect.request_stop()


@contextlib.asynccontextmanager
async def _status(
    config: VeilConfig, supervisor: Supervisor, say: Callable[[str], None]
) -> AsyncIterator[None]:
    """/metrics, /healthz and /readyz (the supervisor's readiness), if a port is set. After a
    failure /readyz answers 503 for ``failure_linger_s`` more, so that probes see it."""
    obs_config = config.observability
    if obs_config.http_port is None:
        yield
        return
    server = StatusServer(obs_config.http_port, lambda: supervisor.ready, obs_config.http_host)
    await server.start()
    say(f"metrics and health on http://{server.host}:{server.port}/metrics")
    try:
        yield
    finally:
        if supervisor.error is not None:
            await asyncio.sleep(obs_config.failure_linger_s)
        await server.stop()


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
    """``veil run``: every role on one host until the (file) sources end, then drain and
    stop. SIGTERM/SIGINT stop reading at once; what was already read is still published and
    detected. Missing profiles are calibrated on the first file source."""
    started = time.perf_counter()
    if not config.streams:
        raise ProfileError("no streams configured")
    first_file = next((s.source for s in config.streams if "://" not in s.source), None)
    obfuscator = build_obfuscator(config, first_file if calibrate_missing else None, say)
    repo = Path(config.triton.model_repository)
    # Every profile the zone may apply gets its tail served, so live alpha changes keep working.
    export_tail(obfuscator.detector, obfuscator.geometry, repo, obfuscator.table.profiles)
    annotator = None
    # Video encoding blocks: one thread of its own, which also keeps the frames in order.
    encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="veil-annotate")
    if config.outputs.annotated_dir:
        from workers.trusted.annotate import AnnotatedWriter

        annotator = AnnotatedWriter(Path(config.outputs.annotated_dir))

    def on_message(msg: DetectionMessage) -> None:
        if annotator is not None:
            encoder.submit(annotator.on_detection, msg)
        if print_detections:
            say(describe(msg))
        if on_detection is not None:
            on_detection(msg)

    say(f"device {obfuscator.device}; profiles {obfuscator.table.alphas}")
    graph = await serve(
        config,
        frozenset({"edge", "detect", "sink"}),
        obfuscator=obfuscator,
        say=say,
        on_detection=on_message,
        settle_timeout_s=settle_timeout_s,
        frame_hook=annotator.keep if annotator is not None else None,
        stop=stop,
    )
    await asyncio.to_thread(encoder.shutdown, True)
    if annotator is not None:
        annotator.close()
        for sid, count in annotator.written.items():
            say(f"annotated video: {annotator.path(sid)} ({count} frames)")
    assert graph.edge is not None
    return RunSummary(
        graph.edge.stats,
        graph.detections,
        time.perf_counter() - started,
        str(obfuscator.device),
    )


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
