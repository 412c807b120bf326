"""The trusted-zone worker: sources -> batches -> head + noise -> Kafka.

Its stages run on the supervised runtime (:mod:`stream.runtime`): the first error wins and
ends the worker; a graceful stop (SIGTERM) publishes every frame already decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from stream.frames import Frame
from stream.kafka import (
    DEFAULT_TOPICS,
    OutgoingRecord,
    TopicNames,
    make_producer,
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
from stream.sources import VideoSource
from stream.wire import (
    ActivationMessage,
    FramePlacement,
    Quantisation,
    StatusMessage,
    encode,
    encode_status,
)
from veil import observability as obs
from veil.config import BatchingConfig, KafkaSecurityConfig, StreamConfig
from veil.errors import SourceError, VeilError
from workers.trusted.control import AlphaControl
from workers.trusted.obfuscator import ObfuscatedFrame, Obfuscator, ProfileTable

log = structlog.get_logger(__name__)


def _leakage_text(leakage: dict[str, Any]) -> str:
    if not leakage or not leakage.get("rank1"):
        return "leakage not measured: run veil privacy"
    rank1, floor = leakage["rank1"], leakage.get("boxes_only") or {}
    floor_text = ""
    if floor.get("rank1"):
        floor_text = f", boxes-only {100 * float(floor['rank1']['value']):.1f}%"
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
    in the background, the control reader. A graceful stop lets every source hand out the frames it
    already decoded; they are all published before the supervisor's run returns.
    """

    def __init__(
        self,
        streams: Sequence[StreamConfig],
        obfuscator: Obfuscator,
        bootstrap_servers: str,
        *,
        idempotent: bool,
        quantisation: Quantisation = "float16",
        batching: BatchingConfig | None = None,
        topics: TopicNames = DEFAULT_TOPICS,
        max_request_size: int = 4 * 1024 * 1024,
        reconnect: Backoff | None = None,
        follow_control: bool = True,
        queue_size: int = 64,
        frame_hook: Callable[[Frame], None] | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        signer: Signer | None = None,
        control_verifier: Verifier | None = None,
        security: KafkaSecurityConfig | None = None,
    ) -> None:
        self.streams = list(streams)
        self.obfuscator = obfuscator
        self.bootstrap = bootstrap_servers
        self.idempotent = idempotent
        self.quantisation = quantisation
        self.batching = batching or BatchingConfig()
        self.topics = topics
        self.max_request_size = max_request_size
        self.reconnect = reconnect
        self.follow_control = follow_control
        self.queue_size = queue_size
        self.frame_hook = frame_hook  # e.g. the annotated-video writer, inside the zone
        self.backoff = backoff
        # The edge key signs every activation (stream.signing); None: they go unsigned.
        self.signer = signer
        # The operator key that control records must be signed with (None: not checked); an
        # old record published again is refused by AlphaControl (workers/trusted/control.py).
        self.control_verifier = control_verifier
        self.security = security  # how the producer and the control reader connect (TLS, SASL)
        self.stats = EdgeStats()
        # Refuses, before anything starts, a configured alpha below the zone's floor or
        # without a calibrated profile.
        self.control = AlphaControl(self.streams, obfuscator.table)
        self.partitions: dict[str, int] = {}
        self._producer: Any = None
        self._sources: list[VideoSource] = []
        self._supervisor: Supervisor | None = None
        self.finished = asyncio.Event()  # set once the last frame is published

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._producer = await retry(
            lambda: make_producer(
                self.bootstrap,
                idempotent=self.idempotent,
                max_request_size=self.max_request_size,
                security=self.security,
            ),
            what=f"kafka producer on {self.bootstrap}",
            transient=transient,
            backoff=self.backoff,
        )
        self.partitions = await self._spread_partitions()
        for s in self.streams:
            source = VideoSource(
                s.id, s.source, policy=s.policy, reconnect=self.reconnect, loop_file=s.loop
            )
            await source.start()
            self._sources.append(source)
        log.info(
            "edge.started",
            streams=[s.id for s in self.streams],
            alphas=self.alphas,
            partitions=self.partitions,
        )
        for note in profile_notes(self.streams, self.obfuscator.table):
            log.info("edge.profile", **note)
        if self.follow_control:
            await self._answer(self.control.started())

    async def _spread_partitions(self) -> dict[str, int]:
        """Streams round robin over the activation partitions (hashing a handful of ids puts
        several on one partition and none on another). One stream keeps one partition, so
        its frames stay in order."""
        found = await retry(
            lambda: self._producer.partitions_for(self.topics.activations),
            what=f"partitions of {self.topics.activations}",
            transient=transient,
            backoff=self.backoff,
        )
        ordered = sorted(found)
        return {s.id: ordered[i % len(ordered)] for i, s in enumerate(self.streams)}

    async def stop(self) -> None:
        """Stop the sources and the producer (after :meth:`run`, everything read is sent)."""
        for src in self._sources:
            await src.stop()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            with contextlib.suppress(TimeoutError, KafkaError):
                await asyncio.wait_for(producer.flush(), 10.0)
            await producer.stop()
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
        frames: Channel[Frame] = Channel("frames", self.queue_size, producers=len(self._sources))
        batches: Channel[list[Frame]] = Channel("batches", 1)
        encoded: Channel[_Encoded] = Channel("encoded", 2)
        for src in self._sources:
            supervisor.add(f"read:{src.stream_id}", partial(self._read, src, frames, supervisor))
        supervisor.add("batch", partial(self._batch, frames, batches))
        supervisor.add("head+noise", partial(self._head_noise, batches, encoded))
        supervisor.add("publish", partial(self._publish, encoded))
        if self.follow_control:
            supervisor.add("control", self._control_loop, background=True)
        supervisor.ready_when(lambda: len(self.stats.source_errors) < len(self._sources))

    # -- stages ------------------------------------------------------------------------------

    async def _read(self, source: VideoSource, out: Channel[Frame], supervisor: Supervisor) -> None:
        stopper = asyncio.create_task(_finish_on_stop(supervisor, source))
        dropped_seen = 0
        try:
            async for frame in source.frames():
                obs.FRAMES_IN.labels(source.stream_id).inc()
                self.stats.frames_in += 1
                dropped = source.stats.dropped
                if dropped > dropped_seen:
                    obs.FRAMES_DROPPED.labels(source.stream_id).inc(dropped - dropped_seen)
                    dropped_seen = dropped
                await out.put(frame)
        except SourceError as exc:
            # One broken camera must not stop the others: record it, keep serving the rest.
            self.stats.source_errors[source.stream_id] = str(exc)
            log.error("edge.source_failed", stream=source.stream_id, error=str(exc))
        finally:
            stopper.cancel()
        await out.close()

    async def _batch(self, frames: Channel[Frame], out: Channel[list[Frame]]) -> None:
        """Frames from every stream, grouped up to ``max_batch`` or ``max_wait_ms``."""
        while (first := await frames.get()) is not None:
            batch = [first]
            deadline = time.monotonic() + self.batching.max_wait_ms / 1000
            while len(batch) < self.batching.max_batch:
                item = frames.get_nowait()
                if item is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or frames.closed:
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

    async def _head_noise(self, batches: Channel[list[Frame]], out: Channel[_Encoded]) -> None:
        async for batch in batches:
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
        partition = self.partitions.get(r.envelope.stream_id)
        return OutgoingRecord(self.topics.activations, key, value, headers, partition)

    async def _publish(self, encoded: Channel[_Encoded]) -> None:
        async for item in encoded:
            await send_all(
                self._producer,
                item.records,
                what=f"publish {len(item.records)} activations",
                backoff=self.backoff,
                on_retry=self._count_retry,
            )
            size = sum(len(r.value or b"") for r in item.records)
            self.stats.bytes_published += size
            obs.BYTES_PUBLISHED.inc(size)
            obs.MESSAGES_PUBLISHED.inc(len(item.records))
            if self.frame_hook is not None:
                for frame in item.frames:
                    self.frame_hook(frame)
            self.stats.frames_published += len(item.records)
            self.stats.batches += 1
        self.finished.set()

    def _count_retry(self, _error: BaseException, _delay: float) -> None:
        self.stats.publish_retries += 1

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
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id="veil-edge-control",
            **security_kwargs(self.security, self.bootstrap),
        )
        await consumer.start()
        try:
            partitions: set[int] = set()
            while not partitions:
                partitions = consumer.partitions_for_topic(self.topics.control) or set()
                if not partitions:
                    await asyncio.sleep(1.0)
                    await consumer._client.force_metadata_update()
            assigned = [TopicPartition(self.topics.control, p) for p in sorted(partitions)]
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

    async def _answer(self, statuses: list[StatusMessage]) -> None:
        """Publish what the zone decided on the status topic (``veil alpha set`` waits)."""
        records = [OutgoingRecord(self.topics.status, *encode_status(s)) for s in statuses]
        if self.signer is not None:  # signed with the edge key: the operator can trust it
            records = [self.signer.signed(r) for r in records]
        await send_all(self._producer, records, what="status", backoff=self.backoff)


async def _finish_on_stop(supervisor: Supervisor, source: VideoSource) -> None:
    """On a graceful stop the source stops decoding and hands out what it has decoded."""
    await supervisor.stopping.wait()
    source.finish()
