"""``veil bench``: the trusted zone's cost and the pipeline's throughput on a real video.

Figures (all printed and saved as JSON, with the device):
* head+noise time per frame at the video's size (median, p99), batch 1, preprocessing
  included; the head alone likewise, and their ratio (the noise layer's overhead);
* frames per second through the whole pipeline (embedded broker, Triton tail) with noise and
  without it, and their ratio; end-to-end latency p50/p99 (capture to detection published);
* bytes per frame on the wire.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.calibrate import video_frames
from veil.config import (
    BatchingConfig,
    KafkaConfig,
    ModelConfig,
    StreamConfig,
    TritonConfig,
    VeilConfig,
)
from veil.detectors import load_detector
from veil.detectors.base import Frame, InputGeometry, SplitDetector
from veil.profiles import ProfileBank
from veil.runner import RunSummary, default_bank, ensure_profiles, run_pipeline
from workers.trusted.obfuscator import Obfuscator, ProfileTable, pick_device


@dataclass(frozen=True)
class BenchSettings:
    video: Path
    model: str = "faceboxes"
    weights: Path | None = None
    geometry: InputGeometry | None = None  # default: the video's size rounded up to the stride
    alpha: float = 0.8
    device: str = "auto"
    micro_frames: int = 50
    bank: Path | None = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def micro_timings(
    detector: SplitDetector,
    geometry: InputGeometry,
    table: ProfileTable,
    device: torch.device,
    frames: list[Frame],
    alpha: float,
) -> dict[str, Any]:
    from stream.frames import Frame as StreamFrame
    from stream.wire import Envelope

    obfuscator = Obfuscator(detector, geometry, table, device, lanes=1)
    row = torch.tensor([table.row(alpha)])

    def timed(noise: bool) -> list[float]:
        out = []
        for i, pixels in enumerate(frames):
            frame = StreamFrame(Envelope("bench", i, None, 0.0), pixels)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            act, _ = obfuscator.head_and_noise([obfuscator._pixels(frame)], row, noise=noise)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append(time.perf_counter() - t0)
            del act
        return out

    timed(True)  # warm up (allocator, kernels, caches)
    # Interleave the two so that machine noise hits both alike.
    head, head_noise = [], []
    for _ in range(2):
        head += timed(False)
        head_noise += timed(True)
    ms = 1000.0
    return {
        "frames": len(head),
        "head_ms_median": statistics.median(head) * ms,
        "head_ms_p99": percentile(head, 99) * ms,
        "head_noise_ms_median": statistics.median(head_noise) * ms,
        "head_noise_ms_p99": percentile(head_noise, 99) * ms,
        "noise_overhead_ratio": statistics.median(head_noise) / statistics.median(head),
    }


def pipeline_figures(summary: RunSummary) -> dict[str, Any]:
    dets = summary.detections
    first = min(d.capture_time for d in dets)
    last = max(d.produced_time for d in dets)
    lat = summary.latencies()
    return {
        "frames": len(dets),
        "fps": len(dets) / (last - first),
        "latency_ms_p50": percentile(lat, 50) * 1000,
        "latency_ms_p99": percentile(lat, 99) * 1000,
        "bytes_per_frame": summary.edge.bytes_published / max(1, summary.edge.frames_published),
        "lost_frames": summary.edge.frames_published - len(dets),
    }


async def _pipelines(config: VeilConfig, alpha: float) -> dict[str, dict[str, Any]]:
    from stream.broker import EmbeddedBroker
    from stream.kafka import ensure_topics
    from veil.runner import export_tail
    from workers.untrusted.triton_server import EmbeddedTriton

    geometry = InputGeometry.parse(config.model.geometry or "")
    detector = load_detector(config.model.name, Path(config.model.weights or ""), "cpu")
    repo = Path(config.triton.model_repository)
    # Serve the tail of every profile the edge may apply (the same set veil run exports).
    profiles = ProfileBank(config.profile_bank).profiles() if config.profile_bank else []
    export_tail(detector, geometry, repo, profiles)
    results: dict[str, dict[str, Any]] = {}
    async with EmbeddedBroker() as broker, EmbeddedTriton(repo) as triton:
        await ensure_topics(broker.bootstrap_servers)
        for label, a in (("without_noise", 0.0), ("with_noise", alpha)):
            stream = replace(
                config.streams[0], id=f"bench-{label}-{time.time_ns()}", alpha=a, allow_clean=a == 0
            )
            run_config = replace(
                config,
                streams=(stream,),
                kafka=replace(
                    config.kafka,
                    bootstrap=broker.bootstrap_servers,
                    idempotent=False,
                    group_id=f"bench-{label}-{time.time_ns()}",
                ),
                triton=replace(config.triton, url=triton.grpc_url),
            )
            summary = await run_pipeline(run_config, print_detections=False)
            results[label] = pipeline_figures(summary)
    return results


def run_bench(settings: BenchSettings, say: Any = print) -> dict[str, Any]:
    device = pick_device(settings.device)
    detector = load_detector(settings.model, settings.weights, device)
    frames = video_frames(settings.video, every=1)
    h, w = frames[0].shape[:2]
    stride = detector.stride
    geometry = settings.geometry or InputGeometry(
        -(-w // stride) * stride, -(-h // stride) * stride
    )
    bank = settings.bank or default_bank(detector, geometry)
    ensure_profiles(detector, geometry, bank, [settings.alpha], str(settings.video), say)
    table = ProfileTable.from_bank(detector, geometry, ProfileBank(bank), device)
    say(
        f"bench: {detector.name} at {geometry} on {device_name(device)}; {len(frames)} frames "
        f"of {w}x{h} from {settings.video}"
    )
    micro = micro_timings(
        detector, geometry, table, device, frames[: settings.micro_frames], settings.alpha
    )
    say(
        f"head+noise per {w}x{h} frame: median {micro['head_noise_ms_median']:.2f} ms, "
        f"p99 {micro['head_noise_ms_p99']:.2f} ms (seed: 5.07 ms on a V100)"
    )
    say(
        f"head alone: median {micro['head_ms_median']:.2f} ms, p99 {micro['head_ms_p99']:.2f} ms;"
        f" noise overhead x{micro['noise_overhead_ratio']:.3f}"
    )
    config = VeilConfig(
        model=ModelConfig(
            settings.model,
            str(settings.weights) if settings.weights else None,
            str(geometry),
            settings.device,
        ),
        profile_bank=str(bank),
        streams=(StreamConfig(id="bench", source=str(settings.video), policy="lossless"),),
        kafka=KafkaConfig(),
        batching=BatchingConfig(max_batch=4, max_wait_ms=20),
        triton=TritonConfig(model_repository=str(Path("runs") / f"bench-repo-{detector.name}")),
    )
    pipes = asyncio.run(_pipelines(config, settings.alpha))
    wn, won = pipes["with_noise"], pipes["without_noise"]
    say(
        f"pipeline fps: with noise {wn['fps']:.2f}, without {won['fps']:.2f} "
        f"(ratio {wn['fps'] / won['fps']:.3f})"
    )
    say(
        f"end-to-end latency with noise: p50 {wn['latency_ms_p50']:.0f} ms, "
        f"p99 {wn['latency_ms_p99']:.0f} ms; without: p50 {won['latency_ms_p50']:.0f} ms, "
        f"p99 {won['latency_ms_p99']:.0f} ms"
    )
    say(f"bytes per frame on the wire: {wn['bytes_per_frame']:,.0f} (float16 payload)")
    return {
        "device": device_name(device),
        "model": detector.name,
        "geometry": str(geometry),
        "video": str(settings.video),
        "frame_size": f"{w}x{h}",
        "alpha": settings.alpha,
        "micro": micro,
        "pipeline": pipes,
        "fps_ratio_noise_vs_clean": wn["fps"] / won["fps"],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
