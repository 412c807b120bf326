"""The Kafka layer on aiokafka: topic names, topic creation, producers, consumers, dead letters.

Delivery is at-least-once: producers wait for ``acks=all``; consumers never auto-commit, they
commit offsets after a record is handled, and drop redeliveries with :class:`SequenceDeduper`
(keyed by stream and sequence). Against Apache Kafka producers are also idempotent; the
embedded tansu broker refuses idempotent producers, so there ``idempotent=False`` and the
deduper is what removes duplicates from producer retries.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from stream.runtime import DEFAULT_BACKOFF, Backoff, retry
from stream.wire import HEADER_ERROR, Headers, decode_control
from veil.config import KafkaSecurityConfig
from veil.errors import ConfigError, ServiceError, VeilError, WireFormatError

log = structlog.get_logger(__name__)

# Kafka's defaults: the broker's message.max.bytes is 1 MiB (+12) and so is the producer's
# max.request.size; a float16 FaceBoxes activation at 1920x1080 (~523 kB) fits.
DEFAULT_MAX_REQUEST_SIZE: Final = 1024 * 1024
# A consumer must be able to fetch the largest record a producer may send, with headroom.
DEFAULT_MAX_PARTITION_FETCH_BYTES: Final = 4 * 1024 * 1024
_ERROR_REASON_MAX_CHARS: Final = 2000
_TOPIC_EXISTS: Final = 36  # Kafka error code TOPIC_ALREADY_EXISTS

HEADER_SOURCE_TOPIC: Final = "veil-source-topic"
HEADER_SOURCE_PARTITION: Final = "veil-source-partition"
HEADER_SOURCE_OFFSET: Final = "veil-source-offset"


# Failures that trying again cannot cure: the request itself is wrong or not allowed.
_FATAL_KAFKA_ERRORS: Final = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.GroupAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.UnsupportedVersionError,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.InvalidTopicError,
    kafka_errors.IllegalArgumentError,
    kafka_errors.ProducerClosed,
)


def transient(exc: BaseException) -> bool:
    """Whether a broker failure may go away by itself (a broker restarting, a leader moving,
    the network): every KafkaError but the ones that say the request is wrong or forbidden.
    aiokafka's own ``retriable`` flag is too narrow here: a restarting broker surfaces as
    UnknownError or NodeNotReadyError."""
    if isinstance(exc, VeilError):
        return exc.retriable
    if isinstance(exc, _FATAL_KAFKA_ERRORS):
        return False
    return isinstance(exc, KafkaError | OSError | TimeoutError)


# -- transport security -----------------------------------------------------------------------

PLAINTEXT: Final = KafkaSecurityConfig()
_warned_plaintext: set[str] = set()


def _host_of(address: str) -> str:
    address = address.strip()
    if address.startswith("["):  # [::1]:9092
        return address[1:].split("]", 1)[0]
    return address.split(":", 1)[0] if address.count(":") == 1 else address


def is_loopback(address: str) -> bool:
    """Whether every ``host[:port]`` of a comma-separated list is this host's loopback."""
    for item in address.split(","):
        host = _host_of(item)
        if host.lower() == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def warn_unencrypted(what: str, address: str) -> None:
    """A structlog warning, once per process and kind of client, when ``what`` talks to
    ``address`` without TLS and ``address`` is not loopback (the embedded default)."""
    if what in _warned_plaintext or is_loopback(address):
        return
    _warned_plaintext.add(what)
    log.warning(
        "unencrypted connection",
        client=what,
        address=address,
        hint="set TLS (kafka.security.protocol SSL or SASL_SSL; triton.tls.enabled)",
    )


def tls_context(
    ca_file: str | None,
    cert_file: str | None = None,
    key_file: str | None = None,
    *,
    check_hostname: bool = True,
    where: str = "kafka.security",
) -> ssl.SSLContext:
    """A client TLS context: the server verified against ``ca_file`` (None: the system's CAs),
    ``cert_file``/``key_file`` presented for mutual TLS. Bad files raise one-line ConfigErrors."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
        context.check_hostname = check_hostname
        if cert_file is not None:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(f for f in (ca_file, cert_file, key_file) if f) or "system CAs"
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"{where}: cannot load {files}: {reason}") from exc
    return context


def security_kwargs(security: KafkaSecurityConfig | None, bootstrap_servers: str) -> dict[str, Any]:
    """The aiokafka keyword arguments (producer, consumer, admin alike) for ``security``:
    ``security_protocol``, an ``ssl_context`` for SSL/SASL_SSL, the SASL mechanism, username
    and password (read from its file now). Warns once when the connection is not encrypted
    and the brokers are not on loopback."""
    security = PLAINTEXT if security is None else security
    kwargs: dict[str, Any] = {"security_protocol": security.protocol}
    if security.tls:
        kwargs["ssl_context"] = tls_context(
            security.ca_file,
            security.cert_file,
            security.key_file,
            check_hostname=security.check_hostname,
        )
    else:
        warn_unencrypted("kafka", bootstrap_servers)
    if security.protocol.startswith("SASL_"):
        kwargs.update(
            sasl_mechanism=security.sasl_mechanism,
            sasl_plain_username=security.username,
            sasl_plain_password=security.password(),
        )
    return kwargs


# How long a fetch may wait at the broker for records. tansu answers a waiting fetch only
# when the wait is over, not when records arrive: at aiokafka's default of 500 ms a record
# took 144 ms (median, 267 at most) from send to consumer on the embedded broker, against
# 10 ms at 10 ms (measured). Apache Kafka answers as soon as records arrive whatever the wait;
# there a short wait costs only empty fetches while a topic is idle (100 a second at most).
# The detect group's fetch of activations, the product's latency, waits FETCH_MAX_WAIT_MS.
# Every other long-lived reader (veil run's detections sink, the edge's control follower,
# `veil alpha`'s status wait, `veil detections tail`) waits FOLLOW_MAX_WAIT_MS: tansu's cost
# per fetch grows with the records a partition holds, and a topic nobody commits on is never
# trimmed. One reader of a growing 3-partition topic at 10 ms took 13% of a core in tansu at
# first and 23% after 1,660 records (5% at 500 ms); in a 120 s RetinaFace realtime run, veil
# run's sink at 10 ms fell behind (capture to sink 108 ms, then 2.7 s, then 17 s) and took the
# cores from the pipeline.
FETCH_MAX_WAIT_MS = 10
FOLLOW_MAX_WAIT_MS = 100


# What a client's start() raises: aiokafka's errors, and its SCRAM client's KeyError('v') or
# ValueError on a server-final "e=..." message (a refusal).
START_ERRORS: Final = (KafkaError, KeyError, ValueError, OSError)


def start_failure(
    exc: BaseException,
    what: str,
    bootstrap_servers: str,
    security: KafkaSecurityConfig | None = None,
) -> ServiceError:
    """The ServiceError for a client that could not start. Retriable (the broker may be
    starting) unless the broker refused the credentials or the SASL mechanism, or TLS
    failed (an unknown CA, a certificate for another host, no client certificate)."""
    sasl = security is not None and security.protocol.startswith("SASL_")
    reason, retriable = repr(exc), True
    if isinstance(exc, kafka_errors.SaslAuthenticationFailed) or (
        sasl and isinstance(exc, KeyError | ValueError)
    ):
        reason = f"SASL authentication failed (wrong username or password?): {exc}"
        retriable = False
    elif isinstance(exc, kafka_errors.UnsupportedSaslMechanismError):
        reason, retriable = f"the broker does not offer this SASL mechanism: {exc}", False
    elif isinstance(exc, ssl.SSLError):
        reason, retriable = f"TLS failed: {exc}", False
    elif isinstance(exc, kafka_errors.KafkaConnectionError) and "closed" in str(exc):
        reason += (
            " (a listener that wants a client certificate closes connections without an "
            "accepted one: kafka.security.cert_file/key_file?)"
            if security is not None and security.tls
            else " (a TLS listener closes plaintext connections: kafka.security.protocol?)"
        )
    error = ServiceError(f"cannot start {what} on {bootstrap_servers}: {reason}")
    error.retriable = retriable
    return error


async def client_failure(
    exc: BaseException,
    what: str,
    bootstrap_servers: str,
    security: KafkaSecurityConfig | None,
    kwargs: dict[str, Any],
) -> ServiceError:
    """:func:`start_failure`, with the reason aiokafka only logs: when it reports just that it
    could not bootstrap, one direct connection to the first broker says why (refused
    credentials, a TLS failure, a closed connection)."""
    if isinstance(exc, kafka_errors.KafkaConnectionError) and "bootstrap" in str(exc):
        from aiokafka.conn import create_conn

        host, _, port = bootstrap_servers.split(",")[0].strip().rpartition(":")
        try:
            conn = await create_conn(
                host.strip("[]"), int(port), request_timeout_ms=10_000, **kwargs
            )
            conn.close()
        except (*START_ERRORS, TimeoutError) as found:
            exc = found
    return start_failure(exc, what, bootstrap_servers, security)


@dataclass(frozen=True)
class OutgoingRecord:
    """One record to send: its topic, key, value, headers and (optionally) partition."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    partition: int | None = None


async def send_all(
    producer: Any,
    records: Sequence[OutgoingRecord],
    *,
    what: str,
    backoff: Backoff = DEFAULT_BACKOFF,
    on_retry: Any = None,
) -> None:
    """Send ``records`` and wait for every ack (``acks=all``); a transient failure re-sends
    the records not yet acknowledged, with backoff, forever by default. A record may so be
    stored twice (non-idempotent producers): consumers drop repeats by (stream, sequence)."""
    waiting = list(records)

    async def attempt() -> None:
        # Each topic's partitions once per attempt, as the broker has them now.
        known = {
            t: sorted(await producer.partitions_for(t))
            for t in {r.topic for r in waiting if r.partition is not None}
        }
        futures = [
            await producer.send(
                r.topic,
                value=r.value,
                key=r.key,
                headers=r.headers,
                partition=_existing_partition(r, known.get(r.topic, [])),
            )
            for r in waiting
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [
            (r, res)
            for r, res in zip(waiting, results, strict=True)
            if isinstance(res, BaseException)
        ]
        waiting[:] = [r for r, _ in failed]
        if failed:
            raise failed[0][1]

    await retry(attempt, what=what, transient=transient, backoff=backoff, on_retry=on_retry)


def _existing_partition(record: OutgoingRecord, known: list[int]) -> int | None:
    """The record's partition, mapped into the topic's ``known`` partitions: a broker that
    came back without its data may have re-created a topic with fewer."""
    if record.partition is None:
        return None
    if record.partition in known or not known:
        return record.partition
    return int(known[record.partition % len(known)])


@dataclass(frozen=True)
class TopicNames:
    """Every topic veil uses, in one place. A prefix keeps deployments (or tests) apart."""

    prefix: str = "veil"

    def __post_init__(self) -> None:
        if not self.prefix or any(c not in _TOPIC_CHARS for c in self.prefix):
            raise ConfigError(
                f"topic prefix {self.prefix!r} must be non-empty ASCII letters, digits, '.', "
                "'_' or '-'"
            )

    @property
    def activations(self) -> str:
        return f"{self.prefix}.activations"

    @property
    def detections(self) -> str:
        return f"{self.prefix}.detections"

    @property
    def control(self) -> str:
        """Compacted: the latest ``alpha`` per stream id."""
        return f"{self.prefix}.control"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def status(self) -> str:
        """Compacted: the trusted zone's answer per stream id (alpha in force, floor, outcome)."""
        return f"{self.prefix}.status"

    def all(self) -> tuple[str, str, str, str, str]:
        return (self.activations, self.detections, self.control, self.dead_letter, self.status)


_TOPIC_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
DEFAULT_TOPICS: Final = TopicNames()


@dataclass(frozen=True)
class KafkaLink:
    """How a worker's clients reach Kafka: the broker, the topics, TLS/SASL, and whether its
    producers are idempotent (Apache Kafka: yes; tansu refuses it). Built once per run
    (``veil.runner``) and shared by the edge and detect workers."""

    bootstrap: str
    idempotent: bool
    topics: TopicNames = DEFAULT_TOPICS
    security: KafkaSecurityConfig | None = None

    async def producer(self, client_id: str, max_request_size: int) -> Any:
        """A started producer (see :func:`make_producer`)."""
        return await make_producer(
            self.bootstrap,
            idempotent=self.idempotent,
            max_request_size=max_request_size,
            client_id=client_id,
            security=self.security,
        )


@dataclass(frozen=True)
class TopicsStatus:
    """What :func:`ensure_topics` did, and whether the broker reports compaction on control."""

    created: tuple[str, ...]
    existing: tuple[str, ...]
    control_cleanup_policy: str | None

    @property
    def control_compacted(self) -> bool:
        return self.control_cleanup_policy == "compact"


async def ensure_topics(
    bootstrap_servers: str,
    *,
    partitions: int = 3,
    topics: TopicNames = DEFAULT_TOPICS,
    replication_factor: int = 1,
    request_timeout_ms: int = 15_000,
    security: KafkaSecurityConfig | None = None,
    detections_retention_ms: int | None = None,
) -> TopicsStatus:
    """Create veil's topics where missing: activations and detections with ``partitions``
    partitions (the unit of consumer parallelism), control with one compacted partition,
    dead letters with one. Existing topics are left as they are. ``security``: how to
    connect (default plaintext). ``detections_retention_ms``: the detections topic's
    ``retention.ms`` (None: the broker's default).
    """
    if partitions < 1 or replication_factor < 1:
        raise ConfigError(
            f"partitions ({partitions}) and replication_factor ({replication_factor}) must be >= 1"
        )
    wanted = _new_topics(topics, partitions, replication_factor, detections_retention_ms)
    kwargs = security_kwargs(security, bootstrap_servers)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=request_timeout_ms, **kwargs
    )
    try:
        try:
            await admin.start()
        except START_ERRORS as exc:
            what = "a Kafka admin client"
            raise await client_failure(exc, what, bootstrap_servers, security, kwargs) from exc
        response = await admin.create_topics(wanted)
        created, existing = _created_or_existing(response.topic_errors, bootstrap_servers)
        policy = await _cleanup_policy(admin, topics.control)
    except KafkaError as exc:
        raise ServiceError(f"cannot create topics on {bootstrap_servers}: {exc!r}") from exc
    finally:
        await admin.close()
    if policy != "compact":
        log.warning("control topic is not compacted", topic=topics.control, cleanup_policy=policy)
    return TopicsStatus(tuple(created), tuple(existing), policy)


def _new_topics(
    topics: TopicNames, partitions: int, replication: int, detections_retention_ms: int | None
) -> list[NewTopic]:
    """veil's topics: activations and detections with ``partitions`` partitions, control and
    status compacted with one, dead letters with one."""
    compacted = {"cleanup.policy": "compact"}
    retention = (
        None if detections_retention_ms is None else {"retention.ms": str(detections_retention_ms)}
    )
    return [
        NewTopic(topics.activations, partitions, replication),
        NewTopic(topics.detections, partitions, replication, topic_configs=retention),
        NewTopic(topics.control, 1, replication, topic_configs=compacted),
        NewTopic(topics.dead_letter, 1, replication),
        NewTopic(topics.status, 1, replication, topic_configs=compacted),
    ]


def _created_or_existing(
    topic_errors: Sequence[tuple[str, int, str | None]], bootstrap_servers: str
) -> tuple[list[str], list[str]]:
    """Split a CreateTopics answer into (created, already there); any other error is raised."""
    created, existing = [], []
    for name, code, message in topic_errors:
        if code == 0:
            created.append(name)
        elif code == _TOPIC_EXISTS:
            existing.append(name)
        else:
            raise ServiceError(
                f"broker {bootstrap_servers} refused to create topic {name}: error {code} "
                f"({message})"
            )
    return created, existing


async def _cleanup_policy(admin: Any, topic: str) -> str | None:
    # Ask for all configs: tansu drops the connection on a DescribeConfigs that names keys.
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    for response in responses:
        for resource in response.resources:
            error_code, _message, _kind, _name, entries = resource[:5]
            if error_code != 0:
                return None
            for entry in entries:
                if entry[0] == "cleanup.policy":
                    return str(entry[1])
    return None


async def make_producer(
    bootstrap_servers: str,
    *,
    idempotent: bool,
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
    client_id: str = "veil-producer",
    linger_ms: int = 1,
    request_timeout_ms: int = 30_000,
    security: KafkaSecurityConfig | None = None,
) -> Any:
    """A started AIOKafkaProducer with ``acks=all``, connected as ``security`` says (TLS,
    SASL; default plaintext).

    ``idempotent=True`` is for Apache Kafka (no duplicates from retries); tansu refuses it
    (InitProducerId fails), so the embedded broker runs with ``idempotent=False``.
    ``max_request_size`` must stay within the topic's ``max.message.bytes``.
    """
    kwargs = security_kwargs(security, bootstrap_servers)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=idempotent,
        max_request_size=max_request_size,
        linger_ms=linger_ms,
        request_timeout_ms=request_timeout_ms,
        **kwargs,
    )
    try:
        await producer.start()
    except START_ERRORS as exc:
        await producer.stop()
        error = await client_failure(exc, "a Kafka producer", bootstrap_servers, security, kwargs)
        if idempotent and isinstance(exc, KafkaError) and error.retriable:
            error.args = (
                f"{error} (the broker refused an idempotent producer: tansu does not support "
                "InitProducerId; use idempotent=False there)",
            )
        raise error from exc
    return producer


async def make_consumer(
    bootstrap_servers: str,
    group_id: str | None,
    topics: Sequence[str],
    *,
    client_id: str = "veil-consumer",
    auto_offset_reset: str = "earliest",
    max_partition_fetch_bytes: int = DEFAULT_MAX_PARTITION_FETCH_BYTES,
    session_timeout_ms: int = 10_000,
    heartbeat_interval_ms: int = 3_000,
    listener: Any = None,
    security: KafkaSecurityConfig | None = None,
) -> Any:
    """A started AIOKafkaConsumer subscribed to ``topics``, auto-commit off.

    Commit with ``await consumer.commit({tp: offset + 1})`` after handling a record; stop it
    with :func:`close_consumer`. ``group_id=None`` reads without a group (nothing to commit).
    ``listener`` is an optional aiokafka ``ConsumerRebalanceListener`` (e.g. to commit or
    reset per-partition state when partitions move). ``security``: how to connect (TLS, SASL;
    default plaintext).
    """
    if not topics:
        raise ConfigError("make_consumer needs at least one topic")
    kwargs = security_kwargs(security, bootstrap_servers)
    consumer = AIOKafkaConsumer(
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset=auto_offset_reset,
        max_partition_fetch_bytes=max_partition_fetch_bytes,
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=heartbeat_interval_ms,
        **kwargs,
    )
    consumer.subscribe(list(topics), listener=listener)
    try:
        await consumer.start()
    except START_ERRORS as exc:
        await consumer.stop()
        what = f"a Kafka consumer (group {group_id})"
        raise await client_failure(exc, what, bootstrap_servers, security, kwargs) from exc
    return consumer


async def close_consumer(consumer: Any) -> None:
    """Stop a consumer so that its group hands its partitions on at once.

    tansu numbers a group's first generation 0 where Kafka starts at 1, and aiokafka only
    sends LeaveGroup for generation > 0; without the leave, the next member waits a whole
    session timeout. LeaveGroup carries no generation, so raising the local one is harmless.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is not None and getattr(coordinator, "generation", None) == 0:
        coordinator.generation = 1
    await consumer.stop()


def _truncated(
    full: OutgoingRecord,
    original: Headers,
    ours: Headers,
    prefix_bytes: int,
    header_value_bytes: int,
    headers_bytes: int,
) -> OutgoingRecord:
    """``full`` cut down: a prefix of the value, capped key and headers, and marks saying so."""
    kept: Headers = []
    room = headers_bytes
    for name, raw in original:
        cut = (name[:256], raw[:header_value_bytes])
        room -= len(cut[0].encode()) + len(cut[1])
        if room < 0:
            break
        kept.append(cut)
    original_size = str(len(full.value or b"")).encode()
    marks: Headers = [("veil-truncated", b"1"), ("veil-original-size", original_size)]
    if len(kept) < len(original):
        marks.append(("veil-headers-dropped", str(len(original) - len(kept)).encode()))
    key = None if full.key is None else full.key[:header_value_bytes]
    value = None if full.value is None else full.value[:prefix_bytes]
    return OutgoingRecord(full.topic, key, value, [*kept, *marks, *ours])


async def publish_dead_letter(
    producer: Any,
    record: Any,
    reason: str,
    *,
    topics: TopicNames = DEFAULT_TOPICS,
    max_bytes: int = DEFAULT_MAX_REQUEST_SIZE,
    prefix_bytes: int = 64 * 1024,
    header_value_bytes: int = 4 * 1024,
    headers_bytes: int = 32 * 1024,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> bool:
    """Send a record that could not be handled to the dead-letter topic; True if truncated.

    Key, value and headers are the original bytes; ``veil-error`` says why, and
    ``veil-source-{topic,partition,offset}`` say where it came from so it can be replayed.
    A dead letter over ``max_bytes`` (or one the producer or broker refuses as too large) is
    sent truncated, marked ``veil-truncated: 1``: the first ``prefix_bytes`` of the value,
    ``veil-original-size``, key and header values cut to ``header_value_bytes`` each, headers
    to ``headers_bytes`` in all. Transient broker failures are retried forever (``backoff``);
    any other failure raises a ServiceError that is not retriable.
    """
    key = None if record.key is None else bytes(record.key)
    value = None if record.value is None else bytes(record.value)
    original = [(str(k), bytes(v) if v is not None else b"") for k, v in (record.headers or ())]
    ours: Headers = [
        (HEADER_ERROR, reason[:_ERROR_REASON_MAX_CHARS].encode("utf-8", errors="replace")),
        (HEADER_SOURCE_TOPIC, str(record.topic).encode()),
        (HEADER_SOURCE_PARTITION, str(record.partition).encode()),
        (HEADER_SOURCE_OFFSET, str(record.offset).encode()),
    ]
    full = OutgoingRecord(topics.dead_letter, key, value, [*original, *ours])
    size = len(key or b"") + len(value or b"") + sum(len(n) + len(v) for n, v in full.headers)

    where = f"{record.topic}[{record.partition}]@{record.offset}"
    log.warning("dead letter", source=where, size=size, reason=reason[:500])
    too_large = (
        kafka_errors.MessageSizeTooLargeError,
        kafka_errors.RecordTooLargeError,
        kafka_errors.RecordListTooLargeError,
    )
    try:
        if size <= max_bytes:
            try:
                await send_all(producer, [full], what=f"dead letter {where}", backoff=backoff)
                return False
            except too_large as exc:
                log.warning("dead letter too large, truncating it", source=where, error=repr(exc))
        cut = _truncated(full, original, ours, prefix_bytes, header_value_bytes, headers_bytes)
        await send_all(producer, [cut], what=f"dead letter {where}", backoff=backoff)
        return True
    except KafkaError as exc:
        error = ServiceError(f"cannot publish a dead letter for {where}: {exc!r}")
        error.retriable = False
        raise error from exc


async def assigned_reader(
    bootstrap: str, topic: str, security: KafkaSecurityConfig | None, client_id: str, missing: str
) -> tuple[Any, list[TopicPartition]]:
    """A started group-less consumer assigned every partition of ``topic`` (fetches wait
    FOLLOW_MAX_WAIT_MS); ServiceError ``no topic ... : missing`` when the topic does not
    exist, the client's own failure (TLS and SASL hints included) when it cannot start."""
    kwargs = security_kwargs(security, bootstrap)
    consumer = AIOKafkaConsumer(
        fetch_max_wait_ms=FOLLOW_MAX_WAIT_MS,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        client_id=client_id,
        **kwargs,
    )
    try:
        await consumer.start()
    except START_ERRORS as exc:
        await consumer.stop()
        raise await client_failure(exc, "a Kafka consumer", bootstrap, security, kwargs) from exc
    await consumer.topics()  # metadata: the topic's partitions are known after this
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not parts:
        await consumer.stop()
        raise ServiceError(f"no topic {topic} on {bootstrap}: {missing}")
    consumer.assign(parts)
    return consumer, parts


async def read_control_table(
    bootstrap_servers: str,
    *,
    topics: TopicNames = DEFAULT_TOPICS,
    timeout_s: float = 10.0,
    security: KafkaSecurityConfig | None = None,
) -> dict[str, float]:
    """The current ``stream_id -> alpha`` overrides: the control topic read to its end.

    Folds to the latest record per key, so the result is the same whether or not the broker
    has compacted the topic yet (tansu never does); tombstones remove a stream. Malformed
    control records are logged and skipped: one bad record must not freeze every stream.
    """
    kwargs = security_kwargs(security, bootstrap_servers)
    consumer = AIOKafkaConsumer(
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        client_id="veil-control-reader",
        **kwargs,
    )
    table: dict[str, float] = {}
    try:
        try:
            await consumer.start()
        except START_ERRORS as exc:
            what = "the control reader"
            raise await client_failure(exc, what, bootstrap_servers, security, kwargs) from exc
        partitions = consumer.partitions_for_topic(topics.control) or set()
        assigned = [TopicPartition(topics.control, p) for p in sorted(partitions)]
        if not assigned:
            raise ServiceError(f"control topic {topics.control} does not exist")
        consumer.assign(assigned)
        await read_to_end(
            consumer,
            assigned,
            lambda record: _fold_control(table, record),
            timeout_s=timeout_s,
            what=f"control topic {topics.control}",
        )
    except KafkaError as exc:
        raise ServiceError(f"cannot read {topics.control} on {bootstrap_servers}: {exc!r}") from exc
    finally:
        await consumer.stop()
    return table


async def read_to_end(
    consumer: Any,
    partitions: Sequence[TopicPartition],
    on_record: Callable[[Any], None],
    *,
    timeout_s: float,
    what: str,
) -> None:
    """Every record of ``partitions`` (assigned to ``consumer``) from the beginning to the end
    they have now, handed to ``on_record``: how a compacted table is read. ServiceError naming
    ``what`` when the end is not reached within ``timeout_s``."""
    await consumer.seek_to_beginning(*partitions)
    end = await consumer.end_offsets(list(partitions))
    deadline = time.monotonic() + timeout_s
    while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} not read to its end within {timeout_s} s")
        for records in (await consumer.getmany(*partitions, timeout_ms=200)).values():
            for record in records:
                on_record(record)


def _fold_control(table: dict[str, float], record: Any) -> None:
    try:
        message = decode_control(record.key, record.value, record.headers)
    except WireFormatError as exc:
        log.warning("skipping malformed control record", offset=record.offset, reason=str(exc))
        return
    if message.alpha is None:
        table.pop(message.stream_id, None)
    else:
        table[message.stream_id] = float(message.alpha)


@dataclass
class _StreamWindow:
    highest: int
    recent: set[int] = field(default_factory=set)


class SequenceDeduper:
    """Drops redelivered (stream, sequence) pairs for at-least-once consumers.

    Per stream it keeps the highest sequence seen and the set of sequences seen within
    ``window`` below it (like an anti-replay window), so a late first arrival inside the window
    is still accepted. A sequence older than the window is treated as a duplicate. The least
    recently active streams are forgotten beyond ``max_streams``.
    """

    def __init__(self, window: int = 1024, max_streams: int = 10_000) -> None:
        if window < 1 or max_streams < 1:
            raise ConfigError(f"window ({window}) and max_streams ({max_streams}) must be >= 1")
        self.window = window
        self.max_streams = max_streams
        self._streams: OrderedDict[str, _StreamWindow] = OrderedDict()

    def accept(self, stream_id: str, sequence: int) -> bool:
        """True (and remember it) if this is the first time ``(stream_id, sequence)`` is seen."""
        state = self._streams.get(stream_id)
        if state is None:
            self._streams[stream_id] = _StreamWindow(sequence, {sequence})
            if len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
            return True
        self._streams.move_to_end(stream_id)
        if sequence > state.highest:
            state.highest = sequence
            state.recent.add(sequence)
            if len(state.recent) > 2 * self.window:  # prune in bulk, not on every message
                floor = sequence - self.window
                state.recent = {s for s in state.recent if s > floor}
            return True
        if sequence <= state.highest - self.window or sequence in state.recent:
            return False
        state.recent.add(sequence)
        return True

    def highest(self, stream_id: str) -> int | None:
        state = self._streams.get(stream_id)
        return None if state is None else state.highest


async def drain(consumer: Any, *, until: int, timeout_s: float) -> list[Any]:
    """Up to ``until`` records from a started consumer, or fewer when ``timeout_s`` runs out."""
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < until and time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=200, max_records=until - len(records))
        for tp in sorted(batches, key=lambda t: (t.topic, t.partition)):
            records.extend(batches[tp])
    return records


def committable(records: Iterable[Any]) -> dict[Any, int]:
    """The offsets to commit after handling ``records``: per partition, last offset + 1."""
    offsets: dict[Any, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        offsets[tp] = max(offsets.get(tp, 0), int(record.offset) + 1)
    return offsets
