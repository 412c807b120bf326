"""WIDER FACE validation AP (easy / medium / hard), scored as the official evaluation scores it.

The rules are those of the official tool's widely used Python port (``widerface_evaluate/
evaluation.py`` in biubug6/Pytorch_Retinaface, after wondervictor/WiderFace-Evaluation),
reimplemented here with numpy:

* all scores of all images are normalised together to ``(s - min) / (max - min)``, with the
  minimum taken no higher than 1 and the maximum no lower than 0;
* per setting, the ``gt_list`` of ``wider_{easy,medium,hard}_val.mat`` names (1-based) the
  faces that count; the other faces of the image are *ignored*: a detection whose best-IoU
  face is ignored is dropped from the proposals;
* in each image, detections (by descending score) are assigned to the face they overlap
  most (IoU >= 0.5, pixel-inclusive areas ``(x2 - x1 + 1) * (y2 - y1 + 1)``); a counted face
  is recalled by the first detection assigned to it; a detection that overlaps no face enough,
  or whose face was already recalled (a duplicate), is a false positive, as in VOC;
* precision and recall are accumulated over all images at 1000 thresholds
  ``1 - k/1000, k = 1..1000`` and integrated with VOC all-point AP;
* images without ground-truth boxes or without detections add nothing but their counted
  faces (so detections on face-less images are never false positives). Images whose only
  "face" is the official all-zero placeholder do count their detections as false positives.

Differences, all deliberate: only the images present under ``WIDER_val/images/`` are scored
(the shared copy holds 668 of the 3226); detections are scored at their float coordinates
(the RetinaFace writer truncates them to integers first); where no detection passes a
threshold, precision is taken as 0 instead of 0/0 (such points lie at recall 0 and cannot
change the AP); when every score is equal, every detection passes every threshold.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import scipy.io
from tqdm import tqdm

from veil.detections import Detections
from veil.errors import ConfigError, DatasetError
from veil.eval import DetectFn, image_batches, run_detector
from veil.eval.metrics import voc_ap

Float64Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

SETTINGS = ("easy", "medium", "hard")
GT_TEXT = Path("wider_face_split") / "wider_face_val_bbx_gt.txt"
IMAGES_DIR = Path("WIDER_val") / "images"
MAT_DIR = Path("ground_truth")
ATTRIBUTES = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")
NUM_THRESHOLDS = 1000


@dataclass(frozen=True)
class WiderImage:
    event: str  # e.g. "0--Parade"
    name: str  # file name without extension, e.g. "0_Parade_marchingband_1_465"
    path: Path
    gt_xywh: Float64Array  # [G, 4] x, y, w, h exactly as the official files list them
    attributes: IntArray  # [G, 6] in the order of ATTRIBUTES
    counted: Mapping[str, IntArray]  # per setting, 0-based indices of the faces that count

    @property
    def is_placeholder(self) -> npt.NDArray[np.bool_]:
        """Rows that stand for "no face": the official files give face-less images one
        all-zero box."""
        placeholder: npt.NDArray[np.bool_] = ~self.gt_xywh.any(axis=1)
        return placeholder

    @property
    def boxes_xyxy(self) -> Float64Array:
        """The real faces (placeholders left out) as xyxy boxes."""
        real = self.gt_xywh[~self.is_placeholder]
        boxes: Float64Array = np.concatenate([real[:, :2], real[:, :2] + real[:, 2:]], axis=1)
        return boxes


@dataclass(frozen=True)
class WiderDataset:
    root: Path  # the folder holding WIDER_val/, wider_face_split/ and ground_truth/
    images: tuple[WiderImage, ...]  # present images, in ground-truth file order
    num_annotated: int  # images in the ground-truth file
    num_present: int  # of those, images found under WIDER_val/images/

    def num_faces(self, setting: str) -> int:
        return sum(len(im.counted[setting]) for im in self.images)


def _wider_root(dataset_dir: str | Path) -> Path:
    """Accept the WIDER FACE folder, or the reference-data root holding widerface/."""
    given = Path(dataset_dir)
    for candidate in (given, given / "widerface"):
        if (candidate / GT_TEXT).is_file():
            return candidate
    raise DatasetError(f"WIDER FACE not found: {given} holds neither {GT_TEXT} nor widerface/")


def parse_wider_gt(path: Path) -> list[tuple[str, Float64Array, IntArray]]:
    """(``event/name.jpg``, ``[G, 4]`` xywh, ``[G, 6]`` attributes) per image of the official
    ground-truth text file. A face-less image is listed with one all-zero line (after a count
    of 0 in the train file, of 1 in the val file); that line is kept, as the .mat files keep
    it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read WIDER FACE ground truth {path}: {exc}") from exc

    def fail(index: int, problem: str) -> DatasetError:
        text = lines[index] if index < len(lines) else "<end of file>"
        return DatasetError(f"{path}:{index + 1}: {problem}, got {text!r}")

    entries: list[tuple[str, Float64Array, IntArray]] = []
    i = 0
    while i < len(lines):
        name = lines[i].strip()
        if not name:
            i += 1
            continue
        if not name.endswith(".jpg") or "/" not in name:
            raise fail(i, "expected an image name 'event/name.jpg'")
        i += 1
        try:
            count = int(lines[i].strip()) if i < len(lines) else -1
        except ValueError:
            count = -1
        if count < 0:
            raise fail(i, f"expected the face count of {name}")
        rows = np.zeros((max(count, 1), 10), dtype=np.int64)
        for r in range(len(rows)):
            i += 1
            fields = lines[i].split() if i < len(lines) else []
            try:
                rows[r] = [int(v) for v in fields]
            except ValueError as exc:
                raise fail(
                    i,
                    "expected 10 integers 'x y w h blur expression illumination "
                    "invalid occlusion pose'",
                ) from exc
        entries.append((name, rows[:, :4].astype(np.float64), rows[:, 4:]))
        i += 1
    return entries


def _load_mats(mat_dir: Path) -> dict[tuple[str, str], tuple[Float64Array, dict[str, IntArray]]]:
    """(event, name) -> (official xywh boxes, per-setting 0-based counted face indices)."""
    mats: dict[str, dict[str, Any]] = {}
    for kind in ("face", *SETTINGS):
        path = mat_dir / f"wider_{kind}_val.mat"
        try:
            mats[kind] = scipy.io.loadmat(str(path))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read WIDER FACE evaluation file {path}: {exc}") from exc
    face = mats["face"]
    table: dict[tuple[str, str], tuple[Float64Array, dict[str, IntArray]]] = {}
    try:
        for e in range(len(face["event_list"])):
            event = str(face["event_list"][e][0][0])
            files = face["file_list"][e][0]
            boxes = face["face_bbx_list"][e][0]
            for j in range(len(files)):
                xywh = np.asarray(boxes[j][0], dtype=np.float64).reshape(-1, 4)
                counted = {
                    s: np.asarray(mats[s]["gt_list"][e][0][j][0], dtype=np.int64).reshape(-1) - 1
                    for s in SETTINGS
                }
                for s, idx in counted.items():
                    if len(idx) and (idx.min() < 0 or idx.max() >= len(xywh)):
                        raise DatasetError(
                            f"wider_{s}_val.mat: face index out of range for {event}/"
                            f"{files[j][0][0]} ({len(xywh)} faces)"
                        )
                table[(event, str(files[j][0][0]))] = (xywh, counted)
    except (KeyError, IndexError, TypeError) as exc:
        raise DatasetError(
            f"WIDER FACE evaluation files in {mat_dir} are malformed: {exc}"
        ) from exc
    return table


def load_widerface(dataset_dir: str | Path, max_images: int | None = None) -> WiderDataset:
    """The WIDER FACE validation images present under ``WIDER_val/images/``, with their ground
    truth (text file, checked against the official .mat boxes) and per-setting counted faces.

    ``dataset_dir`` is the folder holding ``WIDER_val/``, ``wider_face_split/`` and
    ``ground_truth/`` (or the reference-data root holding ``widerface/``); ``max_images``
    keeps the first N present images.
    """
    root = _wider_root(dataset_dir)
    if max_images is not None and max_images < 1:
        raise ConfigError(f"max_images must be at least 1, got {max_images}")
    entries = parse_wider_gt(root / GT_TEXT)
    mats = _load_mats(root / MAT_DIR)
    images: list[WiderImage] = []
    present = 0
    for rel, xywh, attributes in entries:
        path = root / IMAGES_DIR / rel
        if not path.is_file():
            continue
        present += 1
        if max_images is not None and len(images) >= max_images:
            continue
        event, file_name = rel.split("/", 1)
        name = file_name.removesuffix(".jpg")
        if (event, name) not in mats:
            raise DatasetError(f"{rel} is in {GT_TEXT} but not in wider_face_val.mat")
        official, counted = mats[(event, name)]
        if official.shape != xywh.shape or not np.array_equal(official, xywh):
            raise DatasetError(
                f"{rel}: {GT_TEXT} and wider_face_val.mat disagree on its faces "
                f"({len(xywh)} vs {len(official)} boxes)"
            )
        images.append(WiderImage(event, name, path, official, attributes, counted))
    return WiderDataset(root, tuple(images), len(entries), present)


def _iou_pixel_inclusive(pred_xyxy: Float64Array, gt_xyxy: Float64Array) -> Float64Array:
    """IoU ``[P, G]`` with the official tool's "+1" areas (boxes include their last pixel)."""
    inter_w = (
        np.minimum(pred_xyxy[:, None, 2], gt_xyxy[None, :, 2])
        - np.maximum(pred_xyxy[:, None, 0], gt_xyxy[None, :, 0])
        + 1
    )
    inter_h = (
        np.minimum(pred_xyxy[:, None, 3], gt_xyxy[None, :, 3])
        - np.maximum(pred_xyxy[:, None, 1], gt_xyxy[None, :, 1])
        + 1
    )
    inter = np.where((inter_w > 0) & (inter_h > 0), inter_w * inter_h, 0.0)
    area_pred = (pred_xyxy[:, 2] - pred_xyxy[:, 0] + 1) * (pred_xyxy[:, 3] - pred_xyxy[:, 1] + 1)
    area_gt = (gt_xyxy[:, 2] - gt_xyxy[:, 0] + 1) * (gt_xyxy[:, 3] - gt_xyxy[:, 1] + 1)
    union = area_pred[:, None] + area_gt[None, :] - inter
    iou: Float64Array = np.where(inter > 0, inter / np.where(inter > 0, union, 1.0), 0.0)
    return iou


def _image_pr(
    boxes: Float64Array,
    scores: Float64Array,
    gt_xywh: Float64Array,
    counted: IntArray,
    thresholds: Float64Array,
    iou: float,
) -> Float64Array:
    """``[T, 2]`` (proposals, recalled faces) of one image at each threshold; ``scores`` are
    normalised and sorted descending, ``boxes`` in the same order."""
    gt_xyxy = np.concatenate([gt_xywh[:, :2], gt_xywh[:, :2] + gt_xywh[:, 2:]], axis=1)
    overlaps = _iou_pixel_inclusive(boxes, gt_xyxy)
    best = overlaps.argmax(axis=1)
    matched = overlaps[np.arange(len(boxes)), best] >= iou
    is_counted = np.zeros(len(gt_xyxy), dtype=bool)
    is_counted[counted] = True
    proposal = ~(matched & ~is_counted[best])  # a match to an ignored face is no proposal
    recalls = matched & is_counted[best]
    # A counted face is recalled from its first matching detection on.
    _, first = np.unique(best[recalls], return_index=True)
    newly_recalled = np.zeros(len(boxes), dtype=np.int64)
    newly_recalled[np.flatnonzero(recalls)[first]] = 1
    recalled_so_far = np.cumsum(newly_recalled)
    proposals_so_far = np.cumsum(proposal)
    # Detections passing threshold t: the first n_t of them, since scores are descending.
    n_passing = np.searchsorted(-scores, -thresholds, side="right")
    last = np.maximum(n_passing - 1, 0)
    pr: Float64Array = np.stack([proposals_so_far[last], recalled_so_far[last]], axis=1).astype(
        np.float64
    )
    pr[n_passing == 0] = 0.0
    return pr


def widerface_aps(
    images: Sequence[WiderImage], detections: Sequence[Detections], iou: float = 0.5
) -> dict[str, float]:
    """Easy, medium and hard AP of ``detections`` (one per image, in frame pixels), by the
    official rules (see the module docstring)."""
    if len(images) != len(detections):
        raise ConfigError(f"{len(images)} images but {len(detections)} detection sets")
    ordered: list[tuple[Float64Array, Float64Array]] = []
    for dets in detections:
        order = np.argsort(-dets.confidence, kind="stable")
        ordered.append(
            (dets.xyxy[order].astype(np.float64), dets.confidence[order].astype(np.float64))
        )
    all_scores = np.concatenate([s for _, s in ordered]) if ordered else np.zeros(0)
    low = min(1.0, float(all_scores.min())) if len(all_scores) else 0.0
    high = max(0.0, float(all_scores.max())) if len(all_scores) else 1.0
    span = high - low

    def normalise(s: Float64Array) -> Float64Array:
        normalised: Float64Array = (s - low) / span if span > 0 else np.ones_like(s)
        return normalised

    thresholds = 1.0 - (np.arange(NUM_THRESHOLDS) + 1) / NUM_THRESHOLDS
    aps: dict[str, float] = {}
    for setting in SETTINGS:
        pr = np.zeros((NUM_THRESHOLDS, 2))
        faces = 0
        for image, (boxes, scores) in zip(images, ordered, strict=True):
            counted = image.counted[setting]
            faces += len(counted)
            if len(image.gt_xywh) == 0 or len(boxes) == 0:
                continue
            pr += _image_pr(boxes, normalise(scores), image.gt_xywh, counted, thresholds, iou)
        if faces == 0:
            raise DatasetError(f"WIDER FACE {setting}: no counted faces among the images scored")
        precision = np.divide(pr[:, 1], pr[:, 0], out=np.zeros(NUM_THRESHOLDS), where=pr[:, 0] > 0)
        aps[setting] = voc_ap(pr[:, 1] / faces, precision)
    return aps


@dataclass(frozen=True)
class WiderResult:
    easy: float
    medium: float
    hard: float
    num_images: int  # images scored
    num_present: int  # validation images found under WIDER_val/images/
    num_annotated: int  # validation images in the ground truth
    faces: Mapping[str, int]  # counted faces per setting among the images scored
    iou: float
    seconds: float

    def report_lines(self) -> list[str]:
        return [
            f"Easy Val AP: {self.easy:.4f}",
            f"Medium Val AP: {self.medium:.4f}",
            f"Hard Val AP: {self.hard:.4f}",
            f"WIDER FACE val: {self.num_images} images scored, {self.num_present} of "
            f"{self.num_annotated} present; counted faces "
            + ", ".join(f"{s} {self.faces[s]}" for s in SETTINGS),
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "widerface",
            "easy_ap": self.easy,
            "medium_ap": self.medium,
            "hard_ap": self.hard,
            "num_images": self.num_images,
            "num_present": self.num_present,
            "num_annotated": self.num_annotated,
            "faces": dict(self.faces),
            "iou": self.iou,
            "seconds": self.seconds,
        }


def evaluate_widerface(
    detect_fn: DetectFn,
    dataset_dir: str | Path,
    batch_size: int = 4,
    progress: bool = True,
    max_images: int | None = None,
    out: TextIO | None = None,
    iou: float = 0.5,
) -> WiderResult:
    """Run ``detect_fn`` on the WIDER FACE validation images present (the first
    ``max_images`` of them if given) and print easy / medium / hard AP. The progress bar goes
    to stderr, the result lines to ``out``."""
    dataset = load_widerface(dataset_dir, max_images)
    if not dataset.images:
        raise DatasetError(f"no WIDER FACE validation images under {dataset.root / IMAGES_DIR}")
    detections: list[Detections] = []
    started = time.perf_counter()
    with tqdm(
        total=len(dataset.images), desc="WIDER FACE", unit="img", disable=not progress
    ) as bar:
        for frames in image_batches([im.path for im in dataset.images], batch_size):
            detections.extend(run_detector(detect_fn, frames))
            bar.update(len(frames))
    seconds = time.perf_counter() - started
    aps = widerface_aps(dataset.images, detections, iou)
    result = WiderResult(
        easy=aps["easy"],
        medium=aps["medium"],
        hard=aps["hard"],
        num_images=len(dataset.images),
        num_present=dataset.num_present,
        num_annotated=dataset.num_annotated,
        faces={s: dataset.num_faces(s) for s in SETTINGS},
        iou=iou,
        seconds=seconds,
    )
    for line in result.report_lines():
        print(line, file=out)
    return result
