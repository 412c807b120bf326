"""In-process inference through the split: the reference path for benchmarks and tests.

``head -> noise -> tail -> decode`` exactly as the deployed pipeline runs it, without the
network in between.
"""

from __future__ import annotations

import torch

from veil.detections import Detections
from veil.detectors.base import Frame, InputGeometry, SplitDetector
from veil.eval import DetectFn
from veil.noise import NoiseLayer, entropy_generator
from veil.profiles import NoiseProfile


def make_detect_fn(
    detector: SplitDetector,
    geometry: InputGeometry | None = None,
    profile: NoiseProfile | None = None,
    score_threshold: float = 0.05,
    seed: int | None = None,
) -> DetectFn:
    """A batched detector; with a profile, every call draws fresh noise.

    ``seed`` fixes the noise stream (tests and reproducible benchmarks); ``None`` seeds from
    the operating system's entropy, as serving does.
    """
    geometry = geometry or detector.default_geometry
    detector.check_geometry(geometry)
    layer: NoiseLayer | None = None
    generator: torch.Generator | None = None
    if profile is not None:
        profile.check_fits(detector.name, detector.weights_id, geometry)
        layer = profile.layer(detector.device)
        if seed is None:
            generator = entropy_generator(detector.device)
        else:
            generator = torch.Generator(detector.device).manual_seed(seed)

    @torch.no_grad()
    def detect(frames: list[Frame]) -> list[Detections]:
        x, letterboxes = detector.preprocess(frames, geometry)
        a = detector.head(x)
        if layer is not None:
            a = layer(a, generator)
        raw = detector.tail(a)
        return detector.decode(raw, letterboxes, x.shape[2], x.shape[3], score_threshold)

    return detect
