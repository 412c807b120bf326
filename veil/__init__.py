"""veil: confidential face detection on video. The Python API is :mod:`veil.api`, re-exported
here (``veil.open_bank()``, ``veil.demo_frame()``, ...) and imported on first use, so that
``import veil`` and the command line stay light."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from veil.api import (
        DEFAULT_ALPHA,
        Bank,
        Detections,
        Obfuscated,
        Preview,
        calibrate_bank,
        demo_frame,
        draw,
        open_bank,
        open_decoder,
        open_detector,
        read_frame,
    )

__all__ = [
    "DEFAULT_ALPHA",
    "Bank",
    "Detections",
    "Obfuscated",
    "Preview",
    "calibrate_bank",
    "demo_frame",
    "draw",
    "open_bank",
    "open_decoder",
    "open_detector",
    "read_frame",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("veil.api"), name)
    raise AttributeError(f"module 'veil' has no attribute {name!r}")
