"""The edge's batcher: when a batch is sent without waiting for ``max_wait_ms``."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import numpy as np
import torch

from stream.frames import Frame
from stream.kafka import KafkaLink
from stream.runtime import Channel
from stream.wire import Envelope
from tests.tiny_detector import TinyDetector, constant_profile
from veil.config import BatchingConfig, StreamConfig
from workers.trusted.edge import EdgeWorker, _Stream
from workers.trusted.obfuscator import Obfuscator, ProfileTable

WAIT_MS = 400.0


def _edge(policies: dict[str, Literal["realtime", "lossless"]]) -> EdgeWorker:
    det = TinyDetector()
    device = torch.device("cpu")
    table = ProfileTable(det, det.default_geometry, [constant_profile(det, 0.8, 0.5, 0.0)], device)  # type: ignore[list-item]
    configs = [StreamConfig(i, f"{i}.mp4", policy=p) for i, p in policies.items()]
    edge = EdgeWorker(
        configs,
        Obfuscator(det, det.default_geometry, table, device),
        KafkaLink("127.0.0.1:1", idempotent=False),
        batching=BatchingConfig(max_batch=8, max_wait_ms=WAIT_MS),
    )
    source: Any = None  # the batcher reads only the streams' configs and states
    edge._streams = {c.id: _Stream(c, source) for c in configs}
    return edge


def _frame(stream: str) -> Frame:
    return Frame(Envelope(stream, 0, None, 0.0), np.zeros((48, 64, 3), np.uint8))


async def _first_batch(edge: EdgeWorker, streams: list[str]) -> tuple[list[str], float]:
    """The streams of the first batch formed from one frame of each of ``streams``, and
    how long it took."""
    frames: Channel[Frame] = Channel("frames", 16)
    out: Channel[list[Frame]] = Channel("batches", 4)
    task = asyncio.create_task(edge._batch(frames, out))
    started = time.monotonic()
    for s in streams:
        await frames.put(_frame(s))
    batch = await asyncio.wait_for(out.get(), 5)
    elapsed = time.monotonic() - started
    task.cancel()
    assert batch is not None
    return [f.stream_id for f in batch], elapsed


async def test_a_batch_holding_every_realtime_camera_goes_at_once() -> None:
    streams, elapsed = await _first_batch(_edge({"a": "realtime"}), ["a"])
    assert streams == ["a"] and elapsed < WAIT_MS / 4000
    edge = _edge({"a": "realtime", "b": "realtime"})
    streams, elapsed = await _first_batch(edge, ["a", "b"])
    assert streams == ["a", "b"] and elapsed < WAIT_MS / 4000


async def test_a_camera_missing_from_the_batch_or_a_lossless_stream_waits_the_full_time() -> None:
    streams, elapsed = await _first_batch(_edge({"a": "realtime", "b": "realtime"}), ["a"])
    assert streams == ["a"] and elapsed >= WAIT_MS / 1000 * 0.9
    streams, elapsed = await _first_batch(_edge({"a": "realtime", "b": "lossless"}), ["a", "b"])
    assert streams == ["a", "b"] and elapsed >= WAIT_MS / 1000 * 0.9


async def test_an_ended_camera_is_not_waited_for() -> None:
    edge = _edge({"a": "realtime", "b": "realtime"})
    edge._streams["b"].ended = True
    streams, elapsed = await _first_batch(edge, ["a"])
    assert streams == ["a"] and elapsed < WAIT_MS / 4000
