"""Where tests and benchmarks find the reference data. The product itself never needs it."""

from __future__ import annotations

import os
from pathlib import Path

from veil.errors import DatasetError

DATA_ENV = "VEIL_DATA"


def data_root(required: bool = True) -> Path | None:
    """``$VEIL_DATA``, else ``../shared/data`` beside the checkout, if it exists."""
    env = os.environ.get(DATA_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    if required:
        raise DatasetError(
            f"reference data not found: set {DATA_ENV} to the folder that holds fddb/, "
            f"widerface/, faceboxes/ and videos/ (tried {', '.join(map(str, candidates))})"
        )
    return None


def reference_weights(model: str) -> Path | None:
    """The reference data's checkpoint for ``model`` (every FaceBoxes split reads
    ``faceboxes/FaceBoxesProd.pth``), or None for a model whose weights ship with veil."""
    if not model.strip().lower().startswith("faceboxes"):
        return None
    root = data_root()
    assert root is not None  # data_root raises when the data is absent
    return root / "faceboxes" / "FaceBoxesProd.pth"
