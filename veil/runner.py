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
import hashlib
import os
import shlex
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aiokafka import TopicPartition

from stream.frames import Frame
from stream.kafka import (
    DEFAULT_TOPICS,
    KafkaLink,
    SequenceDeduper,
    TopicNames,
    assigned_reader,
    ensure_topics,
)
from stream.runtime import Supervisor, concurrently, one_line, stop_on_signals
from stream.signing import (
    PIPELINE_ROLES,
    RoleKeys,
    Verifier,
    keys_for,
    log_signing_state,
    signing_enabled,
)
from stream.sources import LIVE_SCHEMES
from stream.wire import CLEAN_PROFILE, DetectionMessage
from veil import http_api
from veil import observability as obs
from veil.config import EMBEDDED, KafkaSecurityConfig, StreamConfig, TritonTlsConfig, VeilConfig
from veil.detectors import load_decoder, load_detector
from veil.detectors.base import InputGeometry, SplitDetector
from veil.errors import ConfigError, ProfileError, VeilError
from veil.observability import Request, Response, StatusServer
from veil.outputs import DetectionTally, JsonlWriter, read_detection
from veil.preflight import check_edge
from veil.profiles import NoiseProfile, ProfileBank
from workers.trusted.edge import EdgeStats, EdgeWorker
from workers.trusted.flow import FlowControl
from workers.trusted.obfuscator import Obfuscator, ProfileTable, pick_device
from workers.trusted.preview import LivePreview

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Caches and run files of `veil run`: $XDG_CACHE_HOME/veil, else ~/.cache/veil.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "veil"
ANNOTATE_BACKLOG = 256  # detections waiting for the annotated-video encoder, at most


@dataclass
class RunSummary:
    """What ``veil run`` reports at its end: bounded counters, whatever the run's length."""

    edge: EdgeStats
    tally: DetectionTally = field(default_factory=DetectionTally)
    seconds: float = 0.0
    device: str = "cpu"
    alpha_command: str = ""
    # Seconds from the start of the run to its first detection, and how much of that was
    # spent loading the model and its profiles (calibrating them, the first time).
    first_detection_s: float | None = None
    setup_s: float = 0.0

    def latencies(self) -> list[float]:
        """End-to-end latencies: all of them, or a uniform sample of a long run's."""
        return list(self.tally.latencies)

    def lines(self) -> list[str]:
        out = [
            f"frames read {self.edge.frames_in}, published {self.edge.frames_published}, "
            f"detections received for {self.tally.frames} frames in {self.seconds:.1f} s "
            f"on {self.device}",
        ]
        if self.first_detection_s is not None:
            out.append(
                f"time to first detection {self.first_detection_s:.1f} s "
                f"({self.setup_s:.1f} s of it loading the model and profiles)"
            )
        if self.edge.frames_published:
            per_frame = self.edge.bytes_published / self.edge.frames_published
            out.append(f"bytes per frame on the wire: {per_frame:,.0f}")
        out.extend(self.tally.lines())
        for sid, err in self.edge.source_errors.items():
            out.append(f"stream {sid} failed: {err}")
        if self.alpha_command:
            out.append(f"change a stream's alpha while it runs: {self.alpha_command}")
        return out


def _model_key(detector: SplitDetector, geometry: InputGeometry) -> str:
    return f"{detector.name}-{detector.weights_id[:12]}-{geometry}"


def footage_key(source: str) -> str:
    """A folder name for one piece of footage: its stem and a hash of its absolute path."""
    path = Path(source).resolve()
    return f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def default_bank(
    detector: SplitDetector, geometry: InputGeometry, footage: str | None = None
) -> Path:
    """The cache's bank for this model: one folder per footage profiles are calibrated on."""
    root = CACHE / "banks" / _model_key(detector, geometry)
    return root if footage is None else root / footage_key(footage)


def default_repository(detector: SplitDetector, geometry: InputGeometry) -> Path:
    return CACHE / "triton-repositories" / _model_key(detector, geometry)


def calibrated_on(profile: NoiseProfile) -> str:
    """The footage a profile was calibrated on, as its meta records it."""
    return str(profile.meta.trained_on.get("source") or "unrecorded footage")


def _same_footage(recorded: str, source: str) -> bool:
    path = recorded.removeprefix("video:")
    return Path(path).resolve() == Path(source).resolve()


def _note_foreign_footage(
    profiles: Sequence[NoiseProfile], bank_dir: Path, source: str, say: Callable[[str], None]
) -> None:
    for profile in profiles:
        footage = calibrated_on(profile)
        if not _same_footage(footage, source):
            say(
                f"note: the alpha {profile.alpha} profile in {bank_dir} was calibrated on "
                f"{footage}, not on {source}; leave out --bank (profile_bank) to calibrate on "
                f"{source} (once, cached), or `veil calibrate --video {source} --out DIR` and "
                "pass --bank DIR"
            )


def ensure_profiles(
    detector: SplitDetector,
    geometry: InputGeometry,
    bank_dir: Path,
    alphas: list[float],
    calibration_source: str | None,
    say: Callable[[str], None],
    *,
    note_footage: bool = True,
) -> None:
    """Calibrate missing alphas on the operator's own footage (the zero-config path). With
    ``note_footage``, say which footage each profile in use came from when it is not
    ``calibration_source``."""
    wanted = {round(a, 2) for a in alphas if a > 0}
    found = [
        p
        for p in ProfileBank(bank_dir).profiles()
        if p.meta.model == detector.name and p.meta.geometry == str(geometry)
    ]
    have = {p.alpha for p in found}
    if calibration_source is not None and note_footage:
        _note_foreign_footage(
            [p for p in found if p.alpha in wanted], bank_dir, calibration_source, say
        )
    missing = sorted(wanted - have)
    if not missing:
        return
    if calibration_source is None:
        raise ProfileError(
            f"no calibrated profile for alpha(s) {missing} in {bank_dir}; available: "
            f"{sorted(have) or 'none'}. Run `veil calibrate --video <your footage> --out DIR` "
            "first and pass --bank DIR (profile_bank)"
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
    explicit = config.profile_bank is not None
    bank_dir = bank_folder(config, detector, geometry, calibration_source)
    alphas = [s.alpha for s in config.streams]
    ensure_profiles(
        detector, geometry, bank_dir, alphas, calibration_source, say, note_footage=explicit
    )
    table = ProfileTable.from_bank(detector, geometry, ProfileBank(bank_dir), device)
    return Obfuscator(
        detector,
        geometry,
        table,
        device,
        config.batching.cuda_streams,
        head_runtime=config.model.head_runtime,
        threads=config.threads.for_role("edge", {"edge"}),  # serve() sets the edge role's
        precision=config.model.precision,
    )


def bank_folder(
    config: VeilConfig,
    detector: SplitDetector,
    geometry: InputGeometry,
    calibration_source: str | None = None,
) -> Path:
    """The profile bank the trusted zone reads: ``profile_bank``, else the cache's."""
    if config.profile_bank:
        return Path(config.profile_bank)
    return default_bank(detector, geometry, calibration_source)


def thread_group(config: VeilConfig, roles: Collection[str]) -> frozenset[str]:
    """The roles of a graph of ``roles`` whose compute shares this host's cores: the edge, the
    detect worker and, beside it, an embedded Triton (``threads``' default shares)."""
    group = {r for r in roles if r in ("edge", "detect")}
    if "detect" in group and config.triton.url == EMBEDDED:
        group.add("triton")
    return frozenset(group)


# The embedded broker keeps detections for this long: tansu's cost per fetch grows with what a
# partition holds, and nobody commits on the detections topic (veil run's sink reads without a
# group), so untrimmed it grew over a run: tansu's CPU 0.27 -> 0.44 of a core in 120 s of a
# realtime RetinaFace stream, the latency's p99 with it. An external Kafka keeps what its
# operator sets.
EMBEDDED_DETECTIONS_RETENTION_MS = 10_000


@contextlib.asynccontextmanager
async def broker_for(config: VeilConfig, supervisor: Supervisor) -> AsyncIterator[KafkaLink]:
    """How the roles reach the broker. An embedded broker is a supervised child: its death
    fails the graph (and it dies with this process)."""
    security = kafka_security(config)  # refuses security settings for the embedded broker
    if config.kafka.bootstrap == EMBEDDED:
        from stream.broker import EmbeddedBroker

        data_dir = Path(config.kafka.data_dir) if config.kafka.data_dir else None
        async with EmbeddedBroker(data_dir=data_dir) as broker:
            supervisor.add("broker", broker.watch, background=True)
            await ensure_topics(
                broker.bootstrap_servers,
                topics=topics_of(config),
                detections_retention_ms=EMBEDDED_DETECTIONS_RETENTION_MS,
            )
            # tansu refuses idempotent producers
            yield KafkaLink(broker.bootstrap_servers, False, topics_of(config))
    else:
        idem = True if config.kafka.idempotent is None else config.kafka.idempotent
        yield KafkaLink(config.kafka.bootstrap, idem, topics_of(config), security)


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


def session_timeout_ms(config: VeilConfig) -> int:
    """The detect group's session timeout: ``kafka.session_timeout_ms``, else 3 s on the
    embedded broker (a group's first join waits about half of it there: measured 5.0 s at
    aiokafka's 10 s, 2.0 s at 3 s) and 10 s on Kafka (whose brokers refuse under 6 s)."""
    if config.kafka.session_timeout_ms is not None:
        return config.kafka.session_timeout_ms
    return 3_000 if config.kafka.bootstrap == EMBEDDED else 10_000


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
            and manifest.python_models_current(repo)  # not one an older veil wrote
        ):
            return manifest
    export_model_repository(detector, geometry, repo, profiles=profiles)
    return TailManifest.read(repo)


@contextlib.asynccontextmanager
async def triton_for(
    config: VeilConfig, repo: Path, supervisor: Supervisor, threads: int | None = None
) -> AsyncIterator[tuple[str, Callable[[], Awaitable[None]] | None]]:
    """Triton's gRPC URL, and what to await until it is ready (None: a server of its own,
    nothing boots here). An embedded tritonserver is a supervised child like the broker, its
    Python models running ``threads`` torch threads; it is launched here and boots while the
    caller starts what else it needs."""
    triton_tls(config)  # refuses TLS settings for the embedded server before it starts
    if config.triton.url == EMBEDDED:
        from workers.untrusted.triton_server import EmbeddedTriton

        server = EmbeddedTriton(repo, threads=threads)
        server.launch()
        try:
            supervisor.add("triton", server.watch, background=True)
            yield server.grpc_url, server.wait_ready
        finally:
            await server.stop()
    else:
        yield config.triton.url, None


async def detections_reader(
    bootstrap: str, topics: TopicNames, security: KafkaSecurityConfig | None = None
) -> tuple[Any, list[TopicPartition]]:
    """A reader of the detections topic without a group (no join to wait for), positioned at
    its end now: it gets what is detected from here on, not an earlier run's detections."""
    consumer, parts = await assigned_reader(
        bootstrap, topics.detections, security, "veil-sink", "the broker has no topics yet"
    )
    await consumer.seek_to_end(*parts)
    for tp in parts:
        await consumer.position(tp)  # fixed before anything is published
    return consumer, parts


async def collect_detections(
    reader: tuple[Any, list[TopicPartition]],
    streams: set[str],
    on_message: Callable[[DetectionMessage], None],
    verifier: Verifier | None = None,
) -> None:
    """A background stage of ``veil run``: the detections of ``streams`` from a
    :func:`detections_reader`, once each (only those the detect key signed, when ``verifier``
    is given), handed to ``on_message``; the reader is stopped at the end. Its memory is
    bounded: redeliveries are dropped by a window per stream, nothing is kept."""
    consumer, parts = reader
    seen = SequenceDeduper()
    try:
        while True:
            batches = await consumer.getmany(*parts, timeout_ms=100)
            for records in batches.values():
                for r in records:
                    msg = read_detection(r, verifier)
                    if msg is None or msg.stream_id not in streams:
                        continue
                    if seen.accept(msg.stream_id, msg.sequence):  # else a redelivery
                        on_message(msg)
    finally:
        await consumer.stop()


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
    tally: DetectionTally = field(default_factory=DetectionTally)  # what the sink received
    alpha_command: str = ""  # how an operator changes a stream's alpha on this graph
    http_url: str = ""  # where its metrics, health and API answer, if a port is set


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
    bank_dir: Path | None = None,
    preview: LivePreview | None = None,
) -> Graph:
    """The one graph builder: ``{"edge"}`` (``veil edge``), ``{"detect"}`` (``veil detect``) or
    ``{"edge", "detect", "sink"}`` (``veil run``: then, once the sources end, the detect
    worker runs until every published frame came back, ``settle_timeout_s`` at most).
    ``bank_dir``: the profile bank the edge reloads on request (default: :func:`bank_folder`).
    ``preview``: the live preview the edge's HTTP API serves.

    Runs until the graph ends; raises the first stage error. Returns the graph for its stats.
    """
    graph = Graph(Supervisor("veil-" + "+".join(sorted(roles))))
    sup = graph.supervisor
    # Keys are read (and a missing one refused) before anything starts.
    log_signing_state(config.signing)
    keys = {r: keys_for(config.signing, r) for r in PIPELINE_ROLES if r in roles}
    async with contextlib.AsyncExitStack() as stack:
        # First in, last out: /readyz answers 503 while the rest stops after a failure.
        await stack.enter_async_context(_status(config, graph, say))
        # An embedded Triton boots (seconds) while the broker starts and the group joins.
        triton = await _triton_role(config, stack, sup, roles) if "detect" in roles else None
        link = await stack.enter_async_context(broker_for(config, sup))
        bootstrap = link.bootstrap
        if triton is not None:
            # Under veil run the detect worker outlives the edge (it stops once drained).
            graph.detect = await _detect_role(
                config, stack, sup, link, keys["detect"], roles, triton
            )
            say(f"detect worker: {graph.detect.manifest.detector} tail on {bootstrap}")
        if "edge" in roles:
            assert obfuscator is not None, "the edge role needs the trusted zone's obfuscator"
            obfuscator.set_threads(config.threads.for_role("edge", thread_group(config, roles)))
            graph.edge = _edge_role(config, obfuscator, link, keys["edge"], frame_hook)
            _wire_edge(config, graph, bank_dir, preview, say)
            await stack.enter_async_context(graph.edge)
            graph.edge.attach(sup)
            graph.alpha_command = alpha_command(config, bootstrap, obfuscator.table.alphas)
            say(f"change a stream's alpha while this runs: {graph.alpha_command}")
        if "sink" in roles:
            await _attach_sink(
                config, graph, bootstrap, say, on_detection, settle_timeout_s, keys["sink"].verifier
            )
        if stop is not None:
            sup.add("stop", partial(_stop_on, stop, sup), background=True)
        with stop_on_signals(sup):
            await sup.run()
    return graph


def _wire_edge(
    config: VeilConfig,
    graph: Graph,
    bank_dir: Path | None,
    preview: LivePreview | None,
    say: Callable[[str], None],
) -> None:
    """What the edge of ``graph`` serves besides its streams: the bank it reloads (and, beside
    a detect worker, the new tails it serves outside first) and the live preview."""
    edge = graph.edge
    assert edge is not None
    o = edge.obfuscator
    edge.bank_dir = bank_dir or bank_folder(config, o.detector, o.geometry)
    edge.preview = preview
    if graph.detect is not None and config.triton.model_repository:
        edge.before_reload = partial(_serve_new_tails, config, graph)
    for s in config.streams if preview is not None else ():
        say(f"live preview of {s.id}: {graph.http_url}/v1/streams/{s.id}/preview")


def _edge_role(
    config: VeilConfig,
    obfuscator: Obfuscator,
    link: KafkaLink,
    keys: RoleKeys,
    frame_hook: Callable[[Frame], None] | None,
) -> EdgeWorker:
    return EdgeWorker(
        config.streams,
        obfuscator,
        link,
        quantisation=config.kafka.payload,
        batching=config.batching,
        max_request_size=config.kafka.max_request_size,
        frame_hook=frame_hook,
        signer=keys.signer,
        control_verifier=keys.verifier,
        # Realtime streams: two frames in flight per stream, one in the zone, one outside.
        flow=FlowControl(
            link.bootstrap,
            config.kafka.group_id,
            link.topics.activations,
            2,
            security=link.security,
        ),
    )


async def _serve_new_tails(config: VeilConfig, graph: Graph, table: ProfileTable) -> None:
    """``veil run``'s bank reload: the tails of every profile the reloaded bank holds are
    exported into the repository, and the detect worker has Triton load the new ones."""
    assert graph.edge is not None and graph.detect is not None
    assert config.triton.model_repository is not None
    o = graph.edge.obfuscator
    repo = Path(config.triton.model_repository)
    manifest = await asyncio.to_thread(export_tail, o.detector, o.geometry, repo, table.profiles)
    await graph.detect.serve_profiles(manifest)


async def _stop_on(event: asyncio.Event, supervisor: Supervisor) -> None:
    await event.wait()
    supervisor.request_stop()


async def _triton_role(
    config: VeilConfig,
    stack: contextlib.AsyncExitStack,
    supervisor: Supervisor,
    roles: frozenset[str],
) -> _Triton:
    """The detect worker's Triton: an embedded one launched now (with the threads of its share
    of the host's cores), or the one ``triton.url`` names; and its tail repository."""
    from workers.untrusted.triton_repo import TailManifest

    if config.triton.model_repository is None:
        raise ConfigError(
            "triton.model_repository is not set: name the folder `veil export --out` wrote"
        )
    repo = Path(config.triton.model_repository)
    manifest = TailManifest.read(repo)
    threads = config.threads.for_role("triton", thread_group(config, roles))
    url, booting = await stack.enter_async_context(triton_for(config, repo, supervisor, threads))
    return _Triton(url, booting, manifest)


@dataclass(frozen=True)
class _Triton:
    url: str
    booting: Callable[[], Awaitable[None]] | None  # what to await until an embedded one is up
    manifest: Any  # the repository's TailManifest


async def _detect_role(
    config: VeilConfig,
    stack: contextlib.AsyncExitStack,
    supervisor: Supervisor,
    link: KafkaLink,
    keys: RoleKeys,
    roles: frozenset[str],
    triton: _Triton,
) -> Any:
    """The detect worker of a graph of ``roles`` on ``triton``: with its own stop under veil
    run (a sink), with the threads of its share of the host's cores."""
    from workers.untrusted.detect import DetectWorker
    from workers.untrusted.tail_client import TritonTail

    manifest = triton.manifest
    # The outside needs the architecture only, for anchors and box decoding: no weights.
    decoder = load_decoder(manifest.detector)
    group = thread_group(config, roles)
    tail = TritonTail(
        triton.url,
        config.triton.model or manifest.python_model,
        manifest,
        timeout_s=config.triton.timeout_s,
        tls=triton_tls(config),
        shared_memory=config.triton.shared_memory,
    )
    stack.push_async_callback(tail.stop)  # after the worker's stop: it does not own this tail
    worker = DetectWorker(
        link,
        tail,
        decoder,
        manifest,
        group_id=config.kafka.group_id,
        max_batch=config.batching.max_batch,
        signer=keys.signer,
        verifier=keys.verifier,
        threads=config.threads.for_role("detect", group),
        session_timeout_ms=session_timeout_ms(config),
    )
    stack.push_async_callback(worker.stop)
    if triton.booting is not None:
        # The worker joins its group while its embedded Triton boots. A Triton of its own is
        # waited for before the join: a worker without tails must not hold partitions.
        await concurrently(triton.booting(), worker.start_kafka())
    await worker.start()
    worker.attach(supervisor, stop=asyncio.Event() if "sink" in roles else None)
    return worker


async def _attach_sink(
    config: VeilConfig,
    graph: Graph,
    bootstrap: str,
    say: Callable[[str], None],
    on_detection: Callable[[DetectionMessage], None] | None,
    settle_timeout_s: float,
    verifier: Verifier | None = None,
) -> None:
    def on_message(msg: DetectionMessage) -> None:
        graph.tally.add(msg)
        latency = time.time() - msg.envelope.capture_time
        obs.STREAM_DETECTION_SECONDS.labels(msg.stream_id).observe(latency)
        if on_detection is not None:
            on_detection(msg)

    # The edge's own set: streams added at runtime are collected too.
    streams = graph.edge.known_ids if graph.edge is not None else {s.id for s in config.streams}
    reader = await detections_reader(bootstrap, topics_of(config), kafka_security(config))
    graph.supervisor.add(
        "sink", partial(collect_detections, reader, streams, on_message, verifier), background=True
    )
    graph.supervisor.add("settle", partial(_settle, graph, settle_timeout_s, say))


async def _settle(graph: Graph, timeout_s: float, say: Callable[[str], None]) -> None:
    """Once the edge has published its last frame, wait for every detection, then stop the
    detect worker (a foreground stage of ``veil run``)."""
    assert graph.edge is not None and graph.detect is not None
    await graph.edge.finished.wait()
    deadline = time.monotonic() + timeout_s
    while graph.tally.frames < graph.edge.stats.frames_published:
        if time.monotonic() > deadline:
            say(
                f"gave up waiting after {timeout_s:.0f} s: "
                f"{graph.edge.stats.frames_published - graph.tally.frames} frames have no "
                "detections"
            )
            break
        await asyncio.sleep(0.05)
    graph.detect.request_stop()


@contextlib.asynccontextmanager
async def _status(
    config: VeilConfig, graph: Graph, say: Callable[[str], None]
) -> AsyncIterator[None]:
    """/metrics, /healthz, /readyz (the supervisor's readiness, with each stream's state) and
    the edge's HTTP API, if a port is set. After a failure /readyz answers 503 for
    ``failure_linger_s`` more, so that probes see it."""
    obs_config = config.observability
    if obs_config.http_port is None:
        yield
        return
    supervisor = graph.supervisor

    async def api(request: Request) -> Response | None:
        if graph.edge is None:
            return None
        return await http_api.handler(graph.edge, obs_config.api_writes)(request)

    server = StatusServer(
        obs_config.http_port,
        lambda: supervisor.ready,
        obs_config.http_host,
        readiness=partial(readiness, graph),
        api=api,
    )
    try:
        await server.start()
    except OSError as exc:  # taken since the check before start
        raise ConfigError(
            f"observability.http_port: cannot listen on {obs_config.http_host}:"
            f"{obs_config.http_port} ({exc.strerror or exc})"
        ) from exc
    graph.http_url = f"http://{server.host}:{server.port}"
    say(f"metrics and health on {graph.http_url}/metrics")
    try:
        yield
    finally:
        if supervisor.error is not None:
            await asyncio.sleep(obs_config.failure_linger_s)
        await server.stop()


def readiness(graph: Graph) -> dict[str, Any]:
    """``/readyz``'s body: ready, ``ok`` / ``degraded`` (some stream not up) / ``not ready``,
    the failed stage, and each stream's state."""
    sup = graph.supervisor
    streams = (
        [{"id": s["id"], "state": s["state"]} for s in graph.edge.describe()]
        if graph.edge is not None
        else []
    )
    status = "not ready"
    if sup.ready:
        status = "ok" if all(s["state"] == "up" for s in streams) else "degraded"
    return {
        "ready": sup.ready,
        "status": status,
        "failed_stage": sup.failed_stage,
        "error": one_line(sup.error) if sup.error is not None else None,
        "streams": streams,
    }


def alpha_command(config: VeilConfig, bootstrap: str, alphas: Sequence[float]) -> str:
    """The ``veil alpha set`` command line that changes the first stream's alpha on this
    broker (to another calibrated alpha when there is one); the other stream ids follow."""
    first = config.streams[0]
    others = [a for a in alphas if a != first.alpha]
    value = others[0] if others else first.alpha
    words = ["veil", "alpha", "set", first.id, f"{value:g}", "--bootstrap", bootstrap]
    if config.kafka.topic_prefix != DEFAULT_TOPICS.prefix:
        words += ["--topic-prefix", config.kafka.topic_prefix]
    keys = config.signing.private_key
    if keys is not None and Path(keys).is_dir():
        words += [
            "--key",
            str(Path(keys) / "operator.key"),
            "--edge-key",
            str(Path(keys) / "edge.pub"),
        ]
    elif signing_enabled(config.signing):
        words += ["--key", "OPERATOR_KEY", "--edge-key", "EDGE_PUB"]
    command = shlex.join(words)
    if len(config.streams) > 1:
        command += f"  (streams: {', '.join(s.id for s in config.streams)})"
    return command


class _RunOutputs:
    """``veil run``'s outputs as detections arrive: a JSON line each (appended, flushed), the
    annotated videos (encoded on a thread of their own, which keeps the frames in order) and
    the printed line."""

    def __init__(
        self,
        config: VeilConfig,
        rates: dict[str, Fraction | None],
        say: Callable[[str], None],
        print_detections: bool,
        on_detection: Callable[[DetectionMessage], None] | None = None,
        started: float | None = None,
    ) -> None:
        self.say, self.print_detections = say, print_detections
        self.on_detection = on_detection
        self.started = time.perf_counter() if started is None else started
        self.first_s: float | None = None  # the first detection, seconds after ``started``
        out = config.outputs
        self.jsonl = JsonlWriter(Path(out.jsonl)) if out.jsonl else None
        self.annotator: Any = None
        self.encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="veil-annotate")
        # Frames waiting for the encoder, at most: past it (an encoder slower than the stream),
        # frames go unannotated and are counted, rather than queueing without bound.
        self._backlog = threading.Semaphore(ANNOTATE_BACKLOG)
        self.unannotated = 0
        self.preview = LivePreview(out.preview_fps) if out.preview else None
        if out.annotated_dir or self.preview is not None:
            from workers.trusted.annotate import AnnotatedWriter, Rotation

            live = [s.id for s in config.streams if _is_live(s.source)]
            rotation = Rotation(round(out.annotated_rotate_mb * 2**20), out.annotated_rotate_s)
            folder = Path(out.annotated_dir) if out.annotated_dir else None
            self.annotator = AnnotatedWriter(folder, rates, live, rotation, preview=self.preview)

    @property
    def frame_hook(self) -> Callable[[Frame], None] | None:
        return self.annotator.keep if self.annotator is not None else None

    def on_message(self, msg: DetectionMessage) -> None:
        if self.first_s is None:
            self.first_s = time.perf_counter() - self.started
        if self.jsonl is not None:
            self.jsonl.write(msg)
        if self.annotator is not None:
            if self._backlog.acquire(blocking=False):
                self.encoder.submit(self._annotate, msg)
            else:
                self.unannotated += 1
        if self.print_detections:
            self.say(describe(msg))
        if self.on_detection is not None:
            self.on_detection(msg)

    def _annotate(self, msg: DetectionMessage) -> None:
        try:
            self.annotator.on_detection(msg)
        finally:
            self._backlog.release()

    async def close(self) -> None:
        if self.preview is not None:
            self.preview.close()
        await asyncio.to_thread(self.encoder.shutdown, True)
        if self.unannotated:
            self.say(f"annotated video: {self.unannotated} frames skipped (encoder behind)")
        if self.jsonl is not None:
            self.jsonl.close()
            self.say(f"detections written to {self.jsonl.path} ({self.jsonl.lines} lines)")
        if self.annotator is not None:
            self.annotator.close()
            for files in self.annotator.files.values():
                for path, count in files:
                    self.say(f"annotated video: {path} ({count} frames)")


def _is_live(source: str) -> bool:
    scheme, sep, _ = source.partition("://")
    return bool(sep) and scheme.lower() in LIVE_SCHEMES


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
    detected. Ports, sources and model files are checked before anything starts; missing
    profiles are calibrated on the first file source; the tail is exported under the cache
    folder unless ``triton.model_repository`` names one."""
    started = time.perf_counter()
    if not config.streams:
        raise ProfileError("no streams configured")
    rates = check_edge(config)
    first_file = next((s.source for s in config.streams if "://" not in s.source), None)
    obfuscator = build_obfuscator(config, first_file if calibrate_missing else None, say)
    repo = config.triton.model_repository or default_repository(
        obfuscator.detector, obfuscator.geometry
    )
    config = replace(config, triton=replace(config.triton, model_repository=str(repo)))
    # Every profile the zone may apply gets its tail served, so live alpha changes keep working.
    export_tail(obfuscator.detector, obfuscator.geometry, Path(repo), obfuscator.table.profiles)
    outputs = _RunOutputs(config, rates, say, print_detections, on_detection, started)
    setup_s = time.perf_counter() - started
    say(f"device {obfuscator.device}; profiles {obfuscator.table.alphas}")
    try:
        graph = await serve(
            config,
            frozenset({"edge", "detect", "sink"}),
            obfuscator=obfuscator,
            say=say,
            on_detection=outputs.on_message,
            settle_timeout_s=settle_timeout_s,
            frame_hook=outputs.frame_hook,
            stop=stop,
            preview=outputs.preview,
            bank_dir=bank_folder(
                config,
                obfuscator.detector,
                obfuscator.geometry,
                first_file if calibrate_missing else None,
            ),
        )
    finally:
        await outputs.close()
    assert graph.edge is not None
    seconds = time.perf_counter() - started
    device = str(obfuscator.device)
    edge, tally, command = graph.edge.stats, graph.tally, graph.alpha_command
    return RunSummary(edge, tally, seconds, device, command, outputs.first_s, setup_s)


def demo_streams(alpha: float = 0.8) -> tuple[StreamConfig, ...]:
    from stream.demo_clip import make_demo_clip

    clip = CACHE / "demo" / "astronaut.mp4"
    if not clip.is_file():
        clip.parent.mkdir(parents=True, exist_ok=True)
        make_demo_clip(clip)
    return (StreamConfig(id="demo", source=str(clip), policy="lossless", alpha=alpha),)
