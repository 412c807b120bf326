"""The detect worker's stages with fakes (no broker, no Triton: test_pipeline.py has those).

Per-record failures are dead letters, never batch failures; transient broker and Triton faults
are retried and lose nothing; box decoding runs off the event loop; offsets are committed only
after the batch's publishes were acknowledged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from aiokafka import TopicPartition
from aiokafka import errors as kafka_errors
from torch import Tensor

from stream import kafka as kafka_module
from stream.kafka import KafkaLink, publish_dead_letter
from stream.runtime import Backoff, Supervisor
from stream.wire import (
    MAGIC,
    PREFIX,
    WIRE_VERSION,
    ActivationMessage,
    Envelope,
    FramePlacement,
    Provenance,
    decode,
    decode_detection,
    encode,
)
from tests.tiny_detector import TinyDetector
from veil.detections import Detections
from veil.detectors.base import InputGeometry, Letterbox
from veil.errors import ConfigError, ServiceError, WireFormatError
from workers.untrusted import detect as detect_module
from workers.untrusted.detect import DetectWorker
from workers.untrusted.tail_client import ActivationArray, FloatArray, TailRouter, TritonTail
from workers.untrusted.triton_repo import TailManifest

GEOMETRY = InputGeometry(64, 48)
SHAPE = (8, 6, 8)  # TinyDetector's activation at 64x48
TOPIC = "veil.activations"
FAST = Backoff(initial_s=0.001, max_s=0.01)
MANIFEST = TailManifest(
    detector="tiny",
    weights_id="0" * 64,
    geometry=GEOMETRY,
    activation_shape=SHAPE,
    output_names=("loc", "conf"),
    output_shapes=((48, 4), (48, 2)),
    max_batch_size=8,
    python_model="tiny_tail",
    torchscript_model="tiny_tail_ts",
    torchscript_sha256="0" * 64,
)


# --- fakes ------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeRecord:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    offset: int
    topic: str = TOPIC
    partition: int = 0


class FakeProducer:
    """Acknowledges after ``ack_delay_s``; fails the next ``fail_acks`` acks (transiently) and
    raises on the next ``fail_sends`` sends; refuses records over ``broker_limit`` bytes."""

    def __init__(self, events: list[tuple[Any, ...]] | None = None) -> None:
        self.acked: list[tuple[str, bytes | None, bytes | None, dict[str, bytes]]] = []
        self.events = events if events is not None else []
        self.attempts = 0
        self.fail_sends = 0
        self.fail_acks = 0
        self.ack_delay_s = 0.0
        self.broker_limit: int | None = None

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> asyncio.Future[None]:
        self.attempts += 1
        if self.fail_sends:
            self.fail_sends -= 1
            raise kafka_errors.NodeNotReadyError("broker 1 is restarting")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        size = len(value or b"") + sum(len(v) for _, v in headers)
        if self.broker_limit is not None and size > self.broker_limit:
            future.set_exception(kafka_errors.MessageSizeTooLargeError("MESSAGE_TOO_LARGE"))
        elif self.fail_acks:
            self.fail_acks -= 1
            future.set_exception(kafka_errors.KafkaConnectionError("connection reset"))
        else:
            record = (topic, key, value, dict(headers))
            asyncio.get_running_loop().call_later(self.ack_delay_s, self._ack, future, record)
        return future

    def _ack(self, future: asyncio.Future[None], record: Any) -> None:
        self.acked.append(record)
        headers = record[3]
        source = headers.get("veil-source-offset") or headers.get("veil-sequence")
        self.events.append(("ack", int(source)))
        future.set_result(None)

    async def flush(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def on(self, topic: str) -> list[tuple[str, bytes | None, bytes | None, dict[str, bytes]]]:
        return [r for r in self.acked if r[0] == topic]


class FakeConsumer:
    """Hands out ``batches`` one per poll; fails the next polls and commits as told."""

    def __init__(
        self, batches: Sequence[Sequence[FakeRecord]] = (), events: list[Any] | None = None
    ) -> None:
        self.batches = [list(b) for b in batches]
        self.events = events if events is not None else []
        self.commits: list[dict[Any, int]] = []
        self.poll_errors: list[Exception] = []
        self.commit_errors: list[Exception] = []

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        if self.poll_errors:
            raise self.poll_errors.pop(0)
        if not self.batches:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        records = self.batches.pop(0)
        return {TopicPartition(TOPIC, 0): records}

    async def commit(self, offsets: dict[Any, int]) -> None:
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        self.commits.append(offsets)
        self.events.append(("commit", offsets[TopicPartition(TOPIC, 0)]))

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, 0)}

    def highwater(self, tp: TopicPartition) -> int:
        return 100

    async def position(self, tp: TopicPartition) -> int:
        return 100

    async def stop(self) -> None:
        pass


class FakeTail(TritonTail):
    """Runs TinyDetector's tail in-process. Rows whose payload starts with a value in
    ``reject`` make Triton refuse the whole request (INVALID_ARGUMENT); the next ``down``
    calls (and starts) fail as if Triton were unreachable."""

    def __init__(self, detector: TinyDetector, reject: frozenset[int] = frozenset()) -> None:
        super().__init__("fake:0", "tiny_tail")
        self.detector = detector
        self.reject = reject
        self.down = 0
        self.start_down = 0
        self.calls: list[list[int]] = []

    async def start(self) -> None:
        if self.start_down:
            self.start_down -= 1
            raise ServiceError("Triton at fake:0: connection refused [StatusCode.UNAVAILABLE]")

    async def stop(self) -> None:
        pass

    async def infer(self, activations: ActivationArray) -> tuple[FloatArray, ...]:
        if self.down:
            self.down -= 1
            raise ServiceError("Triton at fake:0: connection refused [StatusCode.UNAVAILABLE]")
        rows = [int(a.flat[0]) for a in activations]
        self.calls.append(rows)
        if self.reject & set(rows):
            raise ConfigError(
                "Triton at fake:0, model 'tiny_tail': input holds values the model refuses "
                "[StatusCode.INVALID_ARGUMENT]"
            )
        with torch.no_grad():
            tail = self.detector.tail(torch.from_numpy(activations).float())
            return tuple(o.numpy() for o in tail)


class SlowDecoder(TinyDetector):
    """Box decoding that blocks for a while, like NMS over thousands of noisy candidates."""

    threads: list[int]

    def decode(self, raw: Sequence[Tensor], *args: Any, **kwargs: Any) -> list[Detections]:
        self.threads.append(threading.get_ident())
        time.sleep(0.5)
        return super().decode(raw, *args, **kwargs)


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector() -> TinyDetector:
    return TinyDetector()


def activation(seq: int, *, stream: str = "s", quantisation: str = "float16") -> FakeRecord:
    """A valid activation whose payload is ``seq`` everywhere (FakeTail reads it back)."""
    msg = ActivationMessage(
        Envelope(stream, seq, None, time.time()),
        Provenance("tiny", "0" * 64, "none", 0.0),
        placement=FramePlacement.from_letterbox(Letterbox(1.0, 64, 48), GEOMETRY),
        payload=np.full(SHAPE, float(seq), dtype=np.float32),
        quantisation=quantisation,  # type: ignore[arg-type]
    )
    key, value, headers = encode(msg)
    return FakeRecord(key, value, list(headers), offset=seq)


def body_start(value: bytes) -> int:
    _, _, header_len = PREFIX.unpack_from(value)
    return PREFIX.size + int(header_len)


def with_int8_scale(record: FakeRecord, scale: float) -> FakeRecord:
    value = bytearray(record.value or b"")
    start = body_start(bytes(value))
    value[start : start + 4 * SHAPE[0]] = np.full(SHAPE[0], scale, "<f4").tobytes()
    return dataclasses.replace(record, value=bytes(value))


def with_float16_at_start(record: FakeRecord, half: bytes) -> FakeRecord:
    value = bytearray(record.value or b"")
    start = body_start(bytes(value))
    value[start : start + 2] = half
    return dataclasses.replace(record, value=bytes(value))


def with_header(record: FakeRecord, header: bytes) -> FakeRecord:
    value = PREFIX.pack(MAGIC, WIRE_VERSION, len(header)) + header
    return dataclasses.replace(record, value=value)


def make_worker(
    tail: FakeTail, decoder: TinyDetector, producer: FakeProducer, consumer: FakeConsumer
) -> DetectWorker:
    router = TailRouter({"tiny_tail": tail}, {"none": "tiny_tail"})
    worker = DetectWorker(KafkaLink("unused:0", False), router, decoder, MANIFEST, backoff=FAST)
    worker._producer, worker._consumer = producer, consumer
    return worker


def detections_of(producer: FakeProducer) -> list[int]:
    return sorted(
        decode_detection(key, value, list(headers.items())).sequence
        for _, key, value, headers in producer.on("veil.detections")
    )


def dead_letters(producer: FakeProducer) -> dict[int, dict[str, bytes]]:
    """Source offset -> the dead letter's headers."""
    return {
        int(headers["veil-source-offset"]): headers
        for *_, headers in producer.on("veil.deadletter")
    }


def committed(consumer: FakeConsumer) -> int:
    return consumer.commits[-1][TopicPartition(TOPIC, 0)]


# --- per-record failures are data -------------------------------------------------------------


async def test_a_message_triton_rejects_is_a_dead_letter_and_the_rest_of_its_batch_is_published(
    detector: TinyDetector,
) -> None:
    tail = FakeTail(detector, reject=frozenset({2}))
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = make_worker(tail, detector, producer, consumer)
    await worker.handle([activation(i) for i in range(4)])

    assert tail.calls == [[0, 1, 2, 3], [0], [1], [2], [3]]  # the batch, then one by one
    assert detections_of(producer) == [0, 1, 3]
    letters = dead_letters(producer)
    assert list(letters) == [2]
    reason = letters[2]["veil-error"].decode()
    assert reason.startswith("Triton rejected the request") and "INVALID_ARGUMENT" in reason
    assert worker.stats.triton_rejected == worker.stats.dead_letters == 1
    assert committed(consumer) == 4  # past the dead letter too


async def test_a_deeply_nested_json_header_is_a_dead_letter_with_a_one_line_reason(
    detector: TinyDetector,
) -> None:
    nested = with_header(activation(1), b"[" * 60_000)  # under the 64 KiB header limit
    with pytest.raises(WireFormatError, match="nested too deeply"):
        decode(nested.key, nested.value, nested.headers)
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = make_worker(FakeTail(detector), detector, producer, consumer)
    await worker.handle([activation(0), nested, activation(2)])

    reason = dead_letters(producer)[1]["veil-error"].decode()
    assert "nested too deeply" in reason and "\n" not in reason
    assert detections_of(producer) == [0, 2]
    assert committed(consumer) == 3


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b'{"a":' + b"1" * 5000 + b"}", "not valid JSON: Exceeds the limit"),  # 4300 digits
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"a": [1, 2', "not valid JSON"),
        (b"[1]", "must be a JSON object"),
    ],
)
def test_malformed_json_headers_raise_wire_format_errors(header: bytes, reason: str) -> None:
    record = with_header(activation(0), header)
    with pytest.raises(WireFormatError, match=reason):
        decode(record.key, record.value, record.headers)


def test_an_integer_beyond_the_float_range_is_not_finite() -> None:
    record = activation(0)
    value = record.value or b""
    start = body_start(value)
    header = json.loads(value[PREFIX.size : start])
    header["capture_time"] = 10**400
    text = json.dumps(header).encode()
    bad = PREFIX.pack(MAGIC, WIRE_VERSION, len(text)) + text + value[start:]
    with pytest.raises(WireFormatError, match="capture_time must be finite"):
        decode(record.key, bad, record.headers)


async def test_non_finite_or_absurd_quantisation_is_a_dead_letter(detector: TinyDetector) -> None:
    records = [
        activation(0, quantisation="int8"),
        with_int8_scale(activation(1, quantisation="int8"), float("nan")),
        with_int8_scale(activation(2, quantisation="int8"), float("inf")),
        with_int8_scale(activation(3, quantisation="int8"), 3e38),  # overflows float32
        with_float16_at_start(activation(4), b"\x00\x7c"),  # +inf
        with_float16_at_start(activation(5), b"\x00\x7e"),  # NaN
        activation(6),
    ]
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = make_worker(FakeTail(detector), detector, producer, consumer)
    await worker.handle(records)

    letters = dead_letters(producer)
    assert sorted(letters) == [1, 2, 3, 4, 5]
    assert all(b"scales must be finite" in letters[i]["veil-error"] for i in (1, 2))
    assert b"overflows float32" in letters[3]["veil-error"]
    assert all(b"non-finite" in letters[i]["veil-error"] for i in (4, 5))
    assert detections_of(producer) == [0, 6]
    assert committed(consumer) == 7


# --- dead letters that are too large ----------------------------------------------------------


def big_record(size: int) -> FakeRecord:
    headers = [("trace-id", b"abc123"), ("huge", b"h" * 10_000), ("veil-stream", b"s")]
    value = bytes(range(256)) * (size // 256)
    return FakeRecord(b"s", value, headers, offset=41, partition=2)


async def test_a_dead_letter_over_the_limit_is_truncated_and_keeps_what_identifies_it() -> None:
    producer = FakeProducer()
    record = big_record(2 * 1024 * 1024)
    truncated = await publish_dead_letter(producer, record, "not a veil activation: magic")

    assert truncated
    [(topic, key, value, headers)] = producer.acked
    assert topic == "veil.deadletter" and key == b"s"
    assert value == (record.value or b"")[: 64 * 1024]
    assert headers["veil-truncated"] == b"1"
    assert int(headers["veil-original-size"]) == len(record.value or b"")
    assert headers["veil-error"] == b"not a veil activation: magic"
    assert headers["trace-id"] == b"abc123"
    assert headers["huge"] == b"h" * 4096  # each header value capped
    assert (headers["veil-source-topic"], headers["veil-source-partition"]) == (
        TOPIC.encode(),
        b"2",
    )
    assert headers["veil-source-offset"] == b"41"


async def test_a_dead_letter_the_broker_refuses_as_too_large_is_sent_truncated() -> None:
    producer = FakeProducer()
    producer.broker_limit = 200_000  # under the producer's own 1 MiB check
    record = big_record(500_000)
    assert await publish_dead_letter(producer, record, "too big for the broker")
    [(_, _, value, headers)] = producer.acked
    assert headers["veil-truncated"] == b"1" and len(value or b"") == 64 * 1024
    small = FakeRecord(b"s", b"tiny", [], offset=1)
    assert not await publish_dead_letter(producer, small, "fits")
    assert producer.acked[-1][2] == b"tiny" and "veil-truncated" not in producer.acked[-1][3]


async def test_a_ten_megabyte_record_is_dead_lettered_truncated_and_committed(
    detector: TinyDetector,
) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = make_worker(FakeTail(detector), detector, producer, consumer)
    huge = dataclasses.replace(big_record(10 * 1024 * 1024), partition=0, offset=1)
    await worker.handle([activation(0), huge, activation(2)])

    letter = dead_letters(producer)[1]
    assert letter["veil-truncated"] == b"1" and b"magic" in letter["veil-error"]
    assert worker.stats.truncated_dead_letters == 1
    assert detections_of(producer) == [0, 2]
    assert committed(consumer) == 3


# --- off the event loop -----------------------------------------------------------------------


async def test_box_decoding_runs_in_a_thread_while_the_loop_keeps_ticking() -> None:
    decoder = SlowDecoder()
    decoder.threads = []
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = make_worker(FakeTail(decoder), decoder, producer, consumer)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    await worker.handle([activation(i) for i in range(3)])
    elapsed = time.monotonic() - started
    task.cancel()
    assert elapsed >= 0.5
    assert decoder.threads and decoder.threads[0] != threading.get_ident()
    assert ticks >= 20  # a blocked loop would have ticked about once
    assert detections_of(producer) == [0, 1, 2]


# --- transient faults are retried, nothing is lost --------------------------------------------


async def test_a_transient_producer_failure_is_retried_and_nothing_is_lost(
    detector: TinyDetector,
) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    producer.fail_sends, producer.fail_acks = 1, 2
    worker = make_worker(FakeTail(detector), detector, producer, consumer)
    malformed = FakeRecord(b"s", b"not veil at all", [], offset=3)
    await worker.handle([activation(0), activation(1), activation(2), malformed])

    assert detections_of(producer) == [0, 1, 2]
    assert list(dead_letters(producer)) == [3]
    assert worker.stats.broker_retries >= 1
    assert producer.attempts == 4 + 3  # the failed ones were sent again, once each
    assert len(producer.on("veil.detections")) == 3  # each acknowledged once
    assert len(consumer.commits) == 1 and committed(consumer) == 4


async def test_broker_and_triton_outages_are_waited_for_in_every_stage(
    detector: TinyDetector,
) -> None:
    batches = [[activation(0), activation(1)], [activation(2)]]
    consumer = FakeConsumer(batches)
    consumer.poll_errors = [
        kafka_errors.UnknownError("broker restarting"),
        kafka_errors.NodeNotReadyError("node 1"),
    ]
    consumer.commit_errors = [kafka_errors.NodeNotReadyError("coordinator away")]
    tail = FakeTail(detector)
    tail.down = 3
    producer = FakeProducer()
    worker = make_worker(tail, detector, producer, consumer)
    stats = await asyncio.wait_for(worker.run(idle_timeout_s=0.3), 10)

    assert detections_of(producer) == [0, 1, 2]
    assert committed(consumer) == 3 and stats.commit_failures == 0
    assert stats.broker_retries == 3 and stats.triton_retries == 3


async def test_triton_and_the_broker_down_at_start_are_waited_for(
    detector: TinyDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    attempts = {"producer": 0}

    async def make_producer(*_: Any, **kwargs: Any) -> FakeProducer:
        attempts["producer"] += 1
        assert kwargs["max_request_size"] >= 16 * 1024 * 1024  # dead letters of large records
        if attempts["producer"] == 1:
            raise ServiceError("cannot start a Kafka producer: NodeNotReadyError")
        return producer

    async def make_consumer(*_: Any, **__: Any) -> FakeConsumer:
        return consumer

    monkeypatch.setattr(kafka_module, "make_producer", make_producer)  # via KafkaLink
    monkeypatch.setattr(detect_module, "make_consumer", make_consumer)
    tail = FakeTail(detector)
    tail.start_down = 2
    worker = make_worker(tail, detector, FakeProducer(), FakeConsumer())
    worker._producer = worker._consumer = None
    async with worker:
        assert worker._producer is producer and worker._consumer is consumer
    assert worker.stats.triton_retries == 2 and worker.stats.broker_retries == 1
    assert worker._producer is None and worker._consumer is None


async def test_a_commit_lost_to_a_rebalance_is_logged_not_fatal(detector: TinyDetector) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    consumer.commit_errors = [kafka_errors.CommitFailedError()]
    worker = make_worker(FakeTail(detector), detector, producer, consumer)
    await worker.handle([activation(0)])
    await worker.handle([activation(1)])
    assert worker.stats.commit_failures == 1 and committed(consumer) == 2
    assert detections_of(producer) == [0, 1]


# --- commits follow acks ----------------------------------------------------------------------


async def test_commits_happen_only_after_the_batch_publishes_are_acknowledged(
    detector: TinyDetector,
) -> None:
    events: list[tuple[Any, ...]] = []
    batches = [
        [activation(0), activation(1)],
        [FakeRecord(b"s", b"junk", [], offset=2), activation(3)],
        [dataclasses.replace(activation(1), offset=4), activation(5)],  # 4 repeats sequence 1
    ]
    consumer = FakeConsumer(batches, events)
    producer = FakeProducer(events)
    producer.ack_delay_s = 0.05
    worker = make_worker(FakeTail(detector), detector, producer, consumer)
    stats = await asyncio.wait_for(worker.run(idle_timeout_s=0.3), 10)

    assert stats.duplicates == 1 and stats.dead_letters == 1 and stats.published == 4
    commits = [(i, offset) for i, (kind, offset) in enumerate(events) if kind == "commit"]
    assert [offset for _, offset in commits] == [2, 4, 6]
    acked_at = {offset: i for i, (kind, offset) in enumerate(events) if kind == "ack"}
    for position, offset in commits:
        published = [o for o in range(offset) if o != 4]  # the duplicate publishes nothing
        assert all(acked_at[o] < position for o in published)


async def test_with_its_own_stop_event_the_worker_outlives_the_supervisors_stop(
    detector: TinyDetector,
) -> None:
    consumer, producer = FakeConsumer([[activation(0)]]), FakeProducer()
    worker = make_worker(FakeTail(detector), detector, producer, consumer)
    supervisor, own = Supervisor("test"), asyncio.Event()
    worker.attach(supervisor, stop=own)
    supervisor.request_stop()  # under veil run: SIGTERM stops the edge, detect drains on

    async def later() -> None:
        await asyncio.sleep(0.1)
        consumer.batches.append([activation(1)])  # still polled after the supervisor's stop
        await asyncio.sleep(0.2)
        worker.request_stop()

    supervisor.add("later", later)
    await asyncio.wait_for(supervisor.run(), 10)
    assert own.is_set() and detections_of(producer) == [0, 1] and committed(consumer) == 2
