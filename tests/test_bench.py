"""The figures `veil bench` prints: the arithmetic behind them (the runs are the bench's)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from stream.kafka import TopicNames
from tests.fixtures_kafka import KafkaTarget, kafka_target  # noqa: F401 (fixture)
from veil.bench import _run_config, latency_windows, pipeline_figures, report_lines
from veil.config import StreamConfig, VeilConfig, load_config


def test_latency_windows_split_by_capture_time_with_their_percentiles() -> None:
    # Capture every 0.1 s for 40 s; latency 0.2 s in the first 20 s, 1.0 s after.
    times = [(t / 10, t / 10 + (0.2 if t < 200 else 1.0)) for t in range(400)]
    windows = latency_windows(times, 20.0)
    assert [w["from_s"] for w in windows] == [0.0, 20.0]
    assert [w["frames"] for w in windows] == [200, 200]
    assert windows[0]["p50_ms"] == pytest.approx(200)
    assert windows[1]["p99_ms"] == pytest.approx(1000)
    assert latency_windows([], 20.0) == []


def test_pipeline_figures_count_fps_from_first_capture_to_last_detection() -> None:
    times = [(0.0, 0.5), (0.5, 1.0), (1.0, 2.0)]
    figures = pipeline_figures(times, frames_published=4, bytes_published=400)
    assert figures["fps"] == pytest.approx(1.5) and figures["lost_frames"] == 1
    assert figures["bytes_per_frame"] == 100


def test_the_report_states_each_goal_beside_its_ratio() -> None:
    pipeline = {"fps": 5.0, "latency_ms_p50": 100.0, "latency_ms_p99": 200.0}
    result = {
        "frame_size": "1920x1080",
        "geometry": "1920x1088",
        "threads": {"edge": 1},
        "micro": {
            "zone_ms_median": 30.0,
            "zone_ms_p99": 40.0,
            "onnxruntime_head_ms_median": 25.0,
            "zone_vs_onnxruntime_ratio": 1.2,
            "head_ms_median": 26.0,
            "head_noise_ms_median": 27.0,
            "noise_overhead_ratio": 1.04,
        },
        "floor": {
            "head_gflop": 2.2,
            "gflops_per_thread": 180.0,
            "floor_ms": 12.0,
            "zone_vs_floor_ratio": 2.5,
        },
        "tail": {
            "triton_ms_median": 11.0,
            "in_process_ms_median": 10.0,
            "triton_vs_in_process_ratio": 1.1,
            "batch": 4.0,
            "batch_triton_ms_median": 42.0,
            "batch_in_process_ms_median": 40.0,
            "batch_triton_vs_in_process_ratio": 1.05,
        },
        "pipeline": {
            "with_noise": pipeline | {"bytes_per_frame": 1000.0},
            "without_noise": pipeline,
        },
        "fps_ratio_noise_vs_clean": 1.0,
        "unsplit_fps": 4.0,
        "payload": "int8",
        "fps_ratio_vs_unsplit": 1.25,
        "realtime": {
            "seconds": 40.0,
            "frames_detected": 300,
            "frames_dropped_at_source": 100,
            "per_batch_ms": 100.0,
            "worst_window_p99_ms": 250.0,
            "p99_vs_per_batch_ratio": 2.5,
            "windows": latency_windows([(0.0, 0.1), (25.0, 25.25)], 20.0),
        },
    }
    text = "\n".join(report_lines(result))
    for expected in (
        "x1.20 (goal <= 1.25)",
        "x1.040 (goal <= 1.05)",
        "x1.10 (goal <= 1.15)",
        "a batch of 4 (the pipeline's): 42.0 against 40.0 ms, x1.05",
        "x1.25 (goal >= 1.0)",
        "x2.50 of it (goal <= 3, flat)",
        "window from 20 s: 1 frames",
        "(int8 payload)",
    ):
        assert expected in text, text


def test_each_bench_run_has_topics_a_group_and_a_stream_of_its_own(
    kafka_target: KafkaTarget,  # noqa: F811
) -> None:
    """A run's detect group must not first read what an earlier run left on the broker."""
    base = load_config(None)
    config = replace(
        base,
        streams=(StreamConfig(id="clip", source="clip.mp4"),),
        kafka=replace(base.kafka, bootstrap=kafka_target.bootstrap_servers),
    )

    async def two_runs() -> tuple[VeilConfig, VeilConfig, set[str]]:
        first = await _run_config(config, "with_noise", alpha=0.8)
        second = await _run_config(config, "realtime", policy="realtime", alpha=0.8)
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_target.bootstrap_servers)
        await admin.start()
        try:
            return first, second, set(await admin.list_topics())
        finally:
            await admin.close()

    first, second, topics = asyncio.run(two_runs())
    assert first.kafka.topic_prefix != second.kafka.topic_prefix
    assert first.kafka.group_id != second.kafka.group_id
    assert first.streams[0].id != second.streams[0].id
    assert second.streams[0].policy == "realtime" and second.streams[0].alpha == 0.8
    for run in (first, second):
        assert TopicNames(run.kafka.topic_prefix).activations in topics
