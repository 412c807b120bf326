"""The embedded broker keeps bounded memory and can be durable, on the real tansu binary.

tansu 0.6 deletes nothing by itself (retention configs are stored but not applied, DeleteRecords
panics); the embedded object store under its S3 engine deletes record batches that every
committing consumer group is past, batches past a topic's retention, and the oldest beyond a
hard cap. These tests fail on tansu's own memory engine, where the log start never moves.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream.broker import EmbeddedBroker
from stream.kafka import TopicNames, ensure_topics, make_producer
from stream.objectstore import StoreStats
from veil.errors import ConfigError

pytestmark = pytest.mark.services

RECORD = os.urandom(500_000)  # about one float16 FaceBoxes activation
TOPIC = "mem.activations"
TP = TopicPartition(TOPIC, 0)


async def _topic(bootstrap: str, configs: dict[str, str] | None = None) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, 1, 1, topic_configs=configs or {})])
    finally:
        await admin.close()


async def _produce(bootstrap: str, count: int, topic: str = TOPIC, value: bytes = RECORD) -> None:
    producer = await make_producer(bootstrap, idempotent=False)
    try:
        for i in range(count):
            await producer.send_and_wait(topic, value, key=b"s%d" % i, partition=0)
    finally:
        await producer.stop()


async def _commit(bootstrap: str, group: str, offset: int) -> None:
    """Commit ``offset`` on TP for ``group`` as a consumer that has read up to there does."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        consumer.assign([TP])
        await consumer.commit({TP: offset})
    finally:
        await consumer.stop()


async def _offsets(bootstrap: str) -> tuple[int, int, list[int]]:
    """(log start offset, end offset, offsets of the records a reader from 0 gets)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, max_partition_fetch_bytes=4 * 1024 * 1024
    )
    await consumer.start()
    try:
        start = (await consumer.beginning_offsets([TP]))[TP]
        end = (await consumer.end_offsets([TP]))[TP]
        consumer.assign([TP])
        consumer.seek(TP, 0)
        got: list[int] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not got or got[-1] < end - 1):
            batches = await consumer.getmany(TP, timeout_ms=300)
            got.extend(r.offset for r in batches.get(TP, []))
    finally:
        await consumer.stop()
    return start, end, got


async def _settled(broker: EmbeddedBroker, done: Any, timeout_s: float = 10.0) -> StoreStats:
    """The store's stats once ``done(stats)`` holds (trimming runs every trim_interval_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = broker.storage_stats()
        if done(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(keep_consumed_bytes=0, trim_interval_s=0.2) as running:
        yield running


async def test_committed_records_are_deleted_and_the_memory_comes_back(
    broker: EmbeddedBroker,
) -> None:
    bs = broker.bootstrap_servers
    await _topic(bs)
    await _produce(bs, 40)  # 20 MB
    full = broker.rss_bytes()["store"]
    assert broker.storage_stats().record_bytes >= 40 * len(RECORD)
    # Two groups: records go when both are past them, not when the faster one is. (A group
    # counts from its first commit: the slower one commits first here.)
    await _commit(bs, "slow", 30)
    await _commit(bs, "fast", 40)

    stats = await _settled(broker, lambda s: s.trimmed_batches >= 30)
    assert stats.trimmed_batches == 30 and stats.lost_records == 0
    assert stats.record_bytes < 11 * len(RECORD)
    start, end, got = await _offsets(bs)
    assert (start, end) == (30, 40)  # the log start offset moved up to the slower group
    assert got == list(range(30, 40))  # and nothing either group still needs went
    # The store gives the memory back (tansu's memory engine would still hold all 20 MB).
    assert broker.rss_bytes()["store"] < full - 10 * 1024 * 1024


async def test_records_no_group_has_committed_stay_until_the_hard_cap() -> None:
    async with EmbeddedBroker(max_stored_bytes=4 * 1024 * 1024, trim_interval_s=0.2) as broker:
        bs = broker.bootstrap_servers
        topics = TopicNames(prefix="cap")
        await ensure_topics(bs, partitions=1, topics=topics)
        await _topic(bs)
        await _produce(bs, 3, topic=topics.control, value=b"{}")  # compacted: never deleted
        await _produce(bs, 20)  # 10 MB, no consumer group at all

        stats = await _settled(broker, lambda s: s.record_bytes <= 4 * 1024 * 1024)
        assert stats.record_bytes <= 4 * 1024 * 1024
        assert stats.capped_batches >= 12 and stats.lost_records == stats.capped_batches
        start, end, got = await _offsets(bs)
        assert end == 20 and got == list(range(start, 20)) and start >= 12  # oldest went first
        assert "capped" in broker.store_log_tail()

        control = TopicPartition(topics.control, 0)
        reader = AIOKafkaConsumer(bootstrap_servers=bs, max_partition_fetch_bytes=4 << 20)
        await reader.start()
        try:
            reader.assign([control])
            assert (await reader.beginning_offsets([control]))[control] == 0
        finally:
            await reader.stop()


async def test_a_topic_retention_ms_expires_old_batches_but_the_newest(
    broker: EmbeddedBroker,
) -> None:
    bs = broker.bootstrap_servers
    await _topic(bs, {"retention.ms": "300"})
    await _produce(bs, 5)

    stats = await _settled(broker, lambda s: s.expired_batches >= 4)
    assert stats.expired_batches == 4 and stats.lost_records == 4
    assert (await _offsets(bs))[:2] == (4, 5)


async def test_a_broker_on_a_data_dir_keeps_topics_records_and_offsets(tmp_path: Path) -> None:
    async with EmbeddedBroker(data_dir=tmp_path, keep_consumed_bytes=None) as broker:
        bs = broker.bootstrap_servers
        await _topic(bs)
        await _produce(bs, 10)
        await _commit(bs, "g", 6)
    assert len(list(tmp_path.rglob("*.batch"))) == 10

    async with EmbeddedBroker(data_dir=tmp_path) as broker:
        bs = broker.bootstrap_servers
        consumer = AIOKafkaConsumer(bootstrap_servers=bs, group_id="g")
        await consumer.start()
        try:
            assert await consumer.committed(TP) == 6
        finally:
            await consumer.stop()
        assert (await _offsets(bs))[2] == list(range(10))
        producer = await make_producer(bs, idempotent=False)
        try:
            assert (await producer.send_and_wait(TOPIC, b"more", partition=0)).offset == 10
        finally:
            await producer.stop()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_stored_bytes": 1000}, "max_stored_bytes"),
        ({"keep_consumed_bytes": -1}, "keep_consumed_bytes"),
        ({"retention_s": 0.0}, "retention_s"),
        ({"trim_interval_s": float("nan")}, "trim_interval_s"),
        ({"data_dir": Path("/tmp"), "storage_engine": "memory://tansu/"}, "data_dir needs"),
    ],
)
def test_bad_store_settings_are_one_line_config_errors(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        EmbeddedBroker(**settings)
    assert "\n" not in str(info.value)


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        EmbeddedBroker(data_dir=tmp_path / "f")
