"""Downstream Kafka clients against the embedded broker (tansu 0.6): confluent-kafka
(librdkafka) reads and writes ``veil.detections`` with the settings the README gives.

tansu holds a JoinGroup for about half the member's ``session.timeout.ms`` (librdkafka's 45 s
default: the first record after 23 s); 6 s brings it to about 3 s. ``assign()`` needs explicit
start offsets: without them librdkafka asks for the committed offset and falls back to
``auto.offset.reset`` (default ``latest``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from stream.broker import EmbeddedBroker
from stream.kafka import DEFAULT_TOPICS, ensure_topics, make_producer
from stream.wire import DetectionMessage, Envelope, Provenance, decode_detection, encode_detection
from veil.detections import Detections

ck = pytest.importorskip("confluent_kafka")

pytestmark = pytest.mark.services

TOPIC = DEFAULT_TOPICS.detections
# The README's settings ("Reading detections with your own Kafka client").
GROUP_SETTINGS: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 2000,
}
PRODUCER_SETTINGS: dict[str, Any] = {"acks": "all", "enable.idempotence": False}


def _message(stream: str, sequence: int) -> DetectionMessage:
    return DetectionMessage(
        Envelope(stream, sequence, sequence / 10, time.time()),
        Provenance("retinaface", "0" * 64, "c4ea836a55332264", 0.8),
        Detections(
            np.array([[306.5, 110.6, 641.2, 535.7]], np.float32), np.array([0.9999], np.float32)
        ),
        time.time(),
    )


async def _produce_with_veil(bootstrap: str, messages: list[DetectionMessage]) -> None:
    producer = await make_producer(bootstrap, idempotent=False)
    try:
        for msg in messages:
            key, value, headers = encode_detection(msg)
            await producer.send_and_wait(TOPIC, value, key=key, headers=list(headers))
    finally:
        await producer.stop()


def _produce_with_confluent(bootstrap: str, messages: list[DetectionMessage]) -> None:
    producer = ck.Producer({"bootstrap.servers": bootstrap, **PRODUCER_SETTINGS})
    for msg in messages:
        key, value, headers = encode_detection(msg)
        producer.produce(TOPIC, value, key, headers=list(headers))
    assert producer.flush(15) == 0


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[str]:
    """An embedded broker holding six detections: three from veil's own producer (as the
    detect worker writes them), three from confluent-kafka's."""
    with EmbeddedBroker() as broker:
        servers = broker.bootstrap_servers
        asyncio.run(ensure_topics(servers))
        asyncio.run(_produce_with_veil(servers, [_message("lobby", i) for i in range(3)]))
        _produce_with_confluent(servers, [_message("gate", i) for i in range(3)])
        yield servers


def _read(consumer: Any, want: int, timeout_s: float) -> tuple[list[DetectionMessage], float]:
    """Up to ``want`` detections within ``timeout_s``, and the seconds to the first one."""
    started, first = time.monotonic(), float("inf")
    got: list[DetectionMessage] = []
    while len(got) < want and time.monotonic() - started < timeout_s:
        record = consumer.poll(0.2)
        if record is None:
            continue
        assert record.error() is None, record.error()
        first = min(first, time.monotonic() - started)
        got.append(decode_detection(record.key(), record.value(), record.headers() or ()))
    return got, first


def _check(got: list[DetectionMessage]) -> None:
    assert sorted((m.stream_id, m.sequence) for m in got) == [
        (s, i) for s in ("gate", "lobby") for i in range(3)
    ]
    assert all(m.detections.confidence.tolist() == pytest.approx([0.9999]) for m in got)


def test_group_consumer_gets_its_first_record_within_seconds(bootstrap: str) -> None:
    settings = {"bootstrap.servers": bootstrap, "group.id": "downstream", **GROUP_SETTINGS}
    consumer = ck.Consumer(settings)
    try:
        consumer.subscribe([TOPIC])
        got, first = _read(consumer, 6, timeout_s=20)
        _check(got)
        assert first < 8, f"first record after {first:.1f} s"  # 3.1 s measured; 23 s at 45 s
        committed = consumer.commit(asynchronous=False)
        assert committed and all(tp.error is None for tp in committed)
    finally:
        consumer.close()


def test_assign_from_the_beginning_reads_at_once(bootstrap: str) -> None:
    consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": "reader"})
    try:
        partitions = consumer.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
        consumer.assign([ck.TopicPartition(TOPIC, p, ck.OFFSET_BEGINNING) for p in partitions])
        got, first = _read(consumer, 6, timeout_s=10)
        _check(got)
        assert first < 3, f"first record after {first:.1f} s"  # 0.01-0.1 s measured
    finally:
        consumer.close()
