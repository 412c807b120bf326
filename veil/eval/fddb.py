"""The FDDB benchmark as the seed document (NetApp/Protopia TR-4928) reports it.

FDDB (Jain & Learned-Miller, 2010) is 2845 images with 5171 faces, annotated as ellipses and
split into ten official folds. The seed document prints one VOC AP per fold, then their
average ("FDDB Dataset Average AP" and "mAP" are the same number). We score each detection
box against the exact axis-aligned bounding box of each ground-truth ellipse at IoU > 0.5
(see :mod:`veil.eval.metrics` for why boxes rather than FDDB's own ellipse matcher), and also
report FDDB's customary figure, the true-positive rate at 1000 false positives over all folds.

Layout read by :func:`load_fddb`: ``FDDB-folds/FDDB-fold-NN-ellipseList.txt`` (per image: its
name, a face count, then one ``major_radius minor_radius angle cx cy 1`` line per face; angle
in radians from the x axis to the major axis) and ``originalPics/<name>.jpg``. Images absent
from ``originalPics/`` are counted, listed and skipped: the shared copy lacks 68 of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from veil.errors import ConfigError, DatasetError
from veil.eval import DetectFn, image_batches, run_detector
from veil.eval.metrics import ScoredDetections, match_detections

Float64Array = npt.NDArray[np.float64]

FOLDS_DIR = "FDDB-folds"
PICTURES_DIR = "originalPics"


def ellipse_to_box(
    major: float, minor: float, angle: float, cx: float, cy: float
) -> tuple[float, float, float, float]:
    """The exact axis-aligned bounding box ``(x1, y1, x2, y2)`` of a rotated ellipse.

    ``major`` and ``minor`` are the semi-axes (FDDB's "radii"), ``angle`` is the major
    axis's angle to the x axis in radians. A point of the ellipse is
    ``(cx + a cos t cos θ - b sin t sin θ, cy + a cos t sin θ + b sin t cos θ)``; maximising
    each coordinate over ``t`` gives the half extents ``sqrt(a² cos²θ + b² sin²θ)`` along x
    and ``sqrt(a² sin²θ + b² cos²θ)`` along y. The sign of θ (and whether y points up or
    down) does not change the box.
    """
    cos_sq, sin_sq = math.cos(angle) ** 2, math.sin(angle) ** 2
    half_w = math.sqrt(major * major * cos_sq + minor * minor * sin_sq)
    half_h = math.sqrt(major * major * sin_sq + minor * minor * cos_sq)
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


@dataclass(frozen=True)
class FddbImage:
    fold: int
    name: str  # the official name, e.g. "2002/08/11/big/img_591"
    path: Path
    ellipses: Float64Array  # [G, 5]: major, minor, angle, cx, cy
    boxes: Float64Array  # [G, 4] xyxy bounding boxes of the ellipses, not clipped to the image

    @property
    def num_faces(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class FddbFold:
    number: int
    images: tuple[FddbImage, ...]  # present images (the first N when a limit was given)
    missing: tuple[str, ...]  # names annotated in the fold but absent from originalPics/
    num_missing_faces: int
    num_annotated: int  # images listed in the fold file

    @property
    def num_faces(self) -> int:
        return sum(im.num_faces for im in self.images)


@dataclass(frozen=True)
class FddbDataset:
    root: Path  # the folder that holds FDDB-folds/ and originalPics/
    folds: tuple[FddbFold, ...]

    @property
    def images(self) -> list[FddbImage]:
        return [im for fold in self.folds for im in fold.images]

    @property
    def num_images(self) -> int:
        return sum(len(f.images) for f in self.folds)

    @property
    def num_faces(self) -> int:
        return sum(f.num_faces for f in self.folds)

    @property
    def missing_images(self) -> tuple[str, ...]:
        return tuple(name for f in self.folds for name in f.missing)

    @property
    def num_missing_faces(self) -> int:
        return sum(f.num_missing_faces for f in self.folds)

    @property
    def num_annotated(self) -> int:
        return sum(f.num_annotated for f in self.folds)


def _fddb_root(dataset_dir: str | Path) -> Path:
    """Accept the folder holding FDDB-folds/, or the reference-data root holding fddb/."""
    given = Path(dataset_dir)
    for candidate in (given, given / "fddb"):
        if (candidate / FOLDS_DIR).is_dir():
            return candidate
    raise DatasetError(f"FDDB not found: {given} holds neither {FOLDS_DIR}/ nor fddb/{FOLDS_DIR}/")


def _parse_ellipse_list(path: Path) -> list[tuple[str, Float64Array]]:
    """(image name, [G, 5] ellipses) for each image of one fold file, in file order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DatasetError(f"FDDB fold file missing: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read FDDB fold file {path}: {exc}") from exc

    def fail(index: int, problem: str) -> DatasetError:
        text = lines[index] if index < len(lines) else "<end of file>"
        return DatasetError(f"{path}:{index + 1}: {problem}, got {text!r}")

    entries: list[tuple[str, Float64Array]] = []
    i = 0
    while i < len(lines):
        name = lines[i].strip()
        if not name:  # blank lines (a trailing newline, say) carry nothing
            i += 1
            continue
        i += 1
        try:
            count = int(lines[i].strip()) if i < len(lines) else -1
        except ValueError:
            count = -1
        if count < 0:
            raise fail(i, f"expected the face count of image {name!r}")
        ellipses = np.zeros((count, 5), dtype=np.float64)
        for face in range(count):
            i += 1
            fields = lines[i].split() if i < len(lines) else []
            try:
                values = [float(v) for v in fields]
            except ValueError:
                values = []
            if len(values) != 6 or not all(math.isfinite(v) for v in values):
                raise fail(i, "expected an ellipse 'major minor angle cx cy 1' (6 numbers)")
            if values[0] <= 0 or values[1] <= 0:
                raise fail(i, "ellipse radii must be positive")
            ellipses[face] = values[:5]
        entries.append((name, ellipses))
        i += 1
    return entries


def _check_image_list(path: Path, names: list[str]) -> None:
    """The fold's image list, where present, must name the same images as its ellipse file."""
    if not path.is_file():
        return
    listed = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    listed = [name for name in listed if name]
    if listed != names:
        raise DatasetError(
            f"{path} lists {len(listed)} images that differ from the {len(names)} annotated in "
            f"its ellipse file"
        )


def load_fddb(
    dataset_dir: str | Path,
    folds: Iterable[int] = range(1, 11),
    max_images_per_fold: int | None = None,
) -> FddbDataset:
    """Read the ground truth of the given folds and find their images.

    ``dataset_dir`` is the folder holding ``FDDB-folds/`` and ``originalPics/`` (or the
    reference-data root holding ``fddb/``). Missing images are listed per fold, with their
    faces counted, and left out; ``max_images_per_fold`` keeps the first N present images of
    each fold (missing images are still those of the whole fold). Malformed fold files raise
    :class:`DatasetError` naming the file and line.
    """
    root = _fddb_root(dataset_dir)
    if max_images_per_fold is not None and max_images_per_fold < 1:
        raise ConfigError(f"max_images_per_fold must be at least 1, got {max_images_per_fold}")
    fold_numbers = list(folds)
    if not fold_numbers:
        raise ConfigError("no FDDB folds selected")
    if len(set(fold_numbers)) != len(fold_numbers):
        raise ConfigError(f"FDDB folds listed twice: {fold_numbers}")
    loaded: list[FddbFold] = []
    for number in fold_numbers:
        if not 1 <= number <= 10:
            raise ConfigError(f"FDDB folds are numbered 1 to 10, got {number}")
        fold_file = root / FOLDS_DIR / f"FDDB-fold-{number:02d}-ellipseList.txt"
        entries = _parse_ellipse_list(fold_file)
        _check_image_list(
            root / FOLDS_DIR / f"FDDB-fold-{number:02d}.txt", [name for name, _ in entries]
        )
        present: list[FddbImage] = []
        missing: list[str] = []
        missing_faces = 0
        for name, ellipses in entries:
            path = root / PICTURES_DIR / f"{name}.jpg"
            if not path.is_file():
                missing.append(name)
                missing_faces += len(ellipses)
                continue
            if max_images_per_fold is not None and len(present) >= max_images_per_fold:
                continue
            boxes = np.array([ellipse_to_box(*e) for e in ellipses], dtype=np.float64)
            present.append(FddbImage(number, name, path, ellipses, boxes.reshape(-1, 4)))
        loaded.append(FddbFold(number, tuple(present), tuple(missing), missing_faces, len(entries)))
    return FddbDataset(root, tuple(loaded))


def _mean_std(values: npt.ArrayLike) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single run) over the first axis."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return float(arr.mean()), std


@dataclass(frozen=True)
class FddbResult:
    """FDDB figures; with several detector runs, each is the mean over runs, ``*_std`` the
    sample standard deviation over runs (0 for one run).

    ``mean_ap`` is the average of the per-fold APs: what the seed document prints both as
    "FDDB Dataset Average AP" and as "mAP". ``pooled_ap`` is a second, different figure: one
    AP over the detections of all folds ranked together. ``tpr_at_max_fp`` is the
    true-positive rate at ``max_fp`` false positives over all folds together.
    """

    folds: tuple[int, ...]
    fold_ap: tuple[float, ...]
    fold_ap_std: tuple[float, ...]
    mean_ap: float
    mean_ap_std: float
    pooled_ap: float
    pooled_ap_std: float
    tpr_at_max_fp: float
    tpr_at_max_fp_std: float
    max_fp: int
    iou: float
    repeats: int
    num_images: int
    num_faces: int
    num_annotated: int
    missing_images: tuple[str, ...]
    num_missing_faces: int
    seconds: float

    def _figure(self, mean: float, std: float) -> str:
        return f"{mean:.4f}" if self.repeats == 1 else f"{mean:.4f} ± {std:.4f}"

    def report_lines(self) -> list[str]:
        """The seed document's lines (per fold, average, mAP), then TPR and coverage."""
        lines = [
            f"FDDB-fold-{fold} Val AP: {self._figure(ap, std)}"
            for fold, ap, std in zip(self.folds, self.fold_ap, self.fold_ap_std, strict=True)
        ]
        lines.append(f"FDDB Dataset Average AP: {self._figure(self.mean_ap, self.mean_ap_std)}")
        lines.append(f"mAP: {self._figure(self.mean_ap, self.mean_ap_std)}")
        lines.append(
            f"FDDB TPR@{self.max_fp}FP: {self._figure(self.tpr_at_max_fp, self.tpr_at_max_fp_std)}"
        )
        lines.append(
            f"FDDB images: {self.num_images} evaluated ({self.num_faces} faces); "
            f"{len(self.missing_images)} of {self.num_annotated} annotated images missing "
            f"from {PICTURES_DIR}/ and skipped ({self.num_missing_faces} faces)"
        )
        if self.repeats > 1:
            lines.append(f"Detector runs: {self.repeats} per image (figures are mean ± sample std)")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "fddb",
            "folds": [
                {"fold": fold, "ap": ap, "ap_std": std}
                for fold, ap, std in zip(self.folds, self.fold_ap, self.fold_ap_std, strict=True)
            ],
            "mean_ap": self.mean_ap,
            "mean_ap_std": self.mean_ap_std,
            "pooled_ap": self.pooled_ap,
            "pooled_ap_std": self.pooled_ap_std,
            "tpr_at_max_fp": self.tpr_at_max_fp,
            "tpr_at_max_fp_std": self.tpr_at_max_fp_std,
            "max_fp": self.max_fp,
            "iou": self.iou,
            "repeats": self.repeats,
            "num_images": self.num_images,
            "num_faces": self.num_faces,
            "num_annotated": self.num_annotated,
            "num_missing_images": len(self.missing_images),
            "num_missing_faces": self.num_missing_faces,
            "missing_images": list(self.missing_images),
            "seconds": self.seconds,
        }


def _clip_boxes(boxes: Float64Array, height: int, width: int) -> Float64Array:
    """Clip to the image, as detectors clip their own boxes (ellipses may overhang)."""
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, width)
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, height)
    return clipped


def evaluate_fddb(
    detect_fn: DetectFn,
    dataset: FddbDataset,
    batch_size: int = 8,
    progress: bool = True,
    out: TextIO | None = None,
    repeats: int = 1,
    iou: float = 0.5,
    max_fp: int = 1000,
) -> FddbResult:
    """Run ``detect_fn`` over the dataset's images and print the seed document's FDDB lines.

    Images are read with cv2 and passed ``batch_size`` at a time (sizes may differ within a
    batch). Ground-truth boxes are clipped to their image before matching. With
    ``repeats=n`` the detector is called n times on every batch (a noisy model draws fresh
    noise on each call) and each figure is reported as mean and standard deviation over the n
    runs. The progress bar goes to stderr, the result lines to ``out``.
    """
    results = evaluate_fddb_many(
        {"": (detect_fn, repeats)}, dataset, batch_size, progress, out, iou, max_fp
    )
    return results[""]


def evaluate_fddb_many(
    detectors: dict[str, tuple[DetectFn, int]],
    dataset: FddbDataset,
    batch_size: int = 8,
    progress: bool = True,
    out: TextIO | None = None,
    iou: float = 0.5,
    max_fp: int = 1000,
) -> dict[str, FddbResult]:
    """:func:`evaluate_fddb` for several detectors (name -> (detect_fn, repeats)) at once.

    Every batch is decoded once and handed to each detector in turn, as the same list object,
    so detectors that share a frozen head can compute it once per batch (see
    ``veil.inference.HeadCache``). Prints each detector's lines under its name.
    """
    for _, repeats in detectors.values():
        if repeats < 1:
            raise ConfigError(f"repeats must be at least 1, got {repeats}")
    for fold in dataset.folds:
        if fold.num_faces == 0:
            raise DatasetError(
                f"FDDB fold {fold.number} has no faces to evaluate under {dataset.root}"
            )
    fold_slot = {fold.number: k for k, fold in enumerate(dataset.folds)}
    # parts[name][run][fold slot] -> one ScoredDetections per image
    parts: dict[str, list[list[list[ScoredDetections]]]] = {
        name: [[[] for _ in dataset.folds] for _ in range(repeats)]
        for name, (_, repeats) in detectors.items()
    }
    seconds = dict.fromkeys(detectors, 0.0)
    images = dataset.images
    with tqdm(total=len(images), desc="FDDB", unit="img", disable=not progress) as bar:
        done = 0
        for frames in image_batches([im.path for im in images], batch_size):
            batch = images[done : done + len(frames)]
            done += len(frames)
            gts = [
                _clip_boxes(im.boxes, frame.shape[0], frame.shape[1])
                for im, frame in zip(batch, frames, strict=True)
            ]
            for name, (detect_fn, repeats) in detectors.items():
                started = time.perf_counter()
                for run in range(repeats):
                    detections = run_detector(detect_fn, frames)
                    for im, gt, dets in zip(batch, gts, detections, strict=True):
                        matching = match_detections(dets.xyxy, dets.confidence, gt, iou)
                        parts[name][run][fold_slot[im.fold]].append(
                            ScoredDetections.from_matching(dets.confidence, matching, len(gt))
                        )
                seconds[name] += time.perf_counter() - started
            bar.update(len(frames))
    results: dict[str, FddbResult] = {}
    for name, (_, repeats) in detectors.items():
        result = _summarise(parts[name], repeats, dataset, iou, max_fp, seconds[name])
        if name:
            print(f"== {name}", file=out)
        for line in result.report_lines():
            print(line, file=out)
        results[name] = result
    return results


def _summarise(
    parts: list[list[list[ScoredDetections]]],
    repeats: int,
    dataset: FddbDataset,
    iou: float,
    max_fp: int,
    seconds: float,
) -> FddbResult:
    fold_ap = np.zeros((repeats, len(dataset.folds)))
    pooled_ap = np.zeros(repeats)
    tpr = np.zeros(repeats)
    for run in range(repeats):
        per_fold = [ScoredDetections.concatenate(p) for p in parts[run]]
        fold_ap[run] = [scored.average_precision() for scored in per_fold]
        everything = ScoredDetections.concatenate(per_fold)
        pooled_ap[run] = everything.average_precision()
        tpr[run] = everything.tpr_at_fp(max_fp)
    fold_stats = [_mean_std(fold_ap[:, k]) for k in range(len(dataset.folds))]
    mean_ap, mean_ap_std = _mean_std(fold_ap.mean(axis=1))
    pooled_mean, pooled_std = _mean_std(pooled_ap)
    tpr_mean, tpr_std = _mean_std(tpr)
    return FddbResult(
        folds=tuple(fold.number for fold in dataset.folds),
        fold_ap=tuple(mean for mean, _ in fold_stats),
        fold_ap_std=tuple(std for _, std in fold_stats),
        mean_ap=mean_ap,
        mean_ap_std=mean_ap_std,
        pooled_ap=pooled_mean,
        pooled_ap_std=pooled_std,
        tpr_at_max_fp=tpr_mean,
        tpr_at_max_fp_std=tpr_std,
        max_fp=max_fp,
        iou=iou,
        repeats=repeats,
        num_images=dataset.num_images,
        num_faces=dataset.num_faces,
        num_annotated=dataset.num_annotated,
        missing_images=dataset.missing_images,
        num_missing_faces=dataset.num_missing_faces,
        seconds=seconds,
    )
