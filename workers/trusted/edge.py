"""The trusted-zone worker: sources -> batches -> head + noise -> Kafka.

Stages are asyncio tasks joined by bounded queues (Savant's adapters): one reader per stream,
one batcher that runs :class:`Obfuscator` in a thread, and a control reader that applies live
alpha changes. The first error wins: it stops every stage and :meth:`EdgeWorker.run` raises it.
A sentinel drains the batch queue on stop (SIGTERM), and the producer is flushed, so frames
already read are published before exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.frames import Frame
from stream.kafka import DEFAULT_TOPICS, TopicNames, make_producer
from stream.sources import ReconnectPolicy, VideoSource
from stream.wire import ActivationMessage, FramePlacement, Quantisation, decode_control, encode
from veil import observability as obs
from veil.config import BatchingConfig, StreamConfig
from veil.errors import ProfileError, SourceError, VeilError
from workers.trusted.obfuscator import Obfuscator, ProfileTable

log = structlog.get_logger(__name__)

_END = object()  # sentinel: no more frames will come


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
    source_errors: dict[str, str] = field(default_factory=dict)
    alpha_changes: list[tuple[str, float]] = field(default_factory=list)


class EdgeWorker:
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
        reconnect: ReconnectPolicy | None = None,
        follow_control: bool = True,
        queue_size: int = 64,
        frame_hook: Callable[[Frame], None] | None = None,
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
        self.frame_hook = frame_hook  # e.g. the annotated-video writer, inside the zone
        self.stats = EdgeStats()
        # Refuse a stream whose configured alpha has no profile before anything starts.
        for s in self.streams:
            obfuscator.table.row(s.alpha)
        self.alphas = {s.id: s.alpha for s in self.streams}
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
        self._producer: Any = None
        self._sources: list[VideoSource] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._control_task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._done = asyncio.Event()
        self.ready = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._producer = await make_producer(
            self.bootstrap, idempotent=self.idempotent, max_request_size=self.max_request_size
        )
        for s in self.streams:
            source = VideoSource(
                s.id, s.source, policy=s.policy, reconnect=self.reconnect, loop_file=s.loop
            )
            await source.start()
            self._sources.append(source)
        self._tasks = [
            asyncio.create_task(self._read(src), name=f"read:{src.stream_id}")
            for src in self._sources
        ]
        batcher = asyncio.create_task(self._batch_loop(), name="batcher")
        batcher.add_done_callback(self._on_batcher_done)
        self._tasks.append(batcher)
        if self.follow_control:
            self._control_task = asyncio.create_task(self._control_loop(), name="control")
        self.ready = True
        log.info("edge.started", streams=[s.id for s in self.streams], alphas=self.alphas)
        for note in profile_notes(self.streams, self.obfuscator.table):
            log.info("edge.profile", **note)

    async def stop(self) -> None:
        """Stop reading, publish what was already read, flush the producer."""
        self.ready = False
        for src in self._sources:
            await src.stop()
        readers = self._tasks[:-1]
        for t in readers:
            t.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        if self._tasks and not self._tasks[-1].done():
            await self._queue.put(_END)
            await asyncio.gather(self._tasks[-1], return_exceptions=True)
        if self._control_task is not None:
            self._control_task.cancel()
            await asyncio.gather(self._control_task, return_exceptions=True)
        if self._producer is not None:
            await self._producer.flush()
            await self._producer.stop()
            self._producer = None
        log.info("edge.stopped", **self.stats.__dict__)

    async def __aenter__(self) -> EdgeWorker:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def run(self) -> EdgeStats:
        """Until every source has ended (files) or a stage failed (first error wins)."""
        readers = self._tasks[:-1]
        await asyncio.gather(*readers, return_exceptions=True)
        if not self._tasks[-1].done():
            await self._queue.put(_END)
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self.stats

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            log.error("edge.failed", error=repr(error))
        self._done.set()

    def _on_batcher_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]
        self._done.set()

    # -- stages ------------------------------------------------------------------------------

    async def _read(self, source: VideoSource) -> None:
        dropped_seen = 0
        try:
            async for frame in source.frames():
                obs.FRAMES_IN.labels(source.stream_id).inc()
                self.stats.frames_in += 1
                dropped = source.stats.dropped
                if dropped > dropped_seen:
                    obs.FRAMES_DROPPED.labels(source.stream_id).inc(dropped - dropped_seen)
                    dropped_seen = dropped
                await self._queue.put(frame)
        except SourceError as exc:
            # One broken camera must not stop the others: record it, keep serving the rest.
            self.stats.source_errors[source.stream_id] = str(exc)
            log.error("edge.source_failed", stream=source.stream_id, error=str(exc))

    async def _next_batch(self) -> tuple[list[Frame], bool]:
        first = await self._queue.get()
        if first is _END:
            return [], True
        batch: list[Frame] = [first]
        deadline = time.monotonic() + self.batching.max_wait_ms / 1000
        while len(batch) < self.batching.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get_nowait()
                    if remaining <= 0
                    else await asyncio.wait_for(self._queue.get(), remaining)
                )
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if item is _END:
                return batch, True
            batch.append(item)
        return batch, False

    async def _batch_loop(self) -> None:
        ended = False
        while not ended:
            batch, ended = await self._next_batch()
            if batch:
                await self._publish_batch(batch)

    async def _publish_batch(self, batch: list[Frame]) -> None:
        alphas = [self.alphas[f.stream_id] for f in batch]
        started = time.perf_counter()
        results = await asyncio.to_thread(self.obfuscator.run, batch, alphas)
        obs.HEAD_NOISE_SECONDS.observe(time.perf_counter() - started)
        obs.BATCH_SIZE.observe(len(batch))
        geometry = self.obfuscator.geometry
        detector = self.obfuscator.detector
        pending = []
        for r in results:
            message = ActivationMessage(
                stream_id=r.stream_id,
                sequence=r.sequence,
                pts=r.pts,
                capture_time=r.capture_time,
                model=detector.name,
                weights_id=detector.weights_id,
                profile_id=r.profile_id,
                alpha=r.alpha,
                placement=FramePlacement.from_letterbox(r.letterbox, geometry),
                payload=r.activation,
                quantisation=self.quantisation,
            )
            key, value, headers = encode(message)
            pending.append(
                await self._producer.send(
                    self.topics.activations, value=value, key=key, headers=headers
                )
            )
            self.stats.bytes_published += len(value)
            obs.BYTES_PUBLISHED.inc(len(value))
        await asyncio.gather(*pending)  # acks=all for the whole batch
        obs.MESSAGES_PUBLISHED.inc(len(results))
        if self.frame_hook is not None:
            for frame in batch:
                self.frame_hook(frame)
        self.stats.frames_published += len(results)
        self.stats.batches += 1

    # -- live alpha --------------------------------------------------------------------------

    def set_alpha(self, stream_id: str, alpha: float) -> None:
        """Apply from the next batch; refuse alphas without a calibrated profile."""
        if stream_id not in self.alphas:
            return  # another worker's stream
        self.obfuscator.table.row(alpha)
        if self.alphas[stream_id] != alpha:
            self.alphas[stream_id] = alpha
            self.stats.alpha_changes.append((stream_id, alpha))
            log.info("edge.alpha_changed", stream=stream_id, alpha=alpha)

    async def _control_loop(self) -> None:
        """Follow the compacted control topic from its beginning, forever."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id="veil-edge-control",
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
                        self._apply_control(record)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def _apply_control(self, record: Any) -> None:
        try:
            msg = decode_control(record.key, record.value, record.headers)
        except VeilError as exc:  # WireFormatError and ConfigError alike
            log.warning("edge.control_malformed", offset=record.offset, reason=str(exc))
            return
        configured = {s.id: s.alpha for s in self.streams}
        alpha = configured.get(msg.stream_id) if msg.alpha is None else msg.alpha
        if alpha is None:
            return
        try:
            self.set_alpha(msg.stream_id, alpha)
        except ProfileError as exc:
            log.error("edge.alpha_refused", stream=msg.stream_id, alpha=alpha, reason=str(exc))
