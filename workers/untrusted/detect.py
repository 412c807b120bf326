"""The outside worker: activations from Kafka -> Triton tail -> detections to Kafka.

It never sees pixels: only noisy activations and where each frame sits in the model input.
Its stages run on the supervised runtime (:mod:`stream.runtime`), joined by bounded channels::

    consume -> parse -> infer -> decode -> publish -> commit

With signing keys configured (:mod:`stream.signing`) every activation must carry the edge
key's signature, checked before anything else: an unsigned, forged or tampered record is a
dead letter with its reason and never reaches the dedupe window; every detection is signed
with the detect key.

Delivery is at least once: a batch's offsets are committed only after its detections and dead
letters are acknowledged by the broker; a redelivered activation is recognised by (stream,
sequence) and skipped. Failures of one record are data, not exceptions: a record that is
malformed, foreign, for another model, made with a profile the tail repository has no model
for, or that Triton rejects becomes a dead letter with its reason, and the rest of its batch
goes on. Each message is read by the tail its profile id names (see
:class:`~workers.untrusted.tail_client.TailRouter`); a batch that mixes profiles is split per
model. Transient faults (the broker restarting, Triton down, at start or later) are retried
with backoff forever, without committing, so nothing is lost; box decoding runs in a thread so
that the event loop keeps serving Kafka heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Final

import numpy as np
import structlog
import torch
from aiokafka import ConsumerRebalanceListener
from aiokafka import errors as kafka_errors
from aiokafka.errors import KafkaError

from stream.kafka import (
    DEFAULT_MAX_REQUEST_SIZE,
    KafkaLink,
    OutgoingRecord,
    SequenceDeduper,
    close_consumer,
    committable,
    make_consumer,
    publish_dead_letter,
    send_all,
    transient,
)
from stream.runtime import (
    DEFAULT_BACKOFF,
    Backoff,
    Channel,
    Supervisor,
    blocking,
    one_line,
    retry,
    stop_on_signals,
)
from stream.signing import ROLE_EDGE, Signer, Verifier
from stream.wire import ActivationMessage, DetectionMessage, decode, encode_detection
from veil import observability as obs
from veil.detections import Detections
from veil.detectors.base import SplitDetector
from veil.errors import ConfigError, ServiceError, WireFormatError
from workers.untrusted.tail_client import FloatArray, TailRouter, TritonTail
from workers.untrusted.triton_repo import TailManifest

log = structlog.get_logger(__name__)

# The producer may send requests this large: a dead letter carries a record as large as the
# consumer fetched (4 MiB) and more; publish_dead_letter truncates what the broker refuses.
DETECT_MAX_REQUEST_SIZE: Final = 16 * 1024 * 1024
_CHANNEL_CAPACITY: Final = 2  # batches in flight between two stages
# A commit that fails with these lost its partitions to a rebalance: the next owner re-reads
# from the last commit and the dedupe downstream drops the repeats. Retrying cannot help.
_COMMIT_LOST: Final = (
    kafka_errors.CommitFailedError,
    kafka_errors.IllegalStateError,
    kafka_errors.IllegalGenerationError,
    kafka_errors.UnknownMemberIdError,
    kafka_errors.RebalanceInProgressError,
)


@dataclass
class DetectStats:
    consumed: int = 0
    batches: int = 0
    published: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    unverified: int = 0  # activations refused by the signature check (also dead letters)
    truncated_dead_letters: int = 0
    triton_rejected: int = 0
    commits: int = 0
    commit_failures: int = 0
    triton_retries: int = 0
    broker_retries: int = 0


@dataclass
class _Item:
    """One polled record on its way through the stages: its outcome so far.

    ``reason`` set: it goes to the dead-letter topic with that reason; ``duplicate``: it was
    already handled; else it is ok and gathers its tail outputs, then its detection record.
    """

    record: Any
    message: ActivationMessage | None = None
    reason: str | None = None
    unverified: bool = False  # refused by the signature check, before anything else
    duplicate: bool = False
    raw: tuple[FloatArray, ...] | None = None  # its rows of the tail's outputs
    out: OutgoingRecord | None = None  # its detection record

    @property
    def ok(self) -> bool:
        return self.reason is None and not self.duplicate and self.message is not None

    @property
    def activation(self) -> ActivationMessage:
        if self.message is None:
            raise ConfigError(f"record at offset {self.record.offset} has no activation")
        return self.message


@dataclass
class _Batch:
    """One poll's records, in order, each with its outcome."""

    items: list[_Item]

    def ok(self) -> list[_Item]:
        return [i for i in self.items if i.ok]

    @property
    def records(self) -> list[Any]:
        return [i.record for i in self.items]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    async def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("detect.partitions_revoked", partitions=sorted(str(tp) for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("detect.partitions_assigned", partitions=sorted(str(tp) for tp in assigned))


def _triton_down(exc: BaseException) -> bool:
    """Triton unreachable, overloaded or too slow: the same request may pass later."""
    return isinstance(exc, ServiceError) and exc.retriable


def _commit_transient(exc: BaseException) -> bool:
    return transient(exc) and not isinstance(exc, _COMMIT_LOST)


async def _map(
    inp: Channel[_Batch], out: Channel[_Batch], step: Callable[[_Batch], Awaitable[None]]
) -> None:
    """A stage that applies ``step`` to every batch, in order, and hands it on."""
    async for batch in inp:
        await step(batch)
        await out.put(batch)
    await out.close()


class DetectWorker:
    """The outside role's stages on a :class:`~stream.runtime.Supervisor`.

    ``async with DetectWorker(...) as worker: await worker.run()`` runs alone; :meth:`attach`
    adds the stages to a supervisor shared with other roles. :meth:`handle` runs one list of
    records through every stage (tests).
    """

    def __init__(
        self,
        link: KafkaLink,
        tail: TritonTail | TailRouter,
        decoder: SplitDetector,
        manifest: TailManifest,
        *,
        group_id: str = "veil-detect",
        max_batch: int = 8,
        poll_timeout_ms: int = 50,
        score_threshold: float = 0.5,
        backoff: Backoff = DEFAULT_BACKOFF,
        max_request_size: int = DETECT_MAX_REQUEST_SIZE,
        dead_letter_max_bytes: int = DEFAULT_MAX_REQUEST_SIZE,
        signer: Signer | None = None,
        verifier: Verifier | None = None,
        threads: int | None = None,
        session_timeout_ms: int = 10_000,
    ) -> None:
        self.link = link  # the broker, topics, TLS/SASL of the consumer and the producer
        self.session_timeout_ms = session_timeout_ms
        # Torch threads of box decoding, set in the thread that decodes (None: torch's).
        self.threads = threads
        # A single tail stands for its backend: the other models of the manifest get clients.
        self.router = (
            tail if isinstance(tail, TailRouter) else TailRouter.from_manifest(tail, manifest)
        )
        self.decoder = decoder
        self.manifest = manifest
        self.group_id = group_id
        self.max_batch = max_batch
        self.poll_timeout_ms = poll_timeout_ms
        self.score_threshold = score_threshold
        self.backoff = backoff
        self.max_request_size = max_request_size
        self.dead_letter_max_bytes = dead_letter_max_bytes
        # The detect key signs every detection; the edge key must have signed every activation
        # (checked before any state is touched). None: unsigned, as without keys.
        self.signer = signer
        self.verifier = verifier
        self.stats = DetectStats()
        self.deduper = SequenceDeduper()
        self.lag: dict[int, int] = {}
        self._consumer: Any = None
        self._producer: Any = None
        self._supervisor: Supervisor | None = None
        # What the stages stop on: the supervisor's stopping, or an event of the worker's own
        # (see attach); until attached, this one remembers an early request_stop.
        self._stop: asyncio.Event = asyncio.Event()
        self._idle_timeout_s: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def serve_profiles(self, manifest: TailManifest) -> list[str]:
        """Serve the new profiles of a re-exported repository from now on (``veil run``'s bank
        reload): Triton loads their models first. Returns the profile ids added."""
        added = await self.router.add_routes(manifest, load=True)
        self.manifest = manifest
        log.info("detect.profiles_added", profiles=added)
        return added

    async def start(self) -> None:
        """Triton's tails, then the Kafka clients (unless :meth:`start_kafka` ran already,
        as ``veil run`` does while Triton boots), each waited for while down."""
        try:
            await self.start_tails()
            await self.start_kafka()
        except BaseException:
            await self.stop()
            raise
        log.info("detect.started", group=self.group_id, models=sorted(self.router.tails))

    async def start_tails(self) -> None:
        """Triton's tails, retried while the server is down."""
        await retry(
            self.router.start,
            what=f"triton tails {sorted(self.router.tails)}",
            transient=_triton_down,
            backoff=self.backoff,
            on_retry=self._count_triton_retry,
        )

    async def start_kafka(self) -> None:
        """The producer and the consumer (its group joined), retried while the broker is
        down; nothing when they are started already."""
        if self._consumer is not None:
            return
        self._producer = self._producer or await self._retry_broker(
            lambda: self.link.producer("veil-detect", self.max_request_size),
            f"kafka producer on {self.link.bootstrap}",
        )
        self._consumer = await self._retry_broker(
            lambda: make_consumer(
                self.link.bootstrap,
                self.group_id,
                [self.link.topics.activations],
                client_id="veil-detect",
                listener=_Rebalance(),
                security=self.link.security,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=self.session_timeout_ms // 3,
            ),
            f"kafka consumer (group {self.group_id}) on {self.link.bootstrap}",
        )

    async def stop(self) -> None:
        """Leave the group, flush and stop the producer, stop the tails the router made."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await close_consumer(consumer)
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(TimeoutError, KafkaError):
                await asyncio.wait_for(producer.flush(), 10.0)
            await producer.stop()
        await self.router.stop()
        if consumer is not None or producer is not None:  # once, however often stopped
            log.info("detect.stopped", **self.stats.__dict__)

    async def __aenter__(self) -> DetectWorker:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def ready(self) -> bool:
        return self._supervisor is not None and self._supervisor.ready

    @property
    def _stopping(self) -> asyncio.Event:
        return self._stop

    def request_stop(self) -> None:
        """Stop polling; what was polled is still handled and committed (graceful)."""
        if self._supervisor is not None and self._stop is self._supervisor.stopping:
            self._supervisor.request_stop()
        else:
            self._stop.set()

    def attach(
        self,
        supervisor: Supervisor,
        *,
        stop: asyncio.Event | None = None,
        idle_timeout_s: float | None = None,
    ) -> None:
        """Add this worker's stages to ``supervisor`` (after :meth:`start`).

        The stages stop on ``supervisor.stopping``, or, given ``stop``, on that event only
        (``veil run``: the worker outlives the edge; :meth:`request_stop` sets it). With
        ``idle_timeout_s``, a stop is asked after that long without input.
        """
        asked = self._stop.is_set()
        self._supervisor = supervisor
        self._stop = stop if stop is not None else supervisor.stopping
        self._idle_timeout_s = idle_timeout_s
        polled: Channel[list[Any]] = Channel("polled", _CHANNEL_CAPACITY)
        parsed, inferred, decoded, published = (
            Channel[_Batch](name, _CHANNEL_CAPACITY)
            for name in ("parsed", "inferred", "decoded", "published")
        )
        supervisor.add("consume", partial(self._consume, polled))
        supervisor.add("parse", partial(self._parse_stage, polled, parsed))
        supervisor.add("infer", partial(_map, parsed, inferred, self._infer))
        supervisor.add("decode", partial(_map, inferred, decoded, self._decode))
        supervisor.add("publish", partial(_map, decoded, published, self._publish))
        supervisor.add("commit", partial(self._commit_stage, published))
        supervisor.ready_when(lambda: self._consumer is not None)
        if asked:
            self.request_stop()

    async def run(self, idle_timeout_s: float | None = None) -> DetectStats:
        """Until a stop is asked (SIGTERM, :meth:`request_stop`, ``idle_timeout_s`` without
        input) or a stage fails; returns the stats."""
        supervisor = Supervisor("detect")
        self.attach(supervisor, idle_timeout_s=idle_timeout_s)
        with stop_on_signals(supervisor):
            await supervisor.run()
        return self.stats

    async def handle(self, records: Sequence[Any]) -> None:
        """One list of records through every stage: parse, infer, decode, publish, commit."""
        batch = await self._parse(records)
        await self._infer(batch)
        await self._decode(batch)
        await self._publish(batch)
        await self._commit(batch)

    # -- consume -----------------------------------------------------------------------------

    async def _consume(self, out: Channel[list[Any]]) -> None:
        """Poll until a stop is asked, then close the channel behind the last batch."""
        last_input = time.monotonic()
        while not self._stopping.is_set():
            records = await self._poll()
            if records is None:
                break  # a stop was asked while the broker was away
            if not records:
                idle = time.monotonic() - last_input
                if self._idle_timeout_s is not None and idle > self._idle_timeout_s:
                    log.info("detect.idle_stop", idle_s=round(idle, 1))
                    self.request_stop()
                continue
            last_input = time.monotonic()
            await out.put(records)
            await self._observe_lag()
        await out.close()

    async def _poll(self) -> list[Any] | None:
        """The next records (maybe none), retried while the broker is away; None on a stop."""
        try:
            batches = await retry(
                lambda: self._consumer.getmany(
                    timeout_ms=self.poll_timeout_ms, max_records=self.max_batch
                ),
                what="poll activations",
                transient=transient,
                backoff=self.backoff,
                on_retry=self._count_broker_retry,
                stopping=self._stopping,
            )
        except Exception as exc:
            if self._stopping.is_set() and transient(exc):
                return None
            raise
        ordered = sorted(batches, key=lambda t: (t.topic, t.partition))
        return [r for tp in ordered for r in batches[tp]]

    async def _observe_lag(self) -> None:
        """Consumer lag per partition: the broker's high watermark minus our position."""
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue  # revoked in a rebalance meanwhile, or the broker is away
            self.lag[tp.partition] = highwater - position
            obs.CONSUMER_LAG.labels(str(tp.partition)).set(highwater - position)

    # -- parse -------------------------------------------------------------------------------

    async def _parse_stage(self, inp: Channel[list[Any]], out: Channel[_Batch]) -> None:
        async for records in inp:
            await out.put(await self._parse(records))
        await out.close()

    async def _parse(self, records: Sequence[Any]) -> _Batch:
        """Verify, decode and check every record (in a thread), then drop redeliveries: only
        verified records reach the dedupe window."""
        items = await blocking("decode activations", self._parse_all, list(records))
        self.stats.consumed += len(items)
        self.stats.batches += 1
        self.stats.unverified += sum(item.unverified for item in items)
        for item in items:
            msg = item.message
            if msg is not None and item.ok and not self.deduper.accept(msg.stream_id, msg.sequence):
                item.duplicate = True
                self.stats.duplicates += 1
                obs.DUPLICATES.inc()
        return _Batch(items)

    def _parse_all(self, records: list[Any]) -> list[_Item]:
        return [self._parse_one(record) for record in records]

    def _parse_one(self, record: Any) -> _Item:
        if self.verifier is not None:
            try:
                self.verifier.verify(record.key, record.value, record.headers or (), ROLE_EDGE)
            except WireFormatError as exc:
                return _Item(record, reason=f"activation refused: {exc}", unverified=True)
        try:
            msg = decode(record.key, record.value, record.headers)
            self._check_model(msg)
            self._check_profile(msg)
        except WireFormatError as exc:
            return _Item(record, reason=str(exc))
        except Exception as exc:  # one record must never fail its batch
            log.warning("detect.undecodable", offset=record.offset, error=one_line(exc))
            return _Item(record, reason=f"cannot decode the activation: {one_line(exc)}")
        return _Item(record, message=msg)

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

    # -- infer -------------------------------------------------------------------------------

    async def _infer(self, batch: _Batch) -> None:
        """Each profile's messages through its own model, the models concurrently."""
        groups: dict[str, list[_Item]] = {}
        for item in batch.ok():
            model = self.router.model_for(item.activation.profile_id)
            if model is None:  # _check_profile let only known profiles through
                raise ConfigError(f"no tail model for profile {item.activation.profile_id}")
            groups.setdefault(model, []).append(item)
        await asyncio.gather(*(self._infer_group(m, items) for m, items in groups.items()))

    async def _infer_group(self, model: str, items: list[_Item]) -> None:
        """A rejected request is retried message by message: only the messages Triton still
        rejects become dead letters (with Triton's reason)."""
        # float16 payloads stay float16 to Triton (the tail takes FP16; int8 ones arrive float32).
        stacked = np.stack([i.activation.payload for i in items])
        try:
            raw = await self._infer_retrying(model, stacked)
        except ConfigError as exc:
            if len(items) > 1:
                log.warning(
                    "detect.triton_rejected_batch", model=model, size=len(items), error=str(exc)
                )
                for item in items:
                    await self._infer_group(model, [item])
                return
            self.stats.triton_rejected += 1
            items[0].reason = f"Triton rejected the request: {exc}"
            return
        for row, item in enumerate(items):
            item.raw = tuple(np.ascontiguousarray(output[row]) for output in raw)

    async def _infer_retrying(self, model: str, batch: FloatArray) -> tuple[FloatArray, ...]:
        tail = self.router.tails[model]

        async def once() -> tuple[FloatArray, ...]:
            started = time.perf_counter()
            raw = await tail.infer(batch)
            obs.TRITON_SECONDS.observe(time.perf_counter() - started)
            return raw

        return await retry(
            once,
            what=f"triton {model}",
            transient=_triton_down,
            backoff=self.backoff,
            on_retry=self._count_triton_retry,
            stopping=self._stopping,
        )

    # -- decode ------------------------------------------------------------------------------

    async def _decode(self, batch: _Batch) -> None:
        """Boxes and NMS in a thread (seconds on noisy logits), then the detection records."""
        items = [i for i in batch.ok() if i.raw is not None]
        if not items:
            return
        detections = await blocking("box decoding", self._decode_in_thread, items)
        produced = time.time()
        for item, dets in zip(items, detections, strict=True):
            if isinstance(dets, str):
                item.reason = dets
                continue
            try:
                item.out = self._detection_record(item.activation, dets, produced)
            except WireFormatError as exc:
                item.reason = f"the tail's detections cannot be published: {exc}"

    def _decode_in_thread(self, items: list[_Item]) -> list[Detections | str]:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # per thread under OpenMP: this role's share
        return self._decode_isolated(items)

    def _decode_isolated(self, items: list[_Item]) -> list[Detections | str]:
        """Detections per item; when the batch fails, item by item, a failure's reason."""
        try:
            return list(self._decode_boxes(items))
        except Exception as exc:
            if len(items) == 1:
                log.warning("detect.decode_failed", error=one_line(exc))
                return [f"box decoding failed: {one_line(exc)}"]
        return [d for item in items for d in self._decode_isolated([item])]

    def _decode_boxes(self, items: list[_Item]) -> list[Detections]:
        raws = [i.raw for i in items if i.raw is not None]
        outputs = [torch.from_numpy(np.stack([r[k] for r in raws])) for k in range(len(raws[0]))]
        g = self.manifest.geometry
        return self.decoder.decode(
            outputs,
            [i.activation.placement.letterbox() for i in items],
            g.height,
            g.width,
            score_threshold=self.score_threshold,
        )

    def _detection_record(
        self, msg: ActivationMessage, dets: Detections, produced: float
    ) -> OutgoingRecord:
        out = DetectionMessage(msg.envelope, msg.provenance, dets, produced)
        key, value, headers = encode_detection(out)
        if self.signer is not None:
            headers = [*headers, *self.signer.headers(key, value, headers)]
        return OutgoingRecord(self.link.topics.detections, key, value, headers)

    # -- publish and commit ------------------------------------------------------------------

    async def _publish(self, batch: _Batch) -> None:
        """Detections and dead letters, every ack awaited (transient failures re-sent)."""
        done = [i for i in batch.ok() if i.out is not None]
        dead = [i for i in batch.items if i.reason is not None]
        await asyncio.gather(self._send_detections(done), *(self._dead_letter(i) for i in dead))

    async def _send_detections(self, items: list[_Item]) -> None:
        if not items:
            return
        await send_all(
            self._producer,
            [i.out for i in items if i.out is not None],
            what=f"publish {len(items)} detections",
            backoff=self.backoff,
            on_retry=self._count_broker_retry,
        )
        now = time.time()
        for item in items:
            obs.END_TO_END_SECONDS.observe(max(0.0, now - item.activation.capture_time))
        self.stats.published += len(items)
        obs.DETECTIONS_PUBLISHED.inc(len(items))

    async def _dead_letter(self, item: _Item) -> None:
        truncated = await publish_dead_letter(
            self._producer,
            item.record,
            item.reason or "unknown",
            topics=self.link.topics,
            max_bytes=self.dead_letter_max_bytes,
            backoff=self.backoff,
        )
        self.stats.dead_letters += 1
        self.stats.truncated_dead_letters += int(truncated)
        obs.DEAD_LETTERS.inc()

    async def _commit_stage(self, inp: Channel[_Batch]) -> None:
        async for batch in inp:
            await self._commit(batch)

    async def _commit(self, batch: _Batch) -> None:
        """Every record of the batch (dead letters and duplicates too), after its publishes."""
        offsets = committable(batch.records)
        if not offsets:
            return
        try:
            await retry(
                lambda: self._consumer.commit(offsets),
                what="commit offsets",
                transient=_commit_transient,
                backoff=self.backoff,
                on_retry=self._count_broker_retry,
                stopping=self._stopping,
            )
            self.stats.commits += 1
        except Exception as exc:
            if not isinstance(exc, _COMMIT_LOST) and not transient(exc):
                raise
            # Lost to a rebalance, or the broker was away at a stop: the next owner re-reads
            # from the last commit and the (stream, sequence) dedupe drops the repeats.
            self.stats.commit_failures += 1
            log.warning("detect.commit_failed", error=one_line(exc))

    # -- counters ----------------------------------------------------------------------------

    async def _retry_broker(self, make: Callable[[], Awaitable[Any]], what: str) -> Any:
        return await retry(
            make,
            what=what,
            transient=transient,
            backoff=self.backoff,
            on_retry=self._count_broker_retry,
        )

    def _count_broker_retry(self, _error: BaseException, _delay: float) -> None:
        self.stats.broker_retries += 1

    def _count_triton_retry(self, _error: BaseException, _delay: float) -> None:
        self.stats.triton_retries += 1
