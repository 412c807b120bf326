"""``veil bench``: the trusted zone's cost and the pipeline's throughput on a real video.

Figures (all printed and saved as JSON, with the device, the thread counts and the load):
* the trusted zone per frame at the video's size (median, p99, batch 1): letterbox + head +
  noise + wire encoding, against onnxruntime running the same head alone (goal <= 1.25x)
  and against a FLOP floor (the head's FLOPs over this CPU's matmul rate per thread);
* head+noise against the head alone, letterbox included in both (goal <= 1.05x);
* the tail through Triton against the same TorchScript tail in process, same threads
  (goal <= 1.15x);
* frames per second through the whole pipeline (embedded broker, Triton tail) with noise and
  without it, against the same detector unsplit in this process with plain PyTorch on the
  same frames, decoding included (goal >= 1.0x); end-to-end latency p50/p99 (capture to
  detection published);
* a ``realtime`` stream (the video looped, paced to its frame rate) for ``realtime_s``:
  latency p50/p99 per 20-second window against the per-batch processing time (head+noise plus
  the Triton tail, per batch, as measured in that run; goal p99 <= 3x, flat);
* bytes per frame on the wire.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream.frames import Frame as StreamFrame
from stream.kafka import TopicNames, ensure_topics
from stream.wire import ActivationMessage, Envelope, FramePlacement, Quantisation, encode
from veil.calibrate import video_frames
from veil.config import (
    BatchingConfig,
    KafkaConfig,
    ModelConfig,
    StreamConfig,
    ThreadsConfig,
    TritonConfig,
    VeilConfig,
)
from veil.detectors import load_detector
from veil.detectors.base import Frame, InputGeometry, SplitDetector
from veil.detectors.head_runtime import HeadRunner, OnnxHead
from veil.profiles import ProfileBank
from veil.runner import (
    EMBEDDED_DETECTIONS_RETENTION_MS,
    default_bank,
    ensure_profiles,
    run_pipeline,
)
from workers.trusted.obfuscator import Obfuscator, ProfileTable, pick_device

MS = 1000.0
_DISTINCT_INPUTS = 16  # onnxruntime's own inputs: 78 MB at 640x640, 400 MB at 1920x1088
# veil run's roles on one host: the edge's share of the cores is what the figures use.
PIPELINE_GROUP = frozenset({"edge", "detect", "triton"})


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
    head_runtime: str = "auto"  # model.head_runtime of the zone measured
    threads: int | None = None  # the zone's and Triton's threads; default: veil run's shares
    realtime_s: float = 120.0  # the realtime run's length (0: none)
    window_s: float = 20.0  # its latency windows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _synchroniser(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _seconds(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


def head_gflop(detector: SplitDetector, geometry: InputGeometry) -> float:
    """The head's floating-point operations for one input (convolutions and matmuls, a
    multiply-add counted as two), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = torch.zeros(1, 3, geometry.height, geometry.width, device=detector.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        detector.head(probe)
    return float(counter.get_total_flops()) / 1e9


def matmul_gflops_per_thread(n: int = 1024, repeats: int = 7) -> float:
    """This CPU's float32 matmul rate on one thread (the best of ``repeats``), GFLOP/s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    try:
        best = min(_seconds(lambda: a @ b, lambda: None) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)
    return 2 * n**3 / best / 1e9


def _encoded_zone(
    obfuscator: Obfuscator, pixels: Frame, alpha: float, i: int, payload: Quantisation
) -> int:
    """What the edge does for one frame: letterbox, head, noise, wire encoding in the
    pipeline's ``kafka.payload``; bytes."""
    (r,) = obfuscator.run([StreamFrame(Envelope("bench", i, None, 0.0), pixels)], [alpha])
    message = ActivationMessage(
        r.envelope,
        r.provenance,
        placement=FramePlacement.from_letterbox(r.letterbox, obfuscator.geometry),
        payload=r.activation,
        quantisation=payload,
    )
    return len(encode(message)[1])


def zone_steps(
    obfuscator: Obfuscator,
    reference: HeadRunner,
    alpha: float,
    inputs: list[torch.Tensor],
    payload: Quantisation,
) -> dict[str, Callable[[Frame, int], object]]:
    """The steps timed on every frame, by name. onnxruntime alone reads frame i's letterboxed
    input from ``inputs`` (cycled), not one input again and again, which stays in the cache
    (it ran 1 ms faster than fresh ones at 640x640)."""
    row = [obfuscator.table.row(alpha)]
    return {
        "head": lambda f, i: obfuscator.head_and_noise([f], row, noise=False),
        "head_noise": lambda f, i: obfuscator.head_and_noise([f], row),
        "zone": lambda f, i: _encoded_zone(obfuscator, f, alpha, i, payload),
        "onnxruntime_head": lambda f, i: reference(inputs[i % len(inputs)]),
    }


def micro_timings(
    obfuscator: Obfuscator,
    reference: HeadRunner,
    frames: list[Frame],
    alpha: float,
    payload: Quantisation,
) -> dict[str, Any]:
    """Median and p99 ms of each of :func:`zone_steps` (the wire in ``payload``, the
    pipeline's), interleaved frame by frame so that the machine's noise hits them alike; one
    warm-up pass first."""
    sync = _synchroniser(obfuscator.device)
    # onnxruntime's own inputs (CPU): more than the caches hold, as fresh frames are.
    inputs = [obfuscator.letterbox([f])[0].cpu().clone() for f in frames[:_DISTINCT_INPUTS]]
    steps = zone_steps(obfuscator, reference, alpha, inputs, payload)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(3):
        for i, pixels in enumerate(frames):
            torch.set_num_threads(obfuscator.threads)
            for name, step in steps.items():
                seconds = _seconds(partial(step, pixels, i), sync)
                if rep:  # the first pass warms allocators, kernels and caches
                    times[name].append(seconds)
    out: dict[str, Any] = {"frames": len(times["head"])}
    for name, values in times.items():
        out[f"{name}_ms_median"] = statistics.median(values) * MS
        out[f"{name}_ms_p99"] = percentile(values, 99) * MS
    out["noise_overhead_ratio"] = out["head_noise_ms_median"] / out["head_ms_median"]
    out["zone_vs_onnxruntime_ratio"] = out["zone_ms_median"] / out["onnxruntime_head_ms_median"]
    return out


def floor_figures(
    detector: SplitDetector, geometry: InputGeometry, threads: int, zone_ms: float
) -> dict[str, float]:
    gflop = head_gflop(detector, geometry)
    rate = matmul_gflops_per_thread()
    floor_ms = gflop / (rate * threads) * MS
    return {
        "head_gflop": gflop,
        "gflops_per_thread": rate,
        "floor_ms": floor_ms,
        "zone_vs_floor_ratio": zone_ms / floor_ms,
    }


async def tail_timings(
    url: str, repo: Path, activations: np.ndarray[Any, Any], threads: int, repeats: int = 60
) -> dict[str, float]:
    """Float16 activations through the clean tail on Triton and through the same TorchScript
    in this process with Triton's thread count, interleaved (median ms): one frame, and the
    whole batch ``activations`` (the pipeline's batch size)."""
    from workers.untrusted.tail_client import TritonTail
    from workers.untrusted.triton_repo import TORCHSCRIPT_FILE, TailManifest

    manifest = TailManifest.read(repo)
    path = repo / manifest.python_model / "1" / TORCHSCRIPT_FILE
    local_tail = torch.jit.load(str(path)).eval()  # type: ignore[no-untyped-call]
    out: dict[str, float] = {"batch": float(len(activations))}
    async with TritonTail(url, manifest.python_model, manifest) as tail:
        for prefix, batch in (("", activations[:1]), ("batch_", activations)):
            served: list[float] = []
            local: list[float] = []
            x = torch.from_numpy(batch)
            for rep in range(repeats // len(batch) + 1):
                started = time.perf_counter()
                await tail.infer(batch)
                middle = time.perf_counter()
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    local_tail(x)
                if rep:  # the first of each warms up
                    served.append(middle - started)
                    local.append(time.perf_counter() - middle)
            triton_ms, local_ms = statistics.median(served) * MS, statistics.median(local) * MS
            out[f"{prefix}triton_ms_median"] = triton_ms
            out[f"{prefix}in_process_ms_median"] = local_ms
            out[f"{prefix}triton_vs_in_process_ratio"] = triton_ms / local_ms
    return out


def unsplit_fps(detector: SplitDetector, geometry: InputGeometry, video: Path, batch: int) -> float:
    """Frames per second of the same detector, head and tail in this process with plain
    PyTorch (torch's own thread count), decoding the video included: the peer of the
    pipeline's throughput."""
    from veil.inference import make_detect_fn

    detect = make_detect_fn(detector, geometry, None, score_threshold=0.5)
    started = time.perf_counter()
    frames = video_frames(video, every=1)
    for i in range(0, len(frames), batch):
        detect(frames[i : i + batch])
    return len(frames) / (time.perf_counter() - started)


def latency_windows(times: list[tuple[float, float]], window_s: float) -> list[dict[str, float]]:
    """End-to-end latency p50/p99 per ``window_s`` of capture time (ms), with frame counts."""
    if not times:
        return []
    start = min(c for c, _ in times)
    buckets: dict[int, list[float]] = {}
    for capture, produced in times:
        buckets.setdefault(int((capture - start) // window_s), []).append(produced - capture)
    return [
        {
            "from_s": k * window_s,
            "frames": len(v),
            "p50_ms": percentile(v, 50) * MS,
            "p99_ms": percentile(v, 99) * MS,
        }
        for k, v in sorted(buckets.items())
    ]


def _histogram_mean(name: str, before: tuple[float, float]) -> float:
    """The mean of a veil histogram's observations since ``before`` (its sum and count)."""
    total, count = (now - then for now, then in zip(_histogram_totals(name), before, strict=True))
    return total / count if count else float("nan")


def _histogram_totals(name: str) -> tuple[float, float]:
    from prometheus_client import REGISTRY

    return (
        REGISTRY.get_sample_value(f"{name}_sum") or 0.0,
        REGISTRY.get_sample_value(f"{name}_count") or 0.0,
    )


async def _realtime(
    config: VeilConfig, alpha: float, seconds: float, window_s: float
) -> dict[str, Any]:
    """A realtime stream of the video, looped and paced, for ``seconds``."""
    run_config = await _run_config(
        config, "realtime", policy="realtime", pace=True, loop=True, alpha=alpha
    )
    stream = run_config.streams[0]
    times: list[tuple[float, float]] = []
    stop = asyncio.Event()
    before = {n: _histogram_totals(n) for n in ("veil_head_noise_seconds", "veil_triton_seconds")}
    loop = asyncio.get_running_loop()
    loop.call_later(seconds, stop.set)
    summary = await run_pipeline(
        run_config,
        print_detections=False,
        stop=stop,
        on_detection=lambda d: times.append((d.capture_time, d.produced_time)),
    )
    per_batch = sum(_histogram_mean(n, b) for n, b in before.items())
    windows = latency_windows(times, window_s)
    worst_p99 = max((w["p99_ms"] for w in windows), default=float("nan"))
    return {
        "seconds": seconds,
        "frames_detected": len(times),
        "frames_dropped_at_source": _dropped(stream.id),
        "per_batch_ms": per_batch * MS,
        "windows": windows,
        "worst_window_p99_ms": worst_p99,
        "p99_vs_per_batch_ratio": worst_p99 / (per_batch * MS),
        "flow_wait_s": summary.edge.flow_wait_s,
    }


def _dropped(stream_id: str) -> int:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("veil_frames_dropped_total", {"stream": stream_id})
    return int(value or 0)


def pipeline_figures(
    times: list[tuple[float, float]], frames_published: int, bytes_published: int
) -> dict[str, Any]:
    """From (capture, produced) times of every detection: fps and end-to-end latency."""
    first = min(c for c, _ in times)
    last = max(p for _, p in times)
    latencies = [p - c for c, p in times]
    return {
        "frames": len(times),
        "fps": len(times) / (last - first),
        "latency_ms_p50": percentile(latencies, 50) * MS,
        "latency_ms_p99": percentile(latencies, 99) * MS,
        "bytes_per_frame": bytes_published / max(1, frames_published),
        "lost_frames": frames_published - len(times),
    }


async def _run_config(config: VeilConfig, label: str, **stream: Any) -> VeilConfig:
    """``config`` for one run of its first stream (changed by ``stream``), on topics and a
    group of the run's own: a run's detect group must not first work through the records an
    earlier run left on the same broker (measured: 4.5 s before a realtime run's first frame)."""
    run_id = f"bench-{label}-{time.time_ns()}"
    run = replace(
        config,
        streams=(replace(config.streams[0], id=run_id, **stream),),
        kafka=replace(config.kafka, group_id=run_id, topic_prefix=run_id),
    )
    await ensure_topics(
        run.kafka.bootstrap,
        topics=TopicNames(run_id),
        detections_retention_ms=EMBEDDED_DETECTIONS_RETENTION_MS,  # as veil run's broker
    )
    return run


async def _pipeline(config: VeilConfig, label: str, alpha: float) -> dict[str, Any]:
    """One ``veil run`` of the first stream at ``alpha`` on the broker and Triton given."""
    run_config = await _run_config(config, label, alpha=alpha, allow_clean=not alpha)
    times: list[tuple[float, float]] = []
    summary = await run_pipeline(
        run_config,
        print_detections=False,
        on_detection=lambda d: times.append((d.capture_time, d.produced_time)),
    )
    return pipeline_figures(times, summary.edge.frames_published, summary.edge.bytes_published)


async def _served(
    config: VeilConfig,
    alpha: float,
    activations: np.ndarray[Any, Any],
    triton_threads: int,
    realtime_s: float = 0.0,
    window_s: float = 20.0,
) -> dict[str, dict[str, Any]]:
    """On one embedded broker and Triton: the tail's timings, then the pipelines."""
    from stream.broker import EmbeddedBroker
    from veil.runner import export_tail
    from workers.untrusted.triton_server import EmbeddedTriton

    geometry = InputGeometry.parse(config.model.geometry or "")
    weights = config.model.weights
    detector = load_detector(config.model.name, Path(weights) if weights else None, "cpu")
    repo = Path(config.triton.model_repository or "")
    # Serve the tail of every profile the edge may apply (the same set veil run exports).
    profiles = ProfileBank(config.profile_bank).profiles() if config.profile_bank else []
    export_tail(detector, geometry, repo, profiles)
    results: dict[str, dict[str, Any]] = {}
    async with EmbeddedBroker() as broker, EmbeddedTriton(repo, threads=triton_threads) as triton:
        results["tail"] = await tail_timings(triton.grpc_url, repo, activations, triton_threads)
        served = replace(
            config,
            kafka=replace(config.kafka, bootstrap=broker.bootstrap_servers, idempotent=False),
            triton=replace(config.triton, url=triton.grpc_url),
        )
        for label, a in (("without_noise", 0.0), ("with_noise", alpha)):
            results[label] = await _pipeline(served, label, a)
        if realtime_s > 0:
            results["realtime"] = await _realtime(served, alpha, realtime_s, window_s)
    return results


def _zone(settings: BenchSettings, say: Any) -> tuple[Obfuscator, list[Frame], dict[str, Any]]:
    """The detector, frames and trusted zone of a bench run (profiles calibrated if missing)."""
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
    threads = settings.threads or ThreadsConfig().for_role("edge", PIPELINE_GROUP)
    obfuscator = Obfuscator(
        detector, geometry, table, device, 1, head_runtime=settings.head_runtime, threads=threads
    )
    info = {
        "device": device_name(device),
        "model": detector.name,
        "geometry": str(geometry),
        "video": str(settings.video),
        "frame_size": f"{w}x{h}",
        "alpha": settings.alpha,
        "bank": str(bank),
        "head_runtime": obfuscator.head.name,
        "threads": {
            "edge": threads,
            "triton": settings.threads or ThreadsConfig().for_role("triton", PIPELINE_GROUP),
            "detect": settings.threads or ThreadsConfig().for_role("detect", PIPELINE_GROUP),
        },
    }
    return obfuscator, frames, info


def _pipeline_config(settings: BenchSettings, info: dict[str, Any]) -> VeilConfig:
    threads = info["threads"]
    return VeilConfig(
        model=ModelConfig(
            settings.model,
            str(settings.weights) if settings.weights else None,
            info["geometry"],
            settings.device,
            head_runtime=info["head_runtime"],  # type: ignore[arg-type]
        ),
        profile_bank=info["bank"],
        streams=(
            StreamConfig(id="bench", source=str(settings.video), policy="lossless", pace=False),
        ),
        kafka=KafkaConfig(),
        batching=BatchingConfig(max_batch=4, max_wait_ms=20),
        triton=TritonConfig(model_repository=str(Path("runs") / f"bench-repo-{info['model']}")),
        threads=ThreadsConfig(threads["edge"], threads["detect"], threads["triton"]),
    )


def run_bench(settings: BenchSettings, say: Any = print) -> dict[str, Any]:
    obfuscator, frames, info = _zone(settings, say)
    say(
        f"bench: {info['model']} at {info['geometry']} on {info['device']}, head through "
        f"{info['head_runtime']}; threads {info['threads']}; {load_line()}; {len(frames)} "
        f"frames of {info['frame_size']} from {settings.video}"
    )
    threads = info["threads"]["edge"]
    reference = OnnxHead(obfuscator.detector, obfuscator.geometry, threads)
    config = _pipeline_config(settings, info)
    micro = micro_timings(
        obfuscator,
        reference,
        frames[: settings.micro_frames],
        settings.alpha,
        config.kafka.payload,
    )
    floor = floor_figures(
        obfuscator.detector, obfuscator.geometry, threads, micro["zone_ms_median"]
    )
    batch = config.batching.max_batch
    rows = [obfuscator.table.row(settings.alpha)] * batch
    activations = obfuscator.head_and_noise(frames[:batch], rows)[0].cpu().numpy()
    served = asyncio.run(
        _served(
            config,
            settings.alpha,
            activations.astype(np.float16),
            info["threads"]["triton"],
            settings.realtime_s,
            settings.window_s,
        )
    )
    unsplit = unsplit_fps(
        obfuscator.detector, obfuscator.geometry, settings.video, config.batching.max_batch
    )
    result = {
        **info,
        "micro": micro,
        "floor": floor,
        "tail": served.pop("tail"),
        "realtime": served.pop("realtime", None),
        "pipeline": served,
        "unsplit_fps": unsplit,
        "payload": config.kafka.payload,
        "fps_ratio_vs_unsplit": served["with_noise"]["fps"] / unsplit,
        "fps_ratio_noise_vs_clean": served["with_noise"]["fps"] / served["without_noise"]["fps"],
        "load_average_after": list(os.getloadavg()),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for line in report_lines(result):
        say(line)
    return result


def report_lines(result: dict[str, Any]) -> list[str]:
    """The figures of a :func:`run_bench` result, each with its goal."""
    m, f, t = result["micro"], result["floor"], result["tail"]
    wn, won = result["pipeline"]["with_noise"], result["pipeline"]["without_noise"]
    size = result["frame_size"]
    return [
        f"trusted zone per {size} frame (letterbox + head + noise + encode): median "
        f"{m['zone_ms_median']:.1f} ms, p99 {m['zone_ms_p99']:.1f} ms "
        "(seed: 5.07 ms on a V100)",
        f"onnxruntime, the same head alone: median {m['onnxruntime_head_ms_median']:.1f} ms; "
        f"zone / onnxruntime x{m['zone_vs_onnxruntime_ratio']:.2f} (goal <= 1.25)",
        f"FLOP floor: {f['head_gflop']:.2f} GFLOP at {result['geometry']} over "
        f"{f['gflops_per_thread']:.0f} GFLOP/s per thread x {result['threads']['edge']} = "
        f"{f['floor_ms']:.1f} ms; zone / floor x{f['zone_vs_floor_ratio']:.2f}",
        f"head alone (letterbox included): median {m['head_ms_median']:.1f} ms; head + noise "
        f"{m['head_noise_ms_median']:.1f} ms; noise x{m['noise_overhead_ratio']:.3f} "
        "(goal <= 1.05)",
        f"tail through Triton, one frame: median {t['triton_ms_median']:.1f} ms; in process "
        f"{t['in_process_ms_median']:.1f} ms; x{t['triton_vs_in_process_ratio']:.2f} "
        f"(goal <= 1.15); a batch of {t['batch']:.0f} (the pipeline's): "
        f"{t['batch_triton_ms_median']:.1f} against {t['batch_in_process_ms_median']:.1f} ms, "
        f"x{t['batch_triton_vs_in_process_ratio']:.2f}",
        f"pipeline fps: with noise {wn['fps']:.2f}, without {won['fps']:.2f} "
        f"(ratio {result['fps_ratio_noise_vs_clean']:.3f}); the same detector unsplit in "
        f"process {result['unsplit_fps']:.2f}: pipeline / unsplit "
        f"x{result['fps_ratio_vs_unsplit']:.2f} (goal >= 1.0)",
        f"end-to-end latency with noise: p50 {wn['latency_ms_p50']:.0f} ms, p99 "
        f"{wn['latency_ms_p99']:.0f} ms; without: p50 {won['latency_ms_p50']:.0f} ms, "
        f"p99 {won['latency_ms_p99']:.0f} ms",
        *_realtime_lines(result.get("realtime")),
        f"bytes per frame on the wire: {wn['bytes_per_frame']:,.0f} ({result['payload']} payload); "
        + load_line(),
    ]


def _realtime_lines(rt: dict[str, Any] | None) -> list[str]:
    if not rt:
        return []
    lines = [
        f"realtime stream, {rt['seconds']:.0f} s: {rt['frames_detected']} frames detected, "
        f"{rt['frames_dropped_at_source']} dropped at the source; per-batch processing "
        f"{rt['per_batch_ms']:.0f} ms; worst window p99 {rt['worst_window_p99_ms']:.0f} ms = "
        f"x{rt['p99_vs_per_batch_ratio']:.2f} of it (goal <= 3, flat)"
    ]
    lines += [
        f"  window from {w['from_s']:.0f} s: {w['frames']} frames, p50 {w['p50_ms']:.0f} ms, "
        f"p99 {w['p99_ms']:.0f} ms"
        for w in rt["windows"]
    ]
    return lines


def save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
