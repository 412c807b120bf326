"""How much of a frame a reconstruction recovers: SSIM, PSNR, face crops, face re-detection.

Images are ``H x W`` or ``H x W x C`` arrays, either uint8 (0..255) or floating point in
[0, 1]; both are compared on the [0, 1] scale. Colour images are scored per channel and
averaged, so the channel order (veil works in BGR) does not matter.

SSIM follows Wang et al. 2004 exactly as their reference implementation and scikit-image
(``gaussian_weights=True, use_sample_covariance=False``) compute it: an 11x11 Gaussian window
with sigma 1.5, K1 = 0.01, K2 = 0.03, mean over the pixels whose window lies inside the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter

from veil.detections import Detections
from veil.detectors.base import Frame, InputGeometry
from veil.errors import ConfigError, DatasetError

Image = npt.NDArray[Any]
BoxArray = npt.NDArray[np.float32]  # [K, 4] x1 y1 x2 y2 in the image's pixels

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11x11 window: 3.5 sigma, as scikit-image truncates it
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# Faces smaller than this are grown around their centre for the crop metrics, so that the
# SSIM window fits inside every crop.
MIN_CROP_SIDE = 2 * SSIM_RADIUS + 1


def as_unit_float(image: Image, name: str = "image") -> npt.NDArray[np.float64]:
    """uint8 or [0, 1] float -> float64 in [0, 1]; anything else is refused by name."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ConfigError(f"{name}: expected uint8 or floating point pixels, got {array.dtype}")
    if array.size and (float(array.min()) < -1e-6 or float(array.max()) > 1 + 1e-6):
        raise ConfigError(
            f"{name}: floating point pixels must lie in [0, 1], got "
            f"[{float(array.min()):.3g}, {float(array.max()):.3g}]"
        )
    return array.astype(np.float64)


def _pair(a: Image, b: Image) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    x, y = as_unit_float(a, "first image"), as_unit_float(b, "second image")
    if x.shape != y.shape:
        raise ConfigError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.ndim not in (2, 3):
        raise ConfigError(f"expected an HxW or HxWxC image, got shape {x.shape}")
    return x, y


def ssim(a: Image, b: Image) -> float:
    """Mean structural similarity of two same-sized images (1.0 exactly for identical ones)."""
    x, y = _pair(a, b)
    if min(x.shape[:2]) < MIN_CROP_SIDE:
        raise ConfigError(
            f"SSIM needs images of at least {MIN_CROP_SIDE}x{MIN_CROP_SIDE} pixels, got "
            f"{x.shape[1]}x{x.shape[0]}"
        )
    if x.ndim == 2:
        return _ssim_channel(x, y)
    return float(np.mean([_ssim_channel(x[..., c], y[..., c]) for c in range(x.shape[2])]))


def _ssim_channel(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> float:
    def blur(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        out: npt.NDArray[np.float64] = gaussian_filter(
            v, SSIM_SIGMA, truncate=SSIM_RADIUS / SSIM_SIGMA, mode="reflect"
        )
        return out

    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    r = SSIM_RADIUS
    return float(index[r:-r, r:-r].mean())


def psnr(a: Image, b: Image) -> float:
    """Peak signal-to-noise ratio in dB on the [0, 1] scale; ``inf`` for identical images."""
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def face_crops(shape: tuple[int, ...], boxes: BoxArray) -> list[tuple[int, int, int, int]]:
    """Integer crop windows ``(x1, y1, x2, y2)`` for face boxes inside an image of ``shape``.

    Boxes are clipped to the image; boxes that fall entirely outside are dropped; crops smaller
    than the SSIM window are grown around their centre (and shifted back inside the image).
    """
    height, width = int(shape[0]), int(shape[1])
    if min(height, width) < MIN_CROP_SIDE:
        raise ConfigError(f"image of {width}x{height} pixels is too small for face crops")
    crops: list[tuple[int, int, int, int]] = []
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        cx1, cy1 = max(0.0, x1), max(0.0, y1)
        cx2, cy2 = min(float(width), x2), min(float(height), y2)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        left, right = _span(cx1, cx2, width)
        top, bottom = _span(cy1, cy2, height)
        crops.append((left, top, right, bottom))
    return crops


def _span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    start, stop = math.floor(lo), math.ceil(hi)
    if stop - start < MIN_CROP_SIDE:
        centre = (lo + hi) / 2
        start = round(centre - MIN_CROP_SIDE / 2)
        stop = start + MIN_CROP_SIDE
    shift = max(0, -start) - max(0, stop - limit)
    return start + shift, stop + shift


def face_ssim(a: Image, b: Image, boxes: BoxArray) -> list[float]:
    """SSIM of each face crop (see :func:`face_crops`); one value per face inside the image."""
    x, y = _pair(a, b)
    return [ssim(x[y1:y2, x1:x2], y[y1:y2, x1:x2]) for x1, y1, x2, y2 in face_crops(x.shape, boxes)]


def face_psnr(a: Image, b: Image, boxes: BoxArray) -> list[float]:
    """PSNR of each face crop (see :func:`face_crops`); one value per face inside the image."""
    x, y = _pair(a, b)
    return [psnr(x[y1:y2, x1:x2], y[y1:y2, x1:x2]) for x1, y1, x2, y2 in face_crops(x.shape, boxes)]


class FaceDetector(Protocol):
    """Anything that finds faces in BGR frames, as :meth:`SplitDetector.detect` does."""

    def detect(
        self,
        frames: Sequence[Frame],
        geometry: InputGeometry | None = None,
        score_threshold: float = 0.05,
    ) -> list[Detections]: ...


def box_iou(first: npt.ArrayLike, second: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Pairwise IoU ``[len(first), len(second)]`` of xyxy boxes."""
    a = np.asarray(first, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(second, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    out: npt.NDArray[np.float64] = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    return out


def matched_faces(detections: Detections, gt_boxes: BoxArray, iou: float) -> int:
    """How many ground-truth faces get a detection of IoU >= ``iou``, one detection each.

    Greedy in order of detection confidence, as VOC matching does.
    """
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if len(gt) == 0 or len(detections) == 0:
        return 0
    order = np.argsort(-detections.confidence, kind="stable")
    overlaps = box_iou(detections.xyxy[order], gt)
    taken = np.zeros(len(gt), dtype=bool)
    for row in overlaps:
        candidates = np.where(~taken & (row >= iou), row, -1.0)
        best = int(np.argmax(candidates))
        if candidates[best] >= 0:
            taken[best] = True
    return int(taken.sum())


def redetection_rate(
    detector: FaceDetector,
    reconstructions: Sequence[Frame],
    gt_boxes: Sequence[BoxArray],
    iou: float = 0.5,
    score: float = 0.5,
    geometry: InputGeometry | None = None,
) -> float:
    """Fraction of ground-truth faces that the clean detector still finds in reconstructions.

    ``reconstructions`` are uint8 BGR images and ``gt_boxes`` the faces in their pixels; a face
    counts as found when a detection of confidence >= ``score`` overlaps it with IoU >= ``iou``.
    ``geometry`` is the detector's input geometry (its default when None).
    """
    if len(reconstructions) != len(gt_boxes):
        raise ConfigError(
            f"redetection_rate: {len(reconstructions)} images but {len(gt_boxes)} box sets"
        )
    total = sum(len(np.asarray(b).reshape(-1, 4)) for b in gt_boxes)
    if total == 0:
        raise DatasetError("redetection_rate: no ground-truth faces to re-detect")
    found = 0
    for image, boxes in zip(reconstructions, gt_boxes, strict=True):
        (detections,) = detector.detect([image], geometry, score_threshold=score)
        found += matched_faces(detections.above(score), boxes, iou)
    return found / total
