"""Detection metrics: VOC average precision and the FDDB true-positive rate at N false positives.

Conventions, shared by every benchmark that uses these functions (FDDB here; WIDER FACE has
its own, official rules in :mod:`veil.eval.widerface`):

* boxes are ``xyxy`` in continuous pixel coordinates, so a box's area is
  ``(x2 - x1) * (y2 - y1)`` (no "+1" pixel-inclusive correction);
* a detection matches a ground-truth face when their IoU is strictly greater than ``iou``
  (0.5 by default), as in the PASCAL VOC devkit;
* matching is greedy by descending score and one-to-one: each detection takes the
  still-unmatched face it overlaps most; a second detection of an already matched face (a
  duplicate) is a false positive. Greedy-by-score is what AP needs: whether a detection is a
  true positive must not depend on detections that score lower than it.

**FDDB.** The official FDDB evaluator (Jain & Learned-Miller, 2010) compares each detection
region with the annotated *ellipse* (the overlap of a rectangle and an ellipse, computed on a
pixel grid) and pairs detections with faces by a maximum-weight bipartite (Hungarian)
matching. We match axis-aligned boxes against the ellipses' exact bounding boxes
(:func:`veil.eval.fddb.ellipse_to_box`) at IoU > 0.5 with the greedy rule above instead,
because our detectors emit boxes, because the seed document prints VOC-style APs (the
reference data's README gets the seed's 0.93 this way: box IoU against the ellipses' bounding
boxes), because greedy matching is the one AP is defined
with, and because it is exact, vectorised and needs no rasterisation. A box's IoU with the
ellipse's bounding box is not the same number as its overlap with the ellipse itself, and
the two matchers can pair overlapping faces differently, so figures from here (including
:func:`tpr_at_fp`) are close to, not equal to, published FDDB ROC values: compare them with
each other and with the seed document's, not with the FDDB leaderboard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from veil.detections import Detections
from veil.errors import ConfigError, DatasetError

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]


def box_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> Float64Array:
    """Pairwise IoU of ``[N, 4]`` and ``[M, 4]`` xyxy boxes, ``[N, M]`` (continuous areas)."""
    boxes_a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    boxes_b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(boxes_a[:, 2] - boxes_a[:, 0], 0, None) * np.clip(
        boxes_a[:, 3] - boxes_a[:, 1], 0, None
    )
    area_b = np.clip(boxes_b[:, 2] - boxes_b[:, 0], 0, None) * np.clip(
        boxes_b[:, 3] - boxes_b[:, 1], 0, None
    )
    top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    iou: Float64Array = inter / np.maximum(union, 1e-12)
    return iou


def voc_ap(recall: npt.ArrayLike, precision: npt.ArrayLike) -> float:
    """All-point interpolated average precision, as PASCAL VOC 2010+ and the WIDER FACE tool.

    ``recall`` (non-decreasing) and ``precision`` are the points of a precision/recall curve
    in order of decreasing score threshold. Precision is first replaced by its upper envelope
    (the best precision at this or any higher recall), then integrated exactly over recall:
    ``AP = sum_i (r_i - r_{i-1}) * p_interp(r_i)``, with the curve starting at recall 0 and
    dropping to precision 0 after its last point. This differs from the VOC2007 11-point
    approximation, which samples the envelope at recall 0, 0.1, ..., 1.
    """
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ConfigError(f"voc_ap: {rec.size} recall values but {prec.size} precision values")
    if np.isnan(rec).any() or np.isnan(prec).any():
        raise ConfigError("voc_ap: recall and precision must not contain NaN")
    m_rec = np.concatenate(([0.0], rec, [1.0]))
    m_prec = np.concatenate(([0.0], prec, [0.0]))
    m_prec = np.maximum.accumulate(m_prec[::-1])[::-1]
    steps = np.flatnonzero(m_rec[1:] != m_rec[:-1])
    return float(np.sum((m_rec[steps + 1] - m_rec[steps]) * m_prec[steps + 1]))


@dataclass(frozen=True)
class Matching:
    """The outcome of matching one image's detections, each array in the detections' order.

    A detection is a true positive, ignored (it only matched a face marked ``ignore``: neither
    right nor wrong), or otherwise a false positive.
    """

    true_positive: BoolArray
    ignored: BoolArray
    gt_index: IntArray  # the face a detection matched, -1 for none

    @property
    def false_positive(self) -> BoolArray:
        fp: BoolArray = ~(self.true_positive | self.ignored)
        return fp


def match_detections(
    det_boxes: npt.ArrayLike,
    det_scores: npt.ArrayLike,
    gt_boxes: npt.ArrayLike,
    iou: float = 0.5,
    ignore: npt.ArrayLike | None = None,
) -> Matching:
    """Greedy-by-score, one-to-one matching of one image's detections to its faces.

    Detections are visited by descending score (ties keep their input order); each takes the
    unmatched, non-ignored face with the highest IoU above ``iou``. A detection that finds none
    but overlaps an ``ignore`` face above ``iou`` is ignored; ignored faces may absorb any
    number of detections (as COCO's crowd regions do), since they are never counted.
    """
    boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    gts = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) != len(scores):
        raise ConfigError(f"match_detections: {len(boxes)} boxes but {len(scores)} scores")
    ignore_mask = (
        np.zeros(len(gts), dtype=bool)
        if ignore is None
        else np.asarray(ignore, dtype=bool).reshape(-1)
    )
    if len(ignore_mask) != len(gts):
        raise ConfigError(
            f"match_detections: {len(gts)} ground-truth boxes but {len(ignore_mask)} ignore flags"
        )
    true_positive = np.zeros(len(boxes), dtype=bool)
    ignored = np.zeros(len(boxes), dtype=bool)
    gt_index = np.full(len(boxes), -1, dtype=np.int64)
    if len(boxes) == 0 or len(gts) == 0:
        return Matching(true_positive, ignored, gt_index)

    ious = box_iou(boxes, gts)
    overlapping = ious > iou
    taken = ignore_mask.copy()  # ignored faces never take part in one-to-one matching
    order = np.argsort(-scores, kind="stable")
    # Most detections overlap no face at all: they are false positives without a loop.
    for d in order[overlapping[order].any(axis=1)]:
        free = overlapping[d] & ~taken
        if free.any():
            g = int(np.argmax(np.where(free, ious[d], -1.0)))
            true_positive[d] = True
            taken[g] = True
            gt_index[d] = g
        elif (overlapping[d] & ignore_mask).any():
            ignored[d] = True
            gt_index[d] = int(np.argmax(np.where(ignore_mask, ious[d], -1.0)))
    return Matching(true_positive, ignored, gt_index)


@dataclass(frozen=True)
class ScoredDetections:
    """Detections pooled over many images: each one's score and whether it was a true
    positive (ignored detections are left out), and how many faces there were in all."""

    scores: Float64Array
    true_positive: BoolArray
    num_gt: int

    @classmethod
    def from_matching(
        cls, scores: npt.ArrayLike, matching: Matching, num_gt: int
    ) -> ScoredDetections:
        keep = ~matching.ignored
        return cls(
            np.asarray(scores, dtype=np.float64).reshape(-1)[keep],
            matching.true_positive[keep],
            num_gt,
        )

    @classmethod
    def concatenate(cls, parts: Sequence[ScoredDetections]) -> ScoredDetections:
        if not parts:
            return cls(np.zeros(0, np.float64), np.zeros(0, bool), 0)
        return cls(
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.true_positive for p in parts]),
            sum(p.num_gt for p in parts),
        )

    def _cumulative(self) -> tuple[Float64Array, IntArray, IntArray]:
        """Scores by descending value, with running true- and false-positive counts."""
        order = np.argsort(-self.scores, kind="stable")
        tp = self.true_positive[order]
        return self.scores[order], np.cumsum(tp), np.cumsum(~tp)

    def _require_faces(self) -> None:
        if self.num_gt <= 0:
            raise DatasetError("precision/recall is undefined: there are no ground-truth faces")

    def pr_curve(self) -> tuple[Float64Array, Float64Array]:
        """(recall, precision) after each detection, by descending score."""
        self._require_faces()
        _, tp, fp = self._cumulative()
        recall: Float64Array = tp / self.num_gt
        precision: Float64Array = tp / np.maximum(tp + fp, 1)
        return recall, precision

    def average_precision(self) -> float:
        """VOC all-point AP (:func:`voc_ap`) of the pooled detections."""
        recall, precision = self.pr_curve()
        return voc_ap(recall, precision)

    def tpr_at_fp(self, max_fp: int = 1000) -> float:
        """True-positive rate at the lowest score threshold that lets through at most
        ``max_fp`` false positives (detections with equal scores pass or fail together)."""
        if max_fp < 0:
            raise ConfigError(f"max_fp must be non-negative, got {max_fp}")
        self._require_faces()
        scores, tp, fp = self._cumulative()
        if len(scores) == 0:
            return 0.0
        # A threshold can only fall between distinct scores: the end of each tie group.
        group_end = np.append(scores[1:] != scores[:-1], True)
        allowed = np.flatnonzero(group_end & (fp <= max_fp))
        if len(allowed) == 0:
            return 0.0
        return float(tp[allowed[-1]] / self.num_gt)


def score_images(
    per_image_dets: Sequence[Detections],
    per_image_gts: Sequence[npt.ArrayLike],
    iou: float = 0.5,
) -> ScoredDetections:
    """Match every image's detections to its faces (:func:`match_detections`) and pool them."""
    if len(per_image_dets) != len(per_image_gts):
        raise ConfigError(
            f"{len(per_image_dets)} images of detections but {len(per_image_gts)} of ground truth"
        )
    parts = []
    for dets, gt in zip(per_image_dets, per_image_gts, strict=True):
        gt_boxes = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
        matching = match_detections(dets.xyxy, dets.confidence, gt_boxes, iou)
        parts.append(ScoredDetections.from_matching(dets.confidence, matching, len(gt_boxes)))
    return ScoredDetections.concatenate(parts)


def average_precision(
    per_image_dets: Sequence[Detections],
    per_image_gts: Sequence[npt.ArrayLike],
    iou: float = 0.5,
) -> float:
    """VOC all-point AP over a set of images, detections pooled across images (not averaged
    per image): one ranking by score, one precision/recall curve."""
    return score_images(per_image_dets, per_image_gts, iou).average_precision()


def tpr_at_fp(
    per_image_dets: Sequence[Detections],
    per_image_gts: Sequence[npt.ArrayLike],
    iou: float = 0.5,
    max_fp: int = 1000,
) -> float:
    """The FDDB discrete-score figure: the fraction of faces found when the score threshold
    lets through ``max_fp`` false positives in total over all the images given (FDDB quotes
    it at 1000 over its ten folds). Read off the discrete ROC at the largest number of false
    positives not above ``max_fp``. See the module docstring for how this differs from the
    official FDDB matcher."""
    return score_images(per_image_dets, per_image_gts, iou).tpr_at_fp(max_fp)
