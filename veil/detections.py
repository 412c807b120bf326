"""The one detection type used everywhere: in-process models, the wire, evaluation and reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Detections:
    """Face boxes of one frame, in that frame's pixel coordinates.

    ``xyxy`` is ``[K, 4]`` (x1, y1, x2, y2) and ``confidence`` is ``[K]``, sorted by
    descending confidence. Flat arrays rather than a list of objects, as in supervision, so
    that metrics and drawing are vectorised.
    """

    xyxy: FloatArray
    confidence: FloatArray
    landmarks: FloatArray | None = field(default=None)  # [K, 5, 2] where the model predicts them

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        conf = np.asarray(self.confidence, dtype=np.float32).reshape(-1)
        if len(xyxy) != len(conf):
            raise ValueError(f"Detections: {len(xyxy)} boxes but {len(conf)} confidences")
        object.__setattr__(self, "xyxy", xyxy)
        object.__setattr__(self, "confidence", conf)
        if self.landmarks is not None:
            lm = np.asarray(self.landmarks, dtype=np.float32).reshape(-1, 5, 2)
            if len(lm) != len(conf):
                raise ValueError(f"Detections: {len(lm)} landmark sets but {len(conf)} boxes")
            object.__setattr__(self, "landmarks", lm)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))

    def __len__(self) -> int:
        return int(self.confidence.shape[0])

    def above(self, threshold: float) -> Detections:
        """Only the detections whose confidence is at least ``threshold``."""
        keep = self.confidence >= threshold
        lm = None if self.landmarks is None else self.landmarks[keep]
        return Detections(self.xyxy[keep], self.confidence[keep], lm)

    def to_json(self, decimals: int = 2) -> dict[str, Any]:
        return {
            "boxes": np.round(self.xyxy.astype(np.float64), decimals).tolist(),
            "scores": np.round(self.confidence.astype(np.float64), 4).tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Detections:
        try:
            boxes = np.asarray(data["boxes"], dtype=np.float32).reshape(-1, 4)
            scores = np.asarray(data["scores"], dtype=np.float32).reshape(-1)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"not a detections record: {exc}") from exc
        return cls(boxes, scores)
