"""The outside worker: activations from Kafka -> Triton tail -> detections to Kafka.

It never sees pixels: only noisy activations and where each frame sits in the model input.
Delivery is at least once: offsets are committed only after the batch's detections are
acknowledged by the broker; a redelivered activation is recognised by (stream, sequence) and
skipped. A message that is malformed, foreign, for another model, or made with a profile the
tail repository has no model for goes to the dead-letter topic with its reason, and the worker
keeps going. Each message is read by the tail its profile id names (see
:class:`~workers.untrusted.tail_client.TailRouter`); a batch that mixes profiles is split per
model. A Triton outage is retried with backoff without committing, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import structlog
import torch
from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from stream.kafka import (
    DEFAULT_TOPICS,
    SequenceDeduper,
    TopicNames,
    close_consumer,
    committable,
    make_consumer,
    make_producer,
    publish_dead_letter,
)
from stream.wire import ActivationMessage, DetectionMessage, decode, encode_detection
from veil import observability as obs
from veil.detections import Detections
from veil.detectors.base import SplitDetector
from veil.errors import ServiceError, WireFormatError
from workers.untrusted.tail_client import FloatArray, TailRouter, TritonTail
from workers.untrusted.triton_repo import TailManifest

log = structlog.get_logger(__name__)


@dataclass
class DetectStats:
    consumed: int = 0
    published: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    commits: int = 0
    commit_failures: int = 0
    triton_retries: int = 0


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    async def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("detect.partitions_revoked", partitions=sorted(str(tp) for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("detect.partitions_assigned", partitions=sorted(str(tp) for tp in assigned))


class DetectWorker:
    def __init__(
        self,
        bootstrap_servers: str,
        tail: TritonTail | TailRouter,
        decoder: SplitDetector,
        manifest: TailManifest,
        *,
        idempotent: bool,
        group_id: str = "veil-detect",
        topics: TopicNames = DEFAULT_TOPICS,
        max_batch: int = 8,
        poll_timeout_ms: int = 50,
        score_threshold: float = 0.5,
    ) -> None:
        self.bootstrap = bootstrap_servers
        # A single tail stands for its backend: the other models of the manifest get clients.
        self.router = (
            tail if isinstance(tail, TailRouter) else TailRouter.from_manifest(tail, manifest)
        )
        self.decoder = decoder
        self.manifest = manifest
        self.idempotent = idempotent
        self.group_id = group_id
        self.topics = topics
        self.max_batch = max_batch
        self.poll_timeout_ms = poll_timeout_ms
        self.score_threshold = score_threshold
        self.stats = DetectStats()
        self.deduper = SequenceDeduper()
        self.lag: dict[int, int] = {}
        self._consumer: Any = None
        self._producer: Any = None
        self._stopping = asyncio.Event()
        self.ready = False

    async def start(self) -> None:
        await self.router.start()
        self._producer = await make_producer(self.bootstrap, idempotent=self.idempotent)
        self._consumer = await make_consumer(
            self.bootstrap,
            self.group_id,
            [self.topics.activations],
            client_id="veil-detect",
            listener=_Rebalance(),
        )
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        self._stopping.set()
        if self._consumer is not None:
            await close_consumer(self._consumer)
            self._consumer = None
        if self._producer is not None:
            await self._producer.flush()
            await self._producer.stop()
            self._producer = None
        await self.router.stop()

    async def __aenter__(self) -> DetectWorker:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self, idle_timeout_s: float | None = None) -> DetectStats:
        """Consume until asked to stop (or, if given, after ``idle_timeout_s`` with no input)."""
        last_input = time.monotonic()
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(
                timeout_ms=self.poll_timeout_ms, max_records=self.max_batch
            )
            records = [r for tp in sorted(batches, key=lambda t: t.partition) for r in batches[tp]]
            if not records:
                if idle_timeout_s is not None and time.monotonic() - last_input > idle_timeout_s:
                    break
                continue
            last_input = time.monotonic()
            await self.handle(records)
            await self._observe_lag()
        return self.stats

    async def _observe_lag(self) -> None:
        """Consumer lag per partition: the broker's high watermark minus our position."""
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue  # revoked in a rebalance meanwhile
            self.lag[tp.partition] = highwater - position
            obs.CONSUMER_LAG.labels(str(tp.partition)).set(highwater - position)

    async def handle(self, records: Sequence[Any]) -> None:
        """One polled batch: decode, infer, publish, then commit."""
        self.stats.consumed += len(records)
        messages: list[ActivationMessage] = []
        for record in records:
            try:
                msg = decode(record.key, record.value, record.headers)
                self._check_model(msg)
                self._check_profile(msg)
            except WireFormatError as exc:
                await publish_dead_letter(self._producer, record, str(exc), topics=self.topics)
                self.stats.dead_letters += 1
                obs.DEAD_LETTERS.inc()
                continue
            if not self.deduper.accept(msg.stream_id, msg.sequence):
                self.stats.duplicates += 1
                obs.DUPLICATES.inc()
                continue
            messages.append(msg)
        if messages:
            await self._detect_and_publish(messages)
        await self._commit(records)

    def _check_model(self, msg: ActivationMessage) -> None:
        m = self.manifest
        if msg.model != m.detector or msg.weights_id != m.weights_id:
            raise WireFormatError(
                f"activation from model {msg.model} weights {msg.weights_id[:12]}, but this "
                f"tail serves {m.detector} weights {m.weights_id[:12]}"
            )
        if msg.shape != m.activation_shape:
            raise WireFormatError(
                f"activation shape {msg.shape} does not fit the tail's {m.activation_shape}"
            )
        if msg.placement.geometry() != m.geometry:
            raise WireFormatError(
                f"activation made at input {msg.placement.geometry()}, tail expects {m.geometry}"
            )

    def _check_profile(self, msg: ActivationMessage) -> None:
        if self.router.model_for(msg.profile_id) is None:
            raise WireFormatError(
                f"unknown profile {msg.profile_id}: the tail repository has no model for it "
                "(export it with `veil export --bank` holding that profile)"
            )

    async def _infer(self, model: str, batch: FloatArray) -> tuple[FloatArray, ...]:
        delay = 0.2
        while True:
            started = time.perf_counter()
            try:
                raw = await self.router.tails[model].infer(batch)
                obs.TRITON_SECONDS.observe(time.perf_counter() - started)
                return raw
            except ServiceError as exc:
                if not exc.retriable or self._stopping.is_set():
                    raise
                self.stats.triton_retries += 1
                log.warning("detect.triton_retry", error=str(exc), delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _detect(self, messages: list[ActivationMessage]) -> list[Detections]:
        """Detections per message, in order; each profile's messages go to its own model."""
        groups: dict[str, list[int]] = {}
        for i, msg in enumerate(messages):
            model = self.router.model_for(msg.profile_id)
            assert model is not None  # _check_profile let only known profiles through
            groups.setdefault(model, []).append(i)
        per_group = await asyncio.gather(
            *(
                self._detect_group(model, [messages[i] for i in rows])
                for model, rows in groups.items()
            )
        )
        detections: dict[int, Detections] = {}
        for rows, group_detections in zip(groups.values(), per_group, strict=True):
            detections.update(zip(rows, group_detections, strict=True))
        return [detections[i] for i in range(len(messages))]

    async def _detect_group(
        self, model: str, messages: list[ActivationMessage]
    ) -> list[Detections]:
        batch = np.stack([m.payload for m in messages]).astype(np.float32, copy=False)
        raw = await self._infer(model, batch)
        g = self.manifest.geometry
        return self.decoder.decode(
            [torch.from_numpy(np.ascontiguousarray(r)) for r in raw],
            [m.placement.letterbox() for m in messages],
            g.height,
            g.width,
            score_threshold=self.score_threshold,
        )

    async def _detect_and_publish(self, messages: list[ActivationMessage]) -> None:
        detections = await self._detect(messages)
        pending = []
        now = time.time()
        for msg, dets in zip(messages, detections, strict=True):
            out = DetectionMessage(
                stream_id=msg.stream_id,
                sequence=msg.sequence,
                pts=msg.pts,
                capture_time=msg.capture_time,
                detections=dets,
                model=msg.model,
                weights_id=msg.weights_id,
                profile_id=msg.profile_id,
                alpha=msg.alpha,
                produced_time=now,
            )
            key, value, headers = encode_detection(out)
            pending.append(
                await self._producer.send(
                    self.topics.detections, value=value, key=key, headers=headers
                )
            )
            obs.END_TO_END_SECONDS.observe(max(0.0, now - msg.capture_time))
        await asyncio.gather(*pending)
        self.stats.published += len(messages)
        obs.DETECTIONS_PUBLISHED.inc(len(messages))

    async def _commit(self, records: Sequence[Any]) -> None:
        try:
            await self._consumer.commit(committable(records))
            self.stats.commits += 1
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance took the partition: the next owner re-reads from the last commit and
            # the (stream, sequence) dedupe downstream recognises the repeats. Not fatal.
            self.stats.commit_failures += 1
            log.warning("detect.commit_failed", error=repr(exc))
