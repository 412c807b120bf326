"""Logs and metrics shared by every role.

structlog renders JSON in deployments and readable lines in a terminal. Prometheus metrics are
module-level (one registry per process) and served, with health and readiness, by
:class:`StatusServer` on one port.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

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


class StatusServer:
    """``/metrics`` (Prometheus), ``/healthz`` (process alive), ``/readyz`` (``ready()``)."""

    def __init__(self, port: int, ready: Callable[[], bool], host: str = "127.0.0.1") -> None:
        self.host, self.port, self.ready = host, port, ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path == "/metrics":
                status, body, ctype = "200 OK", generate_latest(), CONTENT_TYPE_LATEST
            elif path == "/healthz":
                status, body, ctype = "200 OK", b"ok\n", "text/plain"
            elif path == "/readyz":
                ok = self.ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                body, ctype = (b"ready\n" if ok else b"not ready\n"), "text/plain"
            else:
                status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
