"""In-process inference through the split: the reference path for benchmarks and tests.

``head -> noise -> tail -> decode`` exactly as the deployed pipeline runs it, without the
network in between.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from veil.detections import Detections
from veil.detectors.base import Frame, InputGeometry, Letterbox, SplitDetector
from veil.eval import DetectFn
from veil.noise import NoiseLayer, NoiseSource, noise_source
from veil.profiles import NoiseProfile


class HeadCache:
    """Remembers the head's output for the last batch (by identity of the frames list).

    The detector is frozen, so the clean activation of a batch is the same for the clean run,
    every alpha and every noise draw: benchmarks that evaluate many profiles on the same
    batch pay for the head once.
    """

    def __init__(self) -> None:
        self._frames: list[Frame] | None = None
        self._value: tuple[Tensor, list[Letterbox], tuple[int, int]] | None = None

    def get(
        self, detector: SplitDetector, frames: list[Frame], geometry: InputGeometry
    ) -> tuple[Tensor, list[Letterbox], tuple[int, int]]:
        if self._frames is not frames or self._value is None:
            x, letterboxes = detector.preprocess(frames, geometry)
            self._value = (detector.head(x), letterboxes, (x.shape[2], x.shape[3]))
            self._frames = frames
        return self._value


def make_detect_fn(
    detector: SplitDetector,
    geometry: InputGeometry | None = None,
    profile: NoiseProfile | None = None,
    score_threshold: float = 0.05,
    seed: int | None = None,
    head_cache: HeadCache | None = None,
    wire: Literal["float16", "int8"] | None = None,
) -> DetectFn:
    """A batched detector; with a profile, every call draws fresh noise and the profile's tail
    (when it carries one) reads it.

    ``seed`` fixes the noise stream (tests and reproducible benchmarks); ``None`` seeds from
    the operating system's entropy, as serving does. ``wire``: the activation goes through the
    wire's payload encoding first (float16, or per-channel int8 as ``kafka.payload: int8``
    sends it), as the outside receives it; None: as computed.
    """
    geometry = geometry or detector.default_geometry
    detector.check_geometry(geometry)
    cache = head_cache or HeadCache()
    layer: NoiseLayer | None = None
    noise: NoiseSource | None = None
    tail_model = detector
    if profile is not None:
        profile.check_fits(
            detector.name, detector.weights_id, geometry, detector.activation_shape(geometry)
        )
        layer = profile.layer(detector.device)
        tail_model = profile.detector_for(detector)
        noise = noise_source(detector.device, seed)

    @torch.no_grad()
    def detect(frames: list[Frame]) -> list[Detections]:
        a, letterboxes, (h, w) = cache.get(detector, frames, geometry)
        if layer is not None:
            a = layer(a, noise)
        if wire is not None:
            a = through_wire(a, wire)
        return detector.decode(tail_model.tail(a), letterboxes, h, w, score_threshold)

    return detect


def through_wire(activations: Tensor, wire: Literal["float16", "int8"]) -> Tensor:
    """``[N, C, H, W]`` activations as the outside decodes them from the wire's payload."""
    if wire == "float16":
        return activations.half().float()
    from stream.wire import dequantise_int8, quantise_int8

    out = []
    for a in activations.cpu().numpy():
        out.append(torch.from_numpy(dequantise_int8(*quantise_int8(a))))
    return torch.stack(out).to(activations.device)
