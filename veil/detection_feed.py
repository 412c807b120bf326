"""``veil detections tail``: the detections topic as JSON lines, for operators.

Reads ``<prefix>.detections`` from the beginning without a consumer group (nothing is
committed, nobody else's position moves), keeps the records that pass the filters (stream,
capture time, score), verified with the detect key when one is given, once each per (stream,
sequence), and writes each as the JSON line ``veil run --jsonl`` writes. Reads to the end the
topic has now, or with ``follow`` keeps reading until stopped.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from stream.kafka import (
    SequenceDeduper,
    TopicNames,
    assigned_reader,
    read_to_end,
)
from stream.signing import Verifier
from stream.wire import DetectionMessage
from veil.config import KafkaSecurityConfig
from veil.errors import ConfigError
from veil.outputs import read_detection

_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, option: str, now: float | None = None) -> float:
    """Unix seconds from ``1700000000.5``, an ISO 8601 time (local time unless it names a
    zone) or a duration ago: ``90s``, ``10m``, ``2h``, ``1d``."""
    text = text.strip()
    found = _AGO.match(text)
    if found:
        ago = float(found.group(1)) * _UNIT_S[found.group(2)]
        return (time.time() if now is None else now) - ago
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise ConfigError(
            f"{option} {text!r}: not unix seconds, an ISO 8601 time or a duration ago "
            "(90s, 10m, 2h, 1d)"
        ) from exc


@dataclass(frozen=True)
class DetectionFilter:
    """Which detections pass: of ``streams`` (empty: all), captured within [since, until],
    boxes scoring at least ``min_score`` (a frame left with no box is dropped)."""

    streams: frozenset[str] = frozenset()
    since: float | None = None
    until: float | None = None
    min_score: float | None = None

    def apply(self, msg: DetectionMessage) -> DetectionMessage | None:
        if self.streams and msg.stream_id not in self.streams:
            return None
        if self.since is not None and msg.capture_time < self.since:
            return None
        if self.until is not None and msg.capture_time > self.until:
            return None
        if self.min_score is None:
            return msg
        kept = msg.detections.above(self.min_score)
        return replace(msg, detections=kept) if len(kept) else None


async def tail_detections(
    bootstrap: str,
    out: Callable[[DetectionMessage], None],
    *,
    topics: TopicNames | None = None,
    where: DetectionFilter | None = None,
    follow: bool = False,
    stop: asyncio.Event | None = None,
    verifier: Verifier | None = None,
    security: KafkaSecurityConfig | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Every detection record that passes ``where``, once each, handed to ``out``: up to the
    end the topic has now (within ``timeout_s``), or with ``follow`` until ``stop`` is set."""
    topic = (topics or TopicNames()).detections
    where = where or DetectionFilter()
    seen = SequenceDeduper()

    def handle(record: Any) -> None:
        msg = read_detection(record, verifier)
        if msg is None or not seen.accept(msg.stream_id, msg.sequence):
            return
        passed = where.apply(msg)
        if passed is not None:
            out(passed)

    consumer, parts = await assigned_reader(
        bootstrap, topic, security, "veil-detections-tail", "no detect worker has published there"
    )
    try:
        if not follow:
            await read_to_end(consumer, parts, handle, timeout_s=timeout_s, what=topic)
            return
        await consumer.seek_to_beginning(*parts)
        while stop is None or not stop.is_set():
            for records in (await consumer.getmany(*parts, timeout_ms=200)).values():
                for record in records:
                    handle(record)
    finally:
        await consumer.stop()
