"""Bounded latency for ``realtime`` streams: at most ``limit`` frames in flight per stream.

A camera's frames are worth something only while they are new. When the outside is slower
than the trusted zone, every frame published beyond what it can take waits in Kafka, and the
latency grows without bound (measured before this: p50 7.4 s, creeping from 3.6 to 8.7 s in
40 s); frames held inside the zone age the same way. So before the edge takes the next frame
of a realtime stream from its source, it waits until the frames of that stream's partition
that it has taken and the detect group has not committed yet are under ``limit`` times the
realtime streams that share the partition. Two per stream (``veil run``): one frame in the
zone, one outside; the next one taken is the newest. By Little's law the latency is the
frames in flight over the throughput: with eight in flight, FaceBoxes at 1080p on two cores
(17 frames/s) had a p50 of 364 ms, five times its processing per batch. Meanwhile
the source's mailbox keeps only the newest frame, dropping (and counting) the others: what a
camera does when nobody keeps up, and the frame taken next is always a fresh one.
``lossless`` streams are never held here: Kafka is their buffer.

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
from aiokafka.errors import KafkaError

from stream.kafka import security_kwargs
from veil.config import KafkaSecurityConfig

log = structlog.get_logger(__name__)


class FlowControl:
    """Realtime frames per partition of ``topic``, from the moment the edge takes one from its
    source until the detect group ``group_id`` has committed it, kept under ``limit`` per
    realtime stream on the partition: :meth:`acquire` before a realtime frame is taken,
    :meth:`published` once sent."""

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
        self.waited_s = 0.0  # in all, for the stats
        self._published: dict[int, int] = {}  # records this edge sent, per partition
        self._pending: dict[int, int] = {}  # realtime frames taken, not sent yet
        self._base: dict[int, int] = {}  # each partition's end offset when this edge started
        self._committed: dict[int, int | None] = {}
        self._fetched: dict[int, float] = {}  # when each partition's commit was last read
        self._locks: dict[int, asyncio.Lock] = {}
        self._advanced = time.monotonic()  # when the group last committed further
        self._unbounded = False
        self._consumer: Any = None

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
        self._advanced = time.monotonic()

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def acquire(self, partition: int, streams: int = 1) -> None:
        """Until a realtime frame of ``partition``, which ``streams`` realtime streams share,
        may enter the zone's pipeline (not at all while the group commits nothing new); the
        frame is counted from here."""
        started = time.monotonic()
        limit = self.limit * max(1, streams)
        while self._consumer is not None and await self._in_use(partition) >= limit:
            if time.monotonic() - self._advanced > self.give_up_s:
                self._give_up(partition)
                break
            await asyncio.sleep(self.poll_s)
        self._pending[partition] = self._pending.get(partition, 0) + 1
        self.waited_s += time.monotonic() - started

    def release(self, partition: int) -> None:
        """An acquired frame that will not be sent (its source ended)."""
        self._pending[partition] = max(0, self._pending.get(partition, 0) - 1)

    def published(self, partition: int, records: int, realtime: int) -> None:
        """``records`` sent on ``partition``, ``realtime`` of them acquired."""
        self._published[partition] = self._published.get(partition, 0) + records
        self._pending[partition] = max(0, self._pending.get(partition, 0) - realtime)

    async def _in_use(self, partition: int) -> int:
        """Frames taken on ``partition`` and not yet committed by the group."""
        lock = self._locks.setdefault(partition, asyncio.Lock())
        async with lock:
            if time.monotonic() - self._fetched.get(partition, 0.0) >= self.poll_s:
                tp = TopicPartition(self.topic, partition)
                try:
                    self._note_commit(partition, await self._consumer.committed(tp))
                except (KafkaError, OSError) as exc:  # broker or group away: keep what we know
                    log.debug("edge.flow_commit_unknown", partition=partition, error=repr(exc))
                self._fetched[partition] = time.monotonic()
        committed = self._committed.get(partition)
        done = 0 if committed is None else max(0, committed - self._base.get(partition, 0))
        return self._pending.get(partition, 0) + self._published.get(partition, 0) - done

    def _note_commit(self, partition: int, committed: int | None) -> None:
        if committed == self._committed.get(partition):
            return
        self._committed[partition] = committed
        self._advanced = time.monotonic()
        if self._unbounded:
            self._unbounded = False
            log.info("edge.flow_bounded", group=self.group_id, partition=partition)

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
