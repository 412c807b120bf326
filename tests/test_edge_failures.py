"""A failing head+noise stage ends the edge within seconds, with /readyz 503 before it ends."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from stream.broker import free_loopback_port
from stream.demo_clip import make_demo_clip
from stream.kafka import TopicNames, ensure_topics
from stream.runtime import StageFailed
from tests.fixtures_kafka import KafkaTarget, kafka_target  # noqa: F401
from veil.config import (
    BatchingConfig,
    KafkaConfig,
    ModelConfig,
    ObservabilityConfig,
    StreamConfig,
    VeilConfig,
)
from veil.runner import build_obfuscator, serve

pytestmark = pytest.mark.services


async def _status(port: int) -> int:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0
    writer.write(b"GET /readyz HTTP/1.1\r\n\r\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    return int(line.split()[1]) if line else 0


async def test_a_failing_head_ends_the_edge_and_readiness_turns_503_first(
    kafka_target: KafkaTarget,  # noqa: F811
    tmp_path: Path,
) -> None:
    clip = make_demo_clip(tmp_path / "clip.mp4", seconds=6, fps=10, size=(320, 240))
    port = free_loopback_port()
    config = VeilConfig(
        model=ModelConfig(name="retinaface", geometry="320x256", device="cpu"),
        profile_bank=str(tmp_path / "bank"),
        streams=(
            StreamConfig(id="s", source=str(clip), policy="lossless", alpha=0.0, allow_clean=True),
        ),
        kafka=KafkaConfig(
            bootstrap=kafka_target.bootstrap_servers, idempotent=False, topic_prefix="edge-fail"
        ),
        batching=BatchingConfig(max_batch=2, max_wait_ms=5),
        observability=ObservabilityConfig(http_port=port),
    )
    await ensure_topics(kafka_target.bootstrap_servers, topics=TopicNames("edge-fail"))
    obfuscator = build_obfuscator(config)
    real_run = obfuscator.run
    calls = 0

    def failing_run(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            time.sleep(0.2)  # the status server is up and ready meanwhile
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run(*args)

    obfuscator.run = failing_run  # type: ignore[method-assign,assignment]
    seen: list[int] = []

    async def poll() -> None:
        while True:
            seen.append(await _status(port))
            await asyncio.sleep(0.005)

    poller = asyncio.create_task(poll())
    started = time.monotonic()
    with pytest.raises(StageFailed, match="stage head\\+noise failed: RuntimeError: CUDA error"):
        await serve(config, frozenset({"edge"}), obfuscator=obfuscator)
    elapsed = time.monotonic() - started
    poller.cancel()
    assert elapsed < 15, elapsed
    assert 200 in seen and 503 in seen, seen
    # Not ready while starting, ready while serving, not ready again from the failure on.
    assert 503 in seen[seen.index(200) :], seen
