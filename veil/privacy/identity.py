"""Identity leakage: does a reconstruction still let a face recogniser tell *who* it shows?

SSIM and PSNR say how much of a face comes back; they do not say whether it is still that
person. This module measures that with dlib's face recogniser (a ResNet giving 128-D
descriptors, two faces of one person lying closer than :data:`SAME_PERSON_DISTANCE`).

Threat model. FDDB carries no identity labels, so an "identity" here is a face *instance*:

* the gallery is the embeddings of the ORIGINAL faces (at least 100 of them for a report,
  so that chance, ``1 / N``, is small);
* a probe is the embedding of the same face region in what the attacker obtained (a
  reconstruction from the noisy activation, or a prediction of the embedding itself, see
  :mod:`veil.privacy.linkage`);
* the attack succeeds on a face when the probe's nearest gallery embedding is its own
  original (rank-1 identification, against chance ``1 / N``), or when the probe lies within
  dlib's same-person distance of its own original (verification).

Verification alone can mislead: a probe that looks like everybody (a constant guess of the
mean embedding, or a near-blank reconstruction) lies within 0.6 of many originals, its own
among them, without pointing to anyone. So every verification share comes with its
**false-match rate**: the share of the *other* gallery faces within the same distance of
the probe (averaged over probes). A same-person share no higher than the false-match rate
says the attack makes faces that match people in general, not the person.

Baselines: :func:`boxes_only_images` is the attacker who knows only the output boxes (which
the outside receives anyway) and pastes the mean face of its own training images into them;
a defence leaks identity only in so far as it beats that attacker.

Every rate comes with a Wilson 95% interval (:class:`Rate`), since report sets are small.
Only the 5-point landmark model is used (the 68-point model's licence is non-commercial).
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from veil.errors import ConfigError
from veil.privacy.metrics import BoxArray

Float32Array = npt.NDArray[np.float32]
Uint8Array = npt.NDArray[np.uint8]

SAME_PERSON_DISTANCE = 0.6  # dlib's documented threshold for its 128-D descriptors
EMBEDDING_DIM = 128
# Measured on FDDB faces: descriptors have euclidean norm 1.41 +- 0.06 (not unit length).
DLIB_EMBEDDING_NORM = 1.41
_Z95 = 1.959963984540054
_MISSING_EXTRA = (
    "face recognition needs the optional extra: pip install 'veil[privacy]' "
    "(dlib-bin, face-recognition-models)"
)
_LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
_RECOGNISER_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def wilson(hits: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``hits / n`` (``(nan, nan)`` when ``n == 0``)."""
    if n < 0 or not 0 <= hits <= n:
        raise ValueError(f"a proportion needs 0 <= hits <= n, got {hits}/{n}")
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n hits the bound is exactly 0 or 1; rounding would leave a few 1e-18 over.
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """A proportion ``hits / n`` with its Wilson 95% interval."""

    hits: int
    n: int

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else math.nan

    @property
    def low(self) -> float:
        return wilson(self.hits, self.n)[0]

    @property
    def high(self) -> float:
        return wilson(self.hits, self.n)[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "n": self.n,
            "value": self.value,
            "low": self.low,
            "high": self.high,
        }

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.2f}, {self.high:.2f}] ({self.hits}/{self.n})"


@dataclass(frozen=True)
class MeanCI:
    """The mean of per-face values with its normal-approximation 95% interval."""

    mean: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def mean_ci(values: Sequence[float]) -> MeanCI:
    """Mean +- 1.96 standard errors (sample std); a single value has a zero-width interval."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0)
    mean = float(array.mean())
    half = _Z95 * float(array.std(ddof=1)) / math.sqrt(array.size) if array.size > 1 else 0.0
    return MeanCI(mean, mean - half, mean + half, int(array.size))


def _model_folder() -> Path:
    """The folder of face_recognition_models' weights, found without importing the package.

    Its ``__init__`` imports ``pkg_resources``, which recent setuptools no longer ship.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise ConfigError(_MISSING_EXTRA)
    folder = Path(spec.origin).parent / "models"
    for name in (_LANDMARKS_FILE, _RECOGNISER_FILE):
        if not (folder / name).is_file():
            raise ConfigError(f"{_MISSING_EXTRA}; {folder / name} is missing")
    return folder


def _square(box: npt.NDArray[np.float64]) -> tuple[int, int, int, int]:
    """A centred square of the box's shorter side, as integer (left, top, right, bottom).

    dlib's 5-point model was trained on its detector's square boxes; FDDB's ellipse boxes are
    taller. On 75 FDDB fold-2 faces the square gave rank-1 1.00 (vs 0.97 for the raw box)
    for lightly degraded probes, and 2.5% (vs 5.4%) of other-face pairs under 0.6.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(0.5, min(x2 - x1, y2 - y1) / 2)
    return round(cx - half), round(cy - half), round(cx + half), round(cy + half)


class FaceRecognizer:
    """dlib's 128-D face descriptor of each box: 5-point landmarks, aligned 150px chip, ResNet.

    About 75 ms per face on one CPU core (no jitter).
    """

    def __init__(self, landmarks: Any, recogniser: Any, num_jitters: int = 0) -> None:
        self._landmarks = landmarks
        self._recogniser = recogniser
        self.num_jitters = num_jitters

    @classmethod
    def load(cls, num_jitters: int = 0) -> FaceRecognizer:
        """Load the models of the ``privacy`` extra; :class:`ConfigError` if it is absent."""
        try:
            import dlib
        except ImportError as exc:
            raise ConfigError(_MISSING_EXTRA) from exc
        folder = _model_folder()
        return cls(
            dlib.shape_predictor(str(folder / _LANDMARKS_FILE)),
            dlib.face_recognition_model_v1(str(folder / _RECOGNISER_FILE)),
            num_jitters,
        )

    def embed(self, image_bgr: npt.NDArray[Any], boxes: BoxArray) -> Float32Array:
        """``[K, 128]`` descriptors, one per box and in order (tiny faces included).

        ``image_bgr`` must be an HxWx3 uint8 BGR frame (checked; ValueError otherwise);
        ``boxes`` are xyxy frame pixels and may overhang the frame.
        """
        import dlib

        image = np.asarray(image_bgr)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an HxWx3 uint8 BGR image, got shape {image.shape} dtype {image.dtype}"
            )
        rows = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = np.zeros((len(rows), EMBEDDING_DIM), dtype=np.float32)
        if not len(rows):
            return out
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        for k, box in enumerate(rows):
            if not np.all(np.isfinite(box)):
                raise ValueError(f"box {k} is not finite: {box.tolist()}")
            shape = self._landmarks(rgb, dlib.rectangle(*_square(box)))
            descriptor = self._recogniser.compute_face_descriptor(
                rgb, shape, self.num_jitters, 0.25
            )
            out[k] = np.asarray(descriptor, dtype=np.float32)
        return out


@dataclass(frozen=True)
class IdentityScores:
    """How often probes identify (rank-1) or verify (distance < 0.6) as their own original."""

    rank1: Rate
    same_person: Rate
    gallery_size: int
    chance: float  # rank-1 rate of a random guess, 1 / gallery_size
    distances: MeanCI  # euclidean distance of each probe to its own original
    # Per probe, the share of the other gallery faces within SAME_PERSON_DISTANCE of it; None
    # for a gallery of one face (or a report written before veil measured it).
    false_match: MeanCI | None = None
    # Per probe, its own original's gallery row and its distance to it (empty in reports
    # written before veil kept them): which faces an attack verified, to compare attacks.
    own_rows: tuple[int, ...] = ()
    own_distances: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "rank1": self.rank1.to_json(),
            "same_person": self.same_person.to_json(),
            "same_person_distance": SAME_PERSON_DISTANCE,
            "gallery_size": self.gallery_size,
            "chance": self.chance,
            "distances": self.distances.to_json(),
            "false_match": None if self.false_match is None else self.false_match.to_json(),
            "own_rows": list(self.own_rows),
            "own_distances": [round(d, 4) for d in self.own_distances],
        }


def _embeddings(array: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    values = np.asarray(array, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != EMBEDDING_DIM:
        raise ValueError(f"{name}: expected [K, {EMBEDDING_DIM}] embeddings, got {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name}: embeddings must be finite")
    return values


def identification(
    probes: npt.ArrayLike, gallery: npt.ArrayLike, truth: Sequence[int]
) -> IdentityScores:
    """Score probe ``i`` against the gallery, whose row ``truth[i]`` is its own original."""
    p = _embeddings(probes, "probes")
    g = _embeddings(gallery, "gallery")
    if len(g) < 1:
        raise ValueError("gallery is empty: identification needs at least one embedding")
    own = np.asarray(truth, dtype=np.int64).reshape(-1)
    if len(own) != len(p):
        raise ValueError(f"truth has {len(own)} indices for {len(p)} probes")
    if len(own) and (own.min() < 0 or own.max() >= len(g)):
        raise ValueError(f"truth indices must lie in [0, {len(g)}), got {own.min()}..{own.max()}")
    squared = (p * p).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2 * p @ g.T
    distance = np.sqrt(np.clip(squared, 0.0, None))
    rows = np.arange(len(p))
    to_own = distance[rows, own]
    # Rank-1: no other gallery face is as close; a tie counts as a miss (it cannot be told apart).
    rank1 = int(np.sum((distance <= to_own[:, None]).sum(1) == 1))
    within = to_own < SAME_PERSON_DISTANCE
    return IdentityScores(
        Rate(rank1, len(p)),
        Rate(int(within.sum()), len(p)),
        len(g),
        1.0 / len(g),
        mean_ci(to_own.tolist()),
        _false_matches(distance, within),
        tuple(int(r) for r in own),
        tuple(float(d) for d in to_own),
    )


@dataclass(frozen=True)
class PairedVerifications:
    """Two attacks' same-person verdicts on the faces both scored: how many both verified and
    how many each verified alone. The exact McNemar test reads only the faces they disagree on,
    so it resolves a difference between two attacks on the same faces that their two intervals,
    each holding the spread of the faces, cannot."""

    both: int
    only_first: int
    only_second: int
    faces: int  # faces both attacks scored

    @property
    def p_value(self) -> float:
        """Two-sided exact McNemar p: the discordant faces against a fair coin."""
        discordant = self.only_first + self.only_second
        fewer = min(self.only_first, self.only_second)
        tail = sum(math.comb(discordant, k) for k in range(fewer + 1)) / (1 << discordant)
        return min(1.0, 2 * tail)

    def to_json(self) -> dict[str, Any]:
        return {
            "both": self.both,
            "only_first": self.only_first,
            "only_second": self.only_second,
            "faces": self.faces,
            "p_value": self.p_value,
        }


def _face_pairs(first: IdentityScores, second: IdentityScores) -> list[tuple[bool, bool]]:
    """Per face both scored, whether each verified it: by position where both scored the same
    faces in the same order, else by gallery row where a row names one face in each."""

    def verified(s: IdentityScores) -> list[bool]:
        return [d < SAME_PERSON_DISTANCE for d in s.own_distances]

    if first.own_rows == second.own_rows:
        return list(zip(verified(first), verified(second), strict=True))

    def single(s: IdentityScores) -> dict[int, bool]:
        counts = Counter(s.own_rows)
        return {r: v for r, v in zip(s.own_rows, verified(s), strict=True) if counts[r] == 1}

    a, b = single(first), single(second)
    return [(a[row], b[row]) for row in sorted(a.keys() & b.keys())]


def paired_verifications(
    first: IdentityScores, second: IdentityScores
) -> PairedVerifications | None:
    """The two attacks' verifications face by face; None when either kept no per-face
    distances (reports written before veil kept them)."""
    if not first.own_rows or not second.own_rows:
        return None
    pairs = _face_pairs(first, second)
    return PairedVerifications(
        both=sum(a and b for a, b in pairs),
        only_first=sum(a and not b for a, b in pairs),
        only_second=sum(b and not a for a, b in pairs),
        faces=len(pairs),
    )


def _false_matches(
    distance: npt.NDArray[np.float64], own_within: npt.NDArray[np.bool_]
) -> MeanCI | None:
    """Per probe, the share of the gallery's other faces within the same-person distance."""
    others = distance.shape[1] - 1
    if others < 1 or not len(distance):
        return None
    matches = (distance < SAME_PERSON_DISTANCE).sum(1) - own_within
    return mean_ci((matches / others).tolist())


def _crop(image: Uint8Array, box: npt.NDArray[np.float64]) -> Uint8Array | None:
    """The box's pixel window, edge pixels repeated where it overhangs; None if outside."""
    x1, y1, x2, y2 = _window(box)
    h, w = image.shape[:2]
    cx1, cy1, cx2, cy2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if cx2 <= cx1 or cy2 <= cy1:
        return None
    inside = np.ascontiguousarray(image[cy1:cy2, cx1:cx2])
    padded = cv2.copyMakeBorder(
        inside, cy1 - y1, y2 - cy2, cx1 - x1, x2 - cx2, cv2.BORDER_REPLICATE
    )
    return np.asarray(padded, dtype=np.uint8)


def _window(box: npt.NDArray[np.float64]) -> tuple[int, int, int, int]:
    """The integer pixel window (floor of the near edges, ceil of the far ones) of a box."""
    return (
        math.floor(box[0]),
        math.floor(box[1]),
        max(math.floor(box[0]) + 1, math.ceil(box[2])),
        max(math.floor(box[1]) + 1, math.ceil(box[3])),
    )


def _paste(frame: Uint8Array, chip: Uint8Array, box: npt.NDArray[np.float64]) -> None:
    """Resize ``chip`` to the box's pixel window and write the part inside ``frame``."""
    x1, y1, x2, y2 = _window(box)
    h, w = frame.shape[:2]
    cx1, cy1, cx2, cy2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if cx2 <= cx1 or cy2 <= cy1:
        return
    resized = cv2.resize(chip, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    frame[cy1:cy2, cx1:cx2] = resized[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]


def mean_face_chip(
    images: Sequence[Uint8Array], boxes_per_image: Sequence[BoxArray], size: int = 96
) -> Uint8Array:
    """The mean of the attacker's own face crops, each resized to ``size`` x ``size``.

    A box that overhangs its image is filled out by repeating the edge pixels, so that every
    crop spans its whole box (as :func:`boxes_only_images` pastes the chip over whole boxes).
    Boxes entirely outside their image are left out.
    """
    if len(images) != len(boxes_per_image):
        raise ValueError(f"{len(images)} images but {len(boxes_per_image)} box arrays")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    total = np.zeros((size, size, 3), dtype=np.float64)
    count = 0
    for image, boxes in zip(images, boxes_per_image, strict=True):
        for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            crop = _crop(image, box)
            if crop is not None:
                total += cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
                count += 1
    if count == 0:
        raise ValueError("no face box lies inside its image: cannot form a mean face")
    return np.asarray(np.clip(np.rint(total / count), 0, 255), dtype=np.uint8)


def boxes_only_images(
    mean_face: Uint8Array,
    boxes_per_image: Sequence[BoxArray],
    sizes: Sequence[tuple[int, int]],
    background: Uint8Array | None = None,
) -> list[Uint8Array]:
    """The boxes-only attacker's guess of each frame: the mean face pasted into every box.

    ``sizes`` are (height, width) of the frames; ``background`` (the attacker's mean image,
    any size, resized to each frame) defaults to mid-grey. Boxes are clipped to the frame;
    pixels outside every box stay background.
    """
    if len(boxes_per_image) != len(sizes):
        raise ValueError(f"{len(boxes_per_image)} box arrays but {len(sizes)} frame sizes")
    chip = np.asarray(mean_face)
    if chip.ndim != 3 or chip.shape[2] != 3 or chip.dtype != np.uint8:
        raise ValueError(f"mean_face must be an SxSx3 uint8 chip, got {chip.shape} {chip.dtype}")
    if background is not None and (background.ndim != 3 or background.shape[2] != 3):
        raise ValueError(f"background must be an HxWx3 image, got {background.shape}")
    out: list[Uint8Array] = []
    for boxes, (h, w) in zip(boxes_per_image, sizes, strict=True):
        if background is None:
            frame = np.full((h, w, 3), 128, dtype=np.uint8)
        else:
            resized = cv2.resize(np.asarray(background), (w, h), interpolation=cv2.INTER_AREA)
            frame = np.ascontiguousarray(resized, dtype=np.uint8)
        for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            _paste(frame, chip, box)
        out.append(np.asarray(frame, dtype=np.uint8))
    return out
