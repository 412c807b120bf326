"""The trusted-zone worker: sources -> batches -> head + noise -> Kafka.

Its stages run on the supervised runtime (:mod:`stream.runtime`): the first error wins and
ends the worker; a graceful stop (SIGTERM) publishes every frame already decoded.

Streams are managed live (:mod:`veil.http_api` calls these methods): a stream added at runtime
gets its own reader stage on the running supervisor and joins the frames channel as one more
producer; a stream removed on purpose stops decoding, hands out what it decoded, and its reader
*returns* (a stage that returns is done, not failed), so the other streams keep running. The
worker ends when its last stream has ended (a file's end, or a removal). Each stream's health
(source up/down, reconnects, frames in/dropped/published, fps, latency, alpha and profile) is
kept here and exported as the per-stream metrics of :mod:`veil.observability`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from stream.frames import Frame
from stream.kafka import (
    FOLLOW_MAX_WAIT_MS,
    KafkaLink,
    OutgoingRecord,
    security_kwargs,
    send_all,
    transient,
)
from stream.runtime import (
    DEFAULT_BACKOFF,
    Backoff,
    Channel,
    Supervisor,
    blocking,
    retry,
)
from stream.signing import Signer, Verifier, decode_signed_control
from stream.sources import VideoSource, redact_url
from stream.wire import (
    ActivationMessage,
    ControlMessage,
    FramePlacement,
    Quantisation,
    StatusMessage,
    encode,
    encode_control,
    encode_status,
)
from veil import observability as obs
from veil.config import BatchingConfig, StreamConfig, check_stream
from veil.errors import ConfigError, ProfileError, SourceError, VeilError
from veil.preflight import check_source
from veil.profiles import ProfileBank
from workers.trusted.control import AlphaControl
from workers.trusted.flow import FlowControl
from workers.trusted.obfuscator import ObfuscatedFrame, Obfuscator, ProfileTable
from workers.trusted.preview import LivePreview

log = structlog.get_logger(__name__)


def _leakage_text(leakage: dict[str, Any]) -> str:
    if not leakage or not leakage.get("rank1"):
        return "leakage not measured: run veil privacy"
    rank1 = leakage["rank1"]
    floors = [
        float(f["rank1"]["value"])
        for f in (leakage.get("boxes_only"), leakage.get("boxes_decoder"))
        if f and f.get("rank1")
    ]
    floor_text = f", boxes-only {100 * max(floors):.1f}%" if floors else ""
    excess = leakage.get("beyond_boxes_only")
    if excess:
        floor_text += (
            f"; same person beyond the boxes, face by face: p = {float(excess['p_value']):.3f}"
            f" ({excess['attack']})"
        )
    return (
        f"measured leakage: the strongest attack ({leakage.get('strongest_attack')}) "
        f"re-identified {100 * float(rank1['value']):.1f}% [{100 * float(rank1['low']):.1f}, "
        f"{100 * float(rank1['high']):.1f}] of {rank1['n']} faces (chance "
        f"{100 * float(leakage.get('chance', float('nan'))):.1f}%{floor_text}) on "
        f"{leakage.get('data_source', '?')}, {leakage.get('date', '?')}"
    )


def _source_name(text: str) -> str:
    """``video:/a/b.mp4`` or ``/a/./b.mp4`` -> a comparable name (resolved when a file)."""
    for prefix in ("video:", "images:", "widerface:"):
        text = text.removeprefix(prefix)
    with contextlib.suppress(OSError, ValueError):
        path = Path(text)
        if "://" not in text and path.exists():
            return str(path.resolve())
    return text


def profile_notes(streams: Sequence[StreamConfig], table: ProfileTable) -> list[dict[str, Any]]:
    """Per stream, the profile it starts with, what it was calibrated on and its measured
    leakage, as log fields with a readable ``message``."""
    notes = []
    for s in streams:
        row = table.row(s.alpha)
        if row == 0:
            message = f"stream {s.id}: alpha 0, no noise: activations leave unprotected"
            notes.append({"stream": s.id, "alpha": 0.0, "message": message})
            continue
        profile = table.profiles[row - 1]
        trained = profile.meta.trained_on
        calibrated = str(trained.get("source") or "unknown footage")
        message = (
            f"stream {s.id}: noise profile {profile.profile_id} (alpha {profile.alpha:.2f}), "
            f"calibrated on {calibrated} ({trained.get('images', '?')} images); "
            + _leakage_text(profile.meta.leakage)
        )
        other = _source_name(calibrated) != _source_name(s.source)
        if other:
            message += (
                f"; NOTE: calibrated on other footage ({calibrated}) than this stream's source "
                f"({s.source})"
            )
        notes.append(
            {
                "stream": s.id,
                "alpha": profile.alpha,
                "profile_id": profile.profile_id,
                "trained_on": trained,
                "leakage": profile.meta.leakage or None,
                "other_footage": other,
                "message": message,
            }
        )
    return notes


@dataclass
class EdgeStats:
    frames_in: int = 0
    frames_published: int = 0
    bytes_published: int = 0
    batches: int = 0
    publish_retries: int = 0
    source_errors: dict[str, str] = field(default_factory=dict)
    alpha_changes: list[tuple[str, float]] = field(default_factory=list)
    flow_wait_s: float = 0.0  # realtime batches held back while the outside caught up


StreamState = Literal["starting", "up", "down", "failed", "ended", "removing"]
_FPS_WINDOW_S = 5.0  # fps is measured over this many seconds
_HEALTH_INTERVAL_S = 0.5  # how often the per-stream gauges are refreshed
_REMOVED_KEPT = 64  # removed streams whose final counters a repeated DELETE still answers


class RequestRefused(VeilError):
    """A runtime request the edge does not carry out: ``status`` is its HTTP status and
    ``field`` the request field at fault (None: none in particular)."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field = status, field


@dataclass
class _Stream:
    """One stream of the running edge: its source, counters and health."""

    config: StreamConfig
    source: VideoSource
    read: int = 0  # frames handed to the batcher
    published: int = 0  # of those, acknowledged by Kafka
    error: str | None = None  # the source failed for good
    ended: bool = False  # the reader has returned
    removing: bool = False
    reconnects_seen: int = 0
    dropped_seen: int = 0
    fps: float = 0.0
    samples: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=round(_FPS_WINDOW_S / _HEALTH_INTERVAL_S))
    )
    reader_done: asyncio.Event = field(default_factory=asyncio.Event)
    removed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        """Neither ended nor being removed: its frames may still come."""
        return not (self.ended or self.removing)

    @property
    def state(self) -> StreamState:
        if self.error is not None:
            return "failed"
        if self.removing:
            return "removing"
        if self.ended:
            return "ended"
        if self.source.connected:
            return "up"
        return "down" if self.source.last_error or self.source.stats.reconnects else "starting"

    def sample(self, now: float) -> None:
        """One fps sample: frames read over the window the samples span."""
        self.samples.append((now, self.read))
        first_t, first_n = self.samples[0]
        self.fps = (self.read - first_n) / (now - first_t) if now > first_t else 0.0


@dataclass
class _Partitions:
    """Each stream's partition of the activations topic, given round robin as streams come
    (hashing a handful of ids puts several on one partition and none on another). One stream
    keeps one partition, so its frames stay in order."""

    order: list[int] = field(default_factory=list)  # the topic's partitions, sorted
    of: dict[str, int] = field(default_factory=dict)  # stream id -> its partition
    given: int = 0  # streams given a partition so far

    def give(self, stream_id: str) -> None:
        self.of[stream_id] = self.order[self.given % len(self.order)]
        self.given += 1


@dataclass(frozen=True)
class _Encoded:
    """A batch ready to publish: its frames (for the in-zone hooks) and its records."""

    frames: list[Frame]
    records: list[OutgoingRecord]


class EdgeWorker:
    """The trusted zone's stages on a :class:`~stream.runtime.Supervisor`.

    ``async with EdgeWorker(...) as edge: edge.attach(supervisor)`` adds its stages to a
    supervisor (``veil.runner.serve`` builds it, alone or beside other roles). Stages: one
    reader per stream -> batch -> head+noise (in a thread) -> publish (acks awaited, transient
    broker failures retried forever: the queues fill and lossless sources stop reading) and,
    in the background, the control reader and the health sampler. A graceful stop lets every
    source hand out the frames it already decoded; they are all published before the
    supervisor's run returns. Streams may be added and removed while it runs (see the module
    docstring); ``bank_dir`` is the profile bank :meth:`reload_bank` reads again.
    """

    def __init__(
        self,
        streams: Sequence[StreamConfig],
        obfuscator: Obfuscator,
        link: KafkaLink,
        *,
        quantisation: Quantisation = "float16",
        batching: BatchingConfig | None = None,
        max_request_size: int = 4 * 1024 * 1024,
        reconnect: Backoff | None = None,
        follow_control: bool = True,
        queue_size: int | None = None,
        frame_hook: Callable[[Frame], None] | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        signer: Signer | None = None,
        control_verifier: Verifier | None = None,
        bank_dir: Path | None = None,
        flow: FlowControl | None = None,
    ) -> None:
        self.streams = list(streams)  # as configured at start
        self.obfuscator = obfuscator
        self.link = link  # the broker, topics, TLS/SASL of the producer and control reader
        self.quantisation = quantisation
        self.batching = batching or BatchingConfig()
        self.max_request_size = max_request_size
        self.reconnect = reconnect
        self.follow_control = follow_control
        # Frames between the sources and the batcher: one batch (a realtime stream's mailbox
        # keeps its newest frame meanwhile; a lossless source queues in its decoder).
        self.queue_size = queue_size or self.batching.max_batch
        self.frame_hook = frame_hook  # e.g. the annotated-video writer, inside the zone
        self.backoff = backoff
        # The edge key signs every activation (stream.signing); None: they go unsigned.
        self.signer = signer
        # The operator key that control records must be signed with (None: not checked); an
        # old record published again is refused by AlphaControl (workers/trusted/control.py).
        self.control_verifier = control_verifier
        self.bank_dir = bank_dir
        self.stats = EdgeStats()
        # Refuses, before anything starts, a configured alpha below the zone's floor or
        # without a calibrated profile.
        self.control = AlphaControl(self.streams, obfuscator.table)
        self.partitions = _Partitions()
        self.known_ids = {s.id for s in self.streams}  # every stream served, removed ones too
        self._producer: Any = None
        self._streams: dict[str, _Stream] = {}
        self._removed: dict[str, dict[str, Any]] = {}  # final counters of removed streams
        self._supervisor: Supervisor | None = None
        self._frames: Channel[Frame] | None = None
        self._compute = asyncio.Lock()  # a bank reload swaps the table between two batches
        # HTTP alpha requests written to the control topic, by (stream, stamp), until answered.
        self._awaiting: dict[tuple[str, float], asyncio.Future[StatusMessage]] = {}
        # Realtime streams: frames taken only as fast as the outside commits them.
        self.flow = flow
        self.preview: LivePreview | None = None  # the live preview its HTTP API serves (veil run)
        # Run with a reloaded bank's table before the edge takes it (veil run: the outside
        # gets the new profiles' tails); a VeilError refuses the reload.
        self.before_reload: Callable[[ProfileTable], Awaitable[None]] | None = None
        self.finished = asyncio.Event()  # set once the last frame is published

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        # The head warms up in a thread while the producer connects.
        warm_up = asyncio.ensure_future(
            blocking("warm-up", self.obfuscator.warm_up, self.batching.max_batch)
        )
        try:
            await self._connect()
        finally:
            warm_s = await warm_up
        log.info("edge.warmed_up", seconds=round(warm_s, 3))
        for s in self.streams:
            self._streams[s.id] = await self._open(s)
        obs.set_build_info(self.obfuscator.detector.name)
        log.info(
            "edge.started",
            streams=[s.id for s in self.streams],
            alphas=self.alphas,
            partitions=self.partitions.of,
        )
        for note in profile_notes(self.streams, self.obfuscator.table):
            log.info("edge.profile", **note)
        if self.follow_control:
            await self._answer(self.control.started())

    async def _connect(self) -> None:
        self._producer = await retry(
            lambda: self.link.producer("veil-edge", self.max_request_size),
            what=f"kafka producer on {self.link.bootstrap}",
            transient=transient,
            backoff=self.backoff,
        )
        self.partitions.order = await self._activation_partitions()
        if self.flow is not None:
            await self.flow.start(self.partitions.order)

    async def _activation_partitions(self) -> list[int]:
        """The activation topic's partitions, sorted."""
        found = await retry(
            lambda: self._producer.partitions_for(self.link.topics.activations),
            what=f"partitions of {self.link.topics.activations}",
            transient=transient,
            backoff=self.backoff,
        )
        return sorted(found)

    async def _open(self, s: StreamConfig) -> _Stream:
        """Start ``s``'s source and give it its partition."""
        source = VideoSource(
            s.id,
            s.source,
            policy=s.policy,
            reconnect=self.reconnect,
            loop_file=s.loop,
            pace=s.pace,
        )
        await source.start()
        obs.declare_stream(s.id)
        self.partitions.give(s.id)
        return _Stream(s, source)

    async def stop(self) -> None:
        """Stop the sources and the producer (after :meth:`run`, everything read is sent)."""
        for stream in self._streams.values():
            await stream.source.stop()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            with contextlib.suppress(TimeoutError, KafkaError):
                await asyncio.wait_for(producer.flush(), 10.0)
            await producer.stop()
        if self.flow is not None:
            await self.flow.stop()
            self.stats.flow_wait_s = round(self.flow.waited_s, 3)
        log.info("edge.stopped", **self.stats.__dict__)

    async def __aenter__(self) -> EdgeWorker:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def ready(self) -> bool:
        return self._supervisor is not None and self._supervisor.ready

    def attach(self, supervisor: Supervisor) -> None:
        """Add this worker's stages to ``supervisor`` (after :meth:`start`)."""
        self._supervisor = supervisor
        frames: Channel[Frame] = Channel("frames", self.queue_size, producers=len(self._streams))
        self._frames = frames
        batches: Channel[list[Frame]] = Channel("batches", 1)
        encoded: Channel[_Encoded] = Channel("encoded", 1)
        for sid, stream in self._streams.items():
            supervisor.add(f"read:{sid}", partial(self._read, stream, frames, supervisor))
        supervisor.add("batch", partial(self._batch, frames, batches))
        supervisor.add("head+noise", partial(self._head_noise, batches, encoded))
        supervisor.add("publish", partial(self._publish, encoded))
        supervisor.add("health", self._health_loop, background=True)
        if self.follow_control:
            supervisor.add("control", self._control_loop, background=True)
        # Ready while at least one stream's source is up (degraded when some are not).
        supervisor.ready_when(lambda: any(s.state == "up" for s in self._streams.values()))

    # -- stages ------------------------------------------------------------------------------

    async def _read(self, stream: _Stream, out: Channel[Frame], supervisor: Supervisor) -> None:
        source = stream.source
        stopper = asyncio.create_task(_finish_on_stop(supervisor, source))
        try:
            async for frame in self._taken(stream):
                obs.FRAMES_IN.labels(source.stream_id).inc()
                self.stats.frames_in += 1
                self._count_drops(stream)
                stream.read += 1
                await out.put(frame)
        except SourceError as exc:
            # One broken camera must not stop the others: record it, keep serving the rest.
            stream.error = self.stats.source_errors[source.stream_id] = str(exc)
            log.error("edge.source_failed", stream=source.stream_id, error=str(exc))
        finally:
            stopper.cancel()
            stream.ended = True
            stream.reader_done.set()
        self._count_drops(stream)
        await out.close()

    async def _taken(self, stream: _Stream) -> AsyncIterator[Frame]:
        """The stream's frames; a realtime one's only as fast as the outside commits them
        (:class:`FlowControl`): meanwhile its source keeps the newest frame."""
        frames = stream.source.frames()
        held = self.flow is not None and stream.config.policy == "realtime"
        while True:
            partition = self.partitions.of[stream.config.id]
            if held:
                assert self.flow is not None
                await self.flow.acquire(partition, self._realtime_on(partition))
            try:
                frame = await anext(frames)
            except StopAsyncIteration:
                if held:
                    assert self.flow is not None
                    self.flow.release(partition)
                return
            yield frame

    def _realtime_on(self, partition: int) -> int:
        """How many running realtime streams publish on ``partition``."""
        return sum(
            1
            for s in self._streams.values()
            if s.running
            and s.config.policy == "realtime"
            and self.partitions.of.get(s.config.id) == partition
        )

    @staticmethod
    def _count_drops(stream: _Stream) -> None:
        dropped = stream.source.stats.dropped
        if dropped > stream.dropped_seen:
            obs.FRAMES_DROPPED.labels(stream.config.id).inc(dropped - stream.dropped_seen)
            stream.dropped_seen = dropped

    async def _batch(self, frames: Channel[Frame], out: Channel[list[Frame]]) -> None:
        """Frames from every stream, grouped up to ``max_batch`` or ``max_wait_ms``; no wait
        once the batch holds a frame of every running stream, all of them realtime: the next
        frame of any of them is a whole frame interval away (measured: 20 ms of latency on
        every frame of a single camera)."""
        while (first := await frames.get()) is not None:
            batch = [first]
            deadline = time.monotonic() + self.batching.max_wait_ms / 1000
            while len(batch) < self.batching.max_batch:
                item = frames.get_nowait()
                if item is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or frames.closed or self._every_camera_in(batch):
                        break
                    try:
                        item = await asyncio.wait_for(frames.get(), remaining)
                    except TimeoutError:
                        break
                    if item is None:
                        break
                batch.append(item)
            await out.put(batch)
        await out.close()

    def _every_camera_in(self, batch: list[Frame]) -> bool:
        """Whether every running stream is realtime and has a frame in ``batch``."""
        running = [s for s in self._streams.values() if s.running]
        if any(s.config.policy != "realtime" for s in running):
            return False
        return {s.config.id for s in running} <= {f.stream_id for f in batch}

    async def _head_noise(self, batches: Channel[list[Frame]], out: Channel[_Encoded]) -> None:
        async for batch in batches:
            async with self._compute:
                alphas = [self.alphas[f.stream_id] for f in batch]
                started = time.perf_counter()
                results = await blocking("head+noise", self.obfuscator.run, batch, alphas)
            obs.HEAD_NOISE_SECONDS.observe(time.perf_counter() - started)
            obs.BATCH_SIZE.observe(len(batch))
            await out.put(_Encoded(batch, [self._record(r) for r in results]))
        await out.close()

    def _record(self, r: ObfuscatedFrame) -> OutgoingRecord:
        message = ActivationMessage(
            r.envelope,
            r.provenance,
            placement=FramePlacement.from_letterbox(r.letterbox, self.obfuscator.geometry),
            payload=r.activation,
            quantisation=self.quantisation,
        )
        key, value, headers = encode(message)
        if self.signer is not None:
            headers = [*headers, *self.signer.headers(key, value, headers)]
        partition = self.partitions.of.get(r.envelope.stream_id)
        return OutgoingRecord(self.link.topics.activations, key, value, headers, partition)

    async def _publish(self, encoded: Channel[_Encoded]) -> None:
        async for item in encoded:
            await send_all(
                self._producer,
                item.records,
                what=f"publish {len(item.records)} activations",
                backoff=self.backoff,
                on_retry=self._count_retry,
            )
            if self.flow is not None:
                self._report_flow(item)
            size = sum(len(r.value or b"") for r in item.records)
            self.stats.bytes_published += size
            obs.BYTES_PUBLISHED.inc(size)
            obs.MESSAGES_PUBLISHED.inc(len(item.records))
            self._count_published(item.frames)
            if self.frame_hook is not None:
                for frame in item.frames:
                    self.frame_hook(frame)
            self.stats.frames_published += len(item.records)
            self.stats.batches += 1
        self.finished.set()

    def _report_flow(self, item: _Encoded) -> None:
        assert self.flow is not None
        sent: dict[int, list[int]] = {}
        for frame, record in zip(item.frames, item.records, strict=True):
            stream = self._streams.get(frame.stream_id)
            realtime = stream is not None and stream.config.policy == "realtime"
            counts = sent.setdefault(record.partition or 0, [0, 0])
            counts[0] += 1
            counts[1] += int(realtime)
        for partition, (records, taken) in sent.items():
            self.flow.published(partition, records, taken)

    def _count_published(self, frames: list[Frame]) -> None:
        now = time.time()
        for frame in frames:
            sid = frame.envelope.stream_id
            obs.FRAMES_PUBLISHED.labels(sid).inc()
            obs.STREAM_PUBLISH_SECONDS.labels(sid).observe(now - frame.envelope.capture_time)
            stream = self._streams.get(sid)
            if stream is not None:
                stream.published += 1

    def _count_retry(self, _error: BaseException, _delay: float) -> None:
        self.stats.publish_retries += 1

    async def _health_loop(self) -> None:
        """Refresh each stream's gauges (up, reconnects, fps, alpha, profile), forever."""
        while True:
            now = time.monotonic()
            for stream in list(self._streams.values()):
                self._observe(stream, now)
            await asyncio.sleep(_HEALTH_INTERVAL_S)

    def _observe(self, stream: _Stream, now: float) -> None:
        sid = stream.config.id
        stream.sample(now)
        obs.SOURCE_UP.labels(sid).set(1 if stream.state == "up" else 0)
        reconnects = stream.source.stats.reconnects
        if reconnects > stream.reconnects_seen:
            obs.SOURCE_RECONNECTS.labels(sid).inc(reconnects - stream.reconnects_seen)
            stream.reconnects_seen = reconnects
        obs.STREAM_FPS.labels(sid).set(stream.fps)
        if sid in self.control.alphas:
            obs.STREAM_ALPHA.labels(sid).set(self.control.alphas[sid])
            obs.set_profile(sid, self.control.profile_id(sid))

    # -- streams managed live (veil.http_api) ------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Every stream with its state and counters (``GET /v1/streams``, ``/readyz``)."""
        return [self._describe(s) for s in self._streams.values()]

    def _describe(self, stream: _Stream) -> dict[str, Any]:
        s, sid = stream.config, stream.config.id
        source = stream.source
        return {
            "id": sid,
            "source": redact_url(s.source),
            "policy": s.policy,
            "state": stream.state,
            "alpha": self.control.alphas.get(sid),
            "profile_id": self.control.profile_id(sid) if sid in self.control.alphas else None,
            "min_alpha": self.control.floors[sid].min_alpha if sid in self.control.floors else None,
            "frames_in": stream.read,
            "frames_dropped": source.stats.dropped,
            "frames_published": stream.published,
            "fps": round(stream.fps, 2),
            "reconnects": source.stats.reconnects,
            "error": stream.error or (None if source.connected else source.last_error),
        }

    async def add_stream(self, s: StreamConfig) -> dict[str, Any]:
        """Start serving ``s`` while the edge runs; RequestRefused naming the field at fault."""
        supervisor, frames = self._supervisor, self._frames
        if s.id in self._streams:
            raise RequestRefused(409, "id", f"stream {s.id!r} exists already")
        if supervisor is None or frames is None or frames.closed or supervisor.stopping.is_set():
            raise RequestRefused(409, None, "the edge is not running (or all its streams ended)")
        _refuse_bad_stream(s)
        if "://" not in s.source:
            try:
                await asyncio.to_thread(check_source, s)
            except ConfigError as exc:
                raise RequestRefused(400, "source", str(exc)) from exc
        try:
            status = self.control.add(s)
        except (ConfigError, ProfileError) as exc:
            raise RequestRefused(400, "alpha", str(exc)) from exc
        try:
            stream = await self._open(s)
        except (ConfigError, SourceError) as exc:
            self.control.remove(s.id)
            raise RequestRefused(400, "source", str(exc)) from exc
        self._streams[s.id] = stream
        self._removed.pop(s.id, None)
        self.known_ids.add(s.id)
        frames.add_producer()
        supervisor.add(f"read:{s.id}", partial(self._read, stream, frames, supervisor))
        log.info("edge.stream_added", stream=s.id, source=redact_url(s.source), alpha=s.alpha)
        if self.follow_control:
            await self._answer([status])
        return self._describe(stream)

    async def remove_stream(self, sid: str, timeout_s: float = 30.0) -> tuple[bool, dict[str, Any]]:
        """Stop ``sid``'s source, publish what it decoded, then forget it. (done, the stream as
        last seen): not done when its frames are still being published after ``timeout_s``
        (asking again waits again, and answers the final counters once it is done)."""
        stream = self._streams.get(sid)
        if stream is None and sid in self._removed:
            return True, self._removed[sid]
        if stream is None:
            raise RequestRefused(404, "id", f"no stream {sid!r} on this edge")
        if not stream.removing and self._supervisor is not None:
            stream.removing = True
            stream.source.finish()  # stops decoding; the frames decoded are still handed out
            self._supervisor.add(f"remove:{sid}", partial(self._retire, stream), background=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stream.removed.wait(), timeout_s)
        if stream.removed.is_set():
            return True, self._removed.get(sid, self._describe(stream))
        return False, self._describe(stream)

    async def _retire(self, stream: _Stream) -> None:
        """A background stage: once a removed stream's frames are all published, forget it."""
        sid = stream.config.id
        await stream.reader_done.wait()
        while stream.published < stream.read and not self.finished.is_set():
            await asyncio.sleep(0.05)
        await stream.source.stop()
        self.control.remove(sid)
        self._streams.pop(sid, None)
        self._removed[sid] = {**self._describe(stream), "state": "removed"}
        while len(self._removed) > _REMOVED_KEPT:
            self._removed.pop(next(iter(self._removed)))
        self.partitions.of.pop(sid, None)
        obs.forget_stream(sid)
        log.info("edge.stream_removed", stream=sid, read=stream.read, published=stream.published)
        stream.removed.set()

    async def request_alpha(self, sid: str, alpha: float, timeout_s: float = 15.0) -> StatusMessage:
        """``sid``'s alpha the way ``veil alpha set`` asks for it: a record on the control
        topic (so that it outlives a restart, which replays that topic), decided by
        :class:`AlphaControl` (its floor, its replay rule) when the edge reads it back, and
        answered on the status topic; returns the answer, applied or refused. Refused in a
        signed zone: only the operator's key may change an alpha there."""
        if sid not in self._streams or sid not in self.control.alphas:
            raise RequestRefused(404, "id", f"no stream {sid!r} on this edge")
        if self.control_verifier is not None:
            raise RequestRefused(
                403, "alpha", "this zone takes alpha changes signed with the operator key only: "
                "use `veil alpha set` with that key"
            )  # fmt: skip
        stamp = time.time()
        try:
            request = ControlMessage(sid, alpha, stamp)
        except VeilError as exc:
            raise RequestRefused(400, "alpha", str(exc)) from exc
        slot = (sid, stamp)
        answer = self._awaiting[slot] = asyncio.get_running_loop().create_future()
        try:
            record = OutgoingRecord(self.link.topics.control, *encode_control(request))
            await send_all(self._producer, [record], what="alpha request", backoff=self.backoff)
            return await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            raise RequestRefused(
                504, "alpha", f"the control topic did not bring the request back in {timeout_s} s"
            ) from None
        finally:
            self._awaiting.pop(slot, None)

    async def reload_bank(self) -> dict[str, Any]:
        """Read the profile bank again: profiles calibrated since start become usable. Refused
        (nothing changes) when a stream's alpha in force would lose its profile."""
        if self.bank_dir is None:
            raise RequestRefused(409, "profile_bank", "this edge was started without a bank folder")
        o = self.obfuscator
        try:
            table = await asyncio.to_thread(
                ProfileTable.from_bank, o.detector, o.geometry, ProfileBank(self.bank_dir), o.device
            )
        except VeilError as exc:
            raise RequestRefused(409, "profile_bank", f"{self.bank_dir}: {exc}") from exc
        if self.before_reload is not None:
            try:
                await self.before_reload(table)
            except VeilError as exc:
                raise RequestRefused(
                    409, "profile_bank", f"the outside cannot serve the reloaded bank: {exc}"
                ) from exc
        before = set(o.table.alphas)
        async with self._compute:  # between two batches
            try:
                self.control.use_table(table)
            except ProfileError as exc:
                raise RequestRefused(409, "profile_bank", str(exc)) from exc
            o.use_table(table)
        added = sorted(set(table.alphas) - before)
        log.info("edge.bank_reloaded", bank=str(self.bank_dir), alphas=table.alphas, added=added)
        return {"bank": str(self.bank_dir), "alphas": table.alphas, "added": added}

    # -- live alpha --------------------------------------------------------------------------

    @property
    def alphas(self) -> dict[str, float]:
        """The alpha in force per stream (applied from the next batch on a change)."""
        return self.control.alphas

    async def _control_loop(self) -> None:
        """Follow the compacted control topic from its beginning, forever (reconnecting)."""
        await retry(
            self._follow_control, what="control topic", transient=transient, backoff=self.backoff
        )

    async def _follow_control(self) -> None:
        consumer = AIOKafkaConsumer(
            fetch_max_wait_ms=FOLLOW_MAX_WAIT_MS,
            bootstrap_servers=self.link.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id="veil-edge-control",
            **security_kwargs(self.link.security, self.link.bootstrap),
        )
        await consumer.start()
        try:
            partitions: set[int] = set()
            while not partitions:
                partitions = consumer.partitions_for_topic(self.link.topics.control) or set()
                if not partitions:
                    await asyncio.sleep(1.0)
                    await consumer._client.force_metadata_update()
            assigned = [TopicPartition(self.link.topics.control, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            while True:
                batches = await consumer.getmany(*assigned, timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        await self._apply_control(record)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _apply_control(self, record: Any) -> None:
        try:
            msg = decode_signed_control(
                record.key, record.value, record.headers, self.control_verifier
            )
        except VeilError as exc:  # unsigned, forged, malformed: refused, nothing changes
            log.warning("edge.control_malformed", offset=record.offset, reason=str(exc))
            return
        status = self.control.request(msg)
        if status is None:
            return  # another edge's stream
        if status.outcome == "applied":
            self.stats.alpha_changes.append((status.stream_id, status.alpha))
        await self._answer([status])
        waiting = self._awaiting.get((status.stream_id, status.request_time or -1.0))
        if waiting is not None and not waiting.done():
            waiting.set_result(status)

    async def _answer(self, statuses: list[StatusMessage]) -> None:
        """Publish what the zone decided on the status topic (``veil alpha set`` waits)."""
        records = [OutgoingRecord(self.link.topics.status, *encode_status(s)) for s in statuses]
        if self.signer is not None:  # signed with the edge key: the operator can trust it
            records = [self.signer.signed(r) for r in records]
        await send_all(self._producer, records, what="status", backoff=self.backoff)


async def _finish_on_stop(supervisor: Supervisor, source: VideoSource) -> None:
    """On a graceful stop the source stops decoding and hands out what it has decoded."""
    await supervisor.stopping.wait()
    source.finish()


def _refuse_bad_stream(s: StreamConfig) -> None:
    try:
        check_stream(s)
    except ConfigError as exc:
        text = str(exc)
        name = next((f for f in ("min_alpha", "alpha") if f".{f} " in text), "id")
        raise RequestRefused(400, name, text) from exc
