"""The embedded broker and the Kafka layer against a real broker (tansu here, Kafka in Docker
where an engine is reachable): produce, consume in a group, commit, resume, dead letters and
the compacted control topic."""

from __future__ import annotations

import dataclasses
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError

from stream.broker import EmbeddedBroker, kafka_api_versions_ok
from stream.kafka import (
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_TOPIC,
    SequenceDeduper,
    TopicNames,
    close_consumer,
    committable,
    drain,
    ensure_topics,
    make_consumer,
    make_producer,
    publish_dead_letter,
    read_control_table,
)
from stream.wire import (
    HEADER_ERROR,
    HEADER_SEQUENCE,
    HEADER_STREAM,
    ActivationMessage,
    ControlMessage,
    Envelope,
    FramePlacement,
    Provenance,
    decode,
    encode,
    encode_control,
)
from tests.fixtures_kafka import KafkaTarget, kafka_target  # noqa: F401  (pytest fixture)
from veil.errors import ConfigError, ServiceError, WireFormatError

pytestmark = pytest.mark.services


def _activation(stream: str, sequence: int, rng: np.random.Generator) -> ActivationMessage:
    return ActivationMessage(
        Envelope(stream, sequence, sequence / 25.0, 1_700_000_000.0 + sequence / 25.0),
        Provenance("faceboxes", "w" * 64, "p1", 0.5),
        placement=FramePlacement(640, 360, 1.0, 640, 384),
        payload=rng.standard_normal((8, 12, 20)).astype(np.float32),
    )


class _RecordingListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.assigned: list[set[TopicPartition]] = []

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned.append(set(assigned))


def _fresh_topics() -> TopicNames:
    return TopicNames(prefix=f"t{uuid.uuid4().hex[:10]}")


# ------------------------------------------------------------------ embedded broker lifecycle


def test_embedded_broker_answers_kafka_and_stops() -> None:
    broker = EmbeddedBroker()
    with pytest.raises(ServiceError, match="not running"):
        _ = broker.bootstrap_servers
    with broker:
        host, port = broker.bootstrap_servers.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert kafka_api_versions_ok(host, int(port))
        assert broker.running
        assert f"listening on: tcp://127.0.0.1:{port}" in broker.log_tail()
    assert not broker.running
    assert not kafka_api_versions_ok(host, int(port))
    # The log outlives the process, for post-mortems.
    assert "ready in" in broker.log_tail()
    broker.stop()  # idempotent


async def test_embedded_broker_async_context() -> None:
    async with EmbeddedBroker() as broker:
        host, port = broker.bootstrap_servers.rsplit(":", 1)
        assert kafka_api_versions_ok(host, int(port))
    assert not broker.running


def test_missing_binary_is_a_clear_service_error(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="missing or not executable"):
        EmbeddedBroker(binary=tmp_path / "tansu").start()


def test_failed_start_reports_the_broker_output() -> None:
    with pytest.raises(ServiceError, match="exited with status 1") as info:
        EmbeddedBroker(storage_engine="bogus://nowhere").start()
    assert "UnsupportedStorageUrl" in str(info.value)


def test_busy_port_is_reported() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ServiceError, match="Address in use"):
            EmbeddedBroker(port=port, startup_timeout_s=5).start()


# ------------------------------------------------------------------ deduper (no broker)


def test_deduper_drops_redeliveries_and_accepts_late_first_arrivals() -> None:
    dedupe = SequenceDeduper(window=4)
    assert [dedupe.accept("a", s) for s in (0, 1, 2)] == [True, True, True]
    assert not dedupe.accept("a", 1)  # redelivered
    assert dedupe.accept("b", 1)  # streams are independent
    assert dedupe.accept("a", 5)
    assert dedupe.accept("a", 4)  # late, inside the window, never seen
    assert not dedupe.accept("a", 4)
    assert not dedupe.accept("a", 1)  # older than the window: stale
    assert dedupe.highest("a") == 5
    assert dedupe.highest("zzz") is None
    for s in range(6, 40):  # long runs prune the window without forgetting recent ones
        assert dedupe.accept("a", s)
    assert not dedupe.accept("a", 38)
    assert not dedupe.accept("a", 36)


def test_deduper_forgets_least_recent_streams() -> None:
    dedupe = SequenceDeduper(window=8, max_streams=2)
    dedupe.accept("a", 3)
    dedupe.accept("b", 3)
    dedupe.accept("a", 4)  # a is now the most recent
    dedupe.accept("c", 3)  # evicts b
    assert dedupe.highest("b") is None
    assert dedupe.highest("a") == 4
    with pytest.raises(ConfigError):
        SequenceDeduper(window=0)


# ------------------------------------------------------------------ against the broker


async def test_topics_are_created_once_with_a_compacted_control_topic(
    kafka_target: KafkaTarget,  # noqa: F811
) -> None:
    topics = _fresh_topics()
    first = await ensure_topics(kafka_target.bootstrap_servers, partitions=2, topics=topics)
    assert sorted(first.created) == sorted(topics.all())
    assert first.control_compacted
    again = await ensure_topics(kafka_target.bootstrap_servers, partitions=2, topics=topics)
    assert again.created == ()
    assert sorted(again.existing) == sorted(topics.all())


async def test_idempotent_producer_matches_the_broker(
    kafka_target: KafkaTarget,  # noqa: F811
) -> None:
    if kafka_target.supports_idempotence:
        producer = await make_producer(kafka_target.bootstrap_servers, idempotent=True)
        await producer.stop()
    else:
        with pytest.raises(ServiceError, match="idempotent"):
            await make_producer(kafka_target.bootstrap_servers, idempotent=True)


async def test_group_consumer_commits_and_a_new_member_resumes_after_the_commit(
    kafka_target: KafkaTarget,  # noqa: F811
) -> None:
    bootstrap = kafka_target.bootstrap_servers
    topics = _fresh_topics()
    await ensure_topics(bootstrap, partitions=2, topics=topics)
    rng = np.random.default_rng(7)
    sent = [_activation(s, i, rng) for i in range(4) for s in ("cam-a", "cam-b")]
    producer = await make_producer(bootstrap, idempotent=kafka_target.supports_idempotence)
    try:
        for msg in sent:
            key, value, headers = encode(msg)
            await producer.send_and_wait(topics.activations, value, key=key, headers=headers)

        group = f"tail-{uuid.uuid4().hex[:8]}"
        first = await make_consumer(bootstrap, group, [topics.activations])
        try:
            records = await drain(first, until=len(sent), timeout_s=30)
            assert len(records) == len(sent)
            decoded = [decode(r.key, r.value, r.headers) for r in records]
            for record, msg in zip(records, decoded, strict=True):
                assert record.key == msg.stream_id.encode()
                assert dict(record.headers)[HEADER_SEQUENCE] == str(msg.sequence).encode()
            by_id = {(m.stream_id, m.sequence): m for m in sent}
            for msg in decoded:
                original = by_id[(msg.stream_id, msg.sequence)]
                np.testing.assert_allclose(msg.payload, original.payload, rtol=1e-3, atol=1e-3)
            # Per stream, order is kept: one stream lives on one partition.
            for stream in ("cam-a", "cam-b"):
                assert [m.sequence for m in decoded if m.stream_id == stream] == [0, 1, 2, 3]
            handled = records[:5]  # "crash" after handling five of eight
            await first.commit(committable(handled))
            committed = {tp: await first.committed(tp) for tp in committable(handled)}
            assert committed == committable(handled)
        finally:
            await close_consumer(first)

        later = [_activation("cam-a", 4, rng), _activation("cam-b", 4, rng)]
        for msg in later:
            key, value, headers = encode(msg)
            await producer.send_and_wait(topics.activations, value, key=key, headers=headers)
    finally:
        await producer.stop()

    expected = {(r.topic, r.partition, r.offset) for r in records[5:]}
    second = await make_consumer(bootstrap, group, [topics.activations])
    try:
        resumed = await drain(second, until=len(expected) + len(later), timeout_s=40)
        extra = await drain(second, until=1, timeout_s=0.5)
    finally:
        await close_consumer(second)
    coordinates = {(r.topic, r.partition, r.offset) for r in resumed}
    assert expected <= coordinates  # the unhandled ones come again...
    assert not {(r.topic, r.partition, r.offset) for r in handled} & coordinates  # ...not the rest
    assert extra == []
    got = sorted((m.stream_id, m.sequence) for m in (decode(r.key, r.value) for r in resumed))
    want = sorted(
        [(m.stream_id, m.sequence) for m in (decode(r.key, r.value) for r in records[5:])]
        + [("cam-a", 4), ("cam-b", 4)]
    )
    assert got == want


async def test_malformed_message_goes_to_dead_letter_and_consumer_keeps_going(
    kafka_target: KafkaTarget,  # noqa: F811
) -> None:
    bootstrap = kafka_target.bootstrap_servers
    topics = _fresh_topics()
    await ensure_topics(bootstrap, partitions=1, topics=topics)
    rng = np.random.default_rng(3)
    good = [_activation("cam-z", i, rng) for i in (0, 1)]
    foreign_value = b'{"hello": "not a veil message"}'
    foreign_headers = [("trace-id", b"abc123"), (HEADER_STREAM, b"cam-z")]
    producer = await make_producer(bootstrap, idempotent=kafka_target.supports_idempotence)
    try:
        for key, value, headers in (
            encode(good[0]),
            (b"cam-z", foreign_value, foreign_headers),
            encode(good[1]),
        ):
            await producer.send_and_wait(topics.activations, value, key=key, headers=headers)

        listener = _RecordingListener()
        consumer = await make_consumer(
            bootstrap, f"dl-{uuid.uuid4().hex[:8]}", [topics.activations], listener=listener
        )
        handled: list[ActivationMessage] = []
        try:
            records = await drain(consumer, until=3, timeout_s=30)
            assert len(records) == 3
            for record in records:
                try:
                    handled.append(decode(record.key, record.value, record.headers))
                except WireFormatError as exc:
                    await publish_dead_letter(producer, record, str(exc), topics=topics)
                await consumer.commit(committable([record]))
            bad_offset = records[1].offset
        finally:
            await close_consumer(consumer)
    finally:
        await producer.stop()
    assert [m.sequence for m in handled] == [0, 1]
    assert listener.assigned == [{TopicPartition(topics.activations, 0)}]

    reader = await make_consumer(bootstrap, None, [topics.dead_letter])
    try:
        letters = await drain(reader, until=1, timeout_s=15)
    finally:
        await close_consumer(reader)
    assert len(letters) == 1
    letter = letters[0]
    assert letter.value == foreign_value
    assert letter.key == b"cam-z"
    letter_headers = dict(letter.headers)
    assert letter_headers["trace-id"] == b"abc123"
    assert b"magic" in letter_headers[HEADER_ERROR]
    assert letter_headers[HEADER_SOURCE_TOPIC] == topics.activations.encode()
    assert letter_headers[HEADER_SOURCE_OFFSET] == str(bad_offset).encode()


async def test_control_topic_round_trip_keeps_the_latest_alpha_per_stream(
    kafka_target: KafkaTarget,  # noqa: F811
) -> None:
    bootstrap = kafka_target.bootstrap_servers
    topics = _fresh_topics()
    await ensure_topics(bootstrap, topics=topics)
    updates = [
        ControlMessage("cam-a", 0.2, time.time()),
        ControlMessage("cam-b", 0.4),
        ControlMessage("cam-a", 0.75),
        ControlMessage("cam-c", 1.0),
        ControlMessage("cam-b", None),  # tombstone: back to the worker's default
    ]
    producer = await make_producer(bootstrap, idempotent=kafka_target.supports_idempotence)
    try:
        for update in updates:
            key, value, headers = encode_control(update)
            await producer.send_and_wait(topics.control, value, key=key, headers=headers)
        # A record that is not a control message is skipped, not fatal.
        await producer.send_and_wait(topics.control, b"alpha=0.9", key=b"cam-d")
    finally:
        await producer.stop()
    assert await read_control_table(bootstrap, topics=topics) == {"cam-a": 0.75, "cam-c": 1.0}


async def test_full_hd_float16_activation_crosses_the_broker_with_default_limits(
    kafka_target: KafkaTarget,  # noqa: F811
) -> None:
    topics = _fresh_topics()
    await ensure_topics(kafka_target.bootstrap_servers, partitions=1, topics=topics)
    small = _activation("cam-hd", 0, np.random.default_rng(1))
    payload = np.random.default_rng(2).standard_normal((128, 34, 60)).astype(np.float32)
    full_hd = dataclasses.replace(small, payload=payload)  # FaceBoxes at 1920x1080
    key, value, headers = encode(full_hd)
    assert 522_240 < len(value) < 523_000
    producer = await make_producer(
        kafka_target.bootstrap_servers, idempotent=kafka_target.supports_idempotence
    )
    try:
        await producer.send_and_wait(topics.activations, value, key=key, headers=headers)
    finally:
        await producer.stop()
    reader = await make_consumer(kafka_target.bootstrap_servers, None, [topics.activations])
    try:
        records = await drain(reader, until=1, timeout_s=15)
    finally:
        await close_consumer(reader)
    assert len(records) == 1
    out = decode(records[0].key, records[0].value, records[0].headers)
    assert out.shape == (128, 34, 60)
    np.testing.assert_allclose(out.payload, payload, rtol=2**-11, atol=1e-7)


async def test_producer_refuses_a_record_above_max_request_size(
    kafka_target: KafkaTarget,  # noqa: F811
) -> None:
    topics = _fresh_topics()
    await ensure_topics(kafka_target.bootstrap_servers, partitions=1, topics=topics)
    small = _activation("cam-big", 0, np.random.default_rng(0))
    big = dataclasses.replace(small, payload=np.ones((128, 68, 120), np.float32))  # 2.1 MB
    key, value, headers = encode(big)
    assert len(value) > 2_000_000
    producer = await make_producer(
        kafka_target.bootstrap_servers, idempotent=kafka_target.supports_idempotence
    )
    try:
        with pytest.raises(MessageSizeTooLargeError):
            await producer.send_and_wait(topics.activations, value, key=key, headers=headers)
    finally:
        await producer.stop()
