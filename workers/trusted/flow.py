"""Bounded latency for ``realtime`` streams: at most ``limit`` frames in flight per partition.

A camera's frames are worth something only while they are new. When the outside is slower
than the trusted zone, every frame published beyond what it can take waits in Kafka, and the
latency grows without bound (measured before this: p50 7.4 s, creeping from 3.6 to 8.7 s in
40 s). So before the edge publishes a batch of a realtime stream, it waits until the frames it
already published on that partition, less those the detect group has committed, are under
``limit``. Meanwhile its queues fill, and the source's mailbox keeps only the newest frame,
dropping (and counting) the others: what a camera does when nobody keeps up. ``lossless``
streams are never held here: Kafka is their buffer.

The committed offsets are read with the detect group's id, without joining it. While that
group has committed nothing new for ``give_up_s`` (a detect worker down, or another group id),
the edge does not wait and says so (``edge.flow_unbounded``): a stalled zone would help no
one. Its next commit bounds the flight again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.kafka import security_kwargs
from veil.config import KafkaSecurityConfig

log = structlog.get_logger(__name__)


class FlowControl:
    """Frames in flight per partition of ``topic``: published here, not committed by
    ``group_id`` yet; :meth:`wait_for_room` holds a publish while they reach ``limit``."""

    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        topic: str,
        limit: int,
        *,
        security: KafkaSecurityConfig | None = None,
        poll_s: float = 0.01,
        give_up_s: float = 10.0,
    ) -> None:
        self.bootstrap, self.group_id, self.topic = bootstrap, group_id, topic
        self.limit, self.poll_s, self.give_up_s = limit, poll_s, give_up_s
        self.security = security
        self.published: dict[int, int] = {}
        self.waited_s = 0.0  # in all, for the stats
        self._base: dict[int, int] = {}  # each partition's end offset when this edge started
        self._consumer: Any = None
        self._committed: dict[int, int | None] = {}
        self._advanced = time.monotonic()  # when the group last committed further
        self._unbounded = False

    async def start(self, partitions: Iterable[int]) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,  # to read its committed offsets; never subscribes
            enable_auto_commit=False,
            client_id="veil-edge-flow",
            **security_kwargs(self.security, self.bootstrap),
        )
        await consumer.start()
        self._consumer = consumer
        parts = [TopicPartition(self.topic, p) for p in partitions]
        ends = await consumer.end_offsets(parts)
        self._base = {tp.partition: offset for tp, offset in ends.items()}
        self.published = dict.fromkeys(self._base, 0)

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def sent(self, partition: int, count: int) -> None:
        self.published[partition] = self.published.get(partition, 0) + count

    async def in_flight(self, partition: int) -> int:
        committed = await self._consumer.committed(TopicPartition(self.topic, partition))
        if committed != self._committed.get(partition):
            self._committed[partition] = committed
            self._advanced = time.monotonic()
            if self._unbounded:
                self._unbounded = False
                log.info("edge.flow_bounded", group=self.group_id, partition=partition)
        done = 0 if committed is None else max(0, committed - self._base.get(partition, 0))
        return self.published.get(partition, 0) - done

    async def wait_for_room(self, partitions: Iterable[int]) -> None:
        """Until every one of ``partitions`` has fewer than ``limit`` frames in flight (not
        at all while the group commits nothing new)."""
        if self._consumer is None:
            return
        started = time.monotonic()
        for partition in sorted(set(partitions)):
            while await self.in_flight(partition) >= self.limit:
                if time.monotonic() - self._advanced > self.give_up_s:
                    self._give_up(partition)
                    break
                await asyncio.sleep(self.poll_s)
        self.waited_s += time.monotonic() - started

    def _give_up(self, partition: int) -> None:
        if self._unbounded:
            return
        self._unbounded = True
        log.warning(
            "edge.flow_unbounded",
            group=self.group_id,
            partition=partition,
            message=f"detect group {self.group_id!r} committed nothing for {self.give_up_s:.0f} "
            "s: realtime frames are published without waiting for the outside until it does "
            "(is the detect worker running, with this kafka.group_id?)",
        )
