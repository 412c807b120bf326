"""Logs and metrics shared by every role.

structlog renders JSON in deployments and readable lines in a terminal. Prometheus metrics are
module-level (one registry per process) and served, with health, readiness and (in the trusted
zone) the HTTP API of :mod:`veil.http_api`, by :class:`StatusServer` on one port. Names follow
Prometheus' conventions: counters end in ``_total``, durations are ``_seconds``, sizes
``_bytes``; per-stream series carry a ``stream`` label and are removed with their stream.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

log = structlog.get_logger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

FRAMES_IN = Counter("veil_frames_in_total", "Frames decoded from sources", ["stream"])
FRAMES_DROPPED = Counter("veil_frames_dropped_total", "Frames dropped (realtime)", ["stream"])
BATCH_SIZE = Histogram(
    "veil_batch_size", "Frames per head+noise batch", buckets=(1, 2, 4, 8, 16, 32)
)
HEAD_NOISE_SECONDS = Histogram(
    "veil_head_noise_seconds", "Preprocess+head+noise time per batch", buckets=LATENCY_BUCKETS
)
BYTES_PUBLISHED = Counter("veil_bytes_published_total", "Activation bytes sent to Kafka")
MESSAGES_PUBLISHED = Counter("veil_activations_published_total", "Activation messages sent")
CONSUMER_LAG = Gauge("veil_consumer_lag", "Activations not yet consumed", ["partition"])
TRITON_SECONDS = Histogram(
    "veil_triton_seconds", "Triton tail latency per batch", buckets=LATENCY_BUCKETS
)
END_TO_END_SECONDS = Histogram(
    "veil_end_to_end_seconds", "Capture to detection published", buckets=LATENCY_BUCKETS
)
DETECTIONS_PUBLISHED = Counter("veil_detections_published_total", "Detection messages sent")
DEAD_LETTERS = Counter("veil_dead_letters_total", "Messages sent to the dead-letter topic")
DUPLICATES = Counter("veil_duplicates_total", "Redelivered activations skipped")

BUILD_INFO = Gauge("veil_build_info", "veil's version and model (value 1)", ["version", "model"])
SOURCE_UP = Gauge("veil_source_up", "1 while the stream's source is open and decoding", ["stream"])
SOURCE_RECONNECTS = Counter(
    "veil_source_reconnects_total", "Reconnection attempts of a live source", ["stream"]
)
FRAMES_PUBLISHED = Counter(
    "veil_frames_published_total", "Activations of the stream acknowledged by Kafka", ["stream"]
)
STREAM_FPS = Gauge(
    "veil_stream_frames_per_second", "Frames read per second over the last seconds", ["stream"]
)
STREAM_PUBLISH_SECONDS = Histogram(
    "veil_stream_publish_latency_seconds",
    "Capture to activation acknowledged by Kafka",
    ["stream"],
    buckets=LATENCY_BUCKETS,
)
STREAM_DETECTION_SECONDS = Histogram(
    "veil_stream_end_to_end_latency_seconds",
    "Capture to detection received back in the trusted zone (veil run)",
    ["stream"],
    buckets=LATENCY_BUCKETS,
)
STREAM_ALPHA = Gauge("veil_stream_alpha", "The alpha in force", ["stream"])
STREAM_PROFILE = Gauge(
    "veil_stream_profile_info", "The noise profile in force (value 1)", ["stream", "profile_id"]
)
_PER_STREAM: Final = (
    FRAMES_IN,
    FRAMES_DROPPED,
    SOURCE_UP,
    SOURCE_RECONNECTS,
    FRAMES_PUBLISHED,
    STREAM_FPS,
    STREAM_PUBLISH_SECONDS,
    STREAM_DETECTION_SECONDS,
    STREAM_ALPHA,
)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("veil")
    except PackageNotFoundError:
        return "unknown"


def set_build_info(model: str) -> None:
    """``veil_build_info{version, model} 1``: the package's version (no git needed)."""
    BUILD_INFO.labels(package_version(), model).set(1)


def set_profile(stream: str, profile_id: str) -> None:
    """``veil_stream_profile_info``: one series per stream, the profile in force."""
    _remove_matching(STREAM_PROFILE, stream)
    STREAM_PROFILE.labels(stream, profile_id).set(1)


def declare_stream(stream: str) -> None:
    """A stream's series from its start, before any frame (an unreachable camera shows
    ``veil_source_up 0`` and ``veil_frames_in_total 0`` rather than no series)."""
    for metric in _PER_STREAM:
        if metric is not STREAM_ALPHA:
            metric.labels(stream)
    SOURCE_UP.labels(stream).set(0)


def forget_stream(stream: str) -> None:
    """Remove a stream's series (a stream removed at runtime leaves no stale ``up``)."""
    for metric in _PER_STREAM:
        _remove_matching(metric, stream)
    _remove_matching(STREAM_PROFILE, stream)


def _remove_matching(metric: Any, stream: str) -> None:
    for labels in [k for k in metric._metrics if k[0] == stream]:  # the client keeps no index
        metric.remove(*labels)


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """``fmt``: ``console`` (coloured key=value) or ``json`` (one object per line)."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


# -- the HTTP server ------------------------------------------------------------------------

_MAX_BODY: Final = 1 << 20  # request bodies are small JSON documents
_MAX_HEADERS: Final = 100
_REASONS: Final = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query
    body: bytes
    loopback: bool  # the peer is on this host (127.0.0.0/8 or ::1)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    # A body sent as it comes (no Content-Length) until it ends or the peer leaves.
    stream: AsyncIterator[bytes] | None = None

    @classmethod
    def json(cls, status: int, document: Any) -> Response:
        return cls(status, json.dumps(document, separators=(",", ":")).encode() + b"\n")


Handler = Callable[[Request], Awaitable[Response | None]]  # None: not this handler's path


class _BadRequest(Exception):
    """A request that cannot be parsed (answered 400 or 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StatusServer:
    """``/metrics`` (Prometheus), ``/healthz`` (process alive), ``/readyz`` (``ready()``; with
    ``readiness``, its JSON document as the body) and whatever ``api`` answers (the trusted
    zone's :mod:`veil.http_api`), one request per connection."""

    def __init__(
        self,
        port: int,
        ready: Callable[[], bool],
        host: str = "127.0.0.1",
        *,
        readiness: Callable[[], dict[str, Any]] | None = None,
        api: Handler | None = None,
    ) -> None:
        self.host, self.port, self.ready = host, port, ready
        self.readiness, self.api = readiness, api
        self._server: asyncio.Server | None = None
        self._streaming: set[asyncio.Task[Any]] = set()  # handlers sending a stream body

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for task in list(self._streaming):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader, writer), 10)
                response = await self._answer(request)
            except _BadRequest as exc:
                response = Response.json(exc.status, {"error": str(exc)})
            reason = _REASONS.get(response.status, "")
            length = "" if response.stream else f"\r\nContent-Length: {len(response.body)}"
            head = (
                f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}"
                f"{length}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + response.body)
            await writer.drain()
            if response.stream is not None:
                await self._send_stream(response.stream, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _send_stream(self, body: AsyncIterator[bytes], writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._streaming.add(task)
        try:
            async for chunk in body:
                writer.write(chunk)
                await writer.drain()
        except asyncio.CancelledError:
            pass  # the server stops
        finally:
            self._streaming.discard(task)
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _answer(self, request: Request) -> Response:
        if request.method == "GET" and request.path == "/metrics":
            return Response(200, generate_latest(), CONTENT_TYPE_LATEST)
        if request.method == "GET" and request.path == "/healthz":
            return Response(200, b"ok\n", "text/plain")
        if request.method == "GET" and request.path == "/readyz":
            ok = self.ready()
            if self.readiness is not None:
                return Response.json(200 if ok else 503, self.readiness())
            return Response(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
        if self.api is not None:
            try:
                answer = await self.api(request)
            except Exception as exc:  # a bug in a handler answers 500, the server keeps serving
                log.error("http.handler_failed", path=request.path, error=repr(exc))
                return Response.json(500, {"error": f"internal error: {type(exc).__name__}"})
            if answer is not None:
                return answer
        return Response.json(404, {"error": f"no such path: {request.method} {request.path}"})


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
    parts = (await reader.readline()).decode("latin-1").split()
    if len(parts) < 2:
        raise _BadRequest(400, "malformed request line")
    length = 0
    for _ in range(_MAX_HEADERS):
        line = (await reader.readline()).decode("latin-1").strip()
        if not line:
            break
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise _BadRequest(400, "Content-Length is not a number") from None
    if not 0 <= length <= _MAX_BODY:
        raise _BadRequest(413, f"request body over {_MAX_BODY} bytes")
    body = await reader.readexactly(length) if length else b""
    peer = writer.get_extra_info("peername")
    return Request(parts[0].upper(), parts[1].partition("?")[0], body, _is_loopback(peer))


def _is_loopback(peer: Any) -> bool:
    try:
        return ipaddress.ip_address(str(peer[0]).partition("%")[0]).is_loopback
    except (TypeError, IndexError, ValueError):
        return False
