"""``veil alpha set`` and ``veil alpha list``: live alpha with an answer from the trusted zone.

A request is a control record whose ``updated_time`` names it; the edge that owns the stream
answers on the compacted status topic (applied, or refused with the reason and the alphas it
would accept). :func:`set_alpha` refuses a stream no edge has announced, publishes the request
and waits for that answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from stream.kafka import (
    DEFAULT_TOPICS,
    TopicNames,
    assigned_reader,
    make_producer,
    read_to_end,
)
from stream.signing import ROLE_EDGE, Signer, Verifier, sign_control
from stream.wire import ControlMessage, StatusMessage, decode_status, encode_control
from veil.config import KafkaSecurityConfig
from veil.errors import ConfigError, ServiceError, WireFormatError

log = structlog.get_logger(__name__)


def _fold(table: dict[str, StatusMessage], records: list[Any], verifier: Verifier | None) -> None:
    """The latest status per stream; with ``verifier``, only those the edge key signed."""
    for r in records:
        headers = [(n, b"" if v is None else v) for n, v in (r.headers or ())]
        try:
            if verifier is not None:
                verifier.verify(r.key, r.value, headers, ROLE_EDGE)
            msg = decode_status(r.key, r.value, headers)
        except WireFormatError as exc:
            log.warning("alpha.status_refused", offset=r.offset, reason=str(exc))
            continue
        table[msg.stream_id] = msg


async def read_status(
    bootstrap: str,
    topics: TopicNames = DEFAULT_TOPICS,
    timeout_s: float = 10.0,
    verifier: Verifier | None = None,
    security: KafkaSecurityConfig | None = None,
) -> dict[str, StatusMessage]:
    """Every stream an edge has announced, with its latest status."""
    consumer, parts = await assigned_reader(
        bootstrap, topics.status, security, "veil-alpha", "no edge has started there"
    )
    table: dict[str, StatusMessage] = {}
    try:
        await read_to_end(
            consumer,
            parts,
            lambda record: _fold(table, [record], verifier),
            timeout_s=timeout_s,
            what=topics.status,
        )
    finally:
        await consumer.stop()
    return table


async def set_alpha(
    bootstrap: str,
    stream_id: str,
    alpha: float,
    topics: TopicNames = DEFAULT_TOPICS,
    timeout_s: float = 15.0,
    signer: Signer | None = None,
    verifier: Verifier | None = None,
    security: KafkaSecurityConfig | None = None,
) -> StatusMessage:
    """Ask for ``alpha`` on ``stream_id``; the trusted zone's answer (applied or refused).
    ``signer``: the operator key the edges require; ``verifier``: the edge key answers bear."""
    known = await read_status(bootstrap, topics, verifier=verifier, security=security)
    if stream_id not in known:
        raise ConfigError(
            f"unknown stream {stream_id!r}: no edge announced it (known: {sorted(known)})"
        )
    consumer, parts = await assigned_reader(
        bootstrap, topics.status, security, "veil-alpha", "no edge has started there"
    )
    try:
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)  # fix the position before the request goes out
        request = ControlMessage(stream_id, alpha, time.time())
        producer = await make_producer(bootstrap, idempotent=False, security=security)
        try:
            key, value, headers = (
                encode_control(request) if signer is None else sign_control(request, signer)
            )
            await producer.send_and_wait(topics.control, value=value, key=key, headers=headers)
        finally:
            await producer.stop()
        return await _answer(consumer, parts, request, timeout_s, verifier)
    finally:
        await consumer.stop()


async def _answer(
    consumer: Any,
    parts: list[Any],
    request: ControlMessage,
    timeout_s: float,
    verifier: Verifier | None,
) -> StatusMessage:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        table: dict[str, StatusMessage] = {}
        for records in (await consumer.getmany(*parts, timeout_ms=200)).values():
            _fold(table, records, verifier)
        answer = table.get(request.stream_id)
        if answer is not None and answer.request_time == request.updated_time:
            return answer
        await asyncio.sleep(0)
    raise ServiceError(
        f"no answer from the trusted zone for stream {request.stream_id!r} within "
        f"{timeout_s:.0f} s (is its edge running?)"
    )


def describe(status: StatusMessage) -> str:
    clean = ", clean allowed" if status.allow_clean else ""
    return (
        f"{status.stream_id}: alpha {status.alpha} (profile {status.profile_id}), floor "
        f"{status.min_alpha}{clean}; available {list(status.available)}; last: "
        f"{status.outcome} ({status.reason})"
    )
