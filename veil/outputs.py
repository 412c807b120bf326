"""What ``veil run`` and ``veil detections tail`` write: detections as JSON lines, appended and
flushed one by one, and the run's summary kept in bounded counters.

Nothing here grows with the length of a run: a JSON line leaves memory as soon as it is written,
and the summary keeps per-stream counters and a fixed-size sample of latencies.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import structlog

from stream.signing import ROLE_DETECT, Verifier
from stream.wire import DetectionMessage, decode_detection
from veil.errors import ConfigError, WireFormatError

log = structlog.get_logger(__name__)

LATENCY_SAMPLE = 4096  # latencies kept for the percentiles (a uniform reservoir sample)


def read_detection(record: Any, verifier: Verifier | None = None) -> DetectionMessage | None:
    """A detection record verified with the detect key (when ``verifier`` is given) and
    decoded; None, with a warning, for one that is unsigned, forged, tampered or malformed."""
    try:
        if verifier is not None:
            verifier.verify(record.key, record.value, record.headers or (), ROLE_DETECT)
    except WireFormatError as exc:
        log.warning("sink.unverified_detection", offset=record.offset, reason=str(exc))
        return None
    try:
        return decode_detection(record.key, record.value, record.headers)
    except WireFormatError as exc:
        log.warning("sink.malformed_detection", reason=str(exc))
        return None


def detection_record(msg: DetectionMessage) -> dict[str, Any]:
    """One detection message as the JSON object of a JSON line."""
    return {
        "stream": msg.stream_id,
        "sequence": msg.sequence,
        "pts": msg.pts,
        "capture_time": msg.capture_time,
        "produced_time": msg.produced_time,
        "model": msg.model,
        "profile_id": msg.profile_id,
        "alpha": msg.alpha,
        **msg.detections.to_json(),
    }


class JsonlWriter:
    """Appends one JSON line per detection to ``path`` and flushes it at once, so that every
    line written survives the process (a crash or ``kill -9`` loses nothing already written).
    An existing file is kept and appended to."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lines = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"outputs.jsonl: cannot write {self.path} ({exc.strerror or exc})"
            ) from exc

    def write(self, msg: DetectionMessage) -> None:
        self._file.write(json.dumps(detection_record(msg)) + "\n")
        self._file.flush()
        self.lines += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class StreamTally:
    frames: int = 0
    faces: int = 0


@dataclass
class DetectionTally:
    """Counters of the detections a run received: frames and faces per stream, and a uniform
    sample of at most ``sample_size`` end-to-end latencies (reservoir sampling)."""

    sample_size: int = LATENCY_SAMPLE
    frames: int = 0
    streams: dict[str, StreamTally] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    _rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    def add(self, msg: DetectionMessage) -> None:
        self.frames += 1
        stream = self.streams.setdefault(msg.stream_id, StreamTally())
        stream.frames += 1
        stream.faces += len(msg.detections)
        latency = msg.produced_time - msg.capture_time
        if len(self.latencies) < self.sample_size:
            self.latencies.append(latency)
            return
        slot = self._rng.randrange(self.frames)
        if slot < self.sample_size:
            self.latencies[slot] = latency

    def lines(self) -> list[str]:
        out = [
            f"stream {sid}: {t.frames} frames, {t.faces} faces "
            f"(mean {t.faces / t.frames:.2f} per frame)"
            for sid, t in sorted(self.streams.items())
        ]
        lat = sorted(self.latencies)
        if lat:
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            out.append(
                f"end-to-end latency p50 {statistics.median(lat) * 1000:.0f} ms, "
                f"p99 {p99 * 1000:.0f} ms"
            )
        return out
